"""The persister: exactly once into history whatever single fault happens (guarantees 1, 3, 7)."""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio
import orjson
import pytest
import redis.asyncio

from streamstore import (
    ConfigurationError,
    HistoryError,
    HistoryUnavailableError,
    Message,
    Persister,
    PersisterSettings,
    Session,
    Settings,
    StreamStore,
)
from streamstore.history import history_from_url
from streamstore.history.memory import MemoryHistory
from streamstore.keys import GROUP
from streamstore.redis.embedded import EmbeddedServer
from tests.faults.tally import Tally
from tests.workers import Worker

TallyFactory = Callable[[str, str, str], Tally]


async def publish_load(store: StreamStore, sessions: int, per_session: int) -> list[Message]:
    """Publish ``per_session`` messages into each of ``sessions`` new sessions."""
    published: list[Message] = []
    ids = [(await store.create_session(["a", "b"])).id for _ in range(sessions)]
    for start in range(0, per_session, 50):
        for sid in ids:
            batch = [
                {"sender": "a", "content": f"{sid}:{i}"}
                for i in range(start, min(start + 50, per_session))
            ]
            published += await store.publish_many(sid, batch)
    return published


async def history_rows(settings: Settings, session_ids: set[str]) -> dict[str, list[Message]]:
    history = history_from_url(settings.history_url)
    await history.open()
    try:
        return {sid: await history.read(sid, limit=1_000_000) for sid in sorted(session_ids)}
    finally:
        await history.close()


async def wait_for_count(settings: Settings, expected: int, timeout: float = 60.0) -> int:
    history = history_from_url(settings.history_url)
    await history.open()
    try:
        count = 0
        with anyio.move_on_after(timeout):
            while (count := await history.count_messages()) < expected:
                await anyio.sleep(0.1)
        return count
    finally:
        await history.close()


def assert_exactly_once(
    published: list[Message], rows: dict[str, list[Message]], counts: Tally | None = None
) -> None:
    """Every published message stored once, in stream-id order per session, unchanged."""
    stored = [m for session_rows in rows.values() for m in session_rows]
    (counts or Tally("", "", "")).count(published, stored).assert_exactly_once()
    by_id = {m.id: m for m in published}
    for session_rows in rows.values():
        stream_ids = [m.stream_id for m in session_rows]
        assert stream_ids == sorted(stream_ids)
        assert all(m.stream_id == by_id[m.id].stream_id for m in session_rows)
        assert all(m.content == by_id[m.id].content for m in session_rows)


async def test_drain_persists_everything_once_and_trims(
    store: StreamStore, raw: redis.asyncio.Redis
) -> None:
    published = await publish_load(store, sessions=5, per_session=120)
    persister = Persister(store, PersisterSettings(consumer="c1", batch_size=100))
    stats = await persister.drain()
    assert stats.persisted == len(published)
    again = await persister.drain()
    assert again.persisted == len(published)  # nothing new the second time
    rows = await history_rows(store.settings, {m.session_id for m in published})
    assert_exactly_once(published, rows)
    for p in range(store.keys.partitions):  # feeds are trimmed below the acknowledged point
        assert await raw.xlen(store.keys.feed(p)) == 0
    for sid in {m.session_id for m in published}:
        session = await store.get_session(sid)
        assert session.message_count == 120


