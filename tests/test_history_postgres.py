"""PostgreSQL history: its own promises (migrations, concurrent writers, lost connections, plans).

The conformance suite runs against PostgreSQL from tests/test_history.py, whose ``store`` fixture
takes :func:`opened_postgres_history` from here. Every test works in a schema of its own
(``streamstore_test_<run>_<n>``) that is dropped when it ends; all are skipped unless
``STREAMSTORE_TEST_POSTGRES_URL`` names a database, e.g. ``postgresql://postgres@127.0.0.1/test``.

``STREAMSTORE_TEST_POSTGRES_URL=... .venv/bin/python -m tests.test_history_postgres`` measures
write_batch against COPY into a plain table (not a test: figures are never asserted).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

asyncpg = pytest.importorskip("asyncpg")

from streamstore.errors import (  # noqa: E402 - after the importorskip
    ConfigurationError,
    HistoryCorruptError,
    HistoryError,
    HistoryUnavailableError,
)
from streamstore.history import HistoryStore, RetentionResult  # noqa: E402
from streamstore.history import postgres as postgres_module  # noqa: E402
from streamstore.history.memory import MemoryHistory  # noqa: E402
from streamstore.history.postgres import SCHEMA_VERSION, PostgresHistory  # noqa: E402
from streamstore.history.sqlite import SQLiteHistory  # noqa: E402
from streamstore.models import Message, Session, SessionState, StreamId, new_message_id  # noqa: E402
from tests.test_history import assert_counts_exact, message  # noqa: E402

_ROOT = Path(__file__).resolve().parent.parent
POSTGRES_URL = os.environ.get("STREAMSTORE_TEST_POSTGRES_URL", "")
_RUN = f"streamstore_test_{uuid.uuid4().hex[:8]}"
_schema_numbers = itertools.count()
needs_postgres = pytest.mark.skipif(
    not POSTGRES_URL, reason="STREAMSTORE_TEST_POSTGRES_URL is not set"
)

# -- helpers (also used by tests/test_history.py) ----------------------------------------------


def url_for(schema: str, **options: str) -> str:
    """The test database's URL, pointed at ``schema``."""
    separator = "&" if "?" in POSTGRES_URL else "?"
    return f"{POSTGRES_URL}{separator}{urlencode({'schema': schema, **options})}"


@contextlib.asynccontextmanager
async def postgres_schema() -> AsyncIterator[str]:
    """A schema name of this run's own; the schema is dropped (if it was made) at the end."""
    async with postgres_schema_named(f"{_RUN}_{next(_schema_numbers)}") as schema:
        yield schema


@contextlib.asynccontextmanager
async def postgres_schema_named(schema: str) -> AsyncIterator[str]:
    if not POSTGRES_URL:
        pytest.skip("STREAMSTORE_TEST_POSTGRES_URL is not set")
    try:
        yield schema
    finally:
        with anyio.CancelScope(shield=True):
            connection = await asyncpg.connect(POSTGRES_URL)
            try:
                await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await connection.close()


@contextlib.asynccontextmanager
async def opened_postgres_history(**options: str) -> AsyncIterator[PostgresHistory]:
    """An open PostgresHistory in a fresh schema; closed and dropped at the end."""
    async with postgres_schema() as schema:
        history = PostgresHistory.from_url(url_for(schema, **options))
        await history.open()
        try:
            yield history
        finally:
            await history.close()


@contextlib.asynccontextmanager
async def opened(url: str) -> AsyncIterator[PostgresHistory]:
    history = PostgresHistory.from_url(url)
    await history.open()
    try:
        yield history
    finally:
        await history.close()


async def everything(store: HistoryStore) -> tuple[list[Session], list[Message]]:
    sessions = await store.list_sessions(limit=100_000)
    messages = [m for s in sessions for m in await store.read(s.id, limit=100_000)]
    return sessions, messages


@pytest.fixture
async def admin() -> AsyncIterator[Any]:
    """A connection of the test's own, outside any store."""
    if not POSTGRES_URL:
        pytest.skip("STREAMSTORE_TEST_POSTGRES_URL is not set")
    connection = await asyncpg.connect(POSTGRES_URL)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    """A schema name of the test's own; it and ``<name>_fresh`` are dropped at the end."""
    async with postgres_schema() as name, postgres_schema_named(f"{name}_fresh"):
        yield name


async def normalized_objects(admin: Any, schema: str) -> list[tuple[str, str]]:
    return [
        (name, definition.replace(f'"{schema}"', "S").replace(schema, "S"))
        for name, definition in await schema_objects(admin, schema)
    ]


async def versions(admin: Any, schema: str) -> list[int]:
    rows = await admin.fetch(
        f'SELECT version FROM "{schema}".streamstore_migrations ORDER BY version'
    )
    return [row[0] for row in rows]


