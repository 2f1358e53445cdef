"""Durable history: the HistoryStore protocol and the URL-chosen implementations.

``sqlite:///path.db`` (default, embedded), ``postgresql://...`` (many workers on many machines),
``json:///dir`` (human-readable JSON-lines files, one process at a time) and ``memory://``
(tests); each lives in its own module, imported only when its scheme is asked for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol, runtime_checkable
from urllib.parse import urlsplit

from streamstore.errors import ConfigurationError, ValidationError
from streamstore.models import Message, Session, StreamId

__all__ = [
    "SAME_SERVER",
    "HistoryStore",
    "RetentionResult",
    "check_retention_limits",
    "history_from_url",
    "history_url_on",
]

SAME_SERVER: Final = "redis+history://"
"""A history URL naming no server: history kept in the deployment's own Redis (the live tier's
server, embedded or not), under the Redis history store's own keys."""


@runtime_checkable
class HistoryStore(Protocol):
    """What the persister writes to and what replay reads from.

    Messages are unique per ``(session_id, id)`` and per ``(session_id, stream_id)``, and are
    read back in stream-id order. Every method may raise :class:`~streamstore.errors.HistoryError`.
    """

    async def open(self) -> None:
        """Create or check the schema; must be called once before any other method.

        Raises:
            HistoryCorruptError: the database is damaged or is not a streamstore database.
        """

    async def close(self) -> None:
        """Release connections and threads. Idempotent."""

    async def write_batch(
        self, messages: Sequence[Message], sessions: Sequence[Session] = ()
    ) -> int:
        """Store a batch in one transaction and return how many messages were new.

        ``sessions`` are catalog snapshots (created/closed/deleted) applied before the
        messages. Messages already stored (same session and id, or same session and stream
        id) are skipped, so a redelivered batch changes nothing. The catalog's message count,
        last activity and last stream id are updated from the new messages. Either all of it
        commits or none of it does.

        Deleted stays deleted: a snapshot in state ``deleted`` removes every stored message of
        its session (those in this batch included) and sets its count to 0, and messages of a
        session whose catalog state is ``deleted`` are skipped (not stored, not counted).
        """

    async def read(
        self,
        session_id: str,
        *,
        after: StreamId | None = None,
        before: StreamId | None = None,
        limit: int = 100,
        newest_first: bool = False,
    ) -> list[Message]:
        """Messages of one session with ``after < stream_id < before``.

        At most ``limit``, in ascending stream-id order, or descending with ``newest_first``
        (the page nearest ``before``).
        """

    async def get_session(self, session_id: str) -> Session | None:
        """The catalog entry of a session, or None."""

    async def list_sessions(self, *, after: str | None = None, limit: int = 100) -> list[Session]:
        """Catalog entries ordered by session id, starting after ``after``."""

    async def count_messages(self, session_id: str | None = None) -> int:
        """How many messages are stored, in one session or in all."""

    async def enforce_retention(
        self,
        *,
        older_than: float | None = None,
        max_messages_per_session: int | None = None,
        max_sessions: int | None = None,
    ) -> RetentionResult:
        """Delete what the retention policy no longer keeps; idempotent.

        ``older_than``: messages whose timestamp is below it. ``max_messages_per_session``:
        the oldest messages (by stream id) of sessions holding more. ``max_sessions``: the
        least recently active closed or deleted sessions beyond that many sessions in all
        (their catalog rows and messages; active sessions are never removed). Message
        counts are kept exact.
        """


@dataclass(frozen=True, slots=True)
class RetentionResult:
    """What one retention pass deleted."""

    messages: int = 0
    sessions: int = 0


def check_retention_limits(
    older_than: float | None, max_messages_per_session: int | None, max_sessions: int | None
) -> None:
    """Refuse retention limits that are not numbers of the right kind.

    Raises:
        ValidationError: ``older_than`` is not a timestamp, or a cap is not a whole number of
            at least 0.
    """
    if older_than is not None and (
        isinstance(older_than, bool)
        or not isinstance(older_than, int | float)
        or math.isnan(older_than)
    ):
        raise ValidationError("older_than must be a timestamp in seconds")
    for name, value in (
        ("max_messages_per_session", max_messages_per_session),
        ("max_sessions", max_sessions),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValidationError(f"{name} must be a whole number")
        if value is not None and value < 0:
            raise ValidationError(f"{name} must be 0 or more, got {value}")


def history_url_on(history_url: str, redis_url: str) -> str:
    """``history_url``, with :data:`SAME_SERVER` turned into the Redis history URL of the
    server at ``redis_url`` (credentials, database and TLS included).

    Raises:
        ConfigurationError: :data:`SAME_SERVER` with a Redis Cluster or ``memory://``.
    """
    if history_url != SAME_SERVER:
        return history_url
    scheme, _, rest = redis_url.partition("://")
    if "cluster" in scheme:
        raise ConfigurationError("history in Redis itself does not support a Redis Cluster")
    if scheme == "memory":
        raise ConfigurationError(
            "history in Redis itself needs a Redis server, not memory:// (use memory:// history)"
        )
    return f"{scheme}+history://{rest}"


def history_from_url(url: str) -> HistoryStore:
    """Build (not open) the history store named by ``url``.

    Raises:
        ConfigurationError: the scheme is unknown or the URL is malformed.
    """
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        from streamstore.history.sqlite import SQLiteHistory

        return SQLiteHistory.from_url(url)
    if scheme == "memory":
        from streamstore.history.memory import MemoryHistory

        return MemoryHistory()
    if scheme in ("postgresql", "postgres"):
        from streamstore.history.postgres import PostgresHistory

        return PostgresHistory.from_url(url)
    if scheme == "json":
        from streamstore.history.json import JSONHistory

        return JSONHistory.from_url(url)
    if scheme.endswith("+history"):  # redis+history://, rediss+history:// (+cluster refused)
        from streamstore.history.redis_history import RedisHistory

        return RedisHistory.from_url(url)
    raise ConfigurationError(
        f"unknown history URL scheme {scheme!r}: expected sqlite:///path.db, "
        "postgresql://user@host/db, json:///dir, redis+history://host:port/db or memory://"
    )
