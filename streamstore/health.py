"""Worker health as other processes see it: each running persister keeps an entry in the
deployment's workers hash (when its history writes began failing, and why); this reads them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import orjson
from redis.asyncio import Redis, RedisCluster

from streamstore.errors import translate_redis_errors
from streamstore.keys import Keyspace

__all__ = ["STALE_AFTER", "STATUS_INTERVAL", "WorkerHealth", "encode_status", "worker_health"]

STATUS_INTERVAL: Final = 5.0
"""How often a running persister rewrites its entry (and at once when its state changes)."""
STALE_AFTER: Final = 600.0
"""An entry not rewritten for this long belongs to a worker that is gone or cut off from Redis:
reported as stale, whatever it said last."""


@dataclass(frozen=True, slots=True)
class WorkerHealth:
    """One worker's last report, judged at ``now``.

    Attributes:
        consumer: the worker's consumer name (the hash field).
        updated_at: when it last wrote its entry (wall clock, seconds; 0.0 if unreadable).
        failing_since: since when its history writes have been failing, or None.
        reason: the last history error it met while failing, or None.
        stale: the entry was not rewritten for ``stale_after`` (or is unreadable): the worker
            is gone or cannot reach Redis, so its state is unknown, not failing.
        healthy: False when a fresh entry says history writes have been failing for longer
            than ``unhealthy_after``; True otherwise (stale entries included: see ``stale``).
    """

    consumer: str
    updated_at: float
    failing_since: float | None
    reason: str | None
    stale: bool
    healthy: bool

    def describe(self, now: float) -> str:
        """One line for people: what this worker's entry says at ``now``."""
        if self.stale:
            return f"worker {self.consumer}: no report since {_iso(self.updated_at)} (stale)"
        if self.failing_since is None:
            return f"worker {self.consumer}: history writes succeed"
        return (
            f"worker {self.consumer}: history writes failing for "
            f"{max(0.0, now - self.failing_since):.0f} s (since {_iso(self.failing_since)}): "
            f"{self.reason or 'no reason given'}"
        )


def encode_status(*, updated_at: float, failing_since: float | None, reason: str | None) -> bytes:
    """A worker's entry in the workers hash: ``{"updated_at", "failing_since", "reason"}``."""
    return orjson.dumps(
        {"updated_at": updated_at, "failing_since": failing_since, "reason": reason}
    )


def judge(
    consumer: str, value: bytes | str, *, now: float, unhealthy_after: float, stale_after: float
) -> WorkerHealth:
    """Classify one entry of the workers hash at ``now`` (an unreadable one is stale)."""
    try:
        fields = orjson.loads(value)
        updated_at = _number(fields["updated_at"])
        failing_since = fields.get("failing_since")
        failing_since = None if failing_since is None else _number(failing_since)
        reason = fields.get("reason")
        reason = None if reason is None else str(reason)[:500]
    except (orjson.JSONDecodeError, TypeError, KeyError, ValueError, AttributeError):
        return WorkerHealth(consumer, 0.0, None, "unreadable status entry", True, True)
    stale = now - updated_at > stale_after
    failing = failing_since is not None and now - failing_since > unhealthy_after
    return WorkerHealth(
        consumer, updated_at, failing_since, reason, stale, healthy=stale or not failing
    )


async def worker_health(
    client: Redis | RedisCluster,
    keys: Keyspace,
    *,
    now: float,
    unhealthy_after: float = 30.0,
    stale_after: float = STALE_AFTER,
) -> list[WorkerHealth]:
    """Every worker's entry in the workers hash, judged at ``now`` (wall clock, seconds),
    ordered by consumer name.

    A worker is unhealthy when its entry, rewritten less than ``stale_after`` ago, says its
    history writes have been failing for longer than ``unhealthy_after`` seconds (use its
    ``PersisterSettings.unhealthy_after_s``). Workers that stop gracefully remove their entry;
    killed ones leave it to go stale.

    Raises:
        ConnectionLostError: Redis cannot be reached.
        ServerError: Redis refused the read (PermissionDeniedError: the user lacks HGETALL).
    """
    with translate_redis_errors():
        entries = await client.hgetall(keys.workers)
    out = []
    for field, value in entries.items():
        consumer = field.decode(errors="replace") if isinstance(field, bytes) else str(field)
        out.append(
            judge(
                consumer, value, now=now, unhealthy_after=unhealthy_after, stale_after=stale_after
            )
        )
    return sorted(out, key=lambda health: health.consumer)


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError("not a time")
    return float(value)


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")