async def schema_objects(admin: Any, schema: str) -> list[tuple[str, str]]:
    """Every table and index of the schema, with the index definitions."""
    rows = await admin.fetch(
        """SELECT c.relname, c.relkind::text || ' ' || coalesce(pg_get_indexdef(c.oid), '')
           FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
           WHERE n.nspname = $1 ORDER BY c.relname""",
        schema,
    )
    return [(row[0], row[1]) for row in rows]


# -- URLs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "dsn", "schema", "pool_size", "command_timeout"),
    [
        ("postgresql://u@h:5/db", "postgresql://u@h:5/db", "streamstore", 10, 60.0),
        (
            "postgres://u:pw@h/db?schema=chat_1&pool_size=3&sslmode=require&command_timeout=2.5",
            "postgres://u:pw@h/db?sslmode=require",
            "chat_1",
            3,
            2.5,
        ),
        (
            "postgresql:///db?host=%2Ftmp&application_name=w1&connect_timeout=3",
            "postgresql:///db?host=%2Ftmp&application_name=w1",
            "streamstore",
            10,
            60.0,
        ),
    ],
)
def test_from_url(url: str, dsn: str, schema: str, pool_size: int, command_timeout: float) -> None:
    store = PostgresHistory.from_url(url)
    assert (store._dsn, store.schema, store._pool_size) == (dsn, schema, pool_size)
    assert store._command_timeout == command_timeout


@pytest.mark.parametrize(
    "url",
    [
        "mysql://u@h/db",
        "postgresql://u@h/db#x",
        "postgresql://u:hunter2@h/db?schema=Upper",
        "postgresql://u:hunter2@h/db?schema=pg_catalog",
        "postgresql://u:hunter2@h/db?schema=a-b",
        'postgresql://u:hunter2@h/db?schema="x"',
        "postgresql://u:hunter2@h/db?schema=x%22%3B%20DROP%20SCHEMA%20public",
        "postgresql://u:hunter2@h/db?schema=",
        "postgresql://u:hunter2@h/db?schema=1abc",
        f"postgresql://u:hunter2@h/db?schema={'a' * 64}",
        "postgresql://u:hunter2@h/db?schema=a&schema=b",
        "postgresql://u:hunter2@h/db?pool_size=0",
        "postgresql://u:hunter2@h/db?pool_size=abc",
        "postgresql://u:hunter2@h/db?pool_size=1.5",
        "postgresql://u:hunter2@h/db?command_timeout=0",
        "postgresql://u:hunter2@h/db?command_timeout=nan",
        "postgresql://u:hunter2@h/db?command_timeout=inf",
        "postgresql://u:hunter2@h/db?connect_timeout=-1",
        "postgresql://u:hunter2@h/db?&&",
    ],
)
def test_from_url_refuses(url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        PostgresHistory.from_url(url)
    assert "hunter2" not in str(caught.value)


# -- error mapping ------------------------------------------------------------------------------


def server_error(code: str, message: str, detail: str = "Key (id)=(secret-value) exists.") -> Any:
    return asyncpg.exceptions.PostgresError.new(
        {"C": code, "M": message, "D": detail, "S": "ERROR"}
    )


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (server_error("53100", "could not extend file"), HistoryUnavailableError),  # disk full
        (server_error("40001", "could not serialize access"), HistoryUnavailableError),
        (server_error("40P01", "deadlock detected"), HistoryUnavailableError),
        (server_error("57P01", "terminating connection"), HistoryUnavailableError),
        (server_error("57014", "canceling statement due to timeout"), HistoryUnavailableError),
        (server_error("08006", "connection failure"), HistoryUnavailableError),
        (server_error("25006", "read-only transaction"), HistoryUnavailableError),
        (server_error("42501", "permission denied for table messages"), HistoryUnavailableError),
        (server_error("28P01", "password authentication failed"), HistoryUnavailableError),
        (ConnectionRefusedError(111, "Connection refused"), HistoryUnavailableError),
        (TimeoutError(), HistoryUnavailableError),
        (asyncpg.exceptions.InterfaceError("connection is closed"), HistoryUnavailableError),
        (asyncpg.exceptions.ProtocolError("unexpected message"), HistoryUnavailableError),
        (server_error("XX001", "invalid page in block 7"), HistoryCorruptError),
        (server_error("42P01", 'relation "s.messages" does not exist'), HistoryCorruptError),
        (server_error("23505", "duplicate key value violates unique constraint"), HistoryError),
        (server_error("22021", "invalid byte sequence for encoding"), HistoryError),
        (server_error("54000", "index row size exceeds maximum"), HistoryError),
        (server_error("42601", "syntax error"), HistoryError),
        (UnicodeEncodeError("utf-8", "secret-value", 0, 1, "surrogates"), HistoryError),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else "",
)
def test_errors_are_translated(error: BaseException, expected: type[HistoryError]) -> None:
    with pytest.raises(HistoryError) as caught, postgres_module._translate_errors():
        raise error
    assert type(caught.value) is expected
    assert "secret-value" not in str(caught.value)


