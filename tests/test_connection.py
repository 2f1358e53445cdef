"""The client streamstore builds: hiredis packing gives redis-py's bytes, restarts are retried,
held connections answer in place and survive a killed link."""

from __future__ import annotations

import contextlib
from pathlib import Path

import anyio
import pytest
import redis.asyncio
import redis.exceptions
from redis.asyncio.connection import Connection

from streamstore import Message, Settings, StreamId, StreamStore
from streamstore.redis import _fastpath
from streamstore.redis._fastpath import DirectExchange, HiredisPacking
from streamstore.redis.connection import CONNECTION_CLASSES
from streamstore.redis.embedded import EmbeddedServer
from streamstore.redis.held import HeldConnection


@pytest.mark.parametrize(
    "command",
    [
        ("GET", "k"),
        ("SCRIPT LOAD", "return 1"),
        ("EVALSHA", "a" * 40, 2, "k1", b"k2", 17, 1.5, "é", b"\x00\xff"),
        ("XADD", "s", "*", "d", b"x" * 1000),
    ],
)
def test_hiredis_packing_matches_redis_py(command: tuple[object, ...]) -> None:
    class Packing(HiredisPacking, Connection):
        pass

    ours = b"".join(Packing().pack_command(*command))
    theirs = b"".join(Connection().pack_command(*command))
    assert ours == theirs
    both = [command, command]
    assert b"".join(Packing().pack_commands(both)) == b"".join(Connection().pack_commands(both))


@pytest.mark.parametrize(
    ("version", "switch", "enabled"),
    [
        ("8.1.0", None, True),
        ("8.2.0", "on", True),
        ("8.2.3", "off", False),
        ("8.3.0", None, False),
        ("7.4.2", None, False),
        ("9.0.0b1", None, False),
        ("8.2.0", "0", False),
    ],
)
def test_fast_path_only_with_the_tested_redis_py(
    version: str, switch: str | None, enabled: bool
) -> None:
    assert _fastpath._enabled(version, switch) is enabled


def test_connections_take_the_path_chosen_at_import() -> None:
    """``STREAMSTORE_FAST_PATH=off`` (``make test`` runs the publish and replay tests so too)
    gives redis-py's own connection classes; otherwise hiredis packing and direct exchange."""
    for connection_class in CONNECTION_CLASSES.values():
        fast = issubclass(connection_class, DirectExchange)
        assert fast is _fastpath.ENABLED
        assert issubclass(connection_class, HiredisPacking) is fast


async def test_calls_after_a_server_restart_are_retried_on_a_new_connection(
    tmp_path: Path, key_prefix: str
) -> None:
    server = EmbeddedServer(data_dir=tmp_path / "valkey", appendfsync="always")
    server.start()
    try:
        settings = Settings(redis_url=server.url, history_url="memory://", key_prefix=key_prefix)
        async with StreamStore.open(settings=settings) as store:
            session = await store.create_session(["a"])
            await store.publish(session.id, sender="a", content="before")
            server.kill()
            server.restart()
            after = await store.publish(session.id, sender="a", content="after")  # no error
            assert [m.id async for m in store.replay(session.id)][-1] == after.id
    finally:
        server.stop()


async def test_held_connections_go_back_to_the_pool(settings: Settings) -> None:
    """The coalescer and every live follower keep a connection out of the pool while they
    work; each gives it back when done, so a small pool serves any number of them in turn,
    and closing the store leaves none checked out."""

    async def first_after(
        store: StreamStore, session_id: str, after: StreamId, seen: list[Message]
    ) -> None:
        async with contextlib.aclosing(store.subscribe(session_id, after=after)) as live:
            async for message in live:
                seen.append(message)
                return

    async with StreamStore.open(settings=settings.replace(max_connections=4)) as store:
        session = await store.create_session(["a", "b"])
        last = await store.publish(session.id, sender="a", content="first")
        for i in range(12):
            assert last.stream_id is not None
            seen: list[Message] = []
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(first_after, store, session.id, last.stream_id, seen)
                    last = await store.publish(session.id, sender="a", content=f"{i}")
            assert [m.id for m in seen] == [last.id]
        client = store.client
    assert isinstance(client, redis.asyncio.Redis)
    assert not client.connection_pool._in_use_connections


async def test_a_held_exchange_answers_each_command_in_place(store: StreamStore) -> None:
    """Replies come raw (bytes, nested lists, None), one per command; a refusal is its
    ResponseError (NoScriptError for a missing script) in its place, not raised."""
    assert isinstance(store.client, redis.asyncio.Redis)
    held = HeldConnection(store.client)
    key = f"{store.keys.prefix}:held"
    try:
        replies = await held.exchange(
            [
                ("HSET", key, "f", "v"),
                ("EVALSHA", "0" * 40, 0),
                ("HMGET", key, "f", "missing"),
                ("XADD", key, "*", "d", "x"),  # wrong type
                ("XRANGE", f"{key}:none", "-", "+"),
            ]
        )
        connection = held._connection
        assert isinstance(connection, DirectExchange) is _fastpath.ENABLED
        assert replies[0] == 1
        assert isinstance(replies[1], redis.exceptions.NoScriptError)
        assert replies[2] == [b"v", None]
        assert isinstance(replies[3], redis.exceptions.ResponseError)
        assert "WRONGTYPE" in str(replies[3])
        assert replies[4] == []
    finally:
        await held.release()
        await store.client.delete(key)


async def test_a_held_exchange_is_sent_again_on_a_new_link_after_a_kill(
    store: StreamStore, raw: redis.asyncio.Redis
) -> None:
    """A link killed between two exchanges (CLIENT KILL, a restart) is replaced under the
    client's retry policy; the command is sent again, whole."""
    assert isinstance(store.client, redis.asyncio.Redis)
    held = HeldConnection(store.client)
    try:
        (first,) = await held.exchange([("CLIENT", "ID")])
        assert await raw.client_kill_filter(_id=first) == 1
        (second,) = await held.exchange([("CLIENT", "ID")])
        assert isinstance(second, int)
        assert second > first  # a new link: the server numbers its clients upwards
    finally:
        await held.release()
