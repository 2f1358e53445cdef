"""Publishing: atomic in both streams, ordered, idempotent, validated before anything is written."""

from __future__ import annotations

import functools
import itertools
from typing import Any

import anyio
import pytest
import redis.asyncio

from streamstore import (
    MessageTooLargeError,
    SessionClosedError,
    SessionExistsError,
    SessionNotFoundError,
    StreamId,
    StreamStore,
    ValidationError,
)
from streamstore.coalescer import PublishCoalescer
from streamstore.errors import ServerError


async def stream_ids(raw: redis.asyncio.Redis, key: str) -> list[bytes]:
    return [entry_id for entry_id, _ in await raw.xrange(key)]


async def feed_entries(raw: redis.asyncio.Redis, store: StreamStore, session_id: str) -> list[Any]:
    feed = store.keys.session(session_id).feed
    return [
        f for _, f in await raw.xrange(feed) if f[b"k"] == b"m" and f[b"s"] == session_id.encode()
    ]


async def test_publish_lands_in_session_stream_and_feed(
    store: StreamStore, raw: redis.asyncio.Redis
) -> None:
    session = await store.create_session(["a", "b"])
    msg = await store.publish(session.id, sender="a", content="hello", recipient="b")
    keys = store.keys.session(session.id)
    assert await stream_ids(raw, keys.stream) == [str(msg.stream_id).encode()]
    (feed,) = await feed_entries(raw, store, session.id)
    assert feed[b"i"] == str(msg.stream_id).encode()
    got = await store.get_session(session.id)
    assert got.message_count == 1
    assert got.last_stream_id == msg.stream_id


async def test_publish_writes_neither_stream_when_the_feed_write_would_fail(
    store: StreamStore, raw: redis.asyncio.Redis
) -> None:
    session = await store.create_session(["a"])
    keys = store.keys.session(session.id)
    await store.publish(session.id, sender="a", content="before")
    # Sabotage the feed: the second XADD of the script would fail after the first succeeded.
    feed_backup = await raw.dump(keys.feed)
    await raw.delete(keys.feed)
    await raw.set(keys.feed, b"not a stream")
    with pytest.raises(ServerError):
        await store.publish(session.id, sender="a", content="lost?")
    assert len(await stream_ids(raw, keys.stream)) == 1
    assert (await store.get_session(session.id)).message_count == 1
    await raw.delete(keys.feed)
    assert feed_backup is not None
    await raw.restore(keys.feed, 0, feed_backup)


async def test_publish_many_is_one_atomic_batch(
    store: StreamStore, raw: redis.asyncio.Redis
) -> None:
    session = await store.create_session(["a"])
    batch = [{"sender": "a", "content": f"m{i}", "metadata": {"i": i}} for i in range(100)]
    published = await store.publish_many(session.id, batch)
    ids = [m.stream_id for m in published]
    assert ids == sorted(ids)
    assert len(set(ids)) == 100
    assert len(await feed_entries(raw, store, session.id)) == 100
    replayed = [m async for m in store.replay(session.id)]
    assert [m.content for m in replayed] == [f"m{i}" for i in range(100)]
    assert [m.metadata for m in replayed] == [{"i": i} for i in range(100)]


async def test_publish_many_takes_at_most_a_thousand_messages(
    store: StreamStore, raw: redis.asyncio.Redis
) -> None:
    session = await store.create_session(["a"])
    with pytest.raises(ValidationError, match="at most 1000"):
        await store.publish_many(session.id, [{"sender": "a", "content": "x"}] * 1001)
    assert await stream_ids(raw, store.keys.session(session.id).stream) == []
    published = await store.publish_many(session.id, [{"sender": "a", "content": "x"}] * 1000)
    assert len({m.stream_id for m in published}) == 1000


async def test_concurrent_producers_keep_one_order(store: StreamStore) -> None:
    session = await store.create_session([f"p{i}" for i in range(8)])
    published: list[Any] = []
    seen: list[Any] = []
    ready = anyio.Event()

    async def subscriber() -> None:
        async for message in store.subscribe(session.id, after="0"):
            seen.append(message)
            if len(seen) == 8000:
                return

    async def producer(n: int) -> None:
        await ready.wait()
        for i in range(1000):
            published.append(await store.publish(session.id, sender=f"p{n}", content=f"{n}:{i}"))

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(subscriber)
            for n in range(8):
                tg.start_soon(producer, n)
            ready.set()
    stream_order = [m.stream_id for m in seen]
    assert len(seen) == 8000
    assert all(a < b for a, b in itertools.pairwise(stream_order))
    assert sorted(m.id for m in seen) == sorted(m.id for m in published)
    assert {m.id: m.stream_id for m in published} == {m.id: m.stream_id for m in seen}
    # each producer's own messages keep their order
    for n in range(8):
        mine = [m.content for m in seen if m.sender == f"p{n}"]
        assert mine == [f"{n}:{i}" for i in range(1000)]


