"""streamstore: a durable, replayable message bus for multi-agent and multi-user chat."""

from streamstore.config import PersisterSettings, Settings, SweeperSettings
from streamstore.errors import (
    BackpressureError,
    ConfigurationError,
    ConnectionLostError,
    CorruptEntryError,
    EmbeddedServerError,
    EvictionPolicyError,
    HistoryCorruptError,
    HistoryError,
    HistoryUnavailableError,
    MessageTooLargeError,
    PermissionDeniedError,
    ScriptReplayError,
    ServerError,
    SessionClosedError,
    SessionExistsError,
    SessionNotFoundError,
    StreamStoreError,
    UnsafeServerError,
    ValidationError,
    WaitTimeoutError,
)
from streamstore.models import Message, Session, SessionState, StreamId
from streamstore.store import StreamStore
from streamstore.workers.persister import Persister, PersisterStats
from streamstore.workers.sweeper import Sweeper, SweepReport

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
    "Message",
    "MessageTooLargeError",
    "PermissionDeniedError",
    "Persister",
    "PersisterSettings",
    "PersisterStats",
    "ScriptReplayError",
    "ServerError",
    "Session",
    "SessionClosedError",
    "SessionExistsError",
    "SessionNotFoundError",
    "SessionState",
    "Settings",
    "StreamId",
    "StreamStore",
    "StreamStoreError",
    "SweepReport",
    "Sweeper",
    "SweeperSettings",
    "UnsafeServerError",
    "ValidationError",
    "WaitTimeoutError",
]
