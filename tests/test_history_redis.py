"""The Redis history store (``redis+history://``): the whole conformance suite of
tests/test_history.py on each server, then what only this store promises."""

from __future__ import annotations

import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import pytest
import redis.asyncio

from streamstore.codec import message_row
from streamstore.errors import (
    ConfigurationError,
    HistoryCorruptError,
    HistoryError,
    HistoryUnavailableError,
)
from streamstore.history import RetentionResult, history_from_url
from streamstore.history.redis_history import RedisHistory
from streamstore.models import Session, SessionState, StreamId
from streamstore.redis.embedded import EmbeddedServer
from tests.test_history import (
    assert_counts_exact,
    conformance_tests,
    message,
    store_tests_collected,
)

CONFORMANCE = conformance_tests()
globals().update(CONFORMANCE)


def history_url(redis_url: str, prefix: str, *, allow_volatile: bool = False) -> str:
    """The redis+history URL of a streamstore Redis URL, under ``prefix``."""
    parts = urlsplit(redis_url)
    query = "&".join(
        [*filter(None, [parts.query]), f"prefix={prefix}"]
        + (["allow_volatile=true"] if allow_volatile else [])
    )
    return urlunsplit(parts._replace(scheme=f"{parts.scheme}+history", query=query))


async def is_volatile(client: redis.asyncio.Redis) -> bool:
    """Whether the server neither appends nor saves (the machine's Redis may be so)."""
    if str((await client.info("persistence")).get("aof_enabled")) == "1":
        return False
    save = await client.config_get("save")
    return not any(value and value.strip() for value in save.values())


@pytest.fixture
async def store(
    redis_url: str, key_prefix: str, raw: redis.asyncio.Redis
) -> AsyncIterator[RedisHistory]:
    """A Redis history under the test's own prefix (``raw`` deletes its keys afterwards)."""
    url = history_url(redis_url, key_prefix, allow_volatile=await is_volatile(raw))
    history = history_from_url(url)
    assert isinstance(history, RedisHistory)
    await history.open()
    try:
        yield history
    finally:
        await history.close()


async def keys_under(client: redis.asyncio.Redis, prefix: str) -> list[bytes]:
    return sorted([key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)])


# -- the conformance suite runs here, on each server -------------------------------------------


def test_every_conformance_test_is_imported(request: pytest.FixtureRequest) -> None:
    """Every test of tests/test_history.py taking the ``store`` fixture runs here too."""
    assert len(CONFORMANCE) >= 20
    collected = store_tests_collected(request, sys.modules[__name__])
    if collected:
        assert collected >= set(CONFORMANCE)
        assert all(globals()[name] is function for name, function in CONFORMANCE.items())


# -- what only this store promises ------------------------------------------------------------


@pytest.fixture
def volatile_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A private server of this test's own that keeps nothing on disk."""
    with EmbeddedServer(data_dir=tmp_path / "volatile", appendonly=False) as server:
        yield server


async def test_a_volatile_server_is_refused_unless_allowed(
    volatile_server: EmbeddedServer,
) -> None:
    refused = history_from_url(history_url(volatile_server.url, "v"))
    with pytest.raises(ConfigurationError, match="does not persist"):
        await refused.open()
    with pytest.raises(HistoryError, match="not open"):
        await refused.count_messages()

    allowed = history_from_url(history_url(volatile_server.url, "v", allow_volatile=True))
    await allowed.open()
    try:
        assert await allowed.write_batch([message("s", 1)]) == 1
        assert await allowed.count_messages() == 1
    finally:
        await allowed.close()


async def test_an_evicting_server_is_refused_unless_allowed(
    volatile_server: EmbeddedServer,
) -> None:
    client = redis.asyncio.Redis.from_url(volatile_server.url)
    try:
        await client.config_set("appendonly", "yes")  # it persists now, but may evict
        await client.config_set("maxmemory-policy", "allkeys-lru")
        refused = history_from_url(history_url(volatile_server.url, "v"))
        with pytest.raises(ConfigurationError, match="allkeys-lru"):
            await refused.open()
        allowed = history_from_url(history_url(volatile_server.url, "v", allow_volatile=True))
        await allowed.open()
        await allowed.close()
        await client.config_set("maxmemory-policy", "noeviction")
        accepted = history_from_url(history_url(volatile_server.url, "v"))
        await accepted.open()
        await accepted.close()
    finally:
        await client.aclose()


async def test_a_batch_failing_in_the_script_leaves_nothing(
    store: RedisHistory, raw: redis.asyncio.Redis, key_prefix: str
) -> None:
    # Session "b" sorts after "a": a script writing as it went would have stored "a" first.
    planted = f"{key_prefix}:{{h:b}}:m".encode()
    await raw.set(planted, b"not a sorted set")
    batch = [message("a", 1), message("a", 2), message("b", 1), message("c", 1)]
    snapshots = [Session(id="a", participants=("x",)), Session(id="z", state=SessionState.CLOSED)]
    with pytest.raises(HistoryCorruptError) as caught:
        await store.write_batch(batch, snapshots)
    assert "hello" not in str(caught.value)
    assert await keys_under(raw, key_prefix) == [planted]
    assert await store.count_messages() == 0
    assert await store.list_sessions() == []

    # A damaged catalog entry stops a batch the same way.
    await raw.delete(planted)
    damaged = f"{key_prefix}:{{h:b}}:c".encode()
    await raw.hset(damaged, mapping={"state": "active", "last_active_at": "1", "count": "x"})
    with pytest.raises(HistoryCorruptError):
        await store.write_batch(batch, snapshots)
    assert await keys_under(raw, key_prefix) == [damaged]

    await raw.delete(damaged)
    assert await store.write_batch(batch, snapshots) == 4
    assert await store.count_messages() == 4
    assert [s.id for s in await store.list_sessions()] == ["a", "b", "c", "z"]
    await assert_counts_exact(store)


