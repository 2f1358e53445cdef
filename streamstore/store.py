"""StreamStore: the public facade for sessions, publishing, subscribing and replay."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from typing import Any, Final

import anyio
import orjson
import redis.exceptions

from streamstore.coalescer import MAX_BATCH, PublishBatch, PublishCoalescer
from streamstore.codec import (
    decode_session_meta,
    encode_message,
    encode_metadata,
    encode_session,
    message_from_values,
)
from streamstore.config import Settings
from streamstore.dead_letters import DeadLetter, list_dead_letters, requeue_dead_letter
from streamstore.deployment import Deployment
from streamstore.errors import (
    BackpressureError,
    MessageTooLargeError,
    ServerError,
    SessionClosedError,
    SessionExistsError,
    SessionNotFoundError,
    ValidationError,
    WaitTimeoutError,
    script_refusal,
)
from streamstore.health import HealthReport, check_deployment
from streamstore.history import HistoryStore
from streamstore.keys import Keyspace
from streamstore.models import (
    STREAM_START,
    Message,
    Session,
    SessionState,
    StreamId,
    new_message_id,
    validate_message_id,
    validate_name,
    validate_session_id,
)
from streamstore.redis.connection import Client, is_transient
from streamstore.redis.server_check import ServerInfo
from streamstore.replay import SessionReader
from streamstore.stats import DeploymentStats, read_stats

__all__ = ["StreamStore"]

log = logging.getLogger(__name__)

_DEFAULT: Final = object()
_MESSAGE_FIELDS = frozenset({"sender", "content", "recipient", "metadata", "id", "timestamp"})
Cursor = StreamId | str


class StreamStore:
    """A connection to a streamstore deployment: Redis for the live tier, a history store for
    the durable one. Build it with :meth:`open`."""

    def __init__(self, deployment: Deployment) -> None:
        """A facade over an open deployment (:meth:`open` builds both)."""
        self._deployment = deployment
        self._client = deployment.client
        self._history = deployment.history
        self._scripts = deployment.scripts
        self._window_ms = max(1, int(deployment.settings.dedup_window_s * 1000))
        self._publisher = PublishCoalescer(
            deployment.topology,
            self._scripts.publish,
            high_water=deployment.settings.max_lag,
            dedup_lifetime_ms=2 * self._window_ms + 1000,
        )
        self._reader = SessionReader(deployment)

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        redis_url: str | None = None,
        history_url: str | None = None,
        *,
        settings: Settings | None = None,
        **options: Any,
    ) -> AsyncIterator[StreamStore]:
        """Connect (starting the embedded server when no Redis URL is given) and open history.

        Settings come from ``settings`` or ``STREAMSTORE_*`` variables, then ``options`` and
        the two URLs on top.

        Raises:
            ConfigurationError: settings are invalid, or the partition count differs from the
                deployment's.
            EmbeddedServerError: no server binary, or it failed to start.
            UnsafeServerError: the server may evict keys (:class:`EvictionPolicyError`) or
                would drop the scripts' writes on restart (:class:`ScriptReplayError`); see
                ``eviction_check``.
            ConnectionLostError: the server cannot be reached.
            HistoryError: the history store cannot be opened.
        """
        base = settings if settings is not None else Settings.from_env()
        if redis_url is not None:
            options["redis_url"] = redis_url
        if history_url is not None:
            options["history_url"] = history_url
        resolved = base.replace(**options) if options else base
        async with Deployment.open(resolved) as deployment:
            store = cls(deployment)
            try:
                yield store
            finally:
                with anyio.CancelScope(shield=True):
                    await store._publisher.release()

    @property
    def deployment(self) -> Deployment:
        """The deployment this facade publishes to and reads from (give it to a
        :class:`~streamstore.Persister` or :class:`~streamstore.Sweeper` in this process)."""
        return self._deployment

    @property
    def settings(self) -> Settings:
        """The settings the store was opened with."""
        return self._deployment.settings

    @property
    def keys(self) -> Keyspace:
        """Every Redis key of the deployment."""
        return self._deployment.keys

    @property
    def server(self) -> ServerInfo:
        """What the server checks found when the store connected."""
        return self._deployment.server

    @property
    def url(self) -> str:
        """The Redis URL in use (the embedded server's when none was configured)."""
        return self._deployment.url

    @property
    def history_store(self) -> HistoryStore:
        """The durable tier (shared with a persister running in this process)."""
        return self._history

    @property
    def client(self) -> Client:
        """The redis-py client (shared with a persister running in this process): a
        ``RedisCluster`` for a ``redis+cluster://`` URL."""
        return self._client

    # -- sessions ---------------------------------------------------------------------------

    async def create_session(
        self,
        participants: Iterable[str] = (),
        *,
        id: str | None = None,
        ttl: float | object | None = _DEFAULT,
        metadata: Mapping[str, Any] | None = None,
    ) -> Session:
        """Create an active session.

        Args:
            participants: names taking part (informational; anyone may publish).
            id: the session id (default: a new time-ordered id).
            ttl: idle seconds before the sweeper closes it (default ``settings.session_ttl``,
                None: never).
            metadata: a JSON object stored with the session.

        Raises:
            ValidationError: a bad id, participant, ttl or metadata.
            SessionExistsError: the id is taken (in Redis or in history).
        """
        session_id = validate_session_id(id) if id is not None else new_message_id()
        names = tuple(validate_name(p, "participant") for p in participants)
        ttl_s = self.settings.session_ttl_s if ttl is _DEFAULT else ttl
        if ttl_s is not None and (
            isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float) or ttl_s <= 0
        ):
            raise ValidationError("ttl must be a positive number of seconds or None")
        meta_json = encode_metadata(_plain(metadata or {}))
        if id is not None and await self._history.get_session(session_id) is not None:
            raise SessionExistsError(session_id)
        now = time.time()
        session = Session(
            id=session_id,
            participants=names,
            created_at=now,
            last_active_at=now,
            ttl=None if ttl_s is None else float(ttl_s),
            metadata=orjson.loads(meta_json),
        )
        keys = self.keys.session(session_id)
        try:
            with self._deployment.redis_errors():
                await self._scripts.create_session(
                    keys=[keys.meta, keys.index, keys.deadlines, keys.feed],
                    args=[
                        session_id,
                        repr(now),
                        orjson.dumps(list(names)),
                        "" if session.ttl is None else repr(session.ttl),
                        meta_json,
                        encode_session(session),
                    ],
                )
        except Exception as exc:
            _raise_script_error(exc, session_id)
            raise
        return session

    async def get_session(self, session_id: str) -> Session:
        """The session, from Redis while it is live, else from the history catalog.

        Raises:
            ValidationError: the id is malformed.
            SessionNotFoundError: neither tier knows it.
        """
        validate_session_id(session_id)
        with self._deployment.redis_errors():
            meta = await self._client.hgetall(self.keys.session(session_id).meta)
        if meta:
            return decode_session_meta(session_id, meta)
        stored = await self._history.get_session(session_id)
        if stored is None:
            raise SessionNotFoundError(session_id)
        return stored

    async def list_sessions(self, *, after: str | None = None, limit: int = 100) -> list[Session]:
        """Sessions ordered by id, live ones and those only in history, ``limit`` per page;
        pass the last id of a page as ``after`` for the next one. No keyspace SCAN is used.

        Raises:
            ValidationError: ``limit`` is not positive or ``after`` is malformed.
        """
        if limit < 1:
            raise ValidationError("limit must be positive")
        start = b"-" if after is None else b"(" + validate_session_id(after).encode()
        with self._deployment.redis_errors():
            async with self._client.pipeline(transaction=False) as pipe:
                for p in range(self.keys.partitions):
                    pipe.zrangebylex(self.keys.index(p), start, b"+", start=0, num=limit)
                pages: list[list[bytes]] = await pipe.execute()
        live = {sid.decode() for page in pages for sid in page}
        stored = {s.id: s for s in await self._history.list_sessions(after=after, limit=limit)}
        ids = sorted(live | stored.keys())[:limit]
        # Redis is the truth while it holds a session's meta (tombstones included): history's
        # catalog learns of a close or delete only when the persister reaches it.
        with self._deployment.redis_errors():
            async with self._client.pipeline(transaction=False) as pipe:
                for sid in ids:
                    pipe.hgetall(self.keys.session(sid).meta)
                metas: list[dict[bytes, bytes]] = await pipe.execute()
        return [
            decode_session_meta(sid, meta) if meta else stored[sid]
            for sid, meta in zip(ids, metas, strict=True)
            if meta or sid in stored
        ]

    async def close_session(self, session_id: str) -> Session:
        """Close a session: it accepts no more messages; its messages stay readable, and its
        Redis keys are retired by the sweeper once everything is persisted. Idempotent.

        Raises:
            ValidationError: the id is malformed.
            SessionNotFoundError: no live session has this id.
            SessionClosedError: the session was deleted.
        """
        return await self._end(session_id, SessionState.CLOSED)

    async def delete_session(self, session_id: str) -> None:
        """Delete a session in both tiers: its stream goes now, its history when the persister
        reaches the deletion (after every message published before it). A late publish is
        refused with SessionClosedError and never recreates it. Idempotent.

        Raises:
            ValidationError: the id is malformed.
            SessionNotFoundError: the session is unknown.
        """
        await self._end(session_id, SessionState.DELETED)

    async def _end(self, session_id: str, state: SessionState) -> Session:
        current = await self.get_session(session_id)
        if current.state is SessionState.DELETED and state is SessionState.CLOSED:
            raise SessionClosedError(session_id, "deleted")
        ended = dataclasses.replace(current, state=state, last_active_at=time.time())
        with self._deployment.redis_errors():
            previous = await self._scripts.end_session(
                self.keys,
                ended,
                now=ended.last_active_at,
                tombstone_ms=self.settings.tombstone_ms,
            )
        if previous is None and current.state is not state:
            # Only in history (its Redis keys were retired): record the change there directly.
            await self._history.write_batch([], [ended])
        return ended

    # -- publishing -------------------------------------------------------------------------

    async def publish(
        self,
        session_id: str,
        *,
        sender: str,
        content: str,
        recipient: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        id: str | None = None,
        timestamp: float | None = None,
    ) -> Message:
        """Append one message to a session; when this returns, the message is in Redis (session
        stream and partition feed) and will reach history exactly once.

        A repeated ``id`` within ``dedup_window`` is not stored again: the first message's
        stream id is returned.

        Raises:
            ValidationError: bad session id, sender, recipient, content, metadata or id.
            MessageTooLargeError: the encoded message exceeds ``max_message_bytes``.
            SessionNotFoundError: no live session has this id.
            SessionClosedError: the session is closed or deleted.
            BackpressureError: the server is out of memory, or persistence lags (after
                waiting ``max_block``).
            ConnectionLostError: the server cannot be reached.
            ServerError: the server refused the script; on a cluster, also a cluster still
                down or still moving the session's slot after ``max_block``.
        """
        draft = self._draft(
            validate_session_id(session_id),
            sender=sender,
            content=content,
            recipient=recipient,
            metadata=metadata,
            id=id,
            timestamp=timestamp,
        )
        (message,) = await self._publish_drafts(session_id, [draft], fresh=id is None)
        return message

    async def publish_many(
        self, session_id: str, messages: Iterable[Mapping[str, Any]]
    ) -> list[Message]:
        """Append several messages to one session in one atomic round trip.

        Each item holds the keyword arguments of :meth:`publish`. Every item is validated
        before anything is written; then all of them are stored, or none. One call takes at
        most 1,000 messages (one script call holds the server while it runs).

        Raises:
            ValidationError: an item is malformed, or there are more than 1,000 (nothing is
                written).
            MessageTooLargeError: an item is too large (nothing is written).
            SessionNotFoundError, SessionClosedError, BackpressureError, ConnectionLostError,
            ServerError: as for :meth:`publish`.
        """
        validate_session_id(session_id)
        drafts = []
        fresh = True  # every id generated here
        for spec in messages:
            unknown = spec.keys() - _MESSAGE_FIELDS
            if unknown:
                raise ValidationError(f"unknown message fields: {sorted(unknown)}")
            drafts.append(self._draft(session_id, **spec))
            fresh = fresh and spec.get("id") is None
            if len(drafts) > MAX_BATCH:
                raise ValidationError(f"publish_many takes at most {MAX_BATCH} messages a call")
        if not drafts:
            return []
        return await self._publish_drafts(session_id, drafts, fresh=fresh)

    async def _publish_drafts(
        self, session_id: str, drafts: list[tuple[Message, bytes]], *, fresh: bool
    ) -> list[Message]:
        """Publish validated drafts, retrying while the partition lags or the cluster moves,
        up to ``max_block``; returns the messages with their stream ids. ``fresh``: their ids
        were all generated here (see :class:`~streamstore.coalescer.PublishBatch`); only the
        first try may count on it."""
        deadline = time.monotonic() + self.settings.max_block_s
        delay = 0.005
        while True:
            try:
                reply = await self._publish_once(session_id, drafts, fresh=fresh)
                break
            except (BackpressureError, ServerError) as exc:
                # a full or lagging partition, or a cluster that is down or moving a slot
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (isinstance(exc, ServerError) and not is_transient(exc)):
                    raise
                await anyio.sleep(min(delay, remaining))
                delay = min(delay * 2, 0.25)
                fresh = False
        for (message, _), stream_id in zip(drafts, reply[::2], strict=True):
            # The drafts have not left this store: give each its stream id in place rather
            # than copying its eight fields into a new frozen Message.
            object.__setattr__(message, "stream_id", StreamId.parse(stream_id))
        return [message for message, _ in drafts]

    async def _publish_once(
        self, session_id: str, drafts: list[tuple[Message, bytes]], *, fresh: bool
    ) -> list[bytes]:
        keys = self.keys.session(session_id)
        bucket = int(time.time() * 1000) // self._window_ms
        pairs: list[str | bytes] = []
        for message, payload in drafts:
            pairs.append(message.id)
            pairs.append(payload)
        batch = PublishBatch(
            keys=(
                keys.meta,
                keys.stream,
                keys.feed,
                keys.deadlines,
                self.keys.dedup(keys.partition, bucket),
                self.keys.dedup(keys.partition, bucket - 1),
            ),
            session_id=session_id,
            pairs=pairs,
            partition=keys.partition,
            fresh=fresh,
        )
        try:
            with self._deployment.redis_errors():
                return await self._publisher.publish(batch)
        except Exception as exc:
            _raise_script_error(exc, session_id)
            raise

    def _draft(
        self,
        session_id: str,
        *,
        sender: object = None,
        content: object = None,
        recipient: object = None,
        metadata: object = None,
        id: object = None,
        timestamp: object = None,
    ) -> tuple[Message, bytes]:
        """A validated message (without its stream id yet) and its encoded payload.

        Raises:
            ValidationError, MessageTooLargeError: as for :meth:`publish`.
        """
        if not isinstance(content, str):
            raise ValidationError(f"content must be a str, not {type(content).__name__}")
        if len(content) > self.settings.max_message_bytes:  # cheap early bound (chars <= bytes)
            raise MessageTooLargeError(
                f"content is larger than max_message_bytes ({self.settings.max_message_bytes})"
            )
        if timestamp is not None and (
            isinstance(timestamp, bool) or not isinstance(timestamp, int | float)
        ):
            raise ValidationError("timestamp must be a number of seconds")
        # Every value is checked here: build the Message without the frozen dataclass's
        # __init__ (publish_many: ~7.8 -> ~7.0 µs of client CPU a message).
        message = message_from_values(
            new_message_id() if id is None else validate_message_id(id),
            session_id,
            validate_name(sender, "sender"),
            content,
            None if recipient is None else validate_name(recipient, "recipient"),
            None if metadata is None else orjson.loads(encode_metadata(_plain(metadata))),
            time.time() if timestamp is None else float(timestamp),
            None,
        )
        payload = encode_message(message)
        if len(payload) > self.settings.max_message_bytes:
            raise MessageTooLargeError(
                f"message {message.id} is {len(payload)} bytes encoded, over max_message_bytes "
                f"({self.settings.max_message_bytes})"
            )
        return message, payload

    # -- operations -------------------------------------------------------------------------

    async def stats(self) -> DeploymentStats:
        """A snapshot of feeds, groups, sessions, dead letters and server memory.

        Raises:
            ConnectionLostError: the server cannot be reached.
            PermissionDeniedError: this Redis user may not read them (XINFO, ZCARD).
        """
        return await read_stats(self._deployment)

    async def check(
        self, *, acknowledge_data_loss: bool = False, now: float | None = None
    ) -> HealthReport:
        """Whether the deployment is healthy, with the reasons if not and warnings: what
        ``streamstore check`` reports (see :func:`streamstore.health.check_deployment`).

        Raises:
            Nothing for an unhealthy deployment (that is the report's content).
        """
        return await check_deployment(
            self._deployment, acknowledge_data_loss=acknowledge_data_loss, now=now
        )

    async def acknowledge_data_loss(self) -> None:
        """Clear the record of a past loss of the server's data (``stats().data_lost_at``),
        once an operator has reviewed it.

        Raises:
            ConnectionLostError: the server cannot be reached.
        """
        with self._deployment.redis_errors():
            await self._client.hdel(self.keys.deployment, "data_lost_at")

    async def dead_letters(self, *, limit: int = 100) -> list[DeadLetter]:
        """The oldest dead-lettered entries, with their reasons.

        Raises:
            ConnectionLostError: the server cannot be reached.
        """
        return await list_dead_letters(self._deployment, limit=limit)

    async def requeue_dead_letter(self, dead_letter_id: str) -> bool:
        """Put a dead-lettered entry back at the end of its feed (after the cause is fixed);
        returns False when there is no such dead letter.

        Raises:
            ValidationError: the id is not a stream id, or the entry holds no original.
            ConnectionLostError: the server cannot be reached.
        """
        return await requeue_dead_letter(self._deployment, dead_letter_id)

    # -- reading ----------------------------------------------------------------------------

    def subscribe(
        self,
        session_id: str,
        *,
        after: Cursor = "$",
        recipient: str | None = None,
    ) -> AsyncGenerator[Message, None]:
        """Live messages of a session, from now (``after="$"``) or after a cursor, until the
        session closes. Survives dropped connections without losing or repeating a message.

        Raises:
            ValidationError: bad session id, cursor or recipient.
            SessionNotFoundError: the session is unknown.
            ConnectionLostError: the server stayed unreachable for ``reconnect_timeout``.
        """
        return self._read(session_id, after, follow=True, recipient=recipient)

    def replay(
        self,
        session_id: str,
        *,
        after: Cursor | None = None,
        follow: bool = False,
        recipient: str | None = None,
    ) -> AsyncGenerator[Message, None]:
        """Every message after ``after`` (default: from the start), from history and then
        Redis, in stream-id order, each exactly once; with ``follow``, continue live.

        Raises:
            ValidationError: bad session id or cursor.
            SessionNotFoundError: the session is unknown.
            ConnectionLostError: the server stayed unreachable for ``reconnect_timeout``.
        """
        start = after if after is not None else STREAM_START
        return self._read(session_id, start, follow=follow, recipient=recipient)

    async def _read(
        self, session_id: str, after: Cursor, *, follow: bool, recipient: str | None
    ) -> AsyncGenerator[Message, None]:
        start = await self._resolve(session_id, after)
        pages = self._reader.follow(session_id, after=start, follow=follow)
        async with contextlib.aclosing(pages):
            async for page in pages:
                for message in page:
                    if recipient is None or message.is_for(recipient):
                        yield message

    async def history(
        self,
        session_id: str,
        *,
        limit: int = 50,
        before: Cursor | None = None,
        after: Cursor | None = None,
    ) -> list[Message]:
        """A window of at most ``limit`` messages in ascending order: the first ones after
        ``after``, or the last ones before ``before`` (default: the newest).

        Raises:
            ValidationError: bad arguments, or both ``before`` and ``after``.
            SessionNotFoundError: the session is unknown.
        """
        if limit < 1:
            raise ValidationError("limit must be positive")
        if before is not None and after is not None:
            raise ValidationError("give before or after, not both")
        await self._resolve(session_id, STREAM_START)
        return await self._reader.page(
            session_id,
            limit=limit,
            before=None if before is None else _cursor(before),
            after=None if after is None else _cursor(after),
        )

    async def wait_for(
        self,
        session_id: str,
        *,
        recipient: str,
        timeout: float,
        after: Cursor = "$",
    ) -> Message:
        """The next message for ``recipient`` (addressed to it, or to everyone by someone
        else). Pass the stream id of your own question as ``after`` so that a reply that
        arrives before this call starts is not missed.

        Raises:
            WaitTimeoutError: none arrived within ``timeout`` seconds.
            SessionNotFoundError: the session is unknown.
        """
        validate_name(recipient, "recipient")
        with anyio.move_on_after(timeout):
            messages = self.subscribe(session_id, after=after, recipient=recipient)
            async with contextlib.aclosing(messages):
                async for message in messages:
                    return message
        raise WaitTimeoutError(f"no message for {recipient!r} in session {session_id!r}")

    async def _resolve(self, session_id: str, after: Cursor) -> StreamId:
        """Check that the session exists and turn ``after`` into a concrete position."""
        validate_session_id(session_id)
        with self._deployment.redis_errors():
            meta = await self._client.hmget(
                self.keys.session(session_id).meta, ["state", "last_id"]
            )
        state, last_id = meta
        if state is None:
            stored = await self._history.get_session(session_id)
            if stored is None:
                raise SessionNotFoundError(session_id)
            state = str(stored.state).encode()
        if state == b"deleted":
            raise SessionClosedError(session_id, "deleted")
        if after == "$":
            if last_id is not None:
                return StreamId.parse(last_id)
            stored = await self._history.get_session(session_id)
            return (stored.last_stream_id if stored else None) or STREAM_START
        return _cursor(after)


def _plain(metadata: object) -> object:
    """A mapping as a dict (anything else is left for encode_metadata to refuse)."""
    return dict(metadata) if isinstance(metadata, Mapping) else metadata


def _cursor(value: Cursor) -> StreamId:
    if isinstance(value, str) and value == "0":
        return STREAM_START
    return StreamId.parse(value)


def _raise_script_error(exc: BaseException, session_id: str) -> None:
    """Raise the typed error of a script's own refusal (others propagate unchanged)."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    if isinstance(cause, redis.exceptions.ResponseError):
        refusal = script_refusal(str(cause), session_id)
        if refusal is not None:
            raise refusal from None