# -- schema and migrations ----------------------------------------------------------------------


@needs_postgres
async def test_opening_again_changes_nothing(admin: Any, schema: str) -> None:
    async with opened(url_for(schema)) as store:
        await store.write_batch([message("s", 1)], [Session(id="s", participants=("a",))])
    before = await schema_objects(admin, schema)
    assert {name for name, _ in before} >= {
        "sessions",
        "messages",
        "streamstore_migrations",
        "messages_by_position",
        "messages_by_id",
        "messages_by_age",
        "sessions_by_activity",
    }
    for _ in range(2):
        async with opened(url_for(schema)) as store:
            assert await store.count_messages() == 1
    assert await schema_objects(admin, schema) == before
    assert await versions(admin, schema) == [1, 2] == list(range(1, SCHEMA_VERSION + 1))


_OPEN_IN_A_PROCESS = """
import asyncio, sys
from streamstore.history.postgres import PostgresHistory
from streamstore.models import Message, StreamId

async def main():
    store = PostgresHistory.from_url(sys.argv[1])
    print("ready", flush=True)
    sys.stdin.readline()
    await store.open()
    message = Message(id="p" + sys.argv[2], session_id="s", sender="a", content="x",
                      stream_id=StreamId(int(sys.argv[2]), 0))
    print(await store.write_batch([message]), flush=True)
    await store.close()

asyncio.run(main())
"""


@needs_postgres
async def test_concurrent_opens_migrate_once(admin: Any, schema: str) -> None:
    """Processes and tasks open a schema that does not exist yet, all at once."""
    url = url_for(schema)
    written: list[int] = []
    go = anyio.Event()

    async def open_and_write(i: int) -> None:
        store = PostgresHistory.from_url(url)
        await go.wait()
        await store.open()
        try:
            written.append(await store.write_batch([message("s", i, id=f"t{i}")]))
        finally:
            await store.close()

    processes = []
    try:
        with anyio.fail_after(60):
            for i in range(3):
                command = [sys.executable, "-c", _OPEN_IN_A_PROCESS, url, str(1000 + i)]
                processes.append(await anyio.open_process(command, cwd=_ROOT, stderr=None))
            outputs = [BufferedByteReceiveStream(p.stdout) for p in processes]  # type: ignore[arg-type]
            for output in outputs:  # imported and waiting
                assert await output.receive_until(b"\n", 100) == b"ready"
            async with anyio.create_task_group() as tg:
                for i in range(6):
                    tg.start_soon(open_and_write, i + 1)
                for process in processes:
                    assert process.stdin is not None
                    await process.stdin.send(b"go\n")
                go.set()
            for process, output in zip(processes, outputs, strict=True):
                assert await output.receive_until(b"\n", 100) == b"1"
                assert await process.wait() == 0
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
            await process.aclose()
    assert written == [1] * 6
    assert await versions(admin, schema) == [1, 2]
    async with opened(url) as store:
        session = await store.get_session("s")
        assert session is not None
        assert session.message_count == await store.count_messages() == 9


# Version 1's schema, frozen as streamstore wrote it: the starting point of the migration test.
_SCHEMA_V1 = (
    """
    CREATE TABLE {schema}.sessions (
        id              text COLLATE "C" PRIMARY KEY,
        participants    text NOT NULL,
        created_at      double precision NOT NULL,
        last_active_at  double precision NOT NULL,
        ttl             double precision,
        metadata        text NOT NULL,
        state           text NOT NULL CHECK (state IN ('active', 'closed', 'deleted')),
        message_count   bigint NOT NULL DEFAULT 0,
        last_stream_ms  bigint,
        last_stream_seq bigint
    )
    """,
    """
    CREATE TABLE {schema}.messages (
        pk          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        session_id  text COLLATE "C" NOT NULL,
        stream_ms   bigint NOT NULL,
        stream_seq  bigint NOT NULL,
        message_id  text COLLATE "C" NOT NULL,
        sender      text NOT NULL,
        recipient   text,
        content     bytea NOT NULL,
        metadata    text,
        timestamp   double precision NOT NULL
    )
    """,
    "CREATE UNIQUE INDEX messages_by_position ON {schema}.messages"
    " (session_id, stream_ms, stream_seq)",
    "CREATE UNIQUE INDEX messages_by_id ON {schema}.messages (message_id, session_id)",
)


def test_the_frozen_version_1_schema_is_the_one_migrated_from() -> None:
    def words(statements: tuple[str, ...]) -> list[str]:
        return [" ".join(statement.split()) for statement in statements]

    assert words(_SCHEMA_V1) == words(postgres_module._SCHEMA_V1)


