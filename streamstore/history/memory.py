"""In-process history (``memory://``): the SQLite store's semantics in dicts and sorted lists.

For tests and throwaway runs; nothing survives the process. Values go through the same JSON
round trip as in SQLite, so what is read back is what SQLite would give back.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence
from typing import Any, Final

import anyio.lowlevel
import orjson

from streamstore.errors import HistoryError
from streamstore.history import RetentionResult, check_retention_limits
from streamstore.models import Message, Session, SessionState, StreamId

__all__ = ["MemoryHistory"]

_MAX_INT64: Final = 2**63 - 1
_STATE_RANK: Final = {SessionState.ACTIVE: 0, SessionState.CLOSED: 1, SessionState.DELETED: 2}


@dataclasses.dataclass(slots=True)
class _SessionLog:
    """One session's messages, kept sorted by stream id."""

    positions: list[StreamId] = dataclasses.field(default_factory=list)
    messages: list[tuple[Message, bytes | None]] = dataclasses.field(default_factory=list)
    ids: set[str] = dataclasses.field(default_factory=set)

    def add(self, message: Message, metadata: bytes | None) -> bool:
        assert message.stream_id is not None
        position = message.stream_id
        if message.id in self.ids:
            return False
        index = bisect.bisect_left(self.positions, position)
        if index < len(self.positions) and self.positions[index] == position:
            return False
        self.positions.insert(index, position)
        self.messages.insert(index, (message, metadata))
        self.ids.add(message.id)
        return True

    def drop_oldest(self, count: int) -> int:
        """Forget the ``count`` messages first in stream-id order; how many there were."""
        dropped = self.messages[:count]
        del self.positions[:count], self.messages[:count]
        self.ids.difference_update(message.id for message, _ in dropped)
        return len(dropped)

    def drop_older_than(self, older_than: float) -> int:
        """Forget the messages with a timestamp below ``older_than``; how many there were."""
        keep = [not message.timestamp < older_than for message, _ in self.messages]
        dropped = keep.count(False)
        if dropped:
            self.positions = [p for p, kept in zip(self.positions, keep, strict=True) if kept]
            self.messages = [m for m, kept in zip(self.messages, keep, strict=True) if kept]
            self.ids = {message.id for message, _ in self.messages}
        return dropped


