"""Network faults, injected for real through a TCP proxy or on the server itself."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import pytest
import redis.asyncio

from streamstore import (
    BackpressureError,
    ConnectionLostError,
    Message,
    Persister,
    PersisterSettings,
    Settings,
    StreamStore,
)
from tests.faults.proxy import Proxy
from tests.faults.tally import Tally

TallyFactory = Callable[[str, str, str], Tally]

pytestmark = pytest.mark.faults


@pytest.fixture
async def proxy(redis_url: str) -> AsyncIterator[Proxy]:
    if not redis_url.startswith("redis://"):
        pytest.skip("the proxy forwards TCP only")
    parts = urlsplit(redis_url)
    started = Proxy(parts.hostname or "127.0.0.1", parts.port or 6379)
    await started.start()
    yield started
    await started.stop()


def proxied(settings: Settings, proxy: Proxy, **changes: object) -> Settings:
    return settings.replace(redis_url=proxy.url, **changes)


async def stored_messages(store: StreamStore, session_ids: set[str]) -> list[Message]:
    out: list[Message] = []
    for sid in session_ids:
        out += await store.history_store.read(sid, limit=1_000_000)
    return out


async def test_lost_publish_replies_are_retried_with_the_same_id_and_stored_once(
    settings: Settings, proxy: Proxy, raw: redis.asyncio.Redis, tally: TallyFactory
) -> None:
    counts = tally("publish reply lost", "reply dropped, connection cut", "TCP proxy")
    acknowledged: list[Message] = []
    retries = 0
    async with StreamStore.open(settings=proxied(settings, proxy)) as store:
        session = await store.create_session(["a"])
        for i in range(100):
            if i % 5 == 0:
                proxy.faults.drop_next_reply = 1
            for _attempt in range(10):
                try:
                    acknowledged.append(
                        await store.publish(session.id, sender="a", content=str(i), id=f"m{i}")
                    )
                    break
                except ConnectionLostError:
                    retries += 1
        live = [m.id async for m in store.replay(session.id)]  # from the Redis stream
        assert live == [f"m{i}" for i in range(100)]  # each retried id entered the stream once
        await Persister(store, PersisterSettings(consumer="c1")).drain()
        stored = await stored_messages(store, {session.id})
    assert proxy.faults.dropped, "the fault was never injected"
    counts.notes["replies dropped"] = len(proxy.faults.dropped)
    counts.notes["client retries"] = retries
    counts.count(acknowledged, stored).assert_exactly_once()
    assert [m.content for m in stored] == [str(i) for i in range(100)]
    assert len({m.stream_id for m in acknowledged}) == 100


async def test_lost_replies_to_publishes_of_generated_ids_are_stored_once(
    settings: Settings, proxy: Proxy, raw: redis.asyncio.Redis, tally: TallyFactory
) -> None:
    """A publish without an id is first sent without a dedup lookup (its generated ids are
    new); when its reply is lost, the client sends it again, and that send must look the ids
    up: the first one was stored."""
    counts = tally(
        "publish reply lost, ids generated", "reply dropped, connection cut", "TCP proxy"
    )
    acknowledged: list[Message] = []
    raised: list[str] = []
    async with StreamStore.open(settings=proxied(settings, proxy)) as store:
        session = await store.create_session(["a"])
        for i in range(100):
            if i % 5 == 0:
                proxy.faults.drop_next_reply = 1
            try:
                acknowledged.append(await store.publish(session.id, sender="a", content=str(i)))
            except ConnectionLostError:
                raised.append(str(i))
        live = [m async for m in store.replay(session.id)]  # from the Redis stream
        await Persister(store, PersisterSettings(consumer="c1")).drain()
        stored = await stored_messages(store, {session.id})
    assert len(proxy.faults.dropped) == 20, "the fault was not injected every time"
    contents = [m.content for m in live]
    assert len(contents) == len(set(contents)), "a resent publish entered the stream twice"
    assert set(contents) - set(raised) == {m.content for m in acknowledged}
    raised_ids = [m.id for m in live if m.content in raised]
    counts.notes["replies dropped"] = len(proxy.faults.dropped)
    counts.notes["publishes raised"] = len(raised)
    counts.count(acknowledged, stored, attempted_ids=raised_ids).assert_exactly_once()


async def test_client_pause_gives_a_typed_error_or_success_within_the_deadline(
    settings: Settings, raw: redis.asyncio.Redis, tally: TallyFactory
) -> None:
    counts = tally("server paused", "CLIENT PAUSE 3 s (writes)", "CLIENT PAUSE")
    fast = settings.replace(socket_timeout=1.5, block=0.2, max_block=0.5)
    acknowledged: list[Message] = []
    attempted: list[str] = []
    outcomes: list[str] = []
    async with StreamStore.open(settings=fast) as store:
        session = await store.create_session(["a"])
        await raw.execute_command("CLIENT", "PAUSE", "3000", "WRITE")
        try:
            for i in range(3):
                started = time.monotonic()
                attempted.append(f"p{i}")
                try:
                    acknowledged.append(
                        await store.publish(session.id, sender="a", content="x", id=f"p{i}")
                    )
                    outcomes.append("ok")
                except (ConnectionLostError, BackpressureError) as exc:
                    outcomes.append(type(exc).__name__)
                # never a hang: redis-py retries a timed-out call a few times at most
                assert time.monotonic() - started < 4 * fast.socket_timeout_s + 2
        finally:
            await raw.execute_command("CLIENT", "UNPAUSE")
        acknowledged.append(await store.publish(session.id, sender="a", content="after"))
        await Persister(store, PersisterSettings(consumer="c1")).drain()
        stored = await stored_messages(store, {session.id})
    counts.notes["outcomes"] = outcomes
    counts.count(acknowledged, stored, attempted_ids=attempted).assert_exactly_once()


async def test_persister_connections_killed_repeatedly(
    settings: Settings, raw: redis.asyncio.Redis, tally: TallyFactory
) -> None:
    counts = tally("persister connections killed", "CLIENT KILL every 50 ms", "CLIENT KILL")
    acknowledged: list[Message] = []
    async with StreamStore.open(settings=settings) as store:
        persister = Persister(
            store, PersisterSettings(consumer="c1", batch_size=50, retry_backoff=0.01)
        )
        sessions = [await store.create_session(["a"]) for _ in range(4)]
        async with anyio.create_task_group() as tg:
            await tg.start(persister.run)

            async def killer() -> None:
                for _ in range(20):
                    await anyio.sleep(0.05)
                    await raw.client_kill_filter(_type="normal", skipme=True)

            tg.start_soon(killer)
            for i in range(50):
                for session in sessions:
                    for _attempt in range(20):
                        try:
                            acknowledged.append(
                                await store.publish(
                                    session.id, sender="a", content="x", id=f"{session.id}-{i}"
                                )
                            )
                            break
                        except ConnectionLostError:
                            await anyio.sleep(0.01)
            started = time.monotonic()
            with anyio.fail_after(30):
                while await store.history_store.count_messages() < len(acknowledged):
                    await anyio.sleep(0.05)
            counts.recovery_s = round(time.monotonic() - started, 2)
            persister.stop()
        stored = await stored_messages(store, {s.id for s in sessions})
    counts.notes["persister errors"] = persister.stats.errors
    counts.count(acknowledged, stored).assert_exactly_once()


async def test_latency_and_jitter_are_slower_but_correct(
    settings: Settings, proxy: Proxy, raw: redis.asyncio.Redis, tally: TallyFactory
) -> None:
    counts = tally("slow link", "5 ms latency + 0-10 ms jitter", "TCP proxy")
    proxy.faults.latency, proxy.faults.jitter = 0.005, 0.010
    acknowledged: list[Message] = []
    async with StreamStore.open(settings=proxied(settings, proxy)) as store:
        session = await store.create_session(["a", "b"])
        seen: list[Message] = []

        async def subscriber() -> None:
            async for message in store.subscribe(session.id, after="0"):
                seen.append(message)
                if len(seen) == 200:
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(subscriber)
            for i in range(20):
                acknowledged += await store.publish_many(
                    session.id, [{"sender": "a", "content": f"{i}:{j}"} for j in range(10)]
                )
        await Persister(store, PersisterSettings(consumer="c1")).drain()
        stored = await stored_messages(store, {session.id})
    assert [m.id for m in seen] == [m.id for m in acknowledged]
    counts.count(acknowledged, stored).assert_exactly_once()


async def test_half_open_link_is_detected_within_the_socket_timeout(
    settings: Settings, proxy: Proxy, raw: redis.asyncio.Redis, tmp_path: Path, tally: TallyFactory
) -> None:
    counts = tally("half-open link", "proxy forwards nothing, closes nothing", "TCP proxy")
    fast = proxied(settings, proxy, socket_timeout=1.0, block=0.2, reconnect_timeout=1.0)
    async with StreamStore.open(settings=fast) as store:
        session = await store.create_session(["a"])
        ok = await store.publish(session.id, sender="a", content="before")
        proxy.faults.blackhole = True
        started = time.monotonic()
        with pytest.raises(ConnectionLostError):
            await store.publish(session.id, sender="a", content="into the void", id="void")
        detected = time.monotonic() - started
        proxy.faults.blackhole = False
        proxy.cut_all()
        after = await store.publish(session.id, sender="a", content="after")
        await Persister(store, PersisterSettings(consumer="c1")).drain()
        stored = await stored_messages(store, {session.id})
    counts.recovery_s = round(detected, 2)
    counts.notes["detected after s"] = round(detected, 2)
    assert detected < 4 * fast.socket_timeout_s + 2
    counts.count([ok, after], stored, attempted_ids=["void"]).assert_exactly_once()