async def write_version_1_schema(admin: Any, schema: str) -> None:
    """What version 1 left behind: ``kept`` (active, 3 messages) and ``gone``, deleted after
    its 2 messages were stored (version 1 kept them)."""
    quoted = f'"{schema}"'
    async with admin.transaction():
        await admin.execute(f"CREATE SCHEMA {quoted}")
        await admin.execute(postgres_module._VERSION_TABLE.replace("{schema}", quoted))
        for statement in _SCHEMA_V1:
            await admin.execute(statement.replace("{schema}", quoted))
        await admin.execute(f"INSERT INTO {quoted}.streamstore_migrations (version) VALUES (1)")
        await admin.executemany(
            f"INSERT INTO {quoted}.sessions"
            " VALUES ($1, '[]', 1.0, $2, NULL, '{}', $3, $4, $5, 0)",
            [("kept", 3.0, "active", 3, 3), ("gone", 2.0, "deleted", 2, 2)],
        )
        await admin.executemany(
            f"INSERT INTO {quoted}.messages (session_id, stream_ms, stream_seq, message_id,"
            " sender, recipient, content, metadata, timestamp)"
            " VALUES ($1, $2, 0, $3, 'a', NULL, 'x', NULL, $4)",
            [("kept", ms, f"k{ms}", float(ms)) for ms in (1, 2, 3)]
            + [("gone", ms, f"g{ms}", float(ms)) for ms in (1, 2)],
        )


@needs_postgres
async def test_a_version_1_schema_is_migrated(admin: Any, schema: str) -> None:
    await write_version_1_schema(admin, schema)
    fresh = f"{schema}_fresh"
    async with opened(url_for(fresh)):
        pass
    async with opened(url_for(schema)) as store:
        assert await versions(admin, schema) == [1, 2]
        assert await normalized_objects(admin, schema) == await normalized_objects(admin, fresh)
        assert [m.id for m in await store.read("kept")] == ["k1", "k2", "k3"]
        gone = await store.get_session("gone")
        assert gone is not None
        # Deleted stays deleted, for what version 1 kept too.
        assert (gone.state, gone.message_count, gone.last_stream_id) == (
            SessionState.DELETED,
            0,
            StreamId(2, 0),
        )
        assert await store.count_messages() == 3
        assert await store.write_batch([message("gone", 5), message("kept", 5, timestamp=5.0)]) == 1
        assert await store.enforce_retention(older_than=2.5) == RetentionResult(2, 0)
        assert await store.enforce_retention(max_sessions=1) == RetentionResult(0, 1)
        assert [s.id for s in await store.list_sessions()] == ["kept"]
    async with opened(url_for(schema)) as store:  # opened again: nothing left to migrate
        assert [m.stream_id for m in await store.read("kept")] == [(3, 0), (5, 0)]
        assert await versions(admin, schema) == [1, 2]


@needs_postgres
async def test_a_newer_schema_is_refused(admin: Any, schema: str) -> None:
    async with opened(url_for(schema)) as store:
        await store.write_batch([message("s", 1)])
    await admin.execute(
        f'INSERT INTO "{schema}".streamstore_migrations (version) VALUES ($1)', SCHEMA_VERSION + 1
    )
    store = PostgresHistory.from_url(url_for(schema))
    with pytest.raises(HistoryCorruptError, match="newer"):
        await store.open()
    with pytest.raises(HistoryError, match="not open"):
        await store.count_messages()


@needs_postgres
async def test_another_applications_tables_are_refused(admin: Any, schema: str) -> None:
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    await admin.execute(f'CREATE TABLE "{schema}".messages (id integer PRIMARY KEY, body text)')
    before = await schema_objects(admin, schema)
    with pytest.raises(HistoryCorruptError, match="not a streamstore history"):
        await PostgresHistory.from_url(url_for(schema)).open()
    assert await schema_objects(admin, schema) == before


@needs_postgres
async def test_a_dropped_table_is_corrupt_not_poison(admin: Any, schema: str) -> None:
    async with opened(url_for(schema)) as store:
        await store.write_batch([message("s", 1)])
        await admin.execute(f'DROP TABLE "{schema}".messages')
        with pytest.raises(HistoryCorruptError):
            await store.write_batch([message("s", 2)])
        with pytest.raises(HistoryCorruptError):
            await store.read("s")
    with pytest.raises(HistoryCorruptError, match="damaged"):
        await PostgresHistory.from_url(url_for(schema)).open()


@needs_postgres
async def test_the_test_schema_is_dropped_at_the_end(admin: Any) -> None:
    async with opened_postgres_history() as store:
        await store.write_batch([message("s", 1)])
        name = store.schema
        exists = "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)"
        assert await admin.fetchval(exists, name)
    assert not await admin.fetchval(exists, name)


# -- writes -------------------------------------------------------------------------------------


