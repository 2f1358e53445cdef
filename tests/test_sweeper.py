"""Sweeper, lifecycle and backpressure: guarantees 5, 6 and 8, and retention (DESIGN.md §4)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import anyio
import pytest
import redis.asyncio

from streamstore import (
    BackpressureError,
    Message,
    Persister,
    PersisterSettings,
    SessionClosedError,
    SessionNotFoundError,
    SessionState,
    Settings,
    StreamStore,
    Sweeper,
    SweeperSettings,
)
from streamstore.redis.embedded import EmbeddedServer
from tests.workers import Worker


def sweeper(store: StreamStore, **settings: object) -> Sweeper:
    return Sweeper(store, SweeperSettings(**settings))  # type: ignore[arg-type]


async def drain(store: StreamStore) -> None:
    await Persister(store, PersisterSettings(consumer="c1")).drain()


async def test_idle_session_is_closed_in_both_tiers_and_history_kept(
    store: StreamStore, raw: redis.asyncio.Redis
) -> None:
    session = await store.create_session(["a"], ttl=10)
    published = await store.publish_many(session.id, [{"sender": "a", "content": "x"}] * 3)
    keys = store.keys.session(session.id)
    await drain(store)
    start = time.time()
    assert (await sweeper(store).sweep_once(now=start + 5)).closed == 0
    report = await sweeper(store).sweep_once(now=start + 11)
    assert report.closed == 1
    assert report.retired == 1  # everything was persisted, so its stream goes at once
    assert (await store.get_session(session.id)).state is SessionState.CLOSED
    with pytest.raises(SessionClosedError):
        await store.publish(session.id, sender="a", content="late")
    assert not await raw.exists(keys.stream)
    assert 0 < await raw.pttl(keys.meta) <= store.settings.tombstone_ms  # a tombstone
    await drain(store)  # the close snapshot reaches the catalog
    stored = await store.history_store.get_session(session.id)
    assert stored is not None
    assert stored.state is SessionState.CLOSED
    replayed = [m async for m in store.replay(session.id)]
    assert [m.id for m in replayed] == [m.id for m in published]
    await raw.delete(keys.meta)  # tombstone expired: the session lives on in history only
    assert (await store.get_session(session.id)).state is SessionState.CLOSED
    assert [m.id for m in await store.history(session.id)] == [m.id for m in published]
    assert session.id in {s.id for s in await store.list_sessions()}


async def test_publishing_keeps_a_session_alive(store: StreamStore) -> None:
    session = await store.create_session(["a"], ttl=10)
    start = time.time()
    await anyio.sleep(0.05)
    await store.publish(session.id, sender="a", content="still here")
    # the deadline slid with the publish: idle since `start + 0.05`, not since `start`
    assert (await sweeper(store).sweep_once(now=start + 10.01)).closed == 0
    assert (await sweeper(store).sweep_once(now=start + 11)).closed == 1


async def test_nothing_unpersisted_is_removed(store: StreamStore, raw: redis.asyncio.Redis) -> None:
    """Stop the persister, advance the clock far, sweep: every message still reaches history."""
    sessions = [await store.create_session(["a"], ttl=1) for _ in range(5)]
    published: list[Message] = []
    for session in sessions:
        published += await store.publish_many(session.id, [{"sender": "a", "content": "x"}] * 40)
    far = time.time() + 10 * 365 * 86400
    report = await sweeper(store, retention=60).sweep_once(now=far)
    assert report.closed == 5
    assert report.retired == 0  # not persisted yet: streams stay
    for session in sessions:
        assert await raw.xlen(store.keys.session(session.id).stream) == 40
    await drain(store)
    assert await store.history_store.count_messages() == len(published)
    assert (await sweeper(store, retention=None).sweep_once(now=far)).retired == 5


async def test_delete_racing_four_producers(store: StreamStore, raw: redis.asyncio.Redis) -> None:
    session = await store.create_session(["a"])
    keys = store.keys.session(session.id)
    acknowledged: list[Message] = []
    refused = 0

    async def producer(n: int) -> None:
        nonlocal refused
        for i in range(10_000):
            try:
                acknowledged.append(await store.publish(session.id, sender=f"p{n}", content=str(i)))
            except SessionClosedError:
                refused += 1
                return

    async with anyio.create_task_group() as tg:
        for n in range(4):
            tg.start_soon(producer, n)
        await anyio.sleep(0.2)
        await store.delete_session(session.id)
    assert refused == 4
    assert acknowledged
    assert not await raw.exists(keys.stream)
    assert await raw.hget(keys.meta, "state") == b"deleted"
    assert await raw.pttl(keys.meta) > 0
    assert await raw.zscore(keys.index, session.id) is None
    assert await raw.zscore(keys.deadlines, session.id) is None
    feed = [f for _, f in await raw.xrange(keys.feed) if f[b"s"] == session.id.encode()]
    assert feed[-1][b"k"] == b"s"  # the deletion is the session's last feed entry
    in_feed = {f[b"i"].decode() for f in feed if f[b"k"] == b"m"}
    assert in_feed == {str(m.stream_id) for m in acknowledged}  # all of them before it
    await drain(store)
    assert await store.history_store.count_messages(session.id) == 0
    stored = await store.history_store.get_session(session.id)
    assert stored is not None
    assert stored.state is SessionState.DELETED
    with pytest.raises(SessionClosedError):
        await store.publish(session.id, sender="a", content="late")
    with pytest.raises(SessionClosedError):
        [m async for m in store.replay(session.id)]
    assert not await raw.exists(keys.stream)


async def test_close_is_idempotent_and_unknown_sessions_are_refused(store: StreamStore) -> None:
    session = await store.create_session(["a"])
    assert (await store.close_session(session.id)).state is SessionState.CLOSED
    assert (await store.close_session(session.id)).state is SessionState.CLOSED
    await store.delete_session(session.id)
    with pytest.raises(SessionClosedError):
        await store.close_session(session.id)
    with pytest.raises(SessionNotFoundError):
        await store.delete_session("never-was")


async def test_retention_and_caps_are_enforced_exactly(store: StreamStore) -> None:
    old = await store.create_session(["a"], id="old")
    new = await store.create_session(["a"], id="new")
    now = time.time()
    await store.publish_many(
        old.id, [{"sender": "a", "content": str(i), "timestamp": now - 1000 + i} for i in range(10)]
    )
    await store.publish_many(new.id, [{"sender": "a", "content": str(i)} for i in range(30)])
    await drain(store)
    report = await sweeper(store, retention=995.5, max_messages_per_session=20).sweep_once(now=now)
    assert report.messages_deleted == 5 + 10
    assert [m.content for m in await store.history_store.read("old", limit=100)] == [
        str(i) for i in range(5, 10)
    ]
    assert [m.content for m in await store.history_store.read("new", limit=100)] == [
        str(i) for i in range(10, 30)
    ]
    assert (await sweeper(store, retention=995.5).sweep_once(now=now)).messages_deleted == 0


async def test_max_sessions_removes_least_recently_active_closed_sessions(
    store: StreamStore,
) -> None:
    ids = []
    for i in range(5):
        session = await store.create_session(["a"], id=f"s{i}")
        await store.publish(session.id, sender="a", content="x")
        ids.append(session.id)
    await store.close_session("s1")
    await store.close_session("s3")
    await store.close_session("s0")
    await drain(store)
    report = await sweeper(store, max_sessions=3).sweep_once()
    assert report.sessions_deleted == 2
    remaining = {s.id for s in await store.history_store.list_sessions()}
    assert remaining == {"s0", "s2", "s4"}  # s1 and s3 were the least recently active closed


@pytest.mark.slow
async def test_stopped_persister_makes_publish_fail_with_backpressure_then_drains(
    redis_url: str, key_prefix: str, tmp_path: Path, raw: redis.asyncio.Redis
) -> None:
    settings = Settings(
        redis_url=redis_url,
        history_url=f"sqlite:///{tmp_path}/h.db",
        key_prefix=key_prefix,
        partitions=1,
        max_lag=300,
        max_block=0.3,
        block=0.2,
    )
    async with StreamStore.open(settings=settings) as store:
        worker = Worker(settings, tmp_path, "w1")
        worker.wait_ready()
        session = await store.create_session(["a"])
        acknowledged: list[Message] = []
        for i in range(100):
            acknowledged.append(await store.publish(session.id, sender="a", content=str(i)))
        worker.process.send_signal(signal.SIGSTOP)
        try:
            with anyio.fail_after(30):
                while True:
                    try:
                        acknowledged.append(
                            await store.publish(session.id, sender="a", content="more")
                        )
                    except BackpressureError:
                        break
            feed_len = await raw.xlen(store.keys.feed(0))
            assert feed_len <= settings.max_lag
            started = time.monotonic()
            with pytest.raises(BackpressureError):
                await store.publish(session.id, sender="a", content="refused")
            assert time.monotonic() - started >= settings.max_block_s * 0.9
        finally:
            worker.process.send_signal(signal.SIGCONT)
        with anyio.fail_after(30):
            while await store.history_store.count_messages(session.id) < len(acknowledged):
                await anyio.sleep(0.05)
        assert worker.terminate() == 0
        stored = {m.id for m in await store.history_store.read(session.id, limit=10_000)}
        assert stored == {m.id for m in acknowledged}
        assert await raw.xlen(store.keys.feed(0)) < settings.max_lag
        await store.publish(session.id, sender="a", content="flowing again")


@pytest.mark.slow
async def test_out_of_memory_server_gives_backpressure_and_loses_nothing(
    tmp_path: Path, key_prefix: str
) -> None:
    server = EmbeddedServer(data_dir=tmp_path / "valkey", maxmemory=4 * 1024 * 1024)
    server.start()
    try:
        settings = Settings(
            redis_url=server.url,
            history_url=f"sqlite:///{tmp_path}/h.db",
            key_prefix=key_prefix,
            partitions=2,
            max_block=0.2,
        )
        async with StreamStore.open(settings=settings) as store:
            persister = Persister(store, PersisterSettings(consumer="c1", batch_size=200))
            await persister.drain()  # the worker was there before memory ran out
            session = await store.create_session(["a"])
            acknowledged: list[Message] = []
            with pytest.raises(BackpressureError):  # noqa: PT012
                for _ in range(10_000):
                    batch = [{"sender": "a", "content": "y" * 1000}] * 20
                    acknowledged += await store.publish_many(session.id, batch)
            assert acknowledged
            await persister.drain()
            stored = {m.id for m in await store.history_store.read(session.id, limit=100_000)}
            assert stored == {m.id for m in acknowledged}
    finally:
        server.stop()


async def test_sweep_racing_publishes_closes_cleanly(
    store: StreamStore, raw: redis.asyncio.Redis
) -> None:
    """The sweeper closes a session (its deadline faked past) while 4 producers publish to it:
    every acknowledged message reaches history once, and nothing is acknowledged after the
    close."""
    session = await store.create_session(["a"], ttl=10)
    acknowledged: list[Message] = []
    refused = 0

    async def producer(n: int) -> None:
        nonlocal refused
        for i in range(10_000):
            try:
                acknowledged.append(await store.publish(session.id, sender=f"p{n}", content=f"{i}"))
            except SessionClosedError:
                refused += 1
                return

    async with anyio.create_task_group() as tg:
        for n in range(4):
            tg.start_soon(producer, n)
        await anyio.sleep(0.2)
        report = await sweeper(store).sweep_once(now=time.time() + 3600)
    assert report.closed == 1
    assert refused == 4
    feed = store.keys.session(session.id).feed
    mine = [f for _, f in await raw.xrange(feed) if f[b"s"] == session.id.encode()]
    assert mine[-1][b"k"] == b"s"  # the close is the session's last feed entry
    await drain(store)
    stored = await store.history_store.read(session.id, limit=100_000)
    assert sorted(m.id for m in stored) == sorted(m.id for m in acknowledged)
    assert (await store.history_store.get_session(session.id)).state is SessionState.CLOSED  # type: ignore[union-attr]
