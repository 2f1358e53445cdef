"""The server itself fails: killed and restarted with or without its append-only file."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from streamstore import Message, Persister, PersisterSettings, Settings, StreamStore
from streamstore.redis.embedded import EmbeddedServer
from tests.faults.tally import Tally, record

TallyFactory = Callable[[str, str, str], Tally]

pytestmark = pytest.mark.faults


async def test_restart_without_persistence_is_detected_and_the_pipeline_recovers(
    tmp_path: Path, key_prefix: str, tally: TallyFactory
) -> None:
    counts = tally(
        "server restarted empty",
        "SIGKILL, restart with no append-only file",
        "kill -9 of valkey-server (appendonly no)",
    )
    server = EmbeddedServer(data_dir=tmp_path / "valkey", appendonly=False)
    server.start()
    try:
        settings = Settings(
            redis_url=server.url,
            history_url=f"sqlite:///{tmp_path}/h.db",
            key_prefix=key_prefix,
            partitions=2,
            socket_timeout=2.0,
            block=0.2,
        )
        async with StreamStore.open(settings=settings) as store:
            persister = Persister(store, PersisterSettings(consumer="c1"))
            session = await store.create_session(["a"])
            persisted = await store.publish_many(session.id, [{"sender": "a", "content": "x"}] * 50)
            await persister.drain()
            unpersisted = await store.publish_many(
                session.id, [{"sender": "a", "content": "y"}] * 50
            )
            server.kill()
            server.restart()
            assert (await store.stats()).data_lost_at is None
            await persister.drain()  # finds a server without its group, and without its epoch
            assert persister.stats.data_losses == 1
            assert (await store.stats()).data_lost_at is not None
            again = await store.create_session(["a"])
            after = await store.publish_many(again.id, [{"sender": "a", "content": "z"}] * 10)
            await persister.drain()
            stored = await store.history_store.read(session.id, limit=1000)
            stored += await store.history_store.read(again.id, limit=1000)
        check = [
            sys.executable, "-m", "streamstore", "--redis-url", server.url,
            "--history-url", settings.history_url, "--key-prefix", key_prefix,
            "--partitions", "2", "check",
        ]  # fmt: skip
        unhealthy = await anyio.run_process(check, check=False)
        assert unhealthy.returncode == 3, unhealthy.stdout
        assert b"lost its data" in unhealthy.stdout
        reviewed = await anyio.run_process([*check, "--acknowledge-data-loss"], check=False)
        assert reviewed.returncode == 0, reviewed.stdout
        assert (await anyio.run_process(check, check=False)).returncode == 0
    finally:
        server.stop()
    counts.count(persisted + unpersisted + after, stored)
    counts.notes["expected loss"] = "the 50 acknowledged, unpersisted messages; detected"
    record(counts)
    assert counts.lost == len(unpersisted)
    assert (counts.duplicated, counts.unexpected) == (0, 0)
    assert {m.id for m in stored} == {m.id for m in persisted + after}


async def test_server_killed_with_appendfsync_always_loses_nothing(
    tmp_path: Path, key_prefix: str, tally: TallyFactory
) -> None:
    counts = tally(
        "server killed between publishes",
        "SIGKILL, restart from the append-only file (appendfsync always)",
        "kill -9 of valkey-server",
    )
    server = EmbeddedServer(data_dir=tmp_path / "valkey", appendfsync="always")
    server.start()
    acknowledged: list[Message] = []
    try:
        settings = Settings(
            redis_url=server.url,
            history_url=f"sqlite:///{tmp_path}/h.db",
            key_prefix=key_prefix,
            partitions=2,
        )
        async with StreamStore.open(settings=settings) as store:
            persister = Persister(store, PersisterSettings(consumer="c1"))
            session = await store.create_session(["a"])
            for round_ in range(3):
                acknowledged += await store.publish_many(
                    session.id, [{"sender": "a", "content": f"{round_}"}] * 30
                )
                server.kill()
                server.restart()
            await persister.drain()
            assert persister.stats.data_losses == 0
            stored = await store.history_store.read(session.id, limit=1000)
    finally:
        server.stop()
    counts.count(acknowledged, stored).assert_exactly_once()