@needs_postgres
async def test_overlapping_batches_from_four_writers(schema: str) -> None:
    """Four stores (pools of their own) write random overlapping batches of the same messages
    at once: every message is stored exactly once, counted once, and nothing deadlocks."""
    sessions = [f"s{i:02d}" for i in range(20)]
    universe = [
        message(sessions[i % 20], 1000 + i // 20, id=f"m{i:05d}", timestamp=1000.0 + i)
        for i in range(3000)
    ]
    url = url_for(schema, pool_size="2")
    async with opened(url):
        pass  # the schema exists before the race: this test is about writes
    written: list[int] = []

    async def writer(n: int) -> None:
        rng = random.Random(n)
        async with opened(url) as store:
            for _ in range(12):
                batch = rng.sample(universe, 400)
                snapshots = [
                    Session(id=session_id, participants=(f"w{n}",), last_active_at=rng.random())
                    for session_id in rng.sample(sessions, 4)
                ]
                written.append(await store.write_batch(batch, snapshots))
            written.append(await store.write_batch(universe[n::4]))

    async with anyio.create_task_group() as tg:
        for n in range(4):
            tg.start_soon(writer, n)
    assert sum(written) == len(universe)
    async with opened(url) as store:
        assert await store.count_messages() == len(universe)
        stored = await store.list_sessions()
        assert [s.id for s in stored] == sessions
        for session in stored:
            assert session.message_count == 150
            assert session.last_stream_id == StreamId(1000 + 149, 0)
            assert session.participants[0].startswith("w")
        read = [m for s in sessions for m in await store.read(s, limit=1000)]
        assert sorted(m.id for m in read) == [m.id for m in universe]
        await assert_counts_exact(store)


@needs_postgres
async def test_retention_alongside_writes_and_deletes(schema: str) -> None:
    """Retention passes (two at once, tiny chunks), writers and deletions touch the same
    sessions at once: no deadlock, and every count stays exact."""
    url = url_for(schema)
    sessions = [f"s{i}" for i in range(8)]
    async with opened(url) as store:
        await store.write_batch(
            [message(s, ms, timestamp=float(ms)) for s in sessions for ms in range(1, 60)],
            [
                Session(id=s, state=SessionState.CLOSED, last_active_at=i)
                for i, s in enumerate(sessions[:4])
            ],
        )
    done = anyio.Event()

    async def write(n: int) -> None:
        rng = random.Random(n)
        async with opened(url) as store:
            ms = 100
            while not done.is_set():
                ms += 1
                batch = [message(s, ms, n, timestamp=float(ms)) for s in rng.sample(sessions, 5)]
                await store.write_batch(batch)

    async def retain() -> None:
        async with opened(url) as store:
            store._retention_chunk = 4
            for older_than in (20.0, 40.0):
                await store.enforce_retention(
                    older_than=older_than, max_messages_per_session=30, max_sessions=6
                )

    async with anyio.create_task_group() as tg:
        tg.start_soon(write, 1)
        tg.start_soon(write, 2)
        async with anyio.create_task_group() as retention:
            retention.start_soon(retain)
            retention.start_soon(retain)
            async with opened(url) as store:
                await anyio.sleep(0.05)
                await store.write_batch([], [Session(id="s7", state=SessionState.DELETED)])
        done.set()
    async with opened(url) as store:  # (s7 may be gone: the catalog cap takes deleted ones)
        await assert_counts_exact(store)


@needs_postgres
async def test_snapshots_of_one_session_in_one_batch_apply_in_order(tmp_path: Path) -> None:
    snapshots = [
        Session(id="s", participants=("a",), last_active_at=5.0, ttl=10),
        Session(id="s", participants=("b",), last_active_at=3.0, state=SessionState.CLOSED),
        Session(id="s", participants=("c",), last_active_at=4.0, metadata={"k": 1}),
        Session(id="t", state=SessionState.DELETED),
        Session(id="t", participants=("late",)),
    ]
    batch = [message("s", 1, timestamp=2.0), message("t", 1), message("u", 1, timestamp=9.0)]
    results = []
    for store in (MemoryHistory(), SQLiteHistory(tmp_path / "h.db")):
        await store.open()
        try:
            results.append((await store.write_batch(batch, snapshots), *await everything(store)))
        finally:
            await store.close()
    async with opened_postgres_history() as store:
        results.append((await store.write_batch(batch, snapshots), *await everything(store)))
    assert results[0] == results[1] == results[2]
    count, sessions, _ = results[2]
    assert count == 2
    assert [(s.id, s.state, s.participants) for s in sessions] == [
        ("s", SessionState.CLOSED, ("c",)),
        ("t", SessionState.DELETED, ("late",)),
        ("u", SessionState.ACTIVE, ()),
    ]


@needs_postgres
async def test_a_nul_in_a_name_fails_the_batch_as_data() -> None:
    async with opened_postgres_history() as store:
        bad = message("s", 2, sender="agent\x00x", content="secret-content")
        with pytest.raises(HistoryError) as caught:
            await store.write_batch([message("s", 1), bad], [Session(id="fresh")])
        assert not isinstance(caught.value, HistoryUnavailableError | HistoryCorruptError)
        assert "secret-content" not in str(caught.value)
        assert await store.count_messages() == 0
        assert await store.list_sessions() == []
        assert await store.write_batch([message("s", 1)]) == 1


@needs_postgres
@pytest.mark.parametrize("seed", range(4))
async def test_same_results_as_the_sqlite_store(seed: int, tmp_path: Path) -> None:
    """Random batches (redeliveries, clashing ids and positions, snapshots, deletions) and
    retention passes give PostgreSQL and SQLite, the reference, the same answers and contents.

    Not the memory store: given one id at two positions in one batch, it keeps the first in
    batch order where SQLite and PostgreSQL keep the first in stream order."""
    rng = random.Random(seed)
    sessions = [f"s{i}" for i in range(6)]
    # Ids and positions clash, but one id at one position in one session is one message (the
    # same timestamp and metadata), as redeliveries are.
    keys = {
        (rng.choice(sessions), rng.randrange(1, 40), rng.randrange(3), rng.randrange(150))
        for _ in range(300)
    }
    universe = [
        message(
            session_id,
            ms,
            seq,
            id=f"m{n}",
            timestamp=float((n * 7 + ms * 3 + seq) % 99 + 1),
            metadata=None if n % 3 else {"n": n, "at": [ms, seq]},
        )
        for session_id, ms, seq, n in sorted(keys)
    ]
    reference = SQLiteHistory(tmp_path / "h.db")
    await reference.open()
    reference._retention_chunk = 3
    async with opened_postgres_history() as store:
        store._retention_chunk = 3
        for step in range(40):
            if step % 7 == 6:
                limits: dict[str, Any] = {
                    "older_than": rng.choice([None, float(rng.randrange(1, 60))]),
                    "max_messages_per_session": rng.choice([None, rng.randrange(0, 20)]),
                    "max_sessions": rng.choice([None, rng.randrange(0, 7)]),
                }
                assert await store.enforce_retention(**limits) == await reference.enforce_retention(
                    **limits
                ), (step, limits)
            else:
                batch = rng.sample(universe, rng.randrange(0, 40))
                snapshots = [
                    Session(
                        id=rng.choice(sessions),
                        participants=(f"p{step}",),
                        last_active_at=float(rng.randrange(100)),
                        state=rng.choice(
                            [SessionState.ACTIVE] * 6
                            + [SessionState.CLOSED] * 3
                            + [SessionState.DELETED]
                        ),
                    )
                    for _ in range(rng.randrange(3))
                ]
                assert await store.write_batch(batch, snapshots) == await reference.write_batch(
                    batch, snapshots
                ), step
            assert await everything(store) == await everything(reference), step
        await assert_counts_exact(store)
    await reference.close()


# -- faults -------------------------------------------------------------------------------------


async def wait_for_lock_wait(admin: Any, application: str) -> None:
    with anyio.fail_after(10):
        while not await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = $1 AND wait_event_type = 'Lock'",
            application,
        ):
            await anyio.sleep(0.01)


