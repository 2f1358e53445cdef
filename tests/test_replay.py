"""Replay and subscribe: history -> stream -> live with no gap and no duplicate (guarantee 4)."""

from __future__ import annotations

import random
from collections import Counter

import anyio
import pytest
import redis.asyncio

from streamstore import (
    Message,
    Persister,
    PersisterSettings,
    SessionNotFoundError,
    StreamId,
    StreamStore,
    WaitTimeoutError,
)
from streamstore import replay as replay_module


async def test_replay_spans_history_and_stream_in_order(store: StreamStore) -> None:
    session = await store.create_session(["a"])
    first = await store.publish_many(
        session.id, [{"sender": "a", "content": f"{i}"} for i in range(300)]
    )
    await Persister(store, PersisterSettings(consumer="c1")).drain()
    second = await store.publish_many(
        session.id, [{"sender": "a", "content": f"{i}"} for i in range(300, 400)]
    )
    everything = first + second
    replayed = [m async for m in store.replay(session.id)]
    assert [m.id for m in replayed] == [m.id for m in everything]
    cursor = everything[150].stream_id
    assert cursor is not None
    after = [m async for m in store.replay(session.id, after=cursor)]
    assert [m.id for m in after] == [m.id for m in everything[151:]]
    page = await store.history(session.id, limit=50)
    assert [m.id for m in page] == [m.id for m in everything[-50:]]
    older = await store.history(session.id, limit=50, before=everything[320].stream_id)
    assert [m.id for m in older] == [m.id for m in everything[270:320]]
    newer = await store.history(session.id, limit=10, after=everything[295].stream_id)
    assert [m.id for m in newer] == [m.id for m in everything[296:306]]


async def test_replay_after_trim_reads_trimmed_part_from_history(
    store: StreamStore, raw: redis.asyncio.Redis
) -> None:
    trimming = store.settings.replace(hot_tail=0)
    async with StreamStore.open(settings=trimming) as eager:
        session = await eager.create_session(["a"])
        published = await eager.publish_many(
            session.id, [{"sender": "a", "content": f"{i}"} for i in range(200)]
        )
        await Persister(eager, PersisterSettings(consumer="c1")).drain()
        stream_len = await raw.xlen(eager.keys.session(session.id).stream)
        assert stream_len <= 1  # trimmed down to the watermark
        replayed = [m async for m in eager.replay(session.id)]
        assert [m.id for m in replayed] == [m.id for m in published]


async def test_replay_pages_through_history_then_follows_live(
    store: StreamStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replay_module, "HISTORY_PAGE", 7)  # many pages, and a partial last one
    trimming = store.settings.replace(hot_tail=0)
    async with StreamStore.open(settings=trimming) as eager:
        session = await eager.create_session(["a"])
        published = await eager.publish_many(
            session.id,
            [{"sender": "a", "content": f"{i}", "metadata": {"i": i}} for i in range(50)],
        )
        await Persister(eager, PersisterSettings(consumer="c1")).drain()
        assert [m async for m in eager.replay(session.id)] == published
        cursor = published[20].stream_id
        assert [m async for m in eager.replay(session.id, after=cursor)] == published[21:]
        followed = eager.replay(session.id, follow=True)
        try:
            assert [await anext(followed) for _ in published] == published
            late = await eager.publish(session.id, sender="a", content="late")
            assert await anext(followed) == late
        finally:
            await followed.aclose()


async def test_unknown_session_cannot_be_replayed(store: StreamStore) -> None:
    with pytest.raises(SessionNotFoundError):
        [m async for m in store.replay("missing")]


async def test_wait_for_sees_a_reply_sent_before_it_started(store: StreamStore) -> None:
    session = await store.create_session(["a", "b"])
    question = await store.publish(session.id, sender="a", recipient="b", content="ping?")
    await store.publish(session.id, sender="b", recipient="a", content="pong")
    reply = await store.wait_for(
        session.id, recipient="a", after=question.stream_id or "0", timeout=2
    )
    assert reply.content == "pong"
    with pytest.raises(WaitTimeoutError):
        await store.wait_for(session.id, recipient="a", timeout=0.3)


