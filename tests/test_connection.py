"""The client streamstore builds: hiredis packing gives redis-py's bytes, restarts are retried."""

from __future__ import annotations

import contextlib
from pathlib import Path

import anyio
import pytest
import redis.asyncio
from redis.asyncio.connection import Connection

from streamstore import Message, Settings, StreamId, StreamStore
from streamstore.connection import _TCPConnection
from streamstore.embedded import EmbeddedServer


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
    ours = b"".join(_TCPConnection().pack_command(*command))
    theirs = b"".join(Connection().pack_command(*command))
    assert ours == theirs
    both = [command, command]
    assert b"".join(_TCPConnection().pack_commands(both)) == b"".join(
        Connection().pack_commands(both)
    )


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