async def terminate(admin: Any, application: str) -> int:
    """pg_terminate_backend every connection of the stores named ``application``, and no other.

    Two statements: in one, the planner may call pg_terminate_backend before the filter.
    """
    pids = [
        row[0]
        for row in await admin.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1", application
        )
    ]
    killed = await admin.fetch(
        "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", pids
    )
    return sum(1 for row in killed if row[0])


@needs_postgres
async def test_a_connection_killed_in_flight_is_unavailable_then_recovers(admin: Any) -> None:
    application = f"sstest-{uuid.uuid4().hex[:8]}"
    async with opened_postgres_history(application_name=application) as store:
        await store.write_batch([message("s", 1)])
        batch = [message("s", 2, content="secret-content"), message("s", 3)]
        failures: list[BaseException] = []

        async def write() -> None:
            try:
                await store.write_batch(batch)
            except HistoryError as exc:
                failures.append(exc)

        locker = await asyncpg.connect(POSTGRES_URL)
        try:
            async with locker.transaction(), anyio.create_task_group() as tg:
                # Hold the session's row: the write waits on it, in flight, when it is killed.
                await locker.execute(
                    f'SELECT 1 FROM "{store.schema}".sessions WHERE id = $1 FOR UPDATE', "s"
                )
                tg.start_soon(write)
                await wait_for_lock_wait(admin, application)
                assert await terminate(admin, application) >= 1
        finally:
            await locker.close()
        assert len(failures) == 1
        assert isinstance(failures[0], HistoryUnavailableError)
        assert "secret-content" not in str(failures[0])
        assert await store.write_batch(batch) == 2  # the next call: new connections
        assert await store.count_messages() == 3
        await assert_counts_exact(store)


