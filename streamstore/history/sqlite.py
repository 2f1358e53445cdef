"""SQLite history: the embedded default store, one writer connection, WAL and synchronous=FULL.

sqlite3 is blocking, so every call runs in a worker thread: writes on one connection behind a
one-slot limiter (SQLite allows one writer anyway), reads on a second connection behind its own.
After an error that may have left a connection unusable (read-only, I/O error, cannot open), both
are reopened before the next call.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import math
import operator
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any, Final, Literal, TypeVar
from urllib.parse import unquote

import anyio
import anyio.to_thread

from streamstore.codec import message_row, messages_from_rows, session_from_row, session_row
from streamstore.crashpoints import crash_if
from streamstore.errors import (
    ConfigurationError,
    HistoryCorruptError,
    HistoryError,
    HistoryUnavailableError,
)
from streamstore.history.backend import RetentionDriver, seconds, split_url
from streamstore.models import Message, Session, SessionState, StreamId

__all__ = ["SCHEMA_VERSION", "SQLiteHistory"]

SCHEMA_VERSION: Final = 2
"""Stored in ``PRAGMA user_version``; a file with a higher number was written by a newer
streamstore and is refused rather than misread, one with a lower number is migrated by open()."""

_APPLICATION_ID: Final = 0x73736831  # "ssh1" in ``PRAGMA application_id``: this is our file
_MAX_INT64: Final = 2**63 - 1
_SYNCHRONOUS: Final = {"full": "FULL", "normal": "NORMAL"}
_DEFAULT_BUSY_TIMEOUT: Final = 30.0
# Retention deletes at most this many messages per transaction, so the writer slot (and the
# file's write lock, for other processes) is never held for long: 5-20 ms each in
# tests/history_bench.py --retention.
_RETENTION_CHUNK: Final = 1000
_CATALOG_PAGE: Final = 1000  # catalog rows read per call while looking for what to trim
_AGE_RANGE: Final = 1000  # messages per message_ages row, at most
_MAX_PARAMETERS: Final = 500  # bound parameters per IN (...) list; SQLite allows 999 or more

# Messages get an ascending INTEGER PRIMARY KEY (each insert appends to the table's last page)
# and two unique indexes. The position index serves every read and takes one insertion point
# per session. The id index leads with the message id, which new_message_id() makes
# time-ordered, so it appends too while still meaning "unique per (session, id)"; led by the
# session id instead it took an insertion point per session and the batch ran ~1.7x slower.
# WITHOUT ROWID tables clustered on the position (~2.5x slower: whole rows land mid-page) or on
# the id (no faster, and random client ids would scatter whole rows) lost too. See
# tests/history_bench.py.
_SCHEMA_V1: Final = (
    """
    CREATE TABLE sessions (
        id              TEXT PRIMARY KEY NOT NULL,
        participants    TEXT NOT NULL,
        created_at      REAL NOT NULL,
        last_active_at  REAL NOT NULL,
        ttl             REAL,
        metadata        TEXT NOT NULL,
        state           TEXT NOT NULL CHECK (state IN ('active', 'closed', 'deleted')),
        message_count   INTEGER NOT NULL DEFAULT 0,
        last_stream_ms  INTEGER,
        last_stream_seq INTEGER
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE messages (
        pk          INTEGER PRIMARY KEY,
        session_id  TEXT NOT NULL,
        stream_ms   INTEGER NOT NULL,
        stream_seq  INTEGER NOT NULL,
        message_id  TEXT NOT NULL,
        sender      TEXT NOT NULL,
        recipient   TEXT,
        content     TEXT NOT NULL,
        metadata    TEXT,
        timestamp   REAL NOT NULL
    )
    """,
    "CREATE UNIQUE INDEX messages_by_position ON messages (session_id, stream_ms, stream_seq)",
    "CREATE UNIQUE INDEX messages_by_id ON messages (message_id, session_id)",
)
# Version 2, for retention. Age without an index on timestamp (one more B-tree insert per
# message): pks ascend and timestamps mostly do, so each batch notes its pk range and the
# oldest timestamp in it, one row per up to _AGE_RANGE messages. A retention pass visits only
# ranges holding something old enough, scans them by pk (neighbouring pages) and writes back
# their new oldest timestamp, or drops the range once it is empty. A range's "oldest" is a
# lower bound (other deletions leave it alone), and ranges may overlap when pks are reused
# after the newest messages were deleted: every message stays inside a range whose oldest
# is at most its timestamp, which is all the pass needs to be exact.
# Catalog cap: a partial index holds only ended sessions, so batches of active ones never
# touch it; it orders them by activity (the id rides along: sessions has no rowid).
_RETENTION_SCHEMA: Final = (
    """
    CREATE TABLE message_ages (
        first_pk    INTEGER PRIMARY KEY,
        last_pk     INTEGER NOT NULL,
        oldest      REAL NOT NULL
    )
    """,
    "CREATE INDEX message_ages_by_oldest ON message_ages (oldest)",
    "CREATE INDEX sessions_by_activity ON sessions (last_active_at) WHERE state != 'active'",
)
_SCHEMA: Final = _SCHEMA_V1 + _RETENTION_SCHEMA
_MIGRATIONS: Final = {
    2: (
        *_RETENTION_SCHEMA,
        # Version 1 kept the messages of deleted sessions; version 2 never stores them.
        """DELETE FROM messages
            WHERE session_id IN (SELECT id FROM sessions WHERE state = 'deleted')""",
        "UPDATE sessions SET message_count = 0 WHERE state = 'deleted' AND message_count != 0",
        f"""INSERT INTO message_ages (first_pk, last_pk, oldest)
            SELECT MIN(pk), MAX(pk), MIN(timestamp) FROM messages GROUP BY pk / {_AGE_RANGE}""",  # noqa: S608 - a constant
    ),
}
"""What takes a file from the version before the key to the key's version."""
_TABLES_V1: Final = frozenset({"sessions", "messages"})
_TABLES: Final = _TABLES_V1 | {"message_ages"}

# A snapshot replaces what the publisher owns (participants, metadata, ttl, created_at) but
# never moves the state back (active < closed < deleted) nor activity back in time; the
# message count and last stream id belong to history alone and are left alone.
_UPSERT_SESSION: Final = """
    INSERT INTO sessions (id, participants, created_at, last_active_at, ttl, metadata, state)
    VALUES (?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (id) DO UPDATE SET
        participants = excluded.participants,
        created_at = excluded.created_at,
        last_active_at = MAX(last_active_at, excluded.last_active_at),
        ttl = excluded.ttl,
        metadata = excluded.metadata,
        state = CASE
            WHEN 'deleted' IN (state, excluded.state) THEN 'deleted'
            WHEN 'closed' IN (state, excluded.state) THEN 'closed'
            ELSE 'active'
        END
"""
# Many rows per INSERT: one statement step (and one release of the GIL, which the persister's
# next read needs meanwhile) per 100 rows rather than per row; 900 bound parameters, under the
# 999 that older SQLite builds allow. ~1.3x faster than executemany in tests/history_bench.py.
# The rest of a batch goes in chunks of 64, 32, ... 1 rows: eight statement shapes in all. One
# shape per remainder size filled sqlite3's statement cache with up to 99 prepared statements
# of tens of KiB each, a few MiB that a worker took on slowly as new batch sizes came (the
# private-memory creep of `streamstore bench --hold`).
_ROWS_PER_INSERT: Final = 100
_REST_CHUNKS: Final = (64, 32, 16, 8, 4, 2, 1)
_INSERT_MESSAGES: Final = """
    INSERT OR IGNORE INTO messages (
        session_id, stream_ms, stream_seq, message_id, sender, recipient, content, metadata,
        timestamp
    ) VALUES
"""
_INSERT_ROWS: Final = {
    count: _INSERT_MESSAGES + ", ".join(("(?, ?, ?, ?, ?, ?, ?, ?, ?)",) * count)
    for count in (_ROWS_PER_INSERT, *_REST_CHUNKS)
}
"""``_INSERT_ROWS[n]`` inserts n message rows (n: 100, 64, 32, ... 1)."""
_STORED_ID_AT: Final = """
    SELECT message_id FROM messages WHERE session_id = ? AND stream_ms = ? AND stream_seq = ?
"""
# Counts what a batch added to each session, creating a minimal entry (active, no participants)
# for a session whose snapshot has not arrived (yet); a deleted session is left alone (no
# change: the fast path sees it in total_changes).
_COUNT_INTO_SESSION: Final = """
    INSERT INTO sessions (
        id, participants, created_at, last_active_at, ttl, metadata, state, message_count,
        last_stream_ms, last_stream_seq
    ) VALUES (?, '[]', ?, ?, NULL, '{}', 'active', ?, ?, ?)
    ON CONFLICT (id) DO UPDATE SET
        message_count = message_count + excluded.message_count,
        last_active_at = MAX(last_active_at, excluded.last_active_at),
        last_stream_ms = CASE
            WHEN last_stream_ms IS NULL
                OR (last_stream_ms, last_stream_seq)
                    < (excluded.last_stream_ms, excluded.last_stream_seq)
            THEN excluded.last_stream_ms ELSE last_stream_ms END,
        last_stream_seq = CASE
            WHEN last_stream_ms IS NULL
                OR (last_stream_ms, last_stream_seq)
                    < (excluded.last_stream_ms, excluded.last_stream_seq)
            THEN excluded.last_stream_seq ELSE last_stream_seq END
    WHERE state != 'deleted'
"""
# Deleted stays deleted: a deleted snapshot empties its session, and no message of a deleted
# session is stored again. The last stream id stays: the furthest the session got.
_PURGE_MESSAGES: Final = "DELETE FROM messages WHERE session_id = ?"
_ZERO_COUNT: Final = "UPDATE sessions SET message_count = 0 WHERE id = ?"
_DELETED_AMONG: Final = "SELECT id FROM sessions WHERE state = 'deleted' AND id IN ({})"

_LAST_PK: Final = "SELECT last_insert_rowid()"
_RECORD_AGES: Final = """
    INSERT INTO message_ages (first_pk, last_pk, oldest) VALUES (?, ?, ?)
    ON CONFLICT (first_pk) DO UPDATE SET
        last_pk = MAX(last_pk, excluded.last_pk),
        oldest = MIN(oldest, excluded.oldest)
"""

# Retention, one bounded chunk per transaction; every decrement is the rows just deleted.
_AGED_RANGES: Final = "SELECT first_pk FROM message_ages WHERE oldest < ? ORDER BY oldest LIMIT ?"
_RANGE_END: Final = "SELECT last_pk FROM message_ages WHERE first_pk = ?"
_OLDER_IN_RANGE: Final = (
    "SELECT pk, session_id FROM messages WHERE pk BETWEEN ? AND ? AND timestamp < ? LIMIT ?"
)
_OLDEST_IN_RANGE: Final = "SELECT MIN(timestamp) FROM messages WHERE pk BETWEEN ? AND ?"
_SET_OLDEST: Final = "UPDATE message_ages SET oldest = ? WHERE first_pk = ?"
_FORGET_RANGE: Final = "DELETE FROM message_ages WHERE first_pk = ?"
_DELETE_AT: Final = "DELETE FROM messages WHERE pk = ?"
_DECREMENT_COUNT: Final = "UPDATE sessions SET message_count = message_count - ? WHERE id = ?"
_COUNT_OF: Final = "SELECT message_count FROM sessions WHERE id = ?"
_DELETE_OLDEST: Final = """
    DELETE FROM messages WHERE pk IN (
        SELECT pk FROM messages WHERE session_id = ? ORDER BY stream_ms, stream_seq LIMIT ?
    )
"""
_CATALOG_PAGE_AFTER: Final = (
    "SELECT id, message_count FROM sessions WHERE id > ? ORDER BY id LIMIT ?"
)
_COUNT_SESSIONS: Final = "SELECT COUNT(*) FROM sessions"  # O(sessions): ~30 ms per million
_LEAST_RECENTLY_ENDED: Final = (
    "SELECT id FROM sessions WHERE state != 'active' ORDER BY last_active_at, id LIMIT ?"
)
_STATE_OF: Final = "SELECT state FROM sessions WHERE id = ?"
_DELETE_SESSION: Final = "DELETE FROM sessions WHERE id = ?"

# The session id is the query's own: not read back.
_MESSAGE_COLUMNS: Final = (
    "stream_ms, stream_seq, message_id, sender, recipient, content, metadata, timestamp"
)
_READ_ASCENDING: Final = f"""
    SELECT {_MESSAGE_COLUMNS} FROM messages
    WHERE session_id = ? AND (stream_ms, stream_seq) > (?, ?) AND (stream_ms, stream_seq) < (?, ?)
    ORDER BY stream_ms, stream_seq LIMIT ?
"""  # noqa: S608 - column list is a constant; every value is a bound parameter
_READ_DESCENDING: Final = f"""
    SELECT {_MESSAGE_COLUMNS} FROM messages
    WHERE session_id = ? AND (stream_ms, stream_seq) > (?, ?) AND (stream_ms, stream_seq) < (?, ?)
    ORDER BY stream_ms DESC, stream_seq DESC LIMIT ?
"""  # noqa: S608 - column list is a constant; every value is a bound parameter
_SESSION_COLUMNS: Final = (
    "id, participants, created_at, last_active_at, ttl, metadata, state, message_count, "
    "last_stream_ms, last_stream_seq"
)
_GET_SESSION: Final = f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id = ?"  # noqa: S608
_LIST_SESSIONS: Final = f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id > ? ORDER BY id LIMIT ?"  # noqa: S608

_T = TypeVar("_T")


class SQLiteHistory(RetentionDriver):
    """History in one SQLite file, built from ``sqlite:///relative.db`` or
    ``sqlite:////absolute.db`` by :meth:`from_url`.

    The file (and its ``-wal``/``-shm`` companions, which SQLite gives the same mode) is created
    0600. It runs in WAL mode with ``synchronous=FULL`` unless ``synchronous="normal"`` is asked
    for: NORMAL may lose the last commits on power loss, after the persister acknowledged them.
    ``busy_timeout`` is how long a write waits for another process's lock before it raises
    :class:`~streamstore.errors.HistoryError` (the caller retries).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Literal["full", "normal"] = "full",
        busy_timeout: float | timedelta = _DEFAULT_BUSY_TIMEOUT,
    ) -> None:
        """Raises:
        ConfigurationError: the path is empty or an option has an unusable value.
        """
        self._path = os.fspath(path)
        if not self._path or self._path == ":memory:" or "\x00" in self._path:
            raise ConfigurationError(
                "the SQLite history needs a file path (use memory:// for an in-process store)"
            )
        if synchronous not in _SYNCHRONOUS:
            raise ConfigurationError(
                f"synchronous must be 'full' or 'normal', got {str(synchronous)[:20]!r}"
            )
        self._synchronous: Literal["full", "normal"] = synchronous
        self._busy_timeout_ms = round(seconds("busy_timeout", busy_timeout, allow_zero=True) * 1000)
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        # Created in open(): anyio primitives need a running event loop.
        self._write_slot: anyio.CapacityLimiter | None = None
        self._read_slot: anyio.CapacityLimiter | None = None
        self._threads: anyio.CapacityLimiter | None = None
        # Set by a call that failed in a way that may have left the connections unusable: the
        # next write (any failure) or read (a failed read) reopens both first (see _reopen).
        # Reads alone do not reopen after a failed write: while the cause lasts (the file is
        # read-only) a reopening gives connections as unusable, so it waits for the retry.
        self._reopen_before_write = False
        self._reopen_before_read = False
        self.reopened = 0
        """How many times the connections were reopened after an error (diagnostics, tests)."""
        self._retention_chunk = _RETENTION_CHUNK  # tests lower it to see several chunks

    @classmethod
    def from_url(cls, url: str) -> SQLiteHistory:
        """Build (not open) a store from ``sqlite:///path.db?synchronous=full&busy_timeout=30000``.

        Options: ``synchronous`` (``full``, the default, or ``normal``) and ``busy_timeout`` in
        milliseconds (default 30000).

        Raises:
            ConfigurationError: the URL is malformed or has an unknown or invalid option.
        """
        usage = "expected sqlite:///relative/path.db or sqlite:////absolute/path.db"
        parts, options, unknown = split_url(
            url, schemes=("sqlite",), usage=usage, known=("synchronous", "busy_timeout")
        )
        if unknown:
            raise ConfigurationError(
                f"unknown sqlite URL option {unknown[0][0][:40]!r}: expected synchronous, "
                "busy_timeout"
            )
        if parts.netloc:
            raise ConfigurationError(
                f"a sqlite URL names a file, not a host ({parts.netloc[:40]!r}): {usage}"
            )
        if not parts.path.startswith("/") or len(parts.path) < 2:
            raise ConfigurationError(f"the sqlite URL has no file path: {usage}")
        path = unquote(parts.path[1:])
        synchronous = options.get("synchronous", "full").lower()
        if synchronous not in ("full", "normal"):
            raise ConfigurationError(
                f"synchronous must be 'full' or 'normal', got {synchronous[:20]!r}"
            )
        busy_timeout = _DEFAULT_BUSY_TIMEOUT
        if "busy_timeout" in options:
            value = options["busy_timeout"]
            if not value.isdigit() or not value.isascii():
                raise ConfigurationError(
                    f"busy_timeout is a whole number of milliseconds, got {value[:20]!r}"
                )
            busy_timeout = int(value) / 1000
        return cls(
            path,
            synchronous="normal" if synchronous == "normal" else "full",
            busy_timeout=busy_timeout,
        )

    @property
    def path(self) -> str:
        """The database file, as given."""
        return self._path

    # -- life cycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the file (0600) and schema, or check an existing one.

        Raises:
            HistoryCorruptError: the file is not a SQLite database, is damaged, belongs to
                another application or was written by a newer streamstore.
            HistoryError: already open, or the file cannot be opened or initialised.
        """
        if self._writer is not None:
            raise HistoryError("the SQLite history is already open")
        self._write_slot = anyio.CapacityLimiter(1)
        self._read_slot = anyio.CapacityLimiter(1)
        # Private worker threads: at most one writer and one reader hold a slot, so this
        # limiter is never contended and a shielded write never waits on anyio's shared pool.
        self._threads = anyio.CapacityLimiter(2)
        # Shielded: a cancelled open would leak the connections it made.
        with anyio.CancelScope(shield=True), _translate_errors(self._busy_timeout_ms):
            connections = await anyio.to_thread.run_sync(self._open_sync, limiter=self._threads)
        self._writer, self._reader = connections
        self._reopen_before_write = self._reopen_before_read = False

    async def close(self) -> None:
        """Wait for the call in flight, then close both connections. Idempotent."""
        writer, reader = self._writer, self._reader
        if writer is None or reader is None:
            return
        self._writer = self._reader = None  # new calls fail from here on
        assert self._write_slot is not None
        assert self._read_slot is not None
        with anyio.CancelScope(shield=True):
            async with self._write_slot, self._read_slot:
                await anyio.to_thread.run_sync(_close_all, writer, reader, limiter=self._threads)

    # -- HistoryStore -------------------------------------------------------------------------

    async def write_batch(
        self, messages: Sequence[Message], sessions: Sequence[Session] = ()
    ) -> int:
        """Store a batch in one transaction and return how many messages were new.

        See :meth:`streamstore.history.HistoryStore.write_batch`. A deleted session keeps its
        last stream id (the furthest it got) with a count of 0.

        Raises:
            HistoryError: not open, a message has no stream id, the database is locked for
                longer than ``busy_timeout``, or SQLite failed; nothing was written.
            HistoryCorruptError: the database is damaged.
        """
        if not messages and not sessions:
            self._connection(write=True)
            return 0
        return await self._run(True, _write_batch_sync, list(messages), list(sessions))

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
            HistoryError: not open, or SQLite failed.
        """
        if limit <= 0:
            self._connection(write=False)
            return []
        low = (-1, -1) if after is None else (after[0], after[1])
        high = (_MAX_INT64, _MAX_INT64) if before is None else (before[0], before[1])
        params = (session_id, *low, *high, limit)
        sql = _READ_DESCENDING if newest_first else _READ_ASCENDING
        rows = await self._run(False, _fetch_all, sql, params)
        return messages_from_rows(session_id, rows)

    async def get_session(self, session_id: str) -> Session | None:
        """The catalog entry of a session, or None.

        Raises:
            HistoryError: not open, or SQLite failed.
        """
        rows = await self._run(False, _fetch_all, _GET_SESSION, (session_id,))
        return session_from_row(rows[0]) if rows else None

    async def list_sessions(self, *, after: str | None = None, limit: int = 100) -> list[Session]:
        """Catalog entries ordered by session id, starting after ``after``.

        Raises:
            HistoryError: not open, or SQLite failed.
        """
        if limit <= 0:
            self._connection(write=False)
            return []
        params = ("" if after is None else after, limit)
        rows = await self._run(False, _fetch_all, _LIST_SESSIONS, params)
        return [session_from_row(row) for row in rows]

    async def count_messages(self, session_id: str | None = None) -> int:
        """How many messages are stored, in one session or in all.

        Raises:
            HistoryError: not open, or SQLite failed.
        """
        if session_id is None:
            rows = await self._run(False, _fetch_all, "SELECT COUNT(*) FROM messages", ())
        else:
            sql = "SELECT COUNT(*) FROM messages WHERE session_id = ?"
            rows = await self._run(False, _fetch_all, sql, (session_id,))
        return int(rows[0][0])

    # -- retention ----------------------------------------------------------------------------

    async def _delete_older_than(self, older_than: float) -> int:
        """Visit the ranges that may hold messages older than ``older_than``; each one left
        has nothing older (or it is gone), so a range never comes back in the same pass."""
        deleted = 0
        while rows := await self._run(False, _fetch_all, _AGED_RANGES, (older_than, _CATALOG_PAGE)):
            ranges = [first_pk for (first_pk,) in rows]
            while ranges:
                went, done = await self._run(
                    True, _expire_ranges_sync, ranges, older_than, self._retention_chunk
                )
                deleted += went
                del ranges[:done]
        return deleted

    async def _cap_sessions(self, cap: int) -> int:
        """Walk the catalog a page at a time (on the reader) and trim the sessions over."""
        deleted = 0
        after = ""
        while page := await self._run(
            False, _fetch_all, _CATALOG_PAGE_AFTER, (after, _CATALOG_PAGE)
        ):
            for session_id, count_then in page:
                count = count_then
                while count > cap:
                    done, count = await self._run(
                        True, _delete_oldest_sync, session_id, cap, self._retention_chunk
                    )
                    deleted += done
            after = page[-1][0]
        return deleted

    async def _remove_sessions_beyond(self, cap: int) -> tuple[int, int]:
        """Remove the least recently active ended sessions until ``cap`` remain, or none do.

        Each round counts the catalog and picks at most that many beyond the cap from one
        snapshot, so a pass never removes more than the cap allows; when a pick turns out to
        be gone already (a concurrent pass took it), it looks again.
        """
        messages = sessions = 0
        while ids := await self._run(False, _ended_beyond_sync, cap, _CATALOG_PAGE):
            while ids:
                deleted, done, removed = await self._run(
                    True, _remove_sessions_sync, ids, self._retention_chunk
                )
                messages += deleted
                sessions += removed
                if removed < done:
                    break
                del ids[:done]
        return messages, sessions

    # -- plumbing -----------------------------------------------------------------------------

    def _require_open(self) -> None:
        self._connection(write=True)

    def _connection(self, *, write: bool) -> sqlite3.Connection:
        connection = self._writer if write else self._reader
        if connection is None:
            raise HistoryError("the SQLite history is not open (call open() first)")
        return connection

    async def _run(self, write: bool, function: Callable[..., _T], *args: Any) -> _T:
        """Call ``function(connection, *args)`` in a worker thread on the writer or the reader,
        behind that connection's slot, reopening both connections first when a previous call
        left them suspect.

        Raises:
            HistoryError: not open or closed meanwhile, the reopening failed, or SQLite failed
                (translated by :func:`_translate_errors`).
        """
        self._connection(write=write)  # not open: fail before waiting for anything
        if self._reopen_before_write if write else self._reopen_before_read:
            await self._reopen()
        slot = self._write_slot if write else self._read_slot
        assert slot is not None
        async with slot:  # waiting for the slot stays cancellable
            connection = self._connection(write=write)  # closed (or reopened) while we waited
            # Once the thread starts, the call (a commit, for a write) always finishes and its
            # result is returned; a cancellation is delivered at the caller's next checkpoint.
            with anyio.CancelScope(shield=True), _translate_errors(self._busy_timeout_ms):
                try:
                    result = await anyio.to_thread.run_sync(
                        function, connection, *args, limiter=self._threads
                    )
                except sqlite3.Error as exc:
                    if _error_code(exc) in _REOPEN_AFTER:
                        self._reopen_before_write = True
                        self._reopen_before_read = self._reopen_before_read or not write
                    raise
        return result

    async def _reopen(self) -> None:
        """Replace both connections with new ones, opened as :meth:`open` opens them (file mode,
        schema check, WAL, ``synchronous``, ``busy_timeout``, ``query_only`` on the reader).

        SQLite keeps a connection it opened while the file was read-only read-only for good
        (and may keep one that met an I/O error failing), so retrying on the same connections
        would fail after the cause is gone; new connections see the file as it is now. Both
        slots are held, in :meth:`close`'s order: no statement or transaction of either
        connection is in flight. The new connections are opened before the old ones are
        closed, so a reopening that fails (the file still read-only, or gone) leaves the store
        as it was, to be tried again by the next call.

        Raises:
            HistoryError: closed meanwhile, or the file cannot be opened (translated).
            HistoryCorruptError: the file is no longer a streamstore history.
        """
        assert self._write_slot is not None
        assert self._read_slot is not None
        async with self._write_slot, self._read_slot:
            old_writer, old_reader = self._writer, self._reader
            needed = self._reopen_before_write or self._reopen_before_read
            if not needed or old_writer is None or old_reader is None:
                return  # reopened by another call meanwhile, or closed
            with anyio.CancelScope(shield=True):  # a cancelled reopen would leak connections
                with _translate_errors(self._busy_timeout_ms):
                    writer, reader = await anyio.to_thread.run_sync(
                        self._open_sync, limiter=self._threads
                    )
                if self._writer is not old_writer:  # close() began meanwhile: it closes those
                    await anyio.to_thread.run_sync(
                        _close_all, writer, reader, limiter=self._threads
                    )
                    raise HistoryError("the SQLite history was closed")
                self._writer, self._reader = writer, reader
                self._reopen_before_write = self._reopen_before_read = False
                self.reopened += 1
                await anyio.to_thread.run_sync(
                    _close_all, old_writer, old_reader, limiter=self._threads
                )

    def _open_sync(self) -> tuple[sqlite3.Connection, sqlite3.Connection]:
        try:
            _create_private_file(self._path)
        except OSError as exc:
            raise HistoryError(
                f"cannot create the history file {self._path!r}: {exc.strerror}"
            ) from exc
        writer = self._connect()
        try:
            _check_and_init(writer, self._path)
            writer.execute(f"PRAGMA synchronous = {_SYNCHRONOUS[self._synchronous]}")
            reader = self._connect()
        except BaseException:
            writer.close()
            raise
        try:
            reader.execute("PRAGMA query_only = ON")
        except BaseException:
            _close_all(writer, reader)
            raise
        return writer, reader

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(
            self._path,
            timeout=self._busy_timeout_ms / 1000,
            isolation_level=None,  # no implicit transactions: BEGIN IMMEDIATE ... COMMIT
            check_same_thread=False,  # used from worker threads, one at a time (the slots)
        )
        try:
            connection.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        except BaseException:
            connection.close()
            raise
        return connection

    def _pragma(self, name: str) -> Any:
        """The writer connection's value of ``PRAGMA name`` (for tests and diagnostics)."""
        if not name.isidentifier():
            raise ValueError("not a pragma name")
        return self._connection(write=True).execute(f"PRAGMA {name}").fetchone()[0]


# -- worker-thread functions ------------------------------------------------------------------


def _create_private_file(path: str) -> None:
    """Create ``path`` 0600 whatever the umask; SQLite gives -wal/-shm the file's mode."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _check_and_init(connection: sqlite3.Connection, path: str) -> None:
    """Refuse a file that is not ours or is newer; initialise an empty one or migrate an older
    one (in one transaction); switch to WAL."""
    # Read the header before writing anything: a foreign or newer file stays untouched.
    app_id, version, tables = _identify(connection)
    if (app_id, version, tables) == (0, 0, frozenset()):
        pass  # a new or empty file: initialised below
    elif app_id != _APPLICATION_ID:
        raise HistoryCorruptError(
            f"{path!r} is a SQLite database of another application, not a streamstore history"
        )
    elif version > SCHEMA_VERSION:
        raise HistoryCorruptError(
            f"{path!r} has history schema version {version}, newer than this streamstore "
            f"understands ({SCHEMA_VERSION}); upgrade streamstore"
        )
    elif version < 1 or not tables >= (_TABLES if version == SCHEMA_VERSION else _TABLES_V1):
        raise HistoryCorruptError(f"{path!r} is a damaged streamstore history (schema missing)")
    mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise HistoryError(f"cannot switch {path!r} to WAL mode (it stays in {mode} mode)")
    if version == SCHEMA_VERSION:
        return
    connection.execute("BEGIN IMMEDIATE")
    try:
        # Another process may have initialised or migrated the file since we looked.
        app_id, version, tables = _identify(connection)
        if (app_id, version, tables) == (0, 0, frozenset()):
            for statement in _SCHEMA:
                connection.execute(statement)
            connection.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        elif app_id == _APPLICATION_ID and 1 <= version < SCHEMA_VERSION:
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step]:
                    connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        connection.execute("COMMIT")
    except BaseException:
        _rollback(connection)
        raise
    app_id, version, tables = _identify(connection)
    if app_id != _APPLICATION_ID or version != SCHEMA_VERSION or not tables >= _TABLES:
        raise HistoryCorruptError(f"{path!r} changed while it was being initialised")


def _identify(connection: sqlite3.Connection) -> tuple[int, int, frozenset[str]]:
    app_id = connection.execute("PRAGMA application_id").fetchone()[0]
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    names = connection.execute("SELECT name FROM sqlite_master").fetchall()
    return int(app_id), int(version), frozenset(str(name) for (name,) in names)


def _write_batch_sync(
    connection: sqlite3.Connection, messages: list[Message], sessions: list[Session]
) -> int:
    # Everything is encoded before BEGIN: an unencodable message fails with nothing written.
    snapshots = [session_row(session) for session in sessions]
    rows = sorted(map(message_row, messages), key=_POSITION)  # ascending index inserts
    connection.execute("BEGIN IMMEDIATE")
    try:
        inserted = _apply_batch(connection, snapshots, rows, session_by_session=False)
        if inserted is None:
            # Some messages were stored already (a redelivery) or belong to a deleted session:
            # start again, skipping deleted sessions and counting session by session. Not a
            # savepoint: one would journal every page the fast path touches.
            connection.execute("ROLLBACK")
            connection.execute("BEGIN IMMEDIATE")
            inserted = _apply_batch(connection, snapshots, rows, session_by_session=True)
            assert inserted is not None
        crash_if("in_transaction")
        connection.execute("COMMIT")
    except BaseException:
        _rollback(connection)
        raise
    return inserted


def _apply_batch(
    connection: sqlite3.Connection,
    snapshots: list[tuple[Any, ...]],
    rows: list[tuple[Any, ...]],
    *,
    session_by_session: bool,
) -> int | None:
    """Apply a batch in the open transaction; None when all at once found duplicates or a
    deleted session.

    total_changes counts the rows actually inserted (OR IGNORE skips are not changes), so
    inserting all at once tells how many were new, and session by session tells it for each
    session, which the catalog needs when some were not. Likewise the catalog update skips a
    deleted session (no change), so the fast path needs no query to learn there was none; the
    slow one looks them up and leaves their messages out.
    """
    if snapshots:
        connection.executemany(_UPSERT_SESSION, snapshots)
        purged = sorted({params[0] for params in snapshots if params[6] == "deleted"})
        if purged:
            connection.executemany(_PURGE_MESSAGES, [(session_id,) for session_id in purged])
            connection.executemany(_ZERO_COUNT, [(session_id,) for session_id in purged])
    if not rows:
        return 0
    if not session_by_session:
        if _insert_rows(connection, rows) < len(rows):
            return None
        catalog = [_catalog_params(group, group, len(group)) for group in _by_session(rows)]
        changes_before = connection.total_changes
        connection.executemany(_COUNT_INTO_SESSION, catalog)
        if connection.total_changes - changes_before < len(catalog):
            return None
        _record_ages(connection, list(map(_TIMESTAMP, rows)))
        return len(rows)
    deleted = _deleted_among(connection, [key for key, _ in itertools.groupby(rows, _SESSION_ID)])
    if deleted:
        rows = [row for row in rows if row[0] not in deleted]
    catalog = []
    inserted = 0
    oldest = math.inf
    for group in _by_session(rows):
        new = _insert_rows(connection, group)
        inserted += new
        if new == len(group):
            stored = group
        elif new == 0:
            stored = []
        else:  # advance the catalog only to the messages stored now
            stored = [row for row in group if _is_stored(connection, row)]
        catalog.append(_catalog_params(group, stored, new))
        if new:
            oldest = min(oldest, *map(_TIMESTAMP, group))
    connection.executemany(_COUNT_INTO_SESSION, catalog)
    if inserted:  # which rows the pks went to is not known here: one range, a lower bound
        _record_ages(connection, [oldest] * inserted)
    return inserted


@contextlib.contextmanager
def _transaction(connection: sqlite3.Connection) -> Iterator[None]:
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
        connection.execute("COMMIT")
    except BaseException:
        _rollback(connection)
        raise


def _expire_ranges_sync(
    connection: sqlite3.Connection, ranges: list[int], older_than: float, limit: int
) -> tuple[int, int]:
    """Delete the messages older than ``older_than`` in these message_ages ranges, in order,
    at most ``limit`` of them. Return how many went and how many ranges are done with (their
    oldest timestamp rewritten, or the range dropped)."""
    deleted: list[tuple[Any, ...]] = []
    done = 0
    with _transaction(connection):
        for first_pk in ranges:
            row = connection.execute(_RANGE_END, (first_pk,)).fetchone()
            if row is not None:
                budget = limit - len(deleted)
                params = (first_pk, row[0], older_than, budget)
                old = connection.execute(_OLDER_IN_RANGE, params).fetchall()
                connection.executemany(_DELETE_AT, [(pk,) for pk, _ in old])
                deleted += old
                if len(old) == budget:  # maybe more left: go on next time
                    break
                oldest = connection.execute(_OLDEST_IN_RANGE, (first_pk, row[0])).fetchone()[0]
                if oldest is None:
                    connection.execute(_FORGET_RANGE, (first_pk,))
                else:
                    connection.execute(_SET_OLDEST, (oldest, first_pk))
            done += 1
        per_session = collections.Counter(session_id for _, session_id in deleted)
        connection.executemany(
            _DECREMENT_COUNT, [(count, session_id) for session_id, count in per_session.items()]
        )
    return len(deleted), done


def _delete_oldest_sync(
    connection: sqlite3.Connection, session_id: str, cap: int, limit: int
) -> tuple[int, int]:
    """Delete up to ``limit`` of the oldest messages a session holds beyond ``cap``; return
    how many went and how many it holds now (exact counts make the excess exact)."""
    with _transaction(connection):
        row = connection.execute(_COUNT_OF, (session_id,)).fetchone()
        count = 0 if row is None else int(row[0])
        deleted = 0
        if count > cap:
            deleted = connection.execute(
                _DELETE_OLDEST, (session_id, min(count - cap, limit))
            ).rowcount
            connection.execute(_DECREMENT_COUNT, (deleted, session_id))
    return deleted, count - deleted


def _ended_beyond_sync(connection: sqlite3.Connection, cap: int, page: int) -> list[str]:
    """From one snapshot: the least recently active ended sessions beyond ``cap`` sessions in
    all, at most ``page`` of them."""
    connection.execute("BEGIN")  # a read transaction: the count and the pick agree
    try:
        excess = int(connection.execute(_COUNT_SESSIONS).fetchone()[0]) - cap
        if excess <= 0:
            return []
        rows = connection.execute(_LEAST_RECENTLY_ENDED, (min(excess, page),)).fetchall()
        return [session_id for (session_id,) in rows]
    finally:
        _rollback(connection)


def _remove_sessions_sync(
    connection: sqlite3.Connection, session_ids: list[str], limit: int
) -> tuple[int, int, int]:
    """Remove ended sessions, in order, with their messages, deleting at most ``limit``
    messages. Return how many messages went, how many of the sessions are done with (removed,
    or found gone or active) and how many were removed."""
    deleted = done = removed = 0
    with _transaction(connection):
        for session_id in session_ids:
            row = connection.execute(_STATE_OF, (session_id,)).fetchone()
            if row is None or row[0] == SessionState.ACTIVE:
                done += 1
                continue
            budget = limit - deleted
            went = connection.execute(_DELETE_OLDEST, (session_id, budget)).rowcount
            deleted += went
            if went == budget:  # maybe more left: count these out, go on next time
                connection.execute(_DECREMENT_COUNT, (went, session_id))
                break
            connection.execute(_DELETE_SESSION, (session_id,))
            done += 1
            removed += 1
    return deleted, done, removed


# A message row: (session_id, stream_ms, stream_seq, message_id, sender, recipient, content,
# metadata, timestamp), the order of _INSERT_ROWS's parameters.
_POSITION: Final = operator.itemgetter(0, 1, 2)
_SESSION_ID: Final = operator.itemgetter(0)
_TIMESTAMP: Final = operator.itemgetter(8)


def _insert_rows(connection: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> int:
    """INSERT OR IGNORE message rows, in their order (their pks ascend likewise); return how
    many were new (total_changes does not count ignored rows)."""
    changes_before = connection.total_changes
    whole = len(rows) - len(rows) % _ROWS_PER_INSERT
    if whole:
        connection.executemany(
            _INSERT_ROWS[_ROWS_PER_INSERT],
            (
                list(itertools.chain.from_iterable(rows[start : start + _ROWS_PER_INSERT]))
                for start in range(0, whole, _ROWS_PER_INSERT)
            ),
        )
    start = whole
    for size in _REST_CHUNKS:
        if len(rows) - start >= size:
            chunk = rows[start : start + size]
            connection.execute(_INSERT_ROWS[size], list(itertools.chain.from_iterable(chunk)))
            start += size
    return connection.total_changes - changes_before


def _by_session(rows: list[tuple[Any, ...]]) -> Iterator[list[tuple[Any, ...]]]:
    for _, group in itertools.groupby(rows, _SESSION_ID):
        yield list(group)


def _catalog_params(
    group: list[tuple[Any, ...]], stored: list[tuple[Any, ...]], new: int
) -> tuple[Any, ...]:
    """_COUNT_INTO_SESSION's parameters for one session's rows: ``new`` were inserted and
    ``stored`` (in position order) are in the table now; a new entry starts at the first."""
    created_at = min(map(_TIMESTAMP, group))
    if not stored:
        return (group[0][0], created_at, 0.0, 0, None, None)
    last = stored[-1]
    return (group[0][0], created_at, max(map(_TIMESTAMP, stored)), new, last[1], last[2])


def _record_ages(connection: sqlite3.Connection, timestamps: list[float]) -> None:
    """Note the messages just inserted in message_ages; ``timestamps`` are theirs, in the
    order they were inserted, which gave them the consecutive pks up to the last one."""
    first_pk = int(connection.execute(_LAST_PK).fetchone()[0]) - len(timestamps) + 1
    connection.executemany(
        _RECORD_AGES,
        [
            (
                first_pk + start,
                first_pk + min(start + _AGE_RANGE, len(timestamps)) - 1,
                min(timestamps[start : start + _AGE_RANGE]),
            )
            for start in range(0, len(timestamps), _AGE_RANGE)
        ],
    )


def _deleted_among(connection: sqlite3.Connection, session_ids: list[str]) -> set[str]:
    """Which of these sessions the catalog (as the open transaction sees it) has deleted."""
    deleted: set[str] = set()
    for start in range(0, len(session_ids), _MAX_PARAMETERS):
        some = session_ids[start : start + _MAX_PARAMETERS]
        sql = _DELETED_AMONG.format(", ".join("?" * len(some)))  # placeholders only
        deleted.update(session_id for (session_id,) in connection.execute(sql, some))
    return deleted


def _is_stored(connection: sqlite3.Connection, row: tuple[Any, ...]) -> bool:
    stored = connection.execute(_STORED_ID_AT, row[:3]).fetchone()
    return stored is not None and stored[0] == row[3]


def _fetch_all(
    connection: sqlite3.Connection, sql: str, params: tuple[Any, ...]
) -> list[tuple[Any, ...]]:
    return connection.execute(sql, params).fetchall()


def _rollback(connection: sqlite3.Connection) -> None:
    if connection.in_transaction:
        with contextlib.suppress(sqlite3.Error):  # the original error is the one to report
            connection.execute("ROLLBACK")


def _close_all(*connections: sqlite3.Connection) -> None:
    for connection in connections:
        with contextlib.suppress(sqlite3.Error):
            connection.close()


# SQLite primary result codes (sqlite3.h).
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_NOTADB = 5, 6, 11, 13, 26
_SQLITE_NOMEM, _SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_CANTOPEN = 7, 8, 10, 14
_REOPEN_AFTER: Final = frozenset(
    {_SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_CANTOPEN, _SQLITE_NOMEM, _SQLITE_FULL}
)
"""Errors after which a connection may stay unusable even once the cause is gone: one opened
while the file was read-only stays read-only (SQLITE_READONLY after a chmod back), a file
descriptor may point at a file that was replaced. Reopening is cheap (a schema check), and
harmless when the connection was fine after all."""


def _error_code(exc: sqlite3.Error) -> int:
    """The primary result code of a sqlite3 error (0 when it carries none)."""
    return (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF


@contextlib.contextmanager
def _translate_errors(busy_timeout_ms: int) -> Iterator[None]:
    """Re-raise sqlite3 and encoding errors as HistoryError; messages never quote values.

    SQLite's own error texts name tables, columns and SQL, never bound parameters, so they are
    kept; a UnicodeEncodeError carries the text it failed on, so it is dropped.
    """
    try:
        yield
    except sqlite3.Error as exc:
        code = _error_code(exc)
        if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
            raise HistoryCorruptError(
                f"the history database is damaged or is not a SQLite database: {exc}"
            ) from exc
        if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
            raise HistoryUnavailableError(
                f"the history database stayed locked by another connection for longer than "
                f"busy_timeout ({busy_timeout_ms} ms); retry later"
            ) from exc
        if code == _SQLITE_FULL:
            raise HistoryUnavailableError("the history database's disk is full") from exc
        if code in (_SQLITE_NOMEM, _SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_CANTOPEN):
            name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
            raise HistoryUnavailableError(f"the history database is unavailable: {name}") from exc
        name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
        raise HistoryError(f"the history database failed: {name}: {exc}") from exc
    except UnicodeEncodeError:
        raise HistoryError(
            "a message or session holds text that is not valid Unicode (lone surrogate)"
        ) from None
    except OverflowError:
        raise HistoryError("a number does not fit SQLite's 64-bit integers") from None