class MemoryHistory:
    """A :class:`~streamstore.history.HistoryStore` held in this process's memory."""

    def __init__(self) -> None:
        self._open = False
        self._logs: dict[str, _SessionLog] = {}
        self._sessions: dict[str, tuple[Session, bytes]] = {}  # (session, metadata JSON)
        self._session_ids: list[str] = []  # sorted, for list_sessions
        self._total = 0

    async def open(self) -> None:
        """Mark the store usable (it starts empty).

        Raises:
            HistoryError: already open.
        """
        await anyio.lowlevel.checkpoint()
        if self._open:
            raise HistoryError("the memory history is already open")
        self._open = True

    async def close(self) -> None:
        """Mark the store closed; its contents stay for a later open(). Idempotent."""
        await anyio.lowlevel.checkpoint()
        self._open = False

    async def write_batch(
        self, messages: Sequence[Message], sessions: Sequence[Session] = ()
    ) -> int:
        """Store a batch atomically and return how many messages were new.

        See :meth:`streamstore.history.HistoryStore.write_batch`. A deleted session keeps its
        last stream id (the furthest it got) with a count of 0.

        Raises:
            HistoryError: not open, or a message has no stream id or cannot be encoded;
                nothing was written.
        """
        await anyio.lowlevel.checkpoint()
        self._require_open()
        # Encode and check everything first, then apply without awaiting: all or nothing.
        snapshots = [(session, _session_json(session)) for session in sessions]
        encoded = [_freeze_message(message) for message in messages]
        for session, (participants, session_metadata) in snapshots:
            self._upsert_snapshot(session, participants, session_metadata)
            if session.state == SessionState.DELETED:
                self._purge(session.id)
        by_session: dict[str, list[tuple[Message, bytes | None]]] = {}
        for message, metadata in encoded:
            by_session.setdefault(message.session_id, []).append((message, metadata))
        inserted = 0
        for session_id in sorted(by_session):
            entry = self._sessions.get(session_id)
            if entry is not None and entry[0].state == SessionState.DELETED:
                continue  # deleted stays deleted
            group = by_session[session_id]
            self._ensure_session(session_id, min(m.timestamp for m, _ in group))
            log = self._logs.setdefault(session_id, _SessionLog())
            new = [message for message, metadata in group if log.add(message, metadata)]
            if new:
                inserted += len(new)
                self._advance(session_id, new)
        self._total += inserted
        return inserted

    async def read(
        self,
        session_id: str,
        *,
        after: StreamId | None = None,
        before: StreamId | None = None,
        limit: int = 100,
        newest_first: bool = False,
    ) -> list[Message]:
        """Messages of one session with ``after < stream_id < before``, at most ``limit``.

        Raises:
            HistoryError: not open.
        """
        await anyio.lowlevel.checkpoint()
        self._require_open()
        log = self._logs.get(session_id)
        if log is None or limit <= 0:
            return []
        low = 0 if after is None else bisect.bisect_right(log.positions, StreamId(*after))
        high = (
            len(log.positions)
            if before is None
            else bisect.bisect_left(log.positions, StreamId(*before))
        )
        if high <= low:
            return []
        if newest_first:
            window = log.messages[max(low, high - limit) : high][::-1]
        else:
            window = log.messages[low : min(high, low + limit)]
        return [_thaw_message(message, metadata) for message, metadata in window]

    async def get_session(self, session_id: str) -> Session | None:
        """The catalog entry of a session, or None.

        Raises:
            HistoryError: not open.
        """
        await anyio.lowlevel.checkpoint()
        self._require_open()
        entry = self._sessions.get(session_id)
        return None if entry is None else _thaw_session(*entry)

    async def list_sessions(self, *, after: str | None = None, limit: int = 100) -> list[Session]:
        """Catalog entries ordered by session id, starting after ``after``.

        Raises:
            HistoryError: not open.
        """
        await anyio.lowlevel.checkpoint()
        self._require_open()
        if limit <= 0:
            return []
        start = 0 if after is None else bisect.bisect_right(self._session_ids, after)
        ids = self._session_ids[start : start + limit]
        return [_thaw_session(*self._sessions[session_id]) for session_id in ids]

    async def count_messages(self, session_id: str | None = None) -> int:
        """How many messages are stored, in one session or in all.

        Raises:
            HistoryError: not open.
        """
        await anyio.lowlevel.checkpoint()
        self._require_open()
        if session_id is None:
            return self._total
        log = self._logs.get(session_id)
        return 0 if log is None else len(log.positions)

    async def enforce_retention(
        self,
        *,
        older_than: float | None = None,
        max_messages_per_session: int | None = None,
        max_sessions: int | None = None,
    ) -> RetentionResult:
        """Delete what the retention policy no longer keeps and say how much; idempotent.

        See :meth:`streamstore.history.HistoryStore.enforce_retention`; the same passes, in the
        same order, as the SQLite store's, done at once.

        Raises:
            ValidationError: a limit is negative or not a number.
            HistoryError: not open.
        """
        await anyio.lowlevel.checkpoint()
        check_retention_limits(older_than, max_messages_per_session, max_sessions)
        self._require_open()
        messages = sessions = 0
        if max_sessions is not None:
            ended = sorted(
                (session.last_active_at, session.id)
                for session, _ in self._sessions.values()
                if session.state != SessionState.ACTIVE
            )
            for _, session_id in ended[: max(0, len(self._sessions) - max_sessions)]:
                messages += self._purge(session_id)
                del self._sessions[session_id]
                del self._session_ids[bisect.bisect_left(self._session_ids, session_id)]
                sessions += 1
        for session_id, log in list(self._logs.items()):
            dropped = 0
            if older_than is not None:
                dropped += log.drop_older_than(float(older_than))
            if max_messages_per_session is not None:
                dropped += log.drop_oldest(max(0, len(log.positions) - max_messages_per_session))
            if dropped:
                messages += dropped
                self._forget(session_id, dropped)
        return RetentionResult(messages=messages, sessions=sessions)

    # -- catalog rules, the same as the SQLite store's ----------------------------------------

    def _require_open(self) -> None:
        if not self._open:
            raise HistoryError("the memory history is not open (call open() first)")

    def _store_session(self, session: Session, metadata: bytes) -> None:
        if session.id not in self._sessions:
            bisect.insort(self._session_ids, session.id)
        self._sessions[session.id] = (session, metadata)

    def _upsert_snapshot(
        self, snapshot: Session, participants: tuple[str, ...], metadata: bytes
    ) -> None:
        """Take what the publisher owns; never move the state or the activity backwards."""
        entry = self._sessions.get(snapshot.id)
        state = SessionState(snapshot.state)
        ttl = None if snapshot.ttl is None else float(snapshot.ttl)
        if entry is None:
            session = Session(
                id=snapshot.id,
                participants=participants,
                created_at=float(snapshot.created_at),
                last_active_at=float(snapshot.last_active_at),
                ttl=ttl,
                state=state,
            )
        else:
            current = entry[0]
            session = dataclasses.replace(
                current,
                participants=participants,
                created_at=float(snapshot.created_at),
                last_active_at=max(current.last_active_at, float(snapshot.last_active_at)),
                ttl=ttl,
                state=max(current.state, state, key=_STATE_RANK.__getitem__),
            )
        self._store_session(session, metadata)

    def _purge(self, session_id: str) -> int:
        """Forget every message of a session and zero its count (its last stream id stays:
        the furthest the session got); how many there were."""
        log = self._logs.pop(session_id, None)
        dropped = 0 if log is None else len(log.positions)
        self._total -= dropped
        entry = self._sessions.get(session_id)
        if entry is not None and entry[0].message_count:
            session, metadata = entry
            self._sessions[session_id] = (dataclasses.replace(session, message_count=0), metadata)
        return dropped

    def _forget(self, session_id: str, dropped: int) -> None:
        """Count ``dropped`` messages of a session out of the catalog and the total."""
        self._total -= dropped
        entry = self._sessions.get(session_id)
        if entry is not None:
            session, metadata = entry
            count = session.message_count - dropped
            self._sessions[session_id] = (
                dataclasses.replace(session, message_count=count),
                metadata,
            )

    def _ensure_session(self, session_id: str, created_at: float) -> None:
        if session_id not in self._sessions:
            self._store_session(Session(id=session_id, created_at=float(created_at)), b"{}")

    def _advance(self, session_id: str, new: list[Message]) -> None:
        current, metadata = self._sessions[session_id]
        last = max(m.stream_id for m in new if m.stream_id is not None)
        if current.last_stream_id is not None:
            last = max(last, current.last_stream_id)
        session = dataclasses.replace(
            current,
            message_count=current.message_count + len(new),
            last_active_at=max(current.last_active_at, *(m.timestamp for m in new)),
            last_stream_id=last,
        )
        self._sessions[session_id] = (session, metadata)