@needs_postgres
async def test_idle_connections_killed_recover_by_the_next_call(admin: Any) -> None:
    application = f"sstest-{uuid.uuid4().hex[:8]}"
    async with opened_postgres_history(application_name=application, pool_size="3") as store:
        async with anyio.create_task_group() as tg:  # warm several connections
            for i in range(3):
                tg.start_soon(store.write_batch, [message(f"s{i}", 1)])
        for call in (
            lambda: store.write_batch([message("s9", 1, id="again")]),
            store.count_messages,
        ):
            assert await terminate(admin, application) >= 1
            with contextlib.suppress(HistoryUnavailableError):
                await call()  # the first call may find a dead connection...
            await call()  # ...the next one does not
        assert await store.count_messages() == 4


@needs_postgres
async def test_a_refused_connection_is_unavailable() -> None:
    store = PostgresHistory.from_url(
        "postgresql://postgres:hunter2@127.0.0.1:1/test?schema=x&connect_timeout=5"
    )
    with pytest.raises(HistoryUnavailableError) as caught:
        await store.open()
    assert "hunter2" not in str(caught.value)
    with pytest.raises(HistoryError, match="not open"):
        await store.read("s")


@needs_postgres
async def test_a_write_in_flight_is_not_cancelled(admin: Any) -> None:
    application = f"sstest-{uuid.uuid4().hex[:8]}"
    async with opened_postgres_history(application_name=application) as store:
        await store.write_batch([message("s", 1)])
        results: list[object] = []
        scope = anyio.CancelScope()

        async def write() -> None:
            with scope:
                results.append(await store.write_batch([message("s", 2), message("s", 3)]))
                await anyio.sleep(5)  # the cancellation lands here, after the commit
                results.append("not cancelled")

        locker = await asyncpg.connect(POSTGRES_URL)
        try:
            async with anyio.create_task_group() as tg, locker.transaction():
                await locker.execute(
                    f'SELECT 1 FROM "{store.schema}".sessions WHERE id = $1 FOR UPDATE', "s"
                )
                tg.start_soon(write)
                await wait_for_lock_wait(admin, application)
                scope.cancel()
                await anyio.sleep(0.2)
                assert results == []
        finally:
            await locker.close()
        assert results == [2]
        assert scope.cancelled_caught
        assert await store.count_messages() == 3


# -- plans --------------------------------------------------------------------------------------


@needs_postgres
async def test_queries_use_indexes(admin: Any) -> None:
    async with opened_postgres_history() as store:
        for start in range(0, 10_000, 1000):
            await store.write_batch(
                [
                    message(f"s{i:05d}", ms, timestamp=i + ms / 10)
                    for i in range(start, start + 1000)
                    for ms in (1, 2)
                ],
                [
                    Session(id=f"s{i:05d}", state=SessionState.CLOSED, last_active_at=i)
                    for i in range(start, start + 1000, 2)
                ],
            )
        await admin.execute(f'ANALYZE "{store.schema}".sessions')
        await admin.execute(f'ANALYZE "{store.schema}".messages')
        sql = store._sql
        ids = [f"s{i:05d}" for i in range(0, 1000, 10)]
        arrays9 = ([], [], [], [], [], [], [], [], [])
        expected: list[tuple[str, tuple[Any, ...], str]] = [
            (sql.read_ascending, ("s00042", 0, 0, 9, 9, 100), "messages_by_position"),
            (sql.read_descending, ("s00042", 0, 0, 9, 9, 100), "messages_by_position"),
            (sql.count_session, ("s00042",), "messages_by_position"),
            (sql.purge_messages, (ids,), "messages_by_position"),
            (sql.aged, (50.0, -math.inf, 1000), "messages_by_age"),
            (sql.delete_aged, ([1, 2, 3],), "messages_pkey"),
            (sql.delete_oldest, ("s00042", 10), "messages_by_position"),
            (sql.least_recently_ended, (10,), "sessions_by_activity"),
            (sql.lock_sessions, (ids,), "sessions_pkey"),
            (sql.deleted_among, (ids,), "sessions_pkey"),
            (sql.get_session, ("s00042",), "sessions_pkey"),
            (sql.list_sessions, ("s00042", 100), "sessions_pkey"),
            (sql.over_cap, ("s00042", 1, 1000), "sessions_pkey"),
            (sql.lock_count, ("s00042",), "sessions_pkey"),
            (
                sql.advance_sessions,
                (ids, [1] * 100, [1.0] * 100, [1] * 100, [0] * 100),
                "sessions_pkey",
            ),
            (sql.decrement_counts, (ids, [1] * 100), "sessions_pkey"),
            (
                sql.insert_new_messages,
                arrays9,
                "Conflict Resolution: NOTHING",
            ),  # every unique index
            (
                sql.lock_and_upsert_sessions,
                ([], [], [], [], [], [], [], []),
                "Conflict Arbiter Indexes: sessions_pkey",
            ),
        ]
        for statement, params, index in expected:
            plan = "\n".join(row[0] for row in await admin.fetch(f"EXPLAIN {statement}", *params))
            assert index in plan, (statement, plan)
            assert "Seq Scan" not in plan, (statement, plan)


