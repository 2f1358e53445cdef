"""The JSON-lines history store: the whole conformance suite, then its own promises (crash
repair after kill -9, the directory lock, file modes, corrupt files, URLs)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import signal
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

import tests.test_history as conformance
from streamstore.errors import (
    ConfigurationError,
    HistoryCorruptError,
    HistoryError,
    HistoryUnavailableError,
)
from streamstore.history import HistoryStore, RetentionResult, history_from_url
from streamstore.history.json import JSONHistory
from streamstore.models import Session, SessionState, StreamId
from tests.faults.test_storage import read_only_files
from tests.test_history import assert_counts_exact, message

# -- the conformance suite, run here on the JSON store -----------------------------------------

# Every test of tests/test_history.py that takes the `store` fixture, under its own name: pytest
# collects them in this module and resolves `store` to the fixture below.
CONFORMANCE = conformance.conformance_tests()
globals().update(CONFORMANCE)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[HistoryStore]:
    history = history_from_url(json_url(tmp_path / "history"))
    await history.open()
    try:
        yield history
    finally:
        await history.close()


def test_the_whole_conformance_suite_is_collected_here(request: pytest.FixtureRequest) -> None:
    assert len(CONFORMANCE) >= 20  # tests/test_history.py has 22 today
    collected = conformance.store_tests_collected(request, sys.modules[__name__])
    if collected:
        assert collected == set(CONFORMANCE)


# -- helpers ------------------------------------------------------------------------------------


def json_url(path: Path, **options: str) -> str:
    query = "&".join(f"{name}={value}" for name, value in options.items())
    return f"json:///{path}" + (f"?{query}" if query else "")


@contextlib.asynccontextmanager
async def opened(path: Path, **options: str) -> AsyncIterator[JSONHistory]:
    history = JSONHistory.from_url(json_url(path, **options))
    await history.open()
    try:
        yield history
    finally:
        await history.close()


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def session_lines(directory: Path, session_id: str) -> list[list[Any]]:
    data = (directory / "sessions" / f"{session_id}.jsonl").read_bytes()
    return [orjson.loads(line) for line in data.splitlines()]


# -- files and format ---------------------------------------------------------------------------


async def test_files_are_human_readable_json_lines(tmp_path: Path) -> None:
    directory = tmp_path / "h"
    async with opened(directory) as store:
        await store.write_batch(
            [message("s", 2, id="b", content="two"), message("s", 1, id="a", metadata={"k": 1})],
            [Session(id="s", participants=("x",))],
        )
        await store.write_batch([message("s", 3, id="c")])
    # One line per message, the codec's row without the session id, in the order committed.
    assert session_lines(directory, "s") == [
        [1, 0, "a", "agent-1", None, "hello", '{"k":1}', 0.001],
        [2, 0, "b", "agent-1", None, "two", None, 0.002],
        [3, 0, "c", "agent-1", None, "hello", None, 0.003],
    ]
    index = orjson.loads((directory / "index.json").read_bytes())
    assert index["format"] == "streamstore-json-history"
    assert index["version"] == 1
    entry = dict(zip(index["columns"], index["sessions"]["s"], strict=True))
    assert entry["participants"] == '["x"]'
    assert (entry["message_count"], entry["last_stream_ms"], entry["state"]) == (3, 3, "active")
    assert entry["file_bytes"] == (directory / "sessions" / "s.jsonl").stat().st_size


@pytest.mark.parametrize("umask", [0o022, 0o000, 0o277], ids=["022", "000", "277"])
async def test_files_are_created_private(tmp_path: Path, umask: int) -> None:
    directory = tmp_path / "h"
    previous = os.umask(umask)
    try:
        async with opened(directory) as store:
            await store.write_batch([message("s", 1), message("t", 1)])
            await store.enforce_retention(max_messages_per_session=0)  # rewrites, then unlinks
            await store.write_batch([message("s", 2)])
    finally:
        os.umask(previous)
    assert file_mode(directory) == 0o700
    assert file_mode(directory / "sessions") == 0o700
    files = [directory / "lock", directory / "index.json", directory / "sessions" / "s.jsonl"]
    for path in files:
        assert file_mode(path) == 0o600, path
    assert sorted(p.name for p in (directory / "sessions").iterdir()) == ["s.jsonl"]


async def test_data_survives_close_and_reopen(tmp_path: Path) -> None:
    directory = tmp_path / "h"
    async with opened(directory) as store:
        await store.write_batch([message("s", ms) for ms in range(1, 6)] + [message("t", 1)])
        await store.write_batch([], [Session(id="t", state=SessionState.DELETED)])
        before = await store.list_sessions()
    async with opened(directory) as store:
        assert await store.list_sessions() == before
        assert [m.stream_id for m in await store.read("s", after=StreamId(3, 0))] == [
            (4, 0),
            (5, 0),
        ]
        assert await store.write_batch([message("s", 5), message("t", 9)]) == 0
        assert await store.count_messages() == 5
        await assert_counts_exact(store)
    assert not (directory / "sessions" / "t.jsonl").exists()


@pytest.mark.parametrize(
    "content",
    [
        b"not json at all",
        b'{"format": "something else", "version": 1, "sessions": {}}',
        b'{"format": "streamstore-json-history", "version": 1, "sessions": {"s": [1, 2]}}',
        b'{"format": "streamstore-json-history", "version": 1, "sessions": []}',
        b"",
    ],
    ids=["garbage", "foreign", "bad-entry", "bad-sessions", "empty"],
)
async def test_a_corrupt_index_raises_corrupt_at_open(tmp_path: Path, content: bytes) -> None:
    directory = tmp_path / "h"
    async with opened(directory) as store:
        await store.write_batch([message("s", 1, content="secret-content")])
    (directory / "index.json").write_bytes(content)
    store = JSONHistory.from_url(json_url(directory))
    with pytest.raises(HistoryCorruptError) as caught:
        await store.open()
    assert "secret-content" not in str(caught.value)
    with pytest.raises(HistoryError, match="not open"):
        await store.read("s")
    with (directory / "lock").open("rb") as lock:  # the failed open released the lock
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


async def test_a_newer_format_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "h"
    async with opened(directory):
        pass
    index = orjson.loads((directory / "index.json").read_bytes())
    index["version"] = 2
    (directory / "index.json").write_bytes(orjson.dumps(index))
    with pytest.raises(HistoryCorruptError, match="newer"):
        async with opened(directory):
            pass


async def test_a_damaged_line_beyond_the_tail_raises_corrupt(tmp_path: Path) -> None:
    directory = tmp_path / "h"
    async with opened(directory) as store:
        await store.write_batch([message("s", ms, content="secret-content") for ms in (1, 2)])
    path = directory / "sessions" / "s.jsonl"
    path.write_bytes(path.read_bytes().replace(b'"secret-content"', b"[secret-content]", 1))
    async with opened(directory) as store:  # same size: the catalog is trusted at open...
        with pytest.raises(HistoryCorruptError) as caught:
            await store.read("s")  # ...and the damage found when the session is loaded
        assert "secret-content" not in str(caught.value)
    path.write_bytes(path.read_bytes() + message_line(3))  # a size the index does not know
    with pytest.raises(HistoryCorruptError, match="line 1"):
        async with opened(directory):
            pass


def message_line(ms: int, message_id: str | None = None) -> bytes:
    row = [ms, 0, message_id or f"m{ms}", "agent-1", None, "hello", None, ms / 1000]
    return orjson.dumps(row) + b"\n"


# -- crash repair -------------------------------------------------------------------------------


async def test_a_torn_tail_and_unindexed_lines_are_reconciled_at_open(tmp_path: Path) -> None:
    directory = tmp_path / "h"
    async with opened(directory) as store:
        await store.write_batch([message("s", ms, id=f"m{ms}") for ms in (1, 2)])
    sessions = directory / "sessions"
    # As a kill -9 leaves it: complete lines appended but not yet counted by the index, a torn
    # last line, and a new session's file whose index entry never landed.
    with (sessions / "s.jsonl").open("ab") as file:
        file.write(message_line(3) + message_line(4)[:-9])
    (sessions / "fresh.jsonl").write_bytes(message_line(7) + message_line(5) + b'[8, 0, "m')
    (sessions / "s.jsonl.tmp").write_bytes(b"a rewrite cut short")
    async with opened(directory) as store:
        assert [m.id for m in await store.read("s")] == ["m1", "m2", "m3"]
        assert [m.id for m in await store.read("fresh")] == ["m5", "m7"]
        s, fresh = await store.get_session("s"), await store.get_session("fresh")
        assert s is not None
        assert (s.message_count, s.last_stream_id, s.last_active_at) == (3, (3, 0), 0.003)
        assert fresh is not None
        assert (fresh.message_count, fresh.last_stream_id, fresh.created_at) == (2, (7, 0), 0.005)
        # The torn message is not there; redelivered, it is stored once, after the others.
        assert await store.write_batch([message("s", 4, id="m4"), message("s", 3, id="m3")]) == 1
        await assert_counts_exact(store)
    assert (sessions / "s.jsonl").read_bytes().endswith(message_line(4))
    assert not (sessions / "s.jsonl.tmp").exists()


async def test_a_deleted_sessions_leftover_file_goes_at_open(tmp_path: Path) -> None:
    directory = tmp_path / "h"
    async with opened(directory) as store:
        await store.write_batch([message("s", 1)])
        saved = (directory / "sessions" / "s.jsonl").read_bytes()
        await store.write_batch([], [Session(id="s", state=SessionState.DELETED)])
    (directory / "sessions" / "s.jsonl").write_bytes(saved)  # the unlink never happened
    async with opened(directory) as store:
        assert await store.read("s") == []
        assert await store.count_messages() == 0
    assert not (directory / "sessions" / "s.jsonl").exists()


_WRITER = """
import asyncio, sys
from streamstore.history.json import JSONHistory
from streamstore.models import Message, StreamId

