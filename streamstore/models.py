"""The values streamstore hands out: stream positions, messages and sessions, and their id rules."""

from __future__ import annotations

import enum
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from streamstore.errors import ValidationError

__all__ = [
    "ID_PATTERN",
    "STREAM_START",
    "Message",
    "Session",
    "SessionState",
    "StreamId",
    "new_message_id",
    "validate_message_id",
    "validate_name",
    "validate_session_id",
]

ID_PATTERN = r"[A-Za-z0-9_.\-]{1,128}"
"""Session ids: 1 to 128 of ``A-Z a-z 0-9 _ . -``. No ``:``, ``{``, ``}``, glob characters or
whitespace, so an id can never change the meaning of the Redis key it is put in."""

_SESSION_ID = re.compile(ID_PATTERN)
_MESSAGE_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,256}")


class StreamId(NamedTuple):
    """A position in a session: the Redis stream entry id ``<ms>-<seq>``.

    Ordered like the stream; ``str()`` gives the Redis form, :meth:`parse` reads it back.
    """

    ms: int
    seq: int

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"

    @classmethod
    def parse(cls, value: str | bytes | StreamId) -> StreamId:
        """Read ``"<ms>-<seq>"`` (or ``"<ms>"``, meaning ``<ms>-0``).

        Raises:
            ValidationError: the value is not a stream id.
        """
        if isinstance(value, StreamId):
            return value
        if isinstance(value, bytes):  # the hot path: ids read from Redis
            raw_ms, raw_sep, raw_seq = value.partition(b"-")
            if raw_ms.isdigit() and (not raw_sep or raw_seq.isdigit()):
                return cls(int(raw_ms), int(raw_seq) if raw_sep else 0)
            text = value.decode("ascii", "replace")
        else:
            text = value
            ms, sep, seq = text.partition("-")
            if text.isascii() and ms.isdigit() and (not sep or seq.isdigit()):
                return cls(int(ms), int(seq) if sep else 0)
        raise ValidationError(f"not a stream id: {text[:40]!r}")

    def next(self) -> StreamId:
        """The smallest id strictly after this one."""
        return StreamId(self.ms, self.seq + 1)


STREAM_START = StreamId(0, 0)
"""The position before the first message of every session."""


class SessionState(enum.StrEnum):
    """Life cycle of a session: active until closed (idle or by request) or deleted."""

    ACTIVE = "active"
    CLOSED = "closed"
    DELETED = "deleted"


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """One chat message.

    ``id`` is the client's idempotency key (generated when not given); ``stream_id`` is its
    position in the session, assigned by Redis when it is published and identical in history.
    """

    id: str
    session_id: str
    sender: str
    content: str
    recipient: str | None = None
    metadata: dict[str, Any] | None = None
    timestamp: float = 0.0
    stream_id: StreamId | None = None

    def is_for(self, participant: str) -> bool:
        """True when the message is addressed to ``participant`` or to everyone but its sender."""
        if self.recipient is None:
            return self.sender != participant
        return self.recipient == participant


@dataclass(frozen=True, slots=True, kw_only=True)
class Session:
    """A conversation: its participants, activity and retention settings."""

    id: str
    participants: tuple[str, ...] = ()
    created_at: float = 0.0
    last_active_at: float = 0.0
    ttl: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    state: SessionState = SessionState.ACTIVE
    message_count: int = 0
    last_stream_id: StreamId | None = None


def validate_session_id(session_id: object) -> str:
    """Return ``session_id`` if it follows :data:`ID_PATTERN`.

    Raises:
        ValidationError: it is not a str or breaks the rule.
    """
    if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
        raise ValidationError(
            f"invalid session id {_preview(session_id)}: expected 1-128 of A-Z a-z 0-9 _ . -"
        )
    return session_id


def validate_message_id(message_id: object) -> str:
    """Return ``message_id`` if it is 1-128 of ``A-Z a-z 0-9 _ . - :``.

    Raises:
        ValidationError: it is not a str or breaks the rule.
    """
    if not isinstance(message_id, str) or not _MESSAGE_ID.fullmatch(message_id):
        raise ValidationError(
            f"invalid message id {_preview(message_id)}: expected 1-128 of A-Z a-z 0-9 _ . - :"
        )
    return message_id


def validate_name(value: object, what: str) -> str:
    """Return a sender/recipient/participant name: 1-256 characters, no control characters.

    Raises:
        ValidationError: it is not a str, is empty, too long, has control characters or
            cannot be encoded as UTF-8 (a lone surrogate).
    """
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValidationError(
            f"invalid {what}: expected 1-256 printable characters, got {_preview(value)}"
        )
    _require_utf8(value, what)
    return value


def _require_utf8(value: str, what: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(f"{what} is not valid Unicode (lone surrogate)") from None


def _preview(value: object) -> str:
    if isinstance(value, str):
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    return f"of type {type(value).__name__}"


class _IdClock:
    """Millisecond time plus a counter: strictly increasing within this process."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start again under a new random node id."""
        self._lock = threading.Lock()
        self._ms = 0
        self._counter = 0
        self._node = os.urandom(5).hex()

    def next(self) -> str:
        with self._lock:
            ms = time.time_ns() // 1_000_000
            if ms > self._ms:
                self._ms, self._counter = ms, 0
            elif self._counter < 0xFFFF:
                self._counter += 1
            else:  # 65,536 ids in one millisecond: borrow the next one to stay ordered
                self._ms, self._counter = self._ms + 1, 0
            return f"{self._ms:012x}{self._counter:04x}{self._node}"


_clock = _IdClock()
# A forked child would otherwise continue its parent's clock under the same node id and
# generate the ids the parent generates in the same milliseconds.
os.register_at_fork(after_in_child=_clock.reset)


def new_message_id() -> str:
    """A unique, time-ordered message id (26 hex characters).

    Ids generated later sort later, so history's unique index receives keys in ascending
    order (an order of magnitude cheaper in SQLite than random keys).
    """
    return _clock.next()
