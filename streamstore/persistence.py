"""The session-persistence surface that multi-agent scripts call: ``SessionPersistence`` (plain
synchronous code, safe from threads) and ``AsyncSessionPersistence`` (the same methods,
awaited), with the seeds' names (``ChatMessage``, ``ChatSession``, ``add_message``,
``get_messages`` ...).

Both are a thin façade over :class:`~streamstore.StreamStore`, not a second implementation:
a message added here goes through the same publish script, the same persister and the same
history as any other, and the guarantees hold unchanged. Each façade runs a persister of its
own in the background, so that a script needs no separate worker; several may run at once on
one deployment (they share its consumer group).

``SessionPersistence`` owns one event loop in one thread for its whole life (an anyio blocking
portal), never one per call; any number of threads may call it at once. Called from inside an
event loop it still works (the work runs on its own loop), but it blocks that loop while it
waits: in async code use ``AsyncSessionPersistence``.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Self, TypeVar

import anyio
from anyio.abc import TaskStatus
from anyio.from_thread import BlockingPortal

from streamstore.config import PersisterSettings, Settings, SweeperSettings
from streamstore.errors import ConfigurationError, SessionNotFoundError
from streamstore.history import SAME_SERVER
from streamstore.models import Message, Session, SessionState
from streamstore.store import StreamStore
from streamstore.workers.persister import Persister
from streamstore.workers.sweeper import Sweeper

__all__ = [
    "AsyncSessionPersistence",
    "ChatMessage",
    "ChatSession",
    "PersistenceConfig",
    "SessionPersistence",
]

log = logging.getLogger(__name__)

StorageType = Literal["sqlite", "json", "redis", "memory", "postgres"]
_STORAGE_TYPES: Final = ("sqlite", "json", "redis", "memory", "postgres")
_BACKUP_INTERVALS: Final = ("hourly", "daily")
_T = TypeVar("_T")


@dataclass(frozen=True, kw_only=True, slots=True)
class ChatMessage:
    """A message as session-persistence scripts know it; ``stream_id`` is its position once
    stored (``None`` before)."""

    id: str
    session_id: str
    sender: str
    content: str
    recipient: str | None = None
    timestamp: float = 0.0
    metadata: dict[str, Any] | None = None
    stream_id: str | None = None

    @classmethod
    def of(cls, message: Message) -> ChatMessage:
        """The chat message of a streamstore message."""
        return cls(
            id=message.id,
            session_id=message.session_id,
            sender=message.sender,
            content=message.content,
            recipient=message.recipient,
            timestamp=message.timestamp,
            metadata=message.metadata,
            stream_id=None if message.stream_id is None else str(message.stream_id),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class ChatSession:
    """A session as session-persistence scripts know it."""

    session_id: str
    participants: list[str] = field(default_factory=list)
    created_at: float = 0.0
    last_activity: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)
    state: str = "active"
    message_count: int = 0

    @classmethod
    def of(cls, session: Session) -> ChatSession:
        """The chat session of a streamstore session."""
        return cls(
            session_id=session.id,
            participants=list(session.participants),
            created_at=session.created_at,
            last_activity=session.last_active_at,
            metadata=dict(session.metadata),
            state=str(session.state),
            message_count=session.message_count,
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class PersistenceConfig:
    """The seeds' configuration keys, plus streamstore's own settings.

    Attributes:
        storage_type: ``sqlite`` (default), ``json`` (readable files), ``redis`` (history in
            the Redis server itself), ``memory`` (everything in this process, no server at
            all unless ``redis_url`` is given: nothing survives the process) or
            ``postgres`` (``history_url`` names the database).
        storage_path: the directory holding the history and the embedded server's data.
        cleanup_days: ``cleanup()`` deletes messages older than this (None: never).
        max_sessions: ``cleanup()`` keeps at most this many sessions (ended ones go first).
        max_messages_per_session: ``cleanup()`` keeps at most this many per session.
        backup_enabled, backup_interval: accepted for the seeds' configurations; scheduled
            backups are not run by this version (a warning says so).
        settings: streamstore's own settings (Redis URL, partitions, ...); their
            ``history_url`` is set from the storage type unless ``storage_type`` is
            ``postgres``.
    """

    storage_type: StorageType = "sqlite"
    storage_path: str = "sessions"
    cleanup_days: float | None = None
    max_sessions: int | None = None
    max_messages_per_session: int | None = None
    backup_enabled: bool = False
    backup_interval: str = "daily"
    settings: Settings = field(default_factory=Settings.from_env)

    def __post_init__(self) -> None:
        if self.storage_type not in _STORAGE_TYPES:
            raise ConfigurationError(
                f"storage_type must be one of {', '.join(_STORAGE_TYPES)}, "
                f"not {str(self.storage_type)[:20]!r}"
            )
        if self.backup_interval not in _BACKUP_INTERVALS:
            raise ConfigurationError(
                f"backup_interval must be 'hourly' or 'daily', not {self.backup_interval!r}"
            )
        if self.cleanup_days is not None and not self.cleanup_days > 0:
            raise ConfigurationError("cleanup_days must be a positive number of days or None")
        # Validated by the sweeper's own settings, built once here.
        self.sweeper_settings()

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any], **overrides: Any) -> PersistenceConfig:
        """A configuration from a seed's dictionary (``PRODUCTION_CONFIG`` and the like):
        its keys are this class's fields or streamstore settings (``redis_url``, ...).

        Raises:
            ConfigurationError: a key is unknown (named in the message) or a value unusable.
        """
        own = {f.name for f in dataclasses.fields(cls)} - {"settings"}
        setting_names = {f.name for f in dataclasses.fields(Settings)}
        values = {**config, **overrides}
        unknown = sorted(set(values) - own - setting_names)
        if unknown:
            raise ConfigurationError(
                f"unknown session-persistence setting {unknown[0]!r}: expected one of "
                f"{', '.join(sorted(own))}, or a streamstore setting"
            )
        settings = Settings.from_env(**{k: v for k, v in values.items() if k in setting_names})
        return cls(settings=settings, **{k: v for k, v in values.items() if k in own})

    def sweeper_settings(self) -> SweeperSettings:
        """What ``cleanup()`` enforces."""
        return SweeperSettings(
            retention=None if self.cleanup_days is None else self.cleanup_days * 86_400,
            max_sessions=self.max_sessions,
            max_messages_per_session=self.max_messages_per_session,
        )

    def store_settings(self) -> Settings:
        """streamstore's settings for this storage type.

        Raises:
            ConfigurationError: ``postgres`` without a ``postgresql://`` history URL.
        """
        root = Path(self.storage_path)
        if self.storage_type == "postgres":
            if not self.settings.history_url.startswith(("postgresql://", "postgres://")):
                raise ConfigurationError(
                    "storage_type 'postgres' needs history_url=postgresql://user@host/db"
                )
            return self.settings
        if self.storage_type == "memory":  # an in-process server of its own, unless a URL is given
            return self.settings.replace(
                redis_url=self.settings.redis_url or "memory://", history_url="memory://"
            )
        if self.storage_type == "json":
            return self.settings.replace(
                history_url=f"json:///{root.absolute()}", embedded_dir=str(root / "redis")
            )
        if self.storage_type == "redis":
            return self.settings.replace(history_url=SAME_SERVER, embedded_dir=str(root / "redis"))
        return self.settings.replace(
            history_url=f"sqlite:///{(root / 'history.db').absolute()}",
            embedded_dir=str(root / "redis"),
        )


class AsyncSessionPersistence:
    """The session-persistence API, awaited; open it with ``async with``."""

    def __init__(self, config: PersistenceConfig | None = None, **options: Any) -> None:
        """Settings from ``config``, or from the seeds' keyword arguments (``storage_type``,
        ``storage_path``, ``cleanup_days`` ...) and streamstore settings.

        Raises:
            ConfigurationError: an unknown option or an unusable value.
        """
        self.config = config if config is not None else PersistenceConfig.from_mapping(options)
        self._stack: contextlib.AsyncExitStack | None = None
        self._store: StreamStore | None = None
        self._stopping: anyio.Event | None = None
        if self.config.backup_enabled:
            log.warning(
                "backup_enabled: scheduled backups are not run by this version of streamstore; "
                "back the history up yourself (deploy/README.md)"
            )

    async def __aenter__(self) -> Self:
        """Open the deployment (starting its embedded server when no Redis URL is set) and
        start persisting in the background.

        Raises:
            StreamStoreError: as :meth:`StreamStore.open` raises.
        """
        async with contextlib.AsyncExitStack() as stack:
            if self.config.storage_type != "memory":
                root = Path(self.config.storage_path)
                await anyio.to_thread.run_sync(_make_dir, root)
            settings = self.config.store_settings()
            store = await stack.enter_async_context(StreamStore.open(settings=settings))
            group = await stack.enter_async_context(anyio.create_task_group())
            persister = Persister(store, PersisterSettings.from_env(consumer=_consumer()))
            await group.start(persister.run)
            stack.callback(persister.stop)
            self._stack, self._store = stack.pop_all(), store
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Finish the batch in hand, stop persisting and close everything."""
        stack, self._stack = self._stack, None
        self._store = None
        if stack is not None:
            await stack.aclose()

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Open, announce readiness, and stay open until :meth:`stop_serving` (for a caller
        that cannot enter and exit in one task: :class:`SessionPersistence`'s portal).

        Raises:
            StreamStoreError: as :meth:`__aenter__` raises.
        """
        stopping = anyio.Event()
        self._stopping = stopping
        async with self:
            task_status.started()
            await stopping.wait()

    async def stop_serving(self) -> None:
        """Make :meth:`serve` close and return."""
        if self._stopping is not None:
            self._stopping.set()

    @property
    def store(self) -> StreamStore:
        """The streamstore facade underneath (for subscribe, replay, wait_for ...).

        Raises:
            RuntimeError: not opened.
        """
        if self._store is None:
            raise RuntimeError("open it first: `async with AsyncSessionPersistence(...) as p`")
        return self._store

    async def create_session(
        self,
        session_id: str | None = None,
        participants: Iterable[str] = (),
        *,
        metadata: Mapping[str, Any] | None = None,
        ttl: float | None = None,
    ) -> ChatSession:
        """Create a session (``session_id`` default: a new time-ordered id). A ``ttl`` closes it
        after that many idle seconds (default: never, as scripts expect).

        Raises:
            ValidationError, SessionExistsError: as :meth:`StreamStore.create_session`.
        """
        session = await self.store.create_session(
            participants, id=session_id, metadata=metadata, ttl=ttl
        )
        return ChatSession.of(session)

    async def add_message(self, message: ChatMessage) -> ChatMessage:
        """Store a message (its ``id`` is its idempotency key: adding it again stores it once);
        returns it with its ``stream_id``.

        Raises:
            ValidationError, SessionNotFoundError, SessionClosedError, BackpressureError:
                as :meth:`StreamStore.publish`.
        """
        stored = await self.store.publish(
            message.session_id,
            sender=message.sender,
            content=message.content,
            recipient=message.recipient,
            metadata=message.metadata,
            id=message.id,
            timestamp=message.timestamp or None,
        )
        return ChatMessage.of(stored)

    async def get_session(self, session_id: str) -> ChatSession | None:
        """The session, or None when there is none by that id.

        Raises:
            ValidationError: the id is malformed.
        """
        try:
            return ChatSession.of(await self.store.get_session(session_id))
        except SessionNotFoundError:
            return None

    async def get_messages(
        self, session_id: str, limit: int = 50, before: str | None = None
    ) -> list[ChatMessage]:
        """The last ``limit`` messages (before the stream id ``before``), oldest first.

        Raises:
            ValidationError, SessionNotFoundError: as :meth:`StreamStore.history`.
        """
        page = await self.store.history(session_id, limit=limit, before=before)
        return [ChatMessage.of(message) for message in page]

    async def list_sessions(
        self,
        *,
        participant: str | None = None,
        state: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[ChatSession]:
        """Sessions ordered by id, at most ``limit``, those with ``participant`` and in
        ``state`` only; ``after`` is the last id of the previous page. (The filters are applied
        while paging: a rare participant among many sessions reads many pages.)

        Raises:
            ValidationError: a bad ``limit``, ``after`` or ``state``.
        """
        wanted = None if state is None else SessionState(state)
        found: list[ChatSession] = []
        cursor = after
        page_size = max(limit, 100)
        while len(found) < limit:
            page = await self.store.list_sessions(after=cursor, limit=page_size)
            for session in page:
                if (participant is None or participant in session.participants) and (
                    wanted is None or session.state is wanted
                ):
                    found.append(ChatSession.of(session))
            if len(page) < page_size:
                break
            cursor = page[-1].id
        return found[:limit]

    async def delete_session(self, session_id: str) -> bool:
        """Delete a session and its messages; False when there was none.

        Raises:
            ValidationError: the id is malformed.
        """
        try:
            await self.store.delete_session(session_id)
        except SessionNotFoundError:
            return False
        return True

    async def cleanup(self) -> dict[str, int]:
        """Apply ``cleanup_days``, ``max_sessions`` and ``max_messages_per_session`` now (and
        close idle sessions); what was removed.

        Raises:
            ConnectionLostError, ServerError, HistoryError: as :meth:`Sweeper.sweep_once`.
        """
        sweeper = Sweeper(self.store, self.config.sweeper_settings())
        report = await sweeper.sweep_once(now=time.time())
        return dataclasses.asdict(report)

    async def get_stats(self) -> dict[str, Any]:
        """Sessions, messages and the persistence backlog.

        Raises:
            ConnectionLostError, PermissionDeniedError: as :meth:`StreamStore.stats`.
        """
        stats = await self.store.stats()
        return {
            "storage_type": self.config.storage_type,
            "live_sessions": stats.live_sessions,
            "stored_messages": await self.store.history_store.count_messages(),
            "backlog": stats.backlog,
            "dead_letters": stats.dead_letters,
        }


class SessionPersistence:
    """The session-persistence API for plain synchronous code: every method of
    :class:`AsyncSessionPersistence`, called directly. Safe from any number of threads; one
    event loop in one thread of its own for its whole life. Close it (or use ``with``)."""

    def __init__(self, config: PersistenceConfig | None = None, **options: Any) -> None:
        """Open the deployment (see :class:`AsyncSessionPersistence`).

        Raises:
            ConfigurationError: an unknown option or an unusable value.
            StreamStoreError: the deployment cannot be opened.
        """
        self._async = AsyncSessionPersistence(config, **options)
        portal, self._thread = _start_portal()
        try:
            # One task opens and later closes everything (task groups end where they begin).
            self._served, _ = portal.start_task(self._async.serve)
        except BaseException:
            _stop_portal(portal, self._thread)
            raise
        self._portal: BlockingPortal | None = portal
        # Scripts rarely close what they open: close at exit (the loop's thread is a daemon,
        # so it is still there then, and never holds the interpreter open).
        atexit.register(self.close)

    @property
    def config(self) -> PersistenceConfig:
        """The configuration in force."""
        return self._async.config

    def close(self) -> None:
        """Stop persisting (the batch in hand is finished) and close. Idempotent."""
        portal, self._portal = self._portal, None
        if portal is None:
            return
        atexit.unregister(self.close)
        try:
            portal.call(self._async.stop_serving)
            self._served.result()  # closed, or why not
        finally:
            _stop_portal(portal, self._thread)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, method: Callable[..., Awaitable[_T]], *args: Any, **kwargs: Any) -> _T:
        if self._portal is None:
            raise RuntimeError("this SessionPersistence is closed")
        return self._portal.call(lambda: method(*args, **kwargs))

    def create_session(
        self,
        session_id: str | None = None,
        participants: Iterable[str] = (),
        *,
        metadata: Mapping[str, Any] | None = None,
        ttl: float | None = None,
    ) -> ChatSession:
        """See :meth:`AsyncSessionPersistence.create_session`."""
        return self._call(
            self._async.create_session, session_id, list(participants), metadata=metadata, ttl=ttl
        )

    def add_message(self, message: ChatMessage) -> ChatMessage:
        """See :meth:`AsyncSessionPersistence.add_message`."""
        return self._call(self._async.add_message, message)

    def get_session(self, session_id: str) -> ChatSession | None:
        """See :meth:`AsyncSessionPersistence.get_session`."""
        return self._call(self._async.get_session, session_id)

    def get_messages(
        self, session_id: str, limit: int = 50, before: str | None = None
    ) -> list[ChatMessage]:
        """See :meth:`AsyncSessionPersistence.get_messages`."""
        return self._call(self._async.get_messages, session_id, limit, before)

    def list_sessions(
        self,
        *,
        participant: str | None = None,
        state: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[ChatSession]:
        """See :meth:`AsyncSessionPersistence.list_sessions`."""
        return self._call(
            self._async.list_sessions,
            participant=participant,
            state=state,
            limit=limit,
            after=after,
        )

    def delete_session(self, session_id: str) -> bool:
        """See :meth:`AsyncSessionPersistence.delete_session`."""
        return self._call(self._async.delete_session, session_id)

    def cleanup(self) -> dict[str, int]:
        """See :meth:`AsyncSessionPersistence.cleanup`."""
        return self._call(self._async.cleanup)

    def get_stats(self) -> dict[str, Any]:
        """See :meth:`AsyncSessionPersistence.get_stats`."""
        return self._call(self._async.get_stats)


def _make_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def _start_portal() -> tuple[BlockingPortal, threading.Thread]:
    """An event loop in a daemon thread of its own, and the portal into it."""
    ready: queue.Queue[BlockingPortal] = queue.Queue(maxsize=1)

    async def host() -> None:
        async with BlockingPortal() as portal:
            ready.put(portal)
            await portal.sleep_until_stopped()

    thread = threading.Thread(
        target=anyio.run, args=(host,), name="streamstore-persistence", daemon=True
    )
    thread.start()
    return ready.get(), thread


def _stop_portal(portal: BlockingPortal, thread: threading.Thread) -> None:
    portal.call(portal.stop)
    thread.join()


def _consumer() -> str:
    """A consumer name of this process: stable while it runs, unique beside others."""
    return f"{PersisterSettings().consumer}-{os.getpid()}"
