"""The history store fails: locked by another process, out of space, read-only, corrupted."""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import orjson
import pytest
import redis.asyncio

from streamstore import Persister, PersisterSettings, Settings, StreamStore
from streamstore.health import worker_health
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


@contextlib.contextmanager
def read_only_files(*paths: Path) -> Iterator[Callable[[], None]]:
    """Make ``paths`` read-only until the yielded function (or the exit) makes them writable
    again: chmod 0444, or for root, whom file modes do not stop, the immutable flag (what a
    read-only mount or a wrong owner does to a worker that is not root)."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", *map(str, paths)], check=False).returncode != 0:
            subprocess.run(["chattr", "-i", *map(str, paths)], check=False)
            pytest.skip("chattr +i is not available here (needed to stop root writing)")

        def writable() -> None:
            subprocess.run(["chattr", "-i", *map(str, paths)], check=True)

    else:
        for path in paths:
            path.chmod(0o444)

        def writable() -> None:
            for path in paths:
                path.chmod(0o600)

    try:
        yield writable
    finally:
        writable()


def get_health(url: str) -> tuple[int, dict[str, object]]:
    """GET a worker's /healthz: (status, JSON body)."""
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, orjson.loads(error.read())


@pytest.mark.slow
@pytest.mark.parametrize("when", ["when the worker opens it", "while the worker persists"])
async def test_history_read_only_then_writable_recovers_without_restart(
    store: StreamStore,
    settings: Settings,
    raw: redis.asyncio.Redis,
    tmp_path: Path,
    tally: TallyFactory,
    when: str,
) -> None:
    """SQLite opens a file it may not write read-only, silently, and that connection stays
    read-only after the file is writable again: before the fix only a restart helped. (A
    chmod of a file the worker already has open changes nothing: its descriptors stay
    writable. The immutable flag on the file and its WAL stops writes through them too.)"""
    counts = tally(
        "history read-only",
        f"the history file made read-only {when}, then writable",
        "chmod 0444 (chattr +i as root)",
    )
    db = tmp_path / "history.db"
    session = await store.create_session(["a"])
    acknowledged = list(
        await store.publish_many(session.id, [{"sender": "a", "content": "w"}] * 10)
    )
    worker_env = {"STREAMSTORE_PERSISTER_UNHEALTHY_AFTER": "1"}
    with contextlib.ExitStack() as fault:
        if when == "when the worker opens it":
            writable = fault.enter_context(read_only_files(db))
        worker = Worker(settings, tmp_path, "w1", batch_size=50, metrics=True, env=worker_env)
        worker.wait_ready()
        url = worker.metrics_url()
        if when == "while the worker persists":
            with anyio.fail_after(20):
                while await store.history_store.count_messages(session.id) < len(acknowledged):
                    await anyio.sleep(0.05)
            writable = fault.enter_context(read_only_files(db, db.with_name("history.db-wal")))
        persisted_before = await store.history_store.count_messages(session.id)
        for i in range(20):
            acknowledged += await store.publish_many(
                session.id, [{"sender": "a", "content": f"{i}"}] * 25
            )
        statuses = []
        with anyio.fail_after(30):
            while True:  # /healthz turns 503 once writes have failed for unhealthy_after (1 s)
                status, health = await anyio.to_thread.run_sync(get_health, url)
                statuses.append(status)
                if status == 503:
                    break
                await anyio.sleep(0.2)
        reasons = health["reasons"]
        assert isinstance(reasons, list)
        assert any("history writes have been failing" in reason for reason in reasons), health
        assert "READONLY" in str(health["history"]) or "IOERR" in str(health["history"]), health
        with anyio.fail_after(15):  # the status the worker publishes for `streamstore check`
            while (entry := await raw.hget(store.keys.workers, "w1")) is None or orjson.loads(
                entry
            )["failing_since"] is None:
                await anyio.sleep(0.1)
        judged = await worker_health(raw, store.keys, now=time.time() + 2, unhealthy_after=1)
        assert [(w.consumer, w.healthy, w.stale) for w in judged] == [("w1", False, False)]
        report = await store.check(now=time.time() + 2)  # `streamstore check`, by its threshold
        assert not report.healthy
        assert any("worker w1: history writes failing" in r for r in report.reasons), report
        assert await store.history_store.count_messages(session.id) == persisted_before
        assert await pending(raw, store) > 0  # read, not committed, so not acknowledged
        started = time.monotonic()
        writable()
    with anyio.fail_after(60):
        while await store.history_store.count_messages(session.id) < len(acknowledged):
            await anyio.sleep(0.1)
    counts.recovery_s = round(time.monotonic() - started, 2)
    with anyio.fail_after(10):
        while (status := (await anyio.to_thread.run_sync(get_health, url))[0]) != 200:
            await anyio.sleep(0.1)
    entry = await raw.hget(store.keys.workers, "w1")
    assert entry is not None
    assert orjson.loads(entry)["failing_since"] is None
    assert worker.process.poll() is None  # never restarted
    assert worker.terminate() == 0, worker.log()
    assert await raw.hget(store.keys.workers, "w1") is None  # a graceful stop removes it
    stored = await store.history_store.read(session.id, limit=10_000)
    counts.notes["healthz polls before 503"] = len(statuses)
    counts.count(acknowledged, stored).assert_exactly_once()
