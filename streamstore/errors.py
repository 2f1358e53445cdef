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
    │   ├── PermissionDeniedError (PermissionError)  this Redis user may not run a command
    │   ├── UnsafeServerError                 the server could lose what it acknowledged
    │   │   ├── EvictionPolicyError           maxmemory-policy can evict streams
    │   │   └── ScriptReplayError             a restart would drop the scripts' writes
    │   ├── GroupMissingError                 a feed has no consumer group (NOGROUP)
    │   ├── GroupExistsError                  the consumer group exists already (BUSYGROUP)
    │   ├── DatabaseMissingError              the URL's database number does not exist
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
import re
from collections.abc import Iterator

import redis.exceptions

__all__ = [
    "BackpressureError",
    "ConfigurationError",
    "ConnectionLostError",
    "CorruptEntryError",
    "DatabaseMissingError",
    "EmbeddedServerError",
    "EvictionPolicyError",
    "GroupExistsError",
    "GroupMissingError",
    "HistoryCorruptError",
    "HistoryError",
    "HistoryUnavailableError",
    "MessageTooLargeError",
    "PermissionDeniedError",
    "ScriptReplayError",
    "ServerError",
    "SessionClosedError",
    "SessionExistsError",
    "SessionNotFoundError",
    "StreamStoreError",
    "UnsafeServerError",
    "ValidationError",
    "WaitTimeoutError",
    "first_error",
    "name_script",
    "permission_denied",
    "script_refusal",
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


class PermissionDeniedError(ServerError, PermissionError):
    """This Redis user may not run a command streamstore needs (``deploy/users.acl`` gives each
    role the commands of its work).

    Attributes:
        user: the Redis user refused, when known.
        command: the command refused, when the server names it (Redis 7.0 does not for a
            command inside a script).
        script: the streamstore script that ran it, if any.
        role: the role of ``deploy/users.acl`` whose work that script is, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        user: str | None = None,
        command: str | None = None,
        script: str | None = None,
        role: str | None = None,
    ) -> None:
        super().__init__(message)
        self.user = user
        self.command = command
        self.script = script
        self.role = role


class GroupMissingError(ServerError):
    """A feed (or its consumer group) does not exist: the server restarted empty or the group
    was deleted (NOGROUP). The persister creates it again."""


class GroupExistsError(ServerError):
    """The consumer group exists already (BUSYGROUP): creating it is done."""


class UnsafeServerError(ServerError):
    """The server is configured so that it could lose messages it acknowledged."""


class EvictionPolicyError(UnsafeServerError):
    """The server's ``maxmemory-policy`` may evict keys, so acknowledged messages could vanish."""


class ScriptReplayError(UnsafeServerError):
    """The server would drop the writes of streamstore's scripts when it reloads its append-only
    file: it logs them as MULTI/EXEC and, on reload, checks EXEC against the ``default`` ACL
    user, which is disabled or restricted (redis/redis#14541, valkey-io/valkey#3983)."""


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


_SCRIPTS: dict[str, tuple[str, str]] = {}
"""SHA1 of each streamstore script -> (its name, the role whose work it is)."""

# How servers word a refusal by the ACL, inside a script or not:
#   NOPERM this user has no permissions to run the 'xadd' command              (Redis 7.0)
#   NOPERM User producer has no permissions to run the 'xtrim' command         (Valkey)
#   ERR ACL failure in script: User prod has no permissions to run the 'set' command script: ...
#   ERR The user executing the script can't run this command or subcommand script: <sha>, ...
_REFUSED = re.compile(
    r"no permissions to (?:run|access)|can't run this command|NOPERM", re.IGNORECASE
)
_COMMAND = re.compile(r"to run the '([A-Za-z|_-]+)' command")
_SHA = re.compile(r"script: ([0-9a-f]{40})")


class DatabaseMissingError(ServerError):
    """The server has no database of the URL's number (SELECT: DB index is out of range)."""


_REPLY_KINDS: dict[str, type[ServerError]] = {
    "NOGROUP": GroupMissingError,
    "BUSYGROUP": GroupExistsError,
}
"""Error replies told apart by their code (the reply's first word)."""


def script_refusal(text: str, session_id: str) -> StreamStoreError | None:
    """The typed error for a refusal the scripts answer with a code of their own
    (publish.lua, create_session.lua): SSNOSESSION, SSCLOSED <state>, SSEXISTS, SSBACKPRESSURE;
    None for any other reply."""
    code, _, detail = text.partition(" ")
    if code == "SSNOSESSION":
        return SessionNotFoundError(session_id)
    if code == "SSCLOSED":
        return SessionClosedError(session_id, detail.strip())
    if code == "SSEXISTS":
        return SessionExistsError(session_id)
    if code == "SSBACKPRESSURE":
        return BackpressureError(
            f"persistence lags: the partition of session {session_id!r} holds max_lag "
            "unpersisted messages"
        )
    return None


def _reply_code(text: str) -> str:
    """The error code of a reply: its first word (redis-py's pipelines prefix a failed
    command's reply with ``Command # N (...) of pipeline caused error:``)."""
    return text.rpartition("caused error: ")[2].partition(" ")[0]


def name_script(sha: str, name: str, role: str) -> None:
    """Remember a script's name and role by its SHA1, so that an ACL refusal inside it names
    them rather than the hash."""
    _SCRIPTS[sha] = (name, role)


@contextlib.contextmanager
def translate_redis_errors(*, user: str | None = None) -> Iterator[None]:
    """Re-raise redis-py errors as streamstore errors; ``user`` is the Redis user of the
    connection, named by an ACL refusal.

    Raises:
        BackpressureError: the server answered OOM (it is out of memory under ``noeviction``).
        ConnectionLostError: the connection failed or timed out.
        PermissionDeniedError: the ACL refused a command (inside a script or not).
        ServerError: any other error reply.
    """
    try:
        yield
    except redis.exceptions.OutOfMemoryError as exc:
        raise BackpressureError("the Redis server is out of memory") from exc
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        raise ConnectionLostError(f"lost the Redis connection: {type(exc).__name__}") from exc
    except redis.exceptions.ResponseError as exc:
        text = str(exc)
        if text.startswith("OOM"):
            raise BackpressureError("the Redis server is out of memory") from exc
        if isinstance(exc, redis.exceptions.NoPermissionError) or _REFUSED.search(text):
            raise permission_denied(text, user=user) from exc
        kind = _REPLY_KINDS.get(_reply_code(text), ServerError)
        if "DB index is out of range" in text:  # plain ERR: the only reply told by its text
            kind = DatabaseMissingError
        raise kind(f"the Redis server refused a command: {exc}") from exc


def permission_denied(text: str, *, user: str | None = None) -> PermissionDeniedError:
    """The error for an ACL refusal worded ``text`` by the server: it names the user, the
    command when the server says which, and the streamstore script and role rather than a
    script hash."""
    found = _COMMAND.search(text)
    command = found.group(1).upper().replace("|", " ") if found else None
    sha = _SHA.search(text)
    script, role = _SCRIPTS.get(sha.group(1), (None, None)) if sha else (None, None)
    who = f"Redis user {user!r}" if user else "this Redis user"
    what = command or "a command"
    where = f" in the {script} script" if script else ""
    needs = (
        f"; this is the {role} role's work (deploy/users.acl)"
        if role
        else "; see deploy/users.acl for what each role may run"
    )
    return PermissionDeniedError(
        f"{who} may not run {what}{where}{needs}",
        user=user,
        command=command,
        script=script,
        role=role,
    )


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