async def main(url, run):
    store = JSONHistory.from_url(url)
    await store.open()
    print("open", flush=True)
    batch = 0
    while True:
        messages = [
            Message(
                id=f"r{run}-b{batch}-{i}",
                session_id=f"s{i % 3}",
                sender="w",
                content="x" * 2000,
                timestamp=float(batch),
                stream_id=StreamId(run * 1_000_000 + batch, i),
            )
            for i in range(300)
        ]
        await store.write_batch(messages)
        print(f"acked {run} {batch}", flush=True)
        batch += 1

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def write_until_killed(url: str, run: int, delay: float) -> list[int]:
    """Run the writer, SIGKILL it ``delay`` seconds after its first acknowledged batch; return
    the batches it saw acknowledged (it prints each, flushed, once write_batch returned)."""
    with subprocess.Popen(
        [sys.executable, "-c", _WRITER, url, str(run)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    ) as process:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "open"
        assert process.stdout.readline().strip() == f"acked {run} 0"
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        acked = [0] + [int(line.split()[2]) for line in process.stdout]
        assert process.wait() == -signal.SIGKILL
    return acked


@pytest.mark.slow
@pytest.mark.faults
async def test_kill_9_during_appends_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "h"
    rng = random.Random(16)
    acked: set[str] = set()
    unreconciled = torn = 0
    for run in range(5):
        batches = write_until_killed(json_url(directory), run, rng.uniform(0.05, 0.6))
        acked.update(f"r{run}-b{b}-{i}" for b in batches for i in range(300))
        index = orjson.loads((directory / "index.json").read_bytes())
        for session_id, entry in index["sessions"].items():
            data = (directory / "sessions" / f"{session_id}.jsonl").read_bytes()
            unreconciled += len(data) != entry[9]  # file_bytes: what the index accounts for
            torn += not data.endswith(b"\n")
        async with opened(directory) as store:
            stored: list[str] = []
            for session_id in ("s0", "s1", "s2"):
                messages = await store.read(session_id, limit=1_000_000)
                order = [m.stream_id for m in messages if m.stream_id is not None]
                assert order == sorted(order)
                assert len(order) == len(messages)
                stored += [m.id for m in messages]
            assert len(stored) == len(set(stored))  # no duplicate
            assert acked <= set(stored)  # every acknowledged batch, whole
            assert await store.count_messages() == len(stored)
            await assert_counts_exact(store)
        for path in (directory / "sessions").iterdir():
            assert path.read_bytes().endswith(b"\n")  # a torn tail was repaired
        # Beyond the acknowledged, the store may hold a prefix of the batch the kill cut
        # short (complete lines only), which a redelivery would complete without duplicates.
        acked.update(stored)
    print(f"after 5 kills: {unreconciled} session files ahead of the index, {torn} torn")


_HOLDER = """
import asyncio, sys
from streamstore.history.json import JSONHistory
from streamstore.models import Message, StreamId

async def main(url):
    store = JSONHistory.from_url(url)
    await store.open()
    await store.write_batch([Message(id="held", session_id="s", sender="w", content="c",
                                     stream_id=StreamId(1, 0))])
    print("open", flush=True)
    sys.stdin.readline()
    await store.close()

asyncio.run(main(sys.argv[1]))
"""


@contextlib.contextmanager
def held_by_another_process(directory: Path) -> Iterator[Callable[[], None]]:
    """Keep the store in ``directory`` open in another process until release() is called."""
    with subprocess.Popen(
        [sys.executable, "-c", _HOLDER, json_url(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    ) as holder:
        assert holder.stdin is not None
        assert holder.stdout is not None
        stdin = holder.stdin

        def release() -> None:
            if holder.poll() is None:
                stdin.write("\n")
                stdin.flush()
                assert holder.wait(timeout=30) == 0

        try:
            assert holder.stdout.readline().strip() == "open"
            yield release
        finally:
            with contextlib.suppress(Exception):
                release()
            if holder.poll() is None:
                holder.kill()


@pytest.mark.faults
async def test_a_second_process_waits_then_raises_unavailable(tmp_path: Path) -> None:
    directory = tmp_path / "h"
    with held_by_another_process(directory) as release:
        second = JSONHistory.from_url(json_url(directory, busy_timeout="300"))
        started = time.monotonic()
        with pytest.raises(HistoryUnavailableError, match="locked") as caught:
            await second.open()
        assert time.monotonic() - started >= 0.25
        assert not isinstance(caught.value, HistoryCorruptError)
        with pytest.raises(HistoryError, match="not open"):
            await second.write_batch([message("s", 2)])
        release()
    async with opened(directory, busy_timeout="0") as store:  # released: opens at once
        assert [m.id for m in await store.read("s")] == ["held"]
        assert await store.write_batch([message("s", 2)]) == 1
        await assert_counts_exact(store)


async def test_a_second_store_in_one_process_is_locked_out_too(tmp_path: Path) -> None:
    async with opened(tmp_path / "h") as first:
        await first.write_batch([message("s", 1)])
        with pytest.raises(HistoryUnavailableError, match="busy_timeout"):
            async with opened(tmp_path / "h", busy_timeout="50"):
                pass
        assert await first.count_messages() == 1


async def test_a_read_only_directory_raises_unavailable_and_recovers(tmp_path: Path) -> None:
    directory = tmp_path / "h"
    async with opened(directory) as store:
        await store.write_batch([message("s", 1)])
        sessions = directory / "sessions"
        batch = [message("s", 2, content="secret-content"), message("new", 1)]
        with read_only_files(sessions / "s.jsonl", sessions):
            with pytest.raises(HistoryUnavailableError) as caught:
                await store.write_batch(batch)
            assert "secret-content" not in str(caught.value)
            assert await store.count_messages() == 1
            assert [m.stream_id for m in await store.read("s")] == [(1, 0)]
        assert await store.write_batch(batch) == 2
        await assert_counts_exact(store)


# -- retention specifics --------------------------------------------------------------------


async def test_retention_rewrites_files_and_survives_reopen(tmp_path: Path) -> None:
    directory = tmp_path / "h"
    async with opened(directory) as store:
        await store.write_batch([message("s", ms, id=f"m{ms}") for ms in range(10, 0, -1)])
        assert await store.enforce_retention(older_than=0.004) == RetentionResult(messages=3)
        assert await store.enforce_retention(max_messages_per_session=4) == RetentionResult(3)
    # A batch is appended in stream-id order; the rewrites keep the lines' order.
    assert [row[2] for row in session_lines(directory, "s")] == ["m7", "m8", "m9", "m10"]
    async with opened(directory) as store:
        assert [m.id for m in await store.read("s")] == ["m7", "m8", "m9", "m10"]
        assert await store.write_batch([message("s", 8, id="m8"), message("s", 11)]) == 1
        await assert_counts_exact(store)


# -- URLs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "path", "busy_timeout_ms"),
    [
        ("json:///relative/dir", "relative/dir", 30000),
        ("json:////absolute/dir", "/absolute/dir", 30000),
        ("json:///d?busy_timeout=250", "d", 250),
        ("json:///with%20space", "with space", 30000),
    ],
)
def test_from_url(url: str, path: str, busy_timeout_ms: int) -> None:
    store = history_from_url(url)
    assert isinstance(store, JSONHistory)
    assert store.path == path
    assert round(store._busy_timeout * 1000) == busy_timeout_ms


@pytest.mark.parametrize(
    "url",
    [
        "json://host/dir",
        "json://",
        "json:///",
        "json:///d?busy_timeout=-1",
        "json:///d?busy_timeout=abc",
        "json:///d?busy_timeout=1&busy_timeout=2",
        "json:///d?synchronous=full",
        "json:///d#fragment",
    ],
)
def test_from_url_refuses(url: str) -> None:
    with pytest.raises(ConfigurationError):
        JSONHistory.from_url(url)


async def test_calls_before_open_raise(tmp_path: Path) -> None:
    store = history_from_url(json_url(tmp_path / "never-opened"))
    with pytest.raises(HistoryError, match="not open"):
        await store.read("s")
    with pytest.raises(HistoryError, match="not open"):
        await store.write_batch([message("s", 1)])
    await store.close()
    assert not (tmp_path / "never-opened").exists()


def test_unknown_scheme_mentions_json() -> None:
    with pytest.raises(ConfigurationError, match=r"json:///"):
        history_from_url("nosuch:///x")