async def test_messages_are_stored_as_codec_rows(
    store: RedisHistory, raw: redis.asyncio.Redis, key_prefix: str
) -> None:
    stored = message("s", 7, 3, metadata={"k": [1]}, recipient="bob")
    await store.write_batch([stored])
    rows = await raw.hgetall(f"{key_prefix}:{{h:s}}:r")
    assert list(rows.values()) == [orjson.dumps(message_row(stored)[1:])]
    assert await raw.exists("ss:{h:s}:r") == 0  # nothing outside the prefix


async def test_a_damaged_row_or_catalog_entry_reads_as_corrupt(
    store: RedisHistory, raw: redis.asyncio.Redis, key_prefix: str
) -> None:
    await store.write_batch([message("s", 1, content="secret-content")])
    rows_key = f"{key_prefix}:{{h:s}}:r"
    (position,) = await raw.hkeys(rows_key)
    await raw.hset(rows_key, position, b'["secret-content", {')
    with pytest.raises(HistoryCorruptError) as caught:
        await store.read("s")
    assert "secret-content" not in str(caught.value)
    await raw.hset(f"{key_prefix}:{{h:s}}:c", "state", "weird")
    with pytest.raises(HistoryCorruptError):
        await store.get_session("s")
    with pytest.raises(HistoryCorruptError):
        await store.list_sessions()


async def test_retention_in_many_small_steps_is_exact(store: RedisHistory) -> None:
    store._retention_chunk = 3  # several script calls per pass
    await store.write_batch(
        [message("a", ms, timestamp=float(ms)) for ms in range(1, 21)]
        + [message("b", ms, timestamp=float(ms)) for ms in range(1, 11)]
        + [message("c", ms, timestamp=100.0) for ms in range(1, 8)],
        [Session(id="c", state=SessionState.CLOSED, last_active_at=1.0)],
    )
    # c goes whole (7), a and b lose 1-4 by age (8), the cap takes 11 of a and 1 of b.
    limits: dict[str, Any] = {"older_than": 5.0, "max_messages_per_session": 5, "max_sessions": 2}
    assert await store.enforce_retention(**limits) == RetentionResult(messages=27, sessions=1)
    assert await store.enforce_retention(**limits) == RetentionResult()
    assert [m.stream_id for m in await store.read("a")] == [StreamId(ms, 0) for ms in range(16, 21)]
    assert [m.stream_id for m in await store.read("b")] == [StreamId(ms, 0) for ms in range(6, 11)]
    assert await store.get_session("c") is None
    await assert_counts_exact(store)


async def test_extreme_stream_ids_sort_and_bound(store: RedisHistory) -> None:
    top = 2**63 - 1
    ids = [(0, 0), (0, top), (1, 0), (top, 0), (top, top)]
    await store.write_batch([message("s", ms, seq) for ms, seq in reversed(ids)])
    assert [tuple(m.stream_id or ()) for m in await store.read("s")] == ids
    assert await store.read("s", after=StreamId(top, top)) == []
    assert len(await store.read("s", after=StreamId(0, 2**64))) == 3  # past (0, anything)
    assert len(await store.read("s", before=StreamId(2**64, 0))) == 5
    assert len(await store.read("s", before=StreamId(0, 2**64))) == 2
    session = await store.get_session("s")
    assert session is not None
    assert session.last_stream_id == StreamId(top, top)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_an_unreachable_server_is_unavailable() -> None:
    store = history_from_url(f"redis+history://127.0.0.1:{free_port()}/0")
    with pytest.raises(HistoryUnavailableError):
        await store.open()
    await store.close()


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster+history://127.0.0.1:7000",
        "redis+history://127.0.0.1:6379/0?allow_volatile=maybe",
        "redis+history://127.0.0.1:6379/0?prefix=a:b",
        "redis+history://127.0.0.1:6379/0?prefix=",
        "redis+history://127.0.0.1:6379/0?prefix=a&prefix=b",
        "redis+history://127.0.0.1:6379/0#fragment",
        "redis+history://127.0.0.1:6379/0?no_such_option=1",
    ],
)
async def test_from_url_refuses(url: str) -> None:
    with pytest.raises(ConfigurationError):
        await RedisHistory.from_url(url).open()


def test_from_url_builds_a_redis_history() -> None:
    store = history_from_url("rediss+history://cache.example:6380/2?prefix=hist")
    assert isinstance(store, RedisHistory)
    with pytest.raises(ConfigurationError, match="Cluster"):
        RedisHistory("redis+cluster://127.0.0.1:7000")