def _freeze_message(message: Message) -> tuple[Message, bytes | None]:
    """Check a message as SQLite would; return it as SQLite would give it back (metadata apart,
    kept as JSON so no caller can change it in the store)."""
    if message.stream_id is None:
        raise HistoryError(f"message {message.id!r} has no stream id; nothing was written")
    ms, seq = message.stream_id
    if not (abs(ms) <= _MAX_INT64 and abs(seq) <= _MAX_INT64):
        raise HistoryError("a number does not fit SQLite's 64-bit integers")
    texts = (message.id, message.session_id, message.sender, message.recipient, message.content)
    _check_text(*(text for text in texts if text is not None))
    metadata = None if message.metadata is None else _json(message.metadata, message.id)
    frozen = dataclasses.replace(
        message, metadata=None, timestamp=float(message.timestamp), stream_id=StreamId(ms, seq)
    )
    return frozen, metadata


def _session_json(session: Session) -> tuple[tuple[str, ...], bytes]:
    try:
        SessionState(session.state)
    except ValueError:
        raise HistoryError(f"session {session.id!r} has an unknown state") from None
    _check_text(session.id)
    participants = orjson.loads(_json(list(session.participants), session.id))
    return tuple(participants), _json(session.metadata, session.id)


def _check_text(*texts: str) -> None:
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise HistoryError(
                "a message or session holds text that is not valid Unicode (lone surrogate)"
            ) from None


def _json(value: object, owner: str) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError; its text may quote the value, so drop it
        raise HistoryError(f"metadata of {owner!r} is not JSON-serializable") from None


def _thaw_message(message: Message, metadata: bytes | None) -> Message:
    """A copy whose metadata the caller may change without changing the store."""
    if metadata is None:
        return message
    decoded: dict[str, Any] = orjson.loads(metadata)
    return dataclasses.replace(message, metadata=decoded)


def _thaw_session(session: Session, metadata: bytes) -> Session:
    decoded: dict[str, Any] = orjson.loads(metadata)
    return dataclasses.replace(session, metadata=decoded)