async def test_concurrent_publishes_are_merged_and_answered_each_on_its_own(
    store: StreamStore, raw: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Publishes made while one is in flight travel in merged script calls, each caller's
    batch checked and answered on its own: a refused one refuses nothing else, and a message
    id repeated across the merged batches is stored once."""
    batches_per_call: list[int] = []
    exchange = PublishCoalescer._exchange

    async def counting(self: PublishCoalescer, commands: Any, held: Any, **options: Any) -> Any:
        batches_per_call.extend(int(command[2]) // 6 for command in commands)
        return await exchange(self, commands, held, **options)

    monkeypatch.setattr(PublishCoalescer, "_exchange", counting)
    live = [await store.create_session(["a"]) for _ in range(6)]
    closed = await store.create_session(["a"])
    await store.close_session(closed.id)
    published: list[Any] = []
    refused: list[type[Exception]] = []

    async def publish(session_id: str, **fields: Any) -> None:
        try:
            published.append(await store.publish(session_id, sender="a", **fields))
        except (SessionClosedError, SessionNotFoundError) as exc:
            refused.append(type(exc))

    async with anyio.create_task_group() as tg:
        for i in range(20):
            for session in live:
                tg.start_soon(functools.partial(publish, session.id, content=f"{i}"))
            tg.start_soon(functools.partial(publish, live[0].id, content="again", id="twice"))
        tg.start_soon(functools.partial(publish, closed.id, content="late"))
        tg.start_soon(functools.partial(publish, "no-such-session", content="lost"))
    assert max(batches_per_call) > 1
    assert sorted(refused, key=str) == sorted([SessionClosedError, SessionNotFoundError], key=str)
    assert len(published) == 6 * 20 + 20
    assert len({m.stream_id for m in published if m.id == "twice"}) == 1
    for session in live:
        stream = await stream_ids(raw, store.keys.session(session.id).stream)
        expected = 20 + (1 if session is live[0] else 0)
        assert len(stream) == expected
        assert len(await feed_entries(raw, store, session.id)) == expected
        assert (await store.get_session(session.id)).message_count == expected
    assert await stream_ids(raw, store.keys.session(closed.id).stream) == []


async def test_repeated_message_id_is_stored_once(
    store: StreamStore, raw: redis.asyncio.Redis
) -> None:
    session = await store.create_session(["a"])
    first = await store.publish(session.id, sender="a", content="x", id="req-1")
    again = await store.publish(session.id, sender="a", content="x", id="req-1")
    assert again.stream_id == first.stream_id
    batch = await store.publish_many(
        session.id, [{"sender": "a", "content": "y", "id": "req-2"}] * 3
    )
    assert len({m.stream_id for m in batch}) == 1
    assert len(await stream_ids(raw, store.keys.session(session.id).stream)) == 2
    assert len(await feed_entries(raw, store, session.id)) == 2
    assert (await store.get_session(session.id)).message_count == 2


async def test_unknown_session_is_refused_and_not_created(
    store: StreamStore, raw: redis.asyncio.Redis
) -> None:
    with pytest.raises(SessionNotFoundError):
        await store.publish("nope", sender="a", content="x")
    assert not await raw.exists(store.keys.session("nope").stream)
    assert not await raw.exists(store.keys.session("nope").meta)


async def test_session_ids_are_unique(store: StreamStore) -> None:
    await store.create_session(["a"], id="room-1")
    with pytest.raises(SessionExistsError):
        await store.create_session(["b"], id="room-1")


BAD_PUBLISHES: list[tuple[dict[str, Any], type[Exception]]] = [
    ({"sender": "", "content": "x"}, ValidationError),
    ({"sender": "a\x00b", "content": "x"}, ValidationError),
    ({"sender": 3, "content": "x"}, ValidationError),
    ({"sender": "a", "content": b"bytes"}, ValidationError),
    ({"sender": "a", "content": None}, ValidationError),
    ({"sender": "a", "content": "\ud800"}, ValidationError),
    ({"sender": "\udfff", "content": "x"}, ValidationError),
    ({"sender": "a", "content": "x" * (64 * 1024 + 1)}, MessageTooLargeError),
    ({"sender": "a", "content": "é" * 40_000}, MessageTooLargeError),
    ({"sender": "a", "content": "x", "metadata": ["not", "an", "object"]}, ValidationError),
    ({"sender": "a", "content": "x", "metadata": {1: "int key"}}, ValidationError),
    ({"sender": "a", "content": "x", "metadata": {"k": object()}}, ValidationError),
    ({"sender": "a", "content": "x", "id": "has space"}, ValidationError),
    ({"sender": "a", "content": "x", "id": ""}, ValidationError),
    ({"sender": "a", "content": "x", "id": "x" * 129}, ValidationError),
    ({"sender": "a", "content": "x", "recipient": ""}, ValidationError),
    ({"sender": "a", "content": "x", "timestamp": "now"}, ValidationError),
    ({"sender": "a", "content": "x", "colour": "blue"}, ValidationError),
]


@pytest.mark.parametrize(("spec", "error"), BAD_PUBLISHES)
async def test_bad_input_raises_typed_error_and_writes_nothing(
    store: StreamStore, raw: redis.asyncio.Redis, spec: dict[str, Any], error: type[Exception]
) -> None:
    session = await store.create_session(["a"])
    good = {"sender": "a", "content": "fine"}
    with pytest.raises(error):
        await store.publish_many(session.id, [good, spec])
    assert await stream_ids(raw, store.keys.session(session.id).stream) == []
    assert await feed_entries(raw, store, session.id) == []


@pytest.mark.parametrize(
    "session_id", ["", "a b", "a:b", "{p1}", "a*", "a?", "[x]", "a\x00", "x" * 129, "é", 42]
)
async def test_bad_session_ids_are_refused(
    store: StreamStore, raw: redis.asyncio.Redis, session_id: Any
) -> None:
    before = await raw.dbsize()
    with pytest.raises(ValidationError):
        await store.create_session(["a"], id=session_id)
    with pytest.raises(ValidationError):
        await store.publish(session_id, sender="a", content="x")
    assert await raw.dbsize() == before


def test_stream_id_order_and_text() -> None:
    assert StreamId.parse("5-1") < StreamId.parse("5-2") < StreamId.parse("6-0")
    assert str(StreamId.parse("17")) == "17-0"
    for bad in ("x-1", "1-", "-1", b"1-x", "1.5-2", "\u0663-1", ""):
        with pytest.raises(ValidationError):
            StreamId.parse(bad)
