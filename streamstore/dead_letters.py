"""The dead-letter stream: what the persister moves aside (an entry that does not decode, or that
history refused too often) with where it came from and why, and what an operator lists and
requeues once the cause is fixed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from redis.typing import EncodableT

from streamstore.deployment import Deployment
from streamstore.errors import ValidationError
from streamstore.models import StreamId

__all__ = ["DeadLetter", "dead_letter_fields", "list_dead_letters", "requeue_dead_letter"]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An entry the persister could not decode or store, moved aside with its reason."""

    id: str
    feed: str
    entry_id: str
    reason: str
    fields: dict[bytes, bytes]


def dead_letter_fields(
    feed: str, entry_id: bytes, fields: Mapping[bytes, bytes], reason: str
) -> list[EncodableT]:
    """A dead letter's fields, as XADD takes them: where it came from, why, and the original
    fields under ``f:`` names."""
    out: list[EncodableT] = ["feed", feed, "id", entry_id, "reason", reason]
    for name, value in fields.items():
        out += [b"f:" + name, value]
    return out


async def list_dead_letters(deployment: Deployment, *, limit: int) -> list[DeadLetter]:
    """The oldest dead letters, with their reasons.

    Raises:
        ConnectionLostError: the server cannot be reached.
    """
    with deployment.redis_errors():
        entries = await deployment.client.xrange(deployment.keys.dead_letters, count=limit)
    return [_decode(entry_id, fields) for entry_id, fields in entries or []]


async def requeue_dead_letter(deployment: Deployment, dead_letter_id: str) -> bool:
    """Put a dead letter's original entry back at the end of its feed; False when there is no
    such dead letter. Requeued first, removed after: on a cluster (two slots, no MULTI) a
    failure between the two requeues it twice, never loses it.

    Raises:
        ValidationError: the id is not a stream id, or the dead letter holds no original.
        ConnectionLostError: the server cannot be reached.
    """
    keys = deployment.keys
    entry = str(StreamId.parse(dead_letter_id))
    with deployment.redis_errors():
        found = await deployment.client.xrange(keys.dead_letters, entry, entry)
        if not found:
            return False
        dead = _decode(*found[0])
        if dead.feed not in keys.feeds() or not dead.fields:
            raise ValidationError(f"dead letter {entry} cannot be requeued (no original)")
        original = [part for pair in dead.fields.items() for part in pair]
        await deployment.topology.together(
            [("XADD", dead.feed, "*", *original)], [("XDEL", keys.dead_letters, entry)]
        )
    return True


def _decode(entry_id: Any, fields: Any) -> DeadLetter:
    """A dead letter from its raw XRANGE entry (bytes ids and fields)."""

    def text(name: bytes) -> str:
        return bytes(fields.get(name, b"")).decode(errors="replace")

    return DeadLetter(
        id=entry_id.decode(),
        feed=text(b"feed"),
        entry_id=text(b"id"),
        reason=text(b"reason"),
        fields={k[2:]: v for k, v in fields.items() if k.startswith(b"f:")},
    )
