"""The history store fails: locked by another process, out of space, corrupted."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
import redis.asyncio

from streamstore import Persister, PersisterSettings, Settings, StreamStore
from streamstore.keys import GROUP
from tests.faults.tally import Tally, record
from tests.workers import Worker

TallyFactory = Callable[[str, str, str], Tally]

pytestmark = pytest.mark.faults

HOLD_LOCK = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
connection.execute("ROLLBACK")
"""


async def pending(raw: redis.asyncio.Redis, store: StreamStore) -> int:
    total = 0
    for feed in store.keys.feeds():
        total += (await raw.xpending(feed, GROUP))["pending"]
    return total


@pytest.mark.slow
async def test_history_locked_by_another_process_acks_nothing_then_resumes(
    settings: Settings, raw: redis.asyncio.Redis, tmp_path: Path, tally: TallyFactory
) -> None:
    counts = tally(
        "history locked",
        "another process holds BEGIN IMMEDIATE for 10 s",
        "sqlite3 in a subprocess",
    )
    db = tmp_path / "history.db"
    locked = settings.replace(history_url=f"sqlite:///{db}?busy_timeout=200")
    async with StreamStore.open(settings=locked) as store:
        session = await store.create_session(["a"])
        first = await store.publish_many(session.id, [{"sender": "a", "content": "1"}] * 20)
        await Persister(store, PersisterSettings(consumer="c1")).drain()
        holder = await anyio.open_process([sys.executable, "-c", HOLD_LOCK, str(db), "10"])
        assert holder.stdout is not None
        assert (await holder.stdout.receive()).strip() == b"locked"
        started = time.monotonic()
        persister = Persister(
            store, PersisterSettings(consumer="c1", retry_backoff=0.1, batch_size=10)
        )
        acknowledged = list(first)
        async with anyio.create_task_group() as tg:
            await tg.start(persister.run)
            acknowledged += await store.publish_many(
                session.id, [{"sender": "a", "content": "2"}] * 30
            )
            await anyio.sleep(2)
            assert persister.stats.errors > 0
            assert await store.history_store.count_messages(session.id) == 20
            assert await pending(raw, store) > 0  # read but not acknowledged: not committed
            with anyio.fail_after(30):
                while await store.history_store.count_messages(session.id) < len(acknowledged):
                    await anyio.sleep(0.1)
            counts.recovery_s = round(time.monotonic() - started, 2)
            persister.stop()
        await holder.wait()
        await holder.aclose()
        stored = await store.history_store.read(session.id, limit=1000)
    counts.notes["commit attempts refused"] = persister.stats.errors
    counts.count(acknowledged, stored).assert_exactly_once()
    assert counts.recovery_s >= 9.5  # nothing could commit while the lock was held


@pytest.mark.slow
async def test_disk_full_acks_nothing_then_resumes_when_space_returns(
    store: StreamStore,
    settings: Settings,
    raw: redis.asyncio.Redis,
    tmp_path: Path,
    tally: TallyFactory,
) -> None:
    counts = tally(
        "history disk full",
        "the worker may not grow any file (RLIMIT_FSIZE), then the limit is lifted",
        "prlimit on the worker process",
    )
    session = await store.create_session(["a"])
    warmup = await store.publish_many(session.id, [{"sender": "a", "content": "w"}] * 10)
    worker = Worker(settings, tmp_path, "w1", batch_size=50)
    worker.wait_ready()
    with anyio.fail_after(20):
        while await store.history_store.count_messages(session.id) < 10:
            await anyio.sleep(0.05)
    size = (tmp_path / "history.db").stat().st_size
    resource.prlimit(worker.process.pid, resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))
    acknowledged = list(warmup)
    for i in range(40):
        acknowledged += await store.publish_many(
            session.id, [{"sender": "a", "content": f"{i}:" + "z" * 2000}] * 25
        )
    await anyio.sleep(3)
    assert await store.history_store.count_messages(session.id) < len(acknowledged)
    assert await pending(raw, store) > 0
    assert "disk is full" in worker.log() or "unavailable" in worker.log()
    started = time.monotonic()
    unlimited = resource.RLIM_INFINITY
    resource.prlimit(worker.process.pid, resource.RLIMIT_FSIZE, (unlimited, unlimited))
    with anyio.fail_after(60):
        while await store.history_store.count_messages(session.id) < len(acknowledged):
            await anyio.sleep(0.1)
    counts.recovery_s = round(time.monotonic() - started, 2)
    assert worker.terminate() == 0, worker.log()
    stored = await store.history_store.read(session.id, limit=10_000)
    counts.count(acknowledged, stored).assert_exactly_once()


async def test_corrupted_history_file_refuses_to_start(
    settings: Settings, tmp_path: Path, tally: TallyFactory
) -> None:
    db = tmp_path / "history.db"
    db.write_bytes(b"this is not a database at all" * 100)
    worker = Worker(settings, tmp_path, "w1")
    code = worker.wait_exit(30)
    assert code == 1, worker.log()
    assert "not a SQLite database" in worker.log() or "damaged" in worker.log()
    counts = tally("history file corrupted", "random bytes in the file", "file overwrite")
    counts.notes["worker exit code"] = code
    record(counts)