# -- measurement (python -m tests.test_history_postgres) ----------------------------------------


def _bench_batches(count: int, batch: int, sessions: int) -> list[list[Message]]:
    """``count`` messages round-robin over ``sessions``, stream ids ascending per session."""
    content = "x" * 200
    base_ms = int(time.time() * 1000)
    messages = [
        Message(
            id=new_message_id(),
            session_id=f"session-{i % sessions:04d}",
            sender="agent-1",
            recipient="agent-2" if i % 2 else None,
            content=content,
            timestamp=base_ms / 1000 + i / 10_000,
            stream_id=StreamId(base_ms + (i // sessions) // 4, (i // sessions) % 4),
        )
        for i in range(count)
    ]
    return [messages[i : i + batch] for i in range(0, count, batch)]


async def _copy(admin: Any, schema: str, table: str, rows: list[list[tuple[Any, ...]]]) -> float:
    """COPY the rows in, one transaction per batch; rows/s."""
    started = time.perf_counter()
    for chunk in rows:
        async with admin.transaction():
            await admin.copy_records_to_table(
                table, schema_name=schema, columns=postgres_module._MESSAGE_COLUMNS, records=chunk
            )
    return sum(map(len, rows)) / (time.perf_counter() - started)


async def _drop_store_tables(admin: Any, schema: str) -> None:
    for table in ("messages", "sessions", "streamstore_migrations"):
        await admin.execute(f'DROP TABLE IF EXISTS "{schema}".{table}')


async def _bench(count: int, batch: int, sessions: int, rounds: int) -> None:
    """Each round, on fresh tables: the raw baseline (COPY into a table with only its identity
    pk), COPY into the store's own messages table (its three indexes: the floor of its
    layout), write_batch, then write_batch of the same batches again (every message stored
    already: the slow path). Rounds alternate, so a noisy machine hurts all alike."""
    batches = _bench_batches(count, batch, sessions)
    rows = [[postgres_module._message_row(m) for m in b] for b in batches]
    results: dict[str, list[float]] = {
        "raw COPY, plain table": [],
        "raw COPY, store's table": [],
        "write_batch": [],
        "write_batch, redelivered": [],
    }
    async with postgres_schema() as schema:
        admin = await asyncpg.connect(POSTGRES_URL)
        url = url_for(schema)
        try:
            await admin.execute(f'CREATE SCHEMA "{schema}"')
            for _ in range(rounds):
                await admin.execute(f'DROP TABLE IF EXISTS "{schema}".plain')
                await admin.execute(
                    f'CREATE TABLE "{schema}".plain (pk bigint GENERATED ALWAYS AS IDENTITY'
                    " PRIMARY KEY, session_id text NOT NULL, stream_ms bigint NOT NULL,"
                    " stream_seq bigint NOT NULL, message_id text NOT NULL, sender text NOT NULL,"
                    " recipient text, content bytea NOT NULL, metadata text,"
                    " timestamp double precision NOT NULL)"
                )
                results["raw COPY, plain table"].append(await _copy(admin, schema, "plain", rows))
                await _drop_store_tables(admin, schema)
                async with opened(url):  # the store's tables, empty
                    speed = await _copy(admin, schema, "messages", rows)
                    results["raw COPY, store's table"].append(speed)
                await _drop_store_tables(admin, schema)
                async with opened(url) as store:
                    started = time.perf_counter()
                    for b in batches:
                        await store.write_batch(b)
                    results["write_batch"].append(count / (time.perf_counter() - started))
                    started = time.perf_counter()
                    for b in batches:  # the COPY fails, then ON CONFLICT DO NOTHING skips all
                        assert await store.write_batch(b) == 0
                    results["write_batch, redelivered"].append(
                        count / (time.perf_counter() - started)
                    )
                    assert await store.count_messages() == count
        finally:
            await admin.close()
    best = {name: max(values) for name, values in results.items()}
    baseline = best["raw COPY, plain table"]
    print(f"{count} messages, batches of {batch}, {sessions} sessions, {rounds} rounds")
    for name, values in results.items():
        print(
            f"  {name:25s} best {best[name]:7.0f} rows/s  median {statistics.median(values):7.0f}"
            f"  ratio {best[name] / baseline:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not POSTGRES_URL:
        sys.exit("set STREAMSTORE_TEST_POSTGRES_URL, e.g. postgresql://postgres@127.0.0.1/test")
    asyncio.run(_bench(args.messages, args.batch, args.sessions, args.rounds))


if __name__ == "__main__":
    main()