async def test_a_follower_reads_past_an_undecodable_last_entry(
    store: StreamStore, raw: redis.asyncio.Redis
) -> None:
    """A foreign entry at the end of a session stream is skipped once: the follower's cursor
    moves past it, rather than reading it again and again until a real message comes."""
    session = await store.create_session(["a"])
    first = await store.publish(session.id, sender="a", content="first")
    assert first.stream_id is not None
    seen: list[Message] = []

    async def follower() -> None:
        async for message in store.subscribe(session.id, after=first.stream_id):
            seen.append(message)
            return

    stream = store.keys.session(session.id).stream
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(follower)
            await anyio.sleep(0.1)  # the follower blocks on its first read
            await raw.xadd(stream, {"d": b"not json"})
            await anyio.sleep(0.1)
            reads = await raw.info("commandstats")
            await anyio.sleep(1.0)  # the follower waits: its blocking reads last block_s each
            after = await raw.info("commandstats")
            last = await store.publish(session.id, sender="a", content="last")
    assert [m.id for m in seen] == [last.id]
    xreads = after["cmdstat_xread"]["calls"] - reads["cmdstat_xread"]["calls"]
    assert xreads <= 1 / store.settings.block_s + 2


async def test_subscriber_survives_client_kill_without_gap_or_duplicate(
    store: StreamStore, raw: redis.asyncio.Redis
) -> None:
    session = await store.create_session(["a"])
    seen: list[Message] = []
    published: list[Message] = []

    async def subscriber() -> None:
        async for message in store.subscribe(session.id, after="0"):
            seen.append(message)
            if len(seen) == 600:
                return

    async def killer() -> None:
        for _ in range(5):
            await anyio.sleep(0.1)
            await raw.client_kill_filter(_type="normal", skipme=True)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(subscriber)
            tg.start_soon(killer)
            for i in range(600):
                for attempt in range(50):
                    try:
                        published.append(
                            await store.publish(session.id, sender="a", content=str(i), id=f"m{i}")
                        )
                        break
                    except Exception:  # the killer cut our own connection too; retry same id
                        if attempt == 49:
                            raise
                        await anyio.sleep(0.01)
                await anyio.sleep(0.001)
    assert [m.id for m in seen] == [f"m{i}" for i in range(600)]
    assert len({m.stream_id for m in published}) == 600


@pytest.mark.slow
async def test_concurrent_replays_see_every_message_once_while_trimming(
    store: StreamStore,
) -> None:
    """50 replays with follow=True, started at random cursors while 8 producers publish, the
    persister commits and session streams are trimmed right down to the watermark."""
    trimming = store.settings.replace(hot_tail=0)
    producers, per_producer = 8, 250
    async with StreamStore.open(settings=trimming) as eager:
        session = await eager.create_session([f"p{i}" for i in range(producers)])
        persister = Persister(eager, PersisterSettings(consumer="c1", batch_size=50))
        published: list[Message] = []
        results: list[tuple[StreamId, list[Message]]] = []

        async def producer(n: int) -> None:
            for i in range(per_producer):
                published.append(
                    await eager.publish(session.id, sender=f"p{n}", content=f"{n}:{i}")
                )
                if i % 10 == 0:
                    await anyio.sleep(0.001)

        async def replayer(cursor: StreamId) -> None:
            got: list[Message] = []
            async for message in eager.replay(session.id, after=cursor, follow=True):
                got.append(message)
                if message.content == "the end":
                    break
            results.append((cursor, got))

        rng = random.Random(7)
        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                await tg.start(persister.run)
                async with anyio.create_task_group() as replays:
                    async with anyio.create_task_group() as load:
                        for n in range(producers):
                            load.start_soon(producer, n)
                        for _ in range(50):
                            await anyio.sleep(rng.uniform(0.0, 0.04))
                            snapshot = [m.stream_id for m in published if m.stream_id]
                            cursor = rng.choice(snapshot) if snapshot else StreamId(0, 0)
                            replays.start_soon(replayer, cursor)
                    published.append(
                        await eager.publish(session.id, sender="p0", content="the end")
                    )
                while await eager.history_store.count_messages(session.id) < len(published):
                    await anyio.sleep(0.05)
                persister.stop()
        ordered = sorted(published, key=lambda m: m.stream_id or StreamId(0, 0))
        gaps = duplicates = 0
        for cursor, got in results:
            expected = [m.id for m in ordered if m.stream_id and m.stream_id > cursor]
            counts = Counter(m.id for m in got)
            duplicates += sum(n - 1 for n in counts.values())
            gaps += len(set(expected) - set(counts))
            assert [m.id for m in got] == expected
        assert (len(results), gaps, duplicates) == (50, 0, 0)
