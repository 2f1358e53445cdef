"""storage_type "memory": the whole broker in one process (``memory://`` Redis served by
fakeredis with the same Lua scripts, memory history), and the publish and replay suites run
again on it (their tests are imported here, so this module's fixtures serve them)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator

import anyio
import pytest
import redis.asyncio

from streamstore import (
    ConfigurationError,
    Message,
    Persister,
    PersisterSettings,
    SessionClosedError,
    Settings,
    StreamStore,
    Sweeper,
)
from streamstore.redis.connection import connect
from streamstore.redis.inprocess import forget
from streamstore.redis.topology import topology_of

# The publish and replay suites, run on memory:// through the fixtures below.
from tests.test_publish import *  # noqa: F403
from tests.test_replay import *  # noqa: F403

SUITE_SERVER = "memory://suite"


async def test_a_follower_reads_past_an_undecodable_last_entry(  # type: ignore[no-redef]
    store: StreamStore, raw: redis.asyncio.Redis
) -> None:
    """Replaces the replay suite's test of that name, which counts XREAD calls with INFO
    commandstats (fakeredis has no INFO): here, only what the follower yields is checked."""
    session = await store.create_session(["a"])
    first = await store.publish(session.id, sender="a", content="first")
    start = first.stream_id
    assert start is not None
    seen: list[Message] = []

    async def follower() -> None:
        async for message in store.subscribe(session.id, after=start):
            seen.append(message)
            return

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(follower)
            await anyio.sleep(0.1)  # the follower blocks on its first read
            await raw.xadd(store.keys.session(session.id).stream, {"d": b"not json"})
            await anyio.sleep(0.3)
            last = await store.publish(session.id, sender="a", content="last")
    assert [m.id for m in seen] == [last.id]


# -- fixtures: the conftest's names, served in process ----------------------------------------


@pytest.fixture(scope="session")
def redis_url() -> str:
    """Every imported test runs on one named in-process server (each under its own prefix)."""
    return SUITE_SERVER


@pytest.fixture
async def raw(redis_url: str, key_prefix: str) -> AsyncIterator[redis.asyncio.Redis]:
    """A client of the same in-process server; deletes the test's keys afterwards."""
    client = connect(redis_url, Settings(redis_url=redis_url))
    assert isinstance(client, redis.asyncio.Redis)
    yield client
    keys = [key async for key in client.scan_iter(match=f"{key_prefix}:*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
async def memory_store() -> AsyncIterator[StreamStore]:
    """A store of storage type memory, on a server of its own name."""
    name = f"t1-{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=f"memory://{name}", history_url="memory://", block=0.2)
    async with StreamStore.open(settings=settings) as opened:
        yield opened
    forget(name)


# -- the memory tier -----------------------------------------------------------------------


async def test_open_reports_an_in_process_server_that_keeps_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    name = f"fresh-{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=f"memory://{name}", history_url="memory://")
    with caplog.at_level(logging.INFO):
        async with StreamStore.open(settings=settings) as store:
            server = store.server
            held = store.deployment.topology.held()
    forget(name)
    assert server.in_process
    assert server.name == "fakeredis"
    assert server.maxmemory_policy == "noeviction"
    assert (server.appendonly, server.replays_scripts) == (False, True)
    assert server.epoch is not None
    assert held is None  # no socket to hold: pipelines serve the hot paths
    opened = [r for r in caplog.records if "nothing in it survives this process" in r.message]
    assert [r.levelno for r in opened] == [logging.INFO]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_memory_tier_end_to_end(memory_store: StreamStore) -> None:
    store = memory_store
    session = await store.create_session(["alice", "bot"], ttl=None)
    question = await store.publish(session.id, sender="alice", content="ping?")
    assert question.stream_id is not None

    # wait_for from another task, and a live subscriber, while more is published.
    answers: list[Message] = []
    live: list[Message] = []
    followed: list[Message] = []
    count = 60

    async def waiter() -> None:
        answers.append(
            await store.wait_for(
                session.id, recipient="alice", timeout=10, after=question.stream_id or "$"
            )
        )

    async def subscriber(started: anyio.Event) -> None:
        messages = store.subscribe(session.id, after=question.stream_id or "$")
        started.set()
        async for message in messages:
            live.append(message)
            if len(live) == count:
                return

    async def follower(started: anyio.Event) -> None:
        messages = store.replay(session.id, follow=True)
        started.set()
        async for message in messages:
            followed.append(message)
            if len(followed) == count + 1:
                return

    published: list[Message] = [question]
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            for task in (subscriber, follower):
                started = anyio.Event()
                tg.start_soon(task, started)
                await started.wait()
            await anyio.sleep(0.05)
            for i in range(count):
                sender = "bot" if i % 2 == 0 else "alice"
                published.append(await store.publish(session.id, sender=sender, content=f"{i}"))
                if i % 10 == 0:  # a persister pass meanwhile: replay crosses the tiers
                    await Persister(store, PersisterSettings(consumer="c1")).drain()

    assert [m.id for m in answers] == [published[1].id]  # the bot's reply to alice
    assert [m.id for m in live] == [m.id for m in published[1:]]
    assert [m.id for m in followed] == [m.id for m in published]  # gapless, each once

    # The persister stores everything exactly once.
    stats = await Persister(store, PersisterSettings(consumer="c2")).drain()
    history = store.history_store
    assert await history.count_messages(session.id) == len(published)
    again = await Persister(store, PersisterSettings(consumer="c2")).drain()
    assert again.persisted == 0
    stored = await history.read(session.id, limit=1000)
    assert [m.id for m in stored] == [m.id for m in published]
    assert stats.persisted + again.persisted <= len(published)


async def test_a_running_persister_follows_with_blocking_group_reads(
    memory_store: StreamStore,
) -> None:
    """``run`` reads the feeds with XREADGROUP BLOCK: fakeredis must wake it on new entries."""
    store = memory_store
    session = await store.create_session(["a"])
    persister = Persister(store, PersisterSettings(consumer="runner"))
    published: list[Message] = []
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(persister.run)
            await anyio.sleep(0.3)  # past one BLOCK (0.2 s): the reader is waiting
            for i in range(20):
                published.append(await store.publish(session.id, sender="a", content=f"{i}"))
            while await store.history_store.count_messages(session.id) < len(published):
                await anyio.sleep(0.01)
            persister.stop()
    stored = await store.history_store.read(session.id, limit=100)
    assert [m.id for m in stored] == [m.id for m in published]
    assert persister.stats.persisted == len(published)


async def test_repeated_message_id_is_stored_once_in_memory(memory_store: StreamStore) -> None:
    store = memory_store
    session = await store.create_session(["a"])
    first = await store.publish(session.id, sender="a", content="x", id="m-1")
    second = await store.publish(session.id, sender="a", content="x", id="m-1")
    assert second.stream_id == first.stream_id
    await Persister(store, PersisterSettings(consumer="c1")).drain()
    assert await store.history_store.count_messages(session.id) == 1
    assert len([m async for m in store.replay(session.id)]) == 1


async def test_closed_session_refuses_publish(memory_store: StreamStore) -> None:
    store = memory_store
    session = await store.create_session(["a"])
    await store.publish(session.id, sender="a", content="before")
    await store.close_session(session.id)
    with pytest.raises(SessionClosedError):
        await store.publish(session.id, sender="a", content="after")
    await store.delete_session(session.id)
    with pytest.raises(SessionClosedError):
        await store.publish(session.id, sender="a", content="late")


async def test_sweeper_closes_idle_sessions(memory_store: StreamStore) -> None:
    store = memory_store
    idle = await store.create_session(["a"], ttl=60)
    busy = await store.create_session(["a"], ttl=3600)
    await store.publish(idle.id, sender="a", content="hello")
    await Persister(store, PersisterSettings(consumer="c1")).drain()
    report = await Sweeper(store).sweep_once(now=time.time() + 120)
    assert report.closed == 1
    assert (await store.get_session(idle.id)).state == "closed"
    assert (await store.get_session(busy.id)).state == "active"
    with pytest.raises(SessionClosedError):
        await store.publish(idle.id, sender="a", content="too late")


async def test_two_stores_on_one_name_share_sessions() -> None:
    name = f"same-{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=f"memory://{name}", history_url="memory://")
    async with (
        StreamStore.open(settings=settings) as one,
        StreamStore.open(settings=settings) as two,
    ):
        session = await one.create_session(["a"])
        sent = await two.publish(session.id, sender="a", content="across")
        assert (await two.get_session(session.id)).id == session.id
        assert [m.id async for m in one.replay(session.id)] == [sent.id]
        assert one.server.epoch == two.server.epoch
    forget(name)


async def test_unnamed_memory_urls_are_private() -> None:
    settings = Settings(redis_url="memory://", history_url="memory://")
    async with (
        StreamStore.open(settings=settings) as one,
        StreamStore.open(settings=settings) as two,
    ):
        session = await one.create_session(["a"])
        assert await two.list_sessions() == []
        assert [s.id for s in await one.list_sessions()] == [session.id]
        assert one.server.epoch != two.server.epoch


@pytest.mark.parametrize(
    "url",
    [
        "memory://user:secret@x",
        "memory://x:6379",
        "memory://x/1",
        "memory://x?db=1",
        "memory://a b",
    ],
)
def test_memory_urls_take_only_a_name(url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        connect(url, Settings(redis_url=url))
    assert "secret" not in str(caught.value)


def test_memory_urls_refuse_tls_options() -> None:
    settings = Settings(redis_url="memory://x", tls_ca_file="/etc/ssl/certs/ca.pem")
    with pytest.raises(ConfigurationError, match="tls_ca_file"):
        connect("memory://x", settings)


def test_a_memory_client_has_an_in_process_topology() -> None:
    client = connect("memory://", Settings(redis_url="memory://"))
    topology = topology_of(client)
    assert topology.in_process
    assert topology.held() is None
    assert topology.address() == "memory://"
    assert not topology.uses_tls()