async def test_poison_entry_is_dead_lettered_and_does_not_block(
    store: StreamStore, raw: redis.asyncio.Redis
) -> None:
    session = await store.create_session(["a"])
    feed = store.keys.session(session.id).feed
    await raw.xadd(feed, {b"k": b"m", b"s": session.id.encode(), b"i": b"1-1", b"d": b"\xff\xfe"})
    await raw.xadd(feed, {b"garbage": b"entirely"})
    good = await store.publish(session.id, sender="a", content="behind the poison")
    persister = Persister(store, PersisterSettings(consumer="c1"))
    stats = await persister.drain()
    assert stats.dead_lettered == 2
    assert stats.persisted == 1
    dead = await raw.xrange(store.keys.dead_letters)
    assert len(dead) == 2
    assert all(b"reason" in fields for _, fields in dead)
    assert [m.id for m in await store.history(session.id)] == [good.id]
    pending = await raw.xpending(feed, GROUP)
    assert pending["pending"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("crash_point", ["after_read", "after_commit"])
async def test_sigkill_at_crash_point_then_restart_loses_and_duplicates_nothing(
    store: StreamStore, settings: Settings, tmp_path: Path, crash_point: str, tally: TallyFactory
) -> None:
    counts = tally(
        f"persister killed {crash_point.replace('_', ' ')}",
        "SIGKILL, restart with the same consumer name",
        f"crash point {crash_point}",
    )
    published = await publish_load(store, sessions=10, per_session=100)
    crashing = Worker(settings, tmp_path, "w1", crash_point=crash_point)
    assert crashing.wait_exit() == -signal.SIGKILL, crashing.log()
    assert f"crash point {crash_point} reached" in crashing.log()
    started = time.monotonic()
    restarted = Worker(settings, tmp_path, "w1")  # same name: re-reads its own pending entries
    restarted.wait_ready()
    assert await wait_for_count(settings, len(published)) == len(published)
    counts.recovery_s = round(time.monotonic() - started, 2)
    assert restarted.terminate() == 0, restarted.log()
    rows = await history_rows(settings, {m.session_id for m in published})
    assert_exactly_once(published, rows, counts)


@pytest.mark.slow
async def test_sigkill_during_claim_then_another_worker_finishes(
    store: StreamStore, settings: Settings, tmp_path: Path, tally: TallyFactory
) -> None:
    counts = tally(
        "persister killed during a claim",
        "SIGKILL of the claimer; a third worker claims",
        "crash point during_claim",
    )
    published = await publish_load(store, sessions=10, per_session=100)
    first = Worker(settings, tmp_path, "w1", crash_point="after_read")
    assert first.wait_exit() == -signal.SIGKILL
    # w2 claims w1's idle entries and dies in the middle of processing the claim
    claimer = Worker(settings, tmp_path, "w2", crash_point="during_claim", claim_idle=0.2)
    assert claimer.wait_exit() == -signal.SIGKILL, claimer.log()
    assert "crash point during_claim reached" in claimer.log()
    started = time.monotonic()
    survivor = Worker(settings, tmp_path, "w3", claim_idle=0.2)
    survivor.wait_ready()
    assert await wait_for_count(settings, len(published)) == len(published)
    counts.recovery_s = round(time.monotonic() - started, 2)
    assert survivor.terminate() == 0
    rows = await history_rows(settings, {m.session_id for m in published})
    assert_exactly_once(published, rows, counts)


@pytest.mark.slow
async def test_four_racing_workers_write_one_row_per_message(
    store: StreamStore, settings: Settings, tmp_path: Path, tally: TallyFactory
) -> None:
    counts = tally("4 racing persisters", "4 worker processes on one group", "processes")
    workers = [Worker(settings, tmp_path, f"r{i}", claim_idle=1.0) for i in range(4)]
    for worker in workers:
        worker.wait_ready()
    published = await publish_load(store, sessions=100, per_session=200)
    assert len(published) == 20_000
    assert await wait_for_count(settings, len(published), timeout=120) == len(published)
    for worker in workers:
        assert worker.terminate() == 0, worker.log()
    rows = await history_rows(settings, {m.session_id for m in published})
    assert_exactly_once(published, rows, counts)


async def test_group_deleted_mid_run_recovers_without_duplicates(
    store: StreamStore, raw: redis.asyncio.Redis, tally: TallyFactory
) -> None:
    counts = tally("consumer group deleted", "XGROUP DESTROY on every feed", "XGROUP DESTROY")
    settings = PersisterSettings(consumer="c1", batch_size=50, claim_interval=0.1)
    persister = Persister(store, settings)
    published: list[Message] = []
    async with anyio.create_task_group() as tg:
        await tg.start(persister.run)
        published += await publish_load(store, sessions=4, per_session=100)
        for p in range(store.keys.partitions):
            await raw.xgroup_destroy(store.keys.feed(p), GROUP)
        published += await publish_load(store, sessions=4, per_session=100)
        with anyio.fail_after(30):
            while await store.history_store.count_messages() < len(published):
                await anyio.sleep(0.05)
        persister.stop()
    rows = await history_rows(store.settings, {m.session_id for m in published})
    assert_exactly_once(published, rows, counts)


@pytest.mark.slow
async def test_server_killed_and_restarted_with_aof_loses_nothing(
    tmp_path: Path, key_prefix: str, tally: TallyFactory
) -> None:
    counts = tally(
        "server killed", "SIGKILL, restart (appendfsync always)", "kill -9 of valkey-server"
    )
    server = EmbeddedServer(data_dir=tmp_path / "valkey", appendfsync="always")
    server.start()
    try:
        settings = Settings(
            redis_url=server.url,
            history_url=f"sqlite:///{tmp_path}/h.db",
            key_prefix=key_prefix,
            partitions=4,
            block=0.2,
            socket_timeout=2.0,
            reconnect_timeout=20.0,
        )
        async with StreamStore.open(settings=settings) as store:
            persister = Persister(
                store, PersisterSettings(consumer="c1", batch_size=100, retry_backoff=0.05)
            )
            published = await publish_load(store, sessions=4, per_session=100)
            async with anyio.create_task_group() as tg:
                await tg.start(persister.run)
                killed = server.pid
                server.kill()
                await anyio.sleep(0.5)
                await anyio.to_thread.run_sync(server.restart)
                published += await publish_load(store, sessions=4, per_session=100)
                with anyio.fail_after(30):
                    while await store.history_store.count_messages() < len(published):
                        await anyio.sleep(0.05)
                persister.stop()
            rows = await history_rows(settings, {m.session_id for m in published})
            counts.notes["persister errors"] = persister.stats.errors
            assert_exactly_once(published, rows, counts)
            assert server.pid != killed  # the fault really happened (the client's retries hide it)
    finally:
        server.stop()


async def test_persist_throughput_is_reported(store: StreamStore) -> None:
    """Not a speed assertion: prints the figure for the record (bench measures properly)."""
    published = await publish_load(store, sessions=20, per_session=250)
    persister = Persister(store, PersisterSettings(consumer="c1", batch_size=1000))
    started = time.perf_counter()
    stats = await persister.drain()
    elapsed = time.perf_counter() - started
    assert stats.persisted == len(published)
    print(
        f"persisted {len(published)} messages in {elapsed:.2f} s "
        f"({len(published) / elapsed:,.0f} msgs/s)"
    )


class RefusingHistory(MemoryHistory):
    """History that refuses any batch holding a message with the given content, or everything."""

    def __init__(self, refuse: str | None) -> None:
        super().__init__()
        self.refuse = refuse

    async def write_batch(
        self, messages: Sequence[Message], sessions: Sequence[Session] = ()
    ) -> int:
        if self.refuse is None:
            raise HistoryUnavailableError("down")
        if any(m.content == self.refuse for m in messages):
            raise HistoryError("refused")
        return await super().write_batch(messages, sessions)


async def test_entry_history_refuses_is_isolated_then_dead_lettered(
    store: StreamStore, raw: redis.asyncio.Redis
) -> None:
    session = await store.create_session(["a"])
    texts = ["ok"] * 10 + ["refuse me"] + ["ok"] * 10
    published = await store.publish_many(session.id, [{"sender": "a", "content": t} for t in texts])
    history = RefusingHistory("refuse me")
    await history.open()
    persister = Persister(
        store, PersisterSettings(consumer="c1", max_deliveries=3), history=history
    )
    for _ in range(2):
        with pytest.raises(HistoryError):
            await persister.drain()
    assert await history.count_messages() == 20  # the others were not held back
    assert await raw.xlen(store.keys.dead_letters) == 0  # not yet: only 2 deliveries
    await persister.drain()
    assert persister.stats.dead_lettered == 1
    (dead,) = await raw.xrange(store.keys.dead_letters)
    assert b"refused it 3 times" in dead[1][b"reason"]
    stored = {m.id for m in await history.read(session.id, limit=100)}
    assert stored == {m.id for m in published if m.content == "ok"}


async def test_history_refusing_everything_dead_letters_nothing(
    store: StreamStore, raw: redis.asyncio.Redis
) -> None:
    session = await store.create_session(["a"])
    await store.publish_many(session.id, [{"sender": "a", "content": "x"}] * 5)
    history = RefusingHistory(None)
    await history.open()
    persister = Persister(
        store, PersisterSettings(consumer="c1", max_deliveries=2), history=history
    )
    for _ in range(5):
        with pytest.raises(HistoryError):
            await persister.drain()
    assert await raw.xlen(store.keys.dead_letters) == 0
    feed = store.keys.session(session.id).feed
    assert (await raw.xpending(feed, GROUP))["pending"] == 6  # 5 messages + the session entry


@pytest.mark.slow
async def test_sigkill_inside_the_sqlite_transaction_leaves_a_sound_file(
    store: StreamStore, settings: Settings, tmp_path: Path, tally: TallyFactory
) -> None:
    counts = tally(
        "persister killed inside the SQLite transaction",
        "SIGKILL between the inserts and COMMIT; PRAGMA integrity_check; restart",
        "crash point in_transaction",
    )
    published = await publish_load(store, sessions=10, per_session=100)
    crashing = Worker(settings, tmp_path, "w1", crash_point="in_transaction")
    assert crashing.wait_exit() == -signal.SIGKILL, crashing.log()
    db = tmp_path / "history.db"
    with sqlite3.connect(db) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert connection.execute("SELECT count(*) FROM messages").fetchone() == (0,)
    restarted = Worker(settings, tmp_path, "w1")
    restarted.wait_ready()
    assert await wait_for_count(settings, len(published)) == len(published)
    assert restarted.terminate() == 0, restarted.log()
    rows = await history_rows(settings, {m.session_id for m in published})
    assert_exactly_once(published, rows, counts)


class WatchfulHistory(MemoryHistory):
    """Memory history that checks, at each commit, that the batch's entries are still pending
    in the feed (not acknowledged yet), and holds the first commit until ``wait_for`` entries
    are pending: the persister reads on meanwhile."""

    def __init__(self, raw: redis.asyncio.Redis, feed: str, wait_for: int) -> None:
        super().__init__()
        self.raw = raw
        self.feed = feed
        self.wait_for = wait_for
        self.commits: list[tuple[int, bool, int]] = []  # (entries, all pending, pending)

    async def pending_message_ids(self) -> list[str]:
        pending = await self.raw.xpending_range(self.feed, GROUP, "-", "+", 100_000)
        ids = []
        for entry in pending:
            entry_id = entry["message_id"]
            ((_, fields),) = await self.raw.xrange(self.feed, entry_id, entry_id)
            ids.append(orjson.loads(fields[b"d"]).get("id", "session snapshot"))
        return ids

    async def write_batch(
        self, messages: Sequence[Message], sessions: Sequence[Session] = ()
    ) -> int:
        if not self.commits:
            with anyio.fail_after(10):  # a hang guard, not a measure
                while len(await self.pending_message_ids()) < self.wait_for:
                    await anyio.sleep(0.01)
        pending = await self.pending_message_ids()
        still_pending = all(m.id in pending for m in messages)
        self.commits.append((len(messages) + len(sessions), still_pending, len(pending)))
        return await super().write_batch(messages, sessions)


async def test_next_batch_is_read_during_a_commit_and_acknowledged_after_its_own(
    store: StreamStore, raw: redis.asyncio.Redis
) -> None:
    session = await store.create_session(["a"])
    published = await store.publish_many(
        session.id, [{"sender": "a", "content": f"{i}"} for i in range(95)]
    )
    # The first batch (10 entries, the session's snapshot first) commits once the next is read.
    history = WatchfulHistory(raw, store.keys.session(session.id).feed, wait_for=20)
    await history.open()
    persister = Persister(store, PersisterSettings(consumer="c1", batch_size=10), history=history)
    stats = await persister.drain()
    assert stats.persisted == len(published)
    assert [size for size, _, _ in history.commits] == [10] * 9 + [6]
    assert all(still_pending for _, still_pending, _ in history.commits)
    assert max(pending for _, _, pending in history.commits) == 20  # two batches in hand at most
    stored = await history.read(session.id, limit=1000)
    assert [m.id for m in stored] == [m.id for m in published]
    assert (await raw.xpending(store.keys.session(session.id).feed, GROUP))["pending"] == 0


class FailingHistory(MemoryHistory):
    """Memory history that is unavailable from its ``fail_from``-th write on."""

    def __init__(self, fail_from: int) -> None:
        super().__init__()
        self.writes = 0
        self.fail_from = fail_from

    async def write_batch(
        self, messages: Sequence[Message], sessions: Sequence[Session] = ()
    ) -> int:
        self.writes += 1
        if self.writes >= self.fail_from:
            raise HistoryUnavailableError("down")
        return await super().write_batch(messages, sessions)


async def test_history_failing_mid_drain_acknowledges_only_what_it_committed(
    store: StreamStore, raw: redis.asyncio.Redis
) -> None:
    session = await store.create_session(["a"])
    published = await store.publish_many(
        session.id, [{"sender": "a", "content": f"{i}"} for i in range(59)]
    )
    feed = store.keys.session(session.id).feed
    history = FailingHistory(fail_from=3)
    await history.open()
    persister = Persister(store, PersisterSettings(consumer="c1", batch_size=10), history=history)
    with pytest.raises(HistoryUnavailableError):  # itself, not in an exception group
        await persister.drain()
    committed = await history.count_messages() + 1  # with the session's snapshot
    assert 20 <= committed < 60  # two transactions went through
    (group,) = await raw.xinfo_groups(feed)
    assert group["pending"] > 0  # at least the batch that failed
    assert group["entries-read"] - group["pending"] == committed  # acknowledged: committed
    history.fail_from = 1_000
    await persister.drain()
    stored = await history.read(session.id, limit=1000)
    assert [m.id for m in stored] == [m.id for m in published]
    assert (await raw.xpending(feed, GROUP))["pending"] == 0


def health_of(persister: Persister) -> tuple[float | None, str | None, str | None]:
    return persister.failing_since, persister.failure_reason, persister.history_problem()


async def test_history_failures_are_tracked_published_and_cleared(
    store: StreamStore, raw: redis.asyncio.Redis
) -> None:
    """While run() goes on, failing history writes start a clock (health after
    ``unhealthy_after``) and reach the workers hash; the next commit clears both; a graceful
    stop removes the entry."""
    session = await store.create_session(["a"])
    history = FailingHistory(fail_from=1)
    await history.open()
    settings = PersisterSettings(consumer="c1", retry_backoff=0.05, unhealthy_after=0.3)
    persister = Persister(store, settings, history=history)
    before = time.time()
    async with anyio.create_task_group() as tg:
        await tg.start(persister.run)
        await store.publish_many(session.id, [{"sender": "a", "content": "x"}] * 5)
        with anyio.fail_after(10):
            while persister.failing_since is None:
                await anyio.sleep(0.02)
        assert before <= persister.failing_since <= time.time()
        assert persister.failure_reason == "down"
        assert persister.history_problem() is None  # not for longer than 0.3 s yet
        with anyio.fail_after(10):
            while (entry := await raw.hget(store.keys.workers, "c1")) is None:
                await anyio.sleep(0.02)
        status = orjson.loads(entry)
        assert status["failing_since"] == persister.failing_since
        assert status["reason"] == "down"
        assert before <= status["updated_at"] <= time.time()
        await anyio.sleep(0.4)
        problem = persister.history_problem()
        assert problem is not None
        assert problem.startswith("history writes have been failing for ")
        assert problem.endswith(": down")
        history.fail_from = 1_000
        with anyio.fail_after(10):
            while await history.count_messages(session.id) < 5:
                await anyio.sleep(0.02)
        assert health_of(persister) == (None, None, None)
        with anyio.fail_after(10):  # the recovery is written at once, not at the next refresh
            while orjson.loads(await raw.hget(store.keys.workers, "c1") or b"{}")["failing_since"]:
                await anyio.sleep(0.02)
        persister.stop()
    assert await raw.hget(store.keys.workers, "c1") is None


async def test_drain_writes_no_status(store: StreamStore, raw: redis.asyncio.Redis) -> None:
    session = await store.create_session(["a"])
    await store.publish_many(session.id, [{"sender": "a", "content": "x"}] * 3)
    history = FailingHistory(fail_from=1)
    await history.open()
    persister = Persister(store, PersisterSettings(consumer="c1"), history=history)
    with pytest.raises(HistoryUnavailableError):
        await persister.drain()
    assert persister.failure_reason == "down"  # tracked all the same
    assert not await raw.exists(store.keys.workers)


def test_unhealthy_after_setting() -> None:
    assert PersisterSettings().unhealthy_after_s == 30.0
    env = {"STREAMSTORE_PERSISTER_UNHEALTHY_AFTER": "2.5"}
    assert PersisterSettings.from_env(env).unhealthy_after_s == 2.5
    with pytest.raises(ConfigurationError):
        PersisterSettings(unhealthy_after=-1)
