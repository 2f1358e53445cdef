"""The hand-written baselines: the same work done with stock redis-py (XADD, XREADGROUP + XACK,
XREAD BLOCK), and history written and read by hand with sqlite3 or asyncpg."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import anyio.to_thread
from redis.asyncio import Redis, RedisCluster
from redis.typing import EncodableT, FieldT

from streamstore.bench.workload import CONTENT, READ_COUNT, RECIPIENT, SENDER
from streamstore.config import Settings
from streamstore.errors import HistoryUnavailableError
from streamstore.history import history_from_url
from streamstore.redis.connection import Client
from streamstore.redis.topology import topology_of

if TYPE_CHECKING:
    import asyncpg

GROUP: Final = "bench"
"""The baseline's consumer group; also the persist step's persister consumer."""
_RAW_TABLE: Final = (
    "CREATE TABLE messages (pk INTEGER PRIMARY KEY, session_id TEXT NOT NULL, "
    "stream_id TEXT NOT NULL, sender TEXT NOT NULL, recipient TEXT, content TEXT NOT NULL, "
    "timestamp REAL NOT NULL)"
)
_RAW_INSERT: Final = (
    "INSERT INTO messages (session_id, stream_id, sender, recipient, content, timestamp) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
_RAW_SELECT: Final = (
    "SELECT stream_id, sender, recipient, content, timestamp FROM messages "
    "WHERE session_id = ? ORDER BY pk"
)
# The same table and reads in PostgreSQL, in the step's schema ("{schema}": a key prefix of
# the bench's own making, [a-z0-9] only, which is why it may be quoted into the statement).
_PG_RAW_TABLE: Final = (
    'CREATE TABLE "{schema}".raw_messages (pk bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, '
    "session_id text NOT NULL, stream_id text NOT NULL, sender text NOT NULL, recipient text, "
    "content text NOT NULL, timestamp double precision NOT NULL)"
)
_PG_RAW_COLUMNS: Final = ("session_id", "stream_id", "sender", "recipient", "content", "timestamp")
_PG_RAW_SELECT: Final = (
    'SELECT stream_id, sender, recipient, content, timestamp FROM "{schema}".raw_messages '
    "WHERE session_id = $1 ORDER BY pk"
)
_PG_OWN_OPTIONS: Final = frozenset({"schema", "pool_size", "command_timeout", "connect_timeout"})
"""The options of a ``postgresql://`` history URL that are streamstore's, not asyncpg's (as
:meth:`PostgresHistory.from_url <streamstore.history.postgres.PostgresHistory.from_url>` reads
them)."""

Row = tuple[str, str, str, str, str, float]
"""A baseline history row: session, stream id, sender, recipient, content, timestamp."""


def raw_client(url: str, settings: Settings) -> Client:
    """The baseline's client, made as a user would with stock redis-py: ``Redis.from_url``, or
    ``RedisCluster.from_url`` on the first node of a ``redis+cluster://`` URL (it finds the
    others), with the TLS files of ``settings`` for ``rediss``. Not
    :func:`streamstore.redis.connection.connect`: its hiredis packing is part of what is
    measured."""
    parts = urlsplit(url)
    scheme = parts.scheme.removesuffix("+cluster")
    tls: dict[str, Any] = {}
    if scheme == "rediss":
        tls = {
            "ssl_ca_certs": settings.tls_ca_file,
            "ssl_certfile": settings.tls_cert_file,
            "ssl_keyfile": settings.tls_key_file,
        }
    if scheme == parts.scheme:
        return Redis.from_url(url, **tls)
    userinfo, at, nodes = parts.netloc.rpartition("@")
    first = f"{userinfo}{at}{nodes.split(',')[0]}"
    return RedisCluster.from_url(urlunsplit(parts._replace(scheme=scheme, netloc=first)), **tls)


def raw_key(prefix: str, name: str) -> str:
    """A baseline stream, named as a user would by hand, under the step's prefix so that the
    step's clean-up deletes it with streamstore's keys."""
    return f"{prefix}:raw:{name}"


def raw_fields() -> dict[FieldT, EncodableT]:
    """What a hand-written publisher puts in an entry."""
    return {"sender": SENDER, "recipient": RECIPIENT, "content": CONTENT, "ts": time.time()}


async def xadd_pipelined(raw: Client, key: str, count: int) -> None:
    async with raw.pipeline(transaction=False) as pipe:
        for _ in range(count):
            pipe.xadd(key, raw_fields())
        await pipe.execute()


async def read_and_ack(raw: Client, key: str, session_id: str) -> list[list[Row]]:
    """The hand-written consumer: XREADGROUP COUNT 1000, turn entries into rows, XACK."""
    batches: list[list[Row]] = []
    route = topology_of(raw).route(key)
    while True:
        reply = _streams(
            await raw.execute_command(
                *("XREADGROUP", "GROUP", GROUP, "consumer", "COUNT", READ_COUNT),
                *("STREAMS", key, ">"),
                **route,
            )
        )
        if not reply:
            return batches
        entries = reply[0][1]
        batches.append(
            [
                (
                    session_id,
                    entry_id.decode(),
                    fields[b"sender"].decode(),
                    fields[b"recipient"].decode(),
                    fields[b"content"].decode(),
                    float(fields[b"ts"]),
                )
                for entry_id, fields in entries
            ]
        )
        await raw.xack(key, GROUP, *(entry_id for entry_id, _ in entries))


async def xread_latencies(raw: Client, key: str, sent: list[float]) -> list[float]:
    """The hand-written subscriber: XREAD BLOCK from the start of a new stream."""
    latencies: list[float] = []
    cursor: bytes | str = "0-0"
    route = topology_of(raw).route(key)
    while len(latencies) < len(sent):
        reply = _streams(
            await raw.execute_command(
                *("XREAD", "COUNT", READ_COUNT, "BLOCK", 1000, "STREAMS", key, cursor),
                **route,
            )
        )
        for _, entries in reply:
            for entry_id, fields in entries:
                latencies.append(time.perf_counter() - sent[int(fields[b"i"])])
                cursor = entry_id
    return latencies


def _streams(reply: object) -> list[Any]:
    """An XREAD/XREADGROUP reply of the baseline client: ``[[key, [(id, fields), ...]], ...]``
    (redis-py's RESP2-shaped default), empty when nothing arrived.

    The baseline sends both reads with ``execute_command``, routed by the topology straight to
    the key's node on a cluster as streamstore does: redis-py's cluster client would otherwise ask
    a node for their keys (COMMAND GETKEYS) before every read, a round trip streamstore does
    not pay."""
    return cast("list[Any]", reply or [])


class HistoryBaseline(Protocol):
    """Where each step keeps its history, and the same writes and reads done by hand there."""

    kind: str
    """What the history is, for the report: ``SQLite <version>`` or ``PostgreSQL <version>``."""
    writes: str
    """How the baseline writes, as figure names say it."""
    reads: str
    """How the baseline reads, as figure names say it."""

    def url(self, name: str) -> str:
        """The history URL of the step whose key prefix is ``name``."""
        ...

    async def write(self, name: str, batches: list[list[Row]]) -> float:
        """Store ``batches`` in a plain table of the step's, one transaction each; returns the
        seconds the writes took."""
        ...

    async def select(self, name: str, session_id: str) -> tuple[float, int]:
        """One SELECT of the session's rows from that table; returns seconds and rows."""
        ...

    async def drop(self, name: str) -> None:
        """Remove what the step stored, even when the step was cancelled."""
        ...


@contextlib.asynccontextmanager
async def history_baseline(url: str, scratch: Path) -> AsyncIterator[HistoryBaseline]:
    """PostgreSQL for a ``postgresql://`` (or ``postgres://``) history URL, else SQLite files
    in ``scratch``.

    Raises:
        ConfigurationError: the ``postgresql://`` URL is malformed.
        HistoryUnavailableError: PostgreSQL cannot be reached or refuses the login.
    """
    if urlsplit(url).scheme in ("postgresql", "postgres"):
        async with _PostgresBaseline.open(url) as postgres:
            yield postgres
    else:
        yield _SQLiteBaseline(scratch)


class _SQLiteBaseline:
    """Each step's history is a SQLite file in the scratch directory (removed at the end of the
    run); the baseline writes a file of its own with sqlite3 executemany, in a thread."""

    writes = "sqlite3 executemany"
    reads = "sqlite3 SELECT"

    def __init__(self, scratch: Path) -> None:
        self.kind = f"SQLite {sqlite3.sqlite_version}"
        self._scratch = scratch

    def url(self, name: str) -> str:
        return sqlite_url(self._scratch / f"{name}.db")

    async def write(self, name: str, batches: list[list[Row]]) -> float:
        return await anyio.to_thread.run_sync(_write_rows, self._raw_path(name), batches)

    async def select(self, name: str, session_id: str) -> tuple[float, int]:
        return await anyio.to_thread.run_sync(_select_rows, self._raw_path(name), session_id)

    async def drop(self, name: str) -> None:
        """Nothing to do: the files go with the scratch directory."""

    def _raw_path(self, name: str) -> Path:
        return self._scratch / f"{name}-raw.db"


def _connect_raw(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = FULL")
    return connection


def _write_rows(path: Path, batches: list[list[Row]]) -> float:
    """The hand-written history: executemany, one transaction per read batch; returns the
    seconds the writes took."""
    connection = _connect_raw(path)
    try:
        connection.execute(_RAW_TABLE)
        started = time.perf_counter()
        for rows in batches:
            with connection:
                connection.executemany(_RAW_INSERT, rows)
        return time.perf_counter() - started
    finally:
        connection.close()


def _select_rows(path: Path, session_id: str) -> tuple[float, int]:
    """The hand-written replay: one SELECT of the session's rows; returns seconds and rows."""
    connection = _connect_raw(path)
    try:
        started = time.perf_counter()
        rows = connection.execute(_RAW_SELECT, (session_id,)).fetchall()
        return time.perf_counter() - started, len(rows)
    finally:
        connection.close()


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


class _PostgresBaseline:
    """Each step's history is a schema of its own, named after its key prefix, in the database
    of the history URL, dropped when the step ends; the baseline COPYs into a plain table in
    that schema, one transaction per read batch, on one asyncpg connection kept for the run."""

    writes = "asyncpg COPY"
    reads = "asyncpg SELECT"

    def __init__(self, url: str, connection: asyncpg.Connection[asyncpg.Record]) -> None:
        version = connection.get_settings().server_version.split()[0]  # "15.6 (Debian ...)"
        self.kind = f"PostgreSQL {version}"
        self._url = url
        self._connection = connection

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, url: str) -> AsyncIterator[_PostgresBaseline]:
        """The baseline for the database of ``url``, a ``postgresql://`` history URL.

        Raises:
            ConfigurationError: the URL is malformed.
            HistoryUnavailableError: PostgreSQL cannot be reached or refuses the login.
        """
        history_from_url(url)  # checks the URL as every step's store will read it
        connection = await _connect_postgres(url)
        try:
            yield cls(url, connection)
        finally:
            with anyio.CancelScope(shield=True):
                await connection.close(timeout=10)

    def url(self, name: str) -> str:
        head, _, query = self._url.partition("?")
        options = [o for o in parse_qsl(query, keep_blank_values=True) if o[0] != "schema"]
        return f"{head}?{urlencode([*options, ('schema', name)])}"

    async def write(self, name: str, batches: list[list[Row]]) -> float:
        # The step's store created the schema when it opened.
        await self._connection.execute(_PG_RAW_TABLE.format(schema=name))
        started = time.perf_counter()
        for rows in batches:
            async with self._connection.transaction():
                await self._connection.copy_records_to_table(
                    "raw_messages", records=rows, columns=_PG_RAW_COLUMNS, schema_name=name
                )
        return time.perf_counter() - started

    async def select(self, name: str, session_id: str) -> tuple[float, int]:
        started = time.perf_counter()
        rows = await self._connection.fetch(_PG_RAW_SELECT.format(schema=name), session_id)
        return time.perf_counter() - started, len(rows)

    async def drop(self, name: str) -> None:
        """DROP SCHEMA ... CASCADE on a connection of its own (the shared one may be in the
        middle of the cancelled step's statement).

        Raises:
            HistoryUnavailableError: PostgreSQL cannot be reached.
            asyncpg.PostgresError: PostgreSQL refused the statement.
        """
        with anyio.move_on_after(30, shield=True):
            connection = await _connect_postgres(self._url)
            try:
                await connection.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
            finally:
                await connection.close(timeout=10)


async def _connect_postgres(url: str) -> asyncpg.Connection[asyncpg.Record]:
    """An asyncpg connection to the database of a history URL (without streamstore's options).

    Raises:
        HistoryUnavailableError: PostgreSQL cannot be reached or refuses the login.
    """
    import asyncpg  # noqa: PLC0415 - the optional postgres extra, needed with PostgreSQL only

    head, _, query = url.partition("?")
    theirs = [o for o in parse_qsl(query, keep_blank_values=True) if o[0] not in _PG_OWN_OPTIONS]
    dsn = head + (f"?{urlencode(theirs)}" if theirs else "")
    try:
        return await asyncpg.connect(dsn, timeout=10)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        # Not the URL: it may hold the password.
        raise HistoryUnavailableError(
            f"the bench cannot connect to PostgreSQL: {type(exc).__name__}: {exc}"
        ) from exc
