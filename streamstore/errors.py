"""The streamstore error tree, and the one place where redis-py errors are translated.

::

    StreamStoreError
    ├── ValidationError (ValueError)          bad input, raised before anything is written
    │   └── MessageTooLargeError
    ├── ConfigurationError (ValueError)       contradictory or unusable settings
    ├── SessionNotFoundError (LookupError)    no such session in Redis nor in history
    ├── SessionExistsError                    create_session with an id already taken
    ├── SessionClosedError                    publish to a closed or deleted session
    ├── BackpressureError                     persistence lags or Redis is out of memory
    ├── WaitTimeoutError (TimeoutError)       wait_for() saw no matching message in time
    ├── ServerError                           the server refused or is unsuitable
    │   ├── EvictionPolicyError               maxmemory-policy can evict streams
    │   └── EmbeddedServerError               the private server could not be started
    ├── ConnectionLostError (ConnectionError) the server could not be reached
    ├── HistoryError                          the history store failed
    │   ├── HistoryUnavailableError           it accepts no writes now (locked, disk full)
    │   └── HistoryCorruptError               the history file is not a usable database
    └── CorruptEntryError                     an entry read from Redis does not decode

Messages never include message content: errors name ids, sizes and states only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import redis.exceptions

__all__ = [
    "BackpressureError",
    "ConfigurationError",
    "ConnectionLostError",
    "CorruptEntryError",
    "EmbeddedServerError",
    "EvictionPolicyError",
    "HistoryCorruptError",
    "HistoryError",
    "HistoryUnavailableError",
    "MessageTooLargeError",
    "ServerError",
    "SessionClosedError",
    "SessionExistsError",
    "SessionNotFoundError",
    "StreamStoreError",
    "ValidationError",
    "WaitTimeoutError",
    "first_error",
    "translate_redis_errors",
]


class StreamStoreError(Exception):
    """Base class of every error streamstore raises on purpose."""


class ValidationError(StreamStoreError, ValueError):
    """An argument is malformed; nothing was written."""


class MessageTooLargeError(ValidationError):
    """A message is larger than the configured ``max_message_bytes``."""


class ConfigurationError(StreamStoreError, ValueError):
    """Settings are contradictory or unusable; raised when they are built."""


class SessionNotFoundError(StreamStoreError, LookupError):
    """The session is known neither to Redis nor to the history store."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} not found")
        self.session_id = session_id


class SessionExistsError(StreamStoreError):
    """A session with this id already exists (or existed and was deleted)."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} already exists")
        self.session_id = session_id


class SessionClosedError(StreamStoreError):
    """The session is closed or deleted; it accepts no more messages."""

    def __init__(self, session_id: str, state: str) -> None:
        super().__init__(f"session {session_id!r} is {state}")
        self.session_id = session_id
        self.state = state


class BackpressureError(StreamStoreError):
    """Publishing was refused for longer than ``max_block``: persistence lags or Redis is full."""


class WaitTimeoutError(StreamStoreError, TimeoutError):
    """No matching message arrived before the timeout."""


class ServerError(StreamStoreError):
    """The Redis-compatible server refused a command or is configured unsafely."""


class EvictionPolicyError(ServerError):
    """The server's ``maxmemory-policy`` may evict keys, so acknowledged messages could vanish."""


class EmbeddedServerError(ServerError):
    """The private embedded server could not be found, started or reached."""


class ConnectionLostError(StreamStoreError, ConnectionError):
    """The server could not be reached (after redis-py's own retries)."""


class HistoryError(StreamStoreError):
    """The history store failed to read or write."""


class HistoryUnavailableError(HistoryError):
    """The history store accepts no writes for now (locked, disk full, I/O error): retry later.

    Unlike other history errors, it says nothing about the data being written."""


class HistoryCorruptError(HistoryError):
    """The history database is damaged or is not a streamstore database."""


class CorruptEntryError(StreamStoreError):
    """An entry read from Redis is not a well-formed streamstore entry (it is dead-lettered)."""


@contextlib.contextmanager
def translate_redis_errors() -> Iterator[None]:
    """Re-raise redis-py errors as streamstore errors.

    Raises:
        BackpressureError: the server answered OOM (it is out of memory under ``noeviction``).
        ConnectionLostError: the connection failed or timed out.
        ServerError: any other error reply.
    """
    try:
        yield
    except redis.exceptions.OutOfMemoryError as exc:
        raise BackpressureError("the Redis server is out of memory") from exc
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        raise ConnectionLostError(f"lost the Redis connection: {type(exc).__name__}") from exc
    except redis.exceptions.ResponseError as exc:
        if str(exc).startswith("OOM"):
            raise BackpressureError("the Redis server is out of memory") from exc
        raise ServerError(f"the Redis server refused a command: {exc}") from exc


@contextlib.contextmanager
def first_error() -> Iterator[None]:
    """Re-raise the first error of a failed task group (nested ones too) as itself, so that
    callers meet the errors a function documents, not a group wrapping them."""
    try:
        yield
    except BaseExceptionGroup as group:
        first: BaseException = group
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
