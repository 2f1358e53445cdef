"""Persister worker processes writing to one PostgreSQL history: exactly once through SIGKILL at
every crash point, three workers racing, and gapless replay from PostgreSQL into the live tail."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from streamstore import Message, Persister, PersisterSettings, Settings, StreamStore
from tests.faults.tally import Tally
from tests.test_history_postgres import postgres_schema, url_for
from tests.test_persister import assert_exactly_once, history_rows, publish_load, wait_for_count
from tests.workers import Worker

TallyFactory = Callable[[str, str, str], Tally]

pytestmark = pytest.mark.slow


@pytest.fixture
async def pg_settings(settings: Settings) -> AsyncIterator[Settings]:
    async with postgres_schema() as schema:
        yield settings.replace(history_url=url_for(schema), hot_tail=0)


@pytest.mark.parametrize("crash_point", ["after_read", "after_commit"])
async def test_sigkill_then_restart_is_exactly_once_in_postgres(
    pg_settings: Settings, tmp_path: Path, crash_point: str, tally: TallyFactory
) -> None:
    counts = tally(
        f"persister killed {crash_point.replace('_', ' ')} (PostgreSQL history)",
        "SIGKILL, restart with the same consumer name",
        f"crash point {crash_point}",
    )
    async with StreamStore.open(settings=pg_settings) as store:
        published = await publish_load(store, sessions=10, per_session=100)
    crashing = Worker(pg_settings, tmp_path, "w1", crash_point=crash_point)
    assert crashing.wait_exit() == -signal.SIGKILL, crashing.log()
    restarted = Worker(pg_settings, tmp_path, "w1")
    restarted.wait_ready()
    assert await wait_for_count(pg_settings, len(published)) == len(published)
    assert restarted.terminate() == 0, restarted.log()
    rows = await history_rows(pg_settings, {m.session_id for m in published})
    assert_exactly_once(published, rows, counts)


async def test_three_racing_workers_and_gapless_replay_from_postgres(
    pg_settings: Settings, tmp_path: Path, tally: TallyFactory
) -> None:
    counts = tally(
        "3 racing persisters (PostgreSQL history)", "3 worker processes on one group", "processes"
    )
    workers = [Worker(pg_settings, tmp_path, f"r{i}", claim_idle=1.0) for i in range(3)]
    for worker in workers:
        worker.wait_ready()
    async with StreamStore.open(settings=pg_settings) as store:
        published = await publish_load(store, sessions=20, per_session=200)
        assert await wait_for_count(pg_settings, len(published), timeout=120) == len(published)
        # streams were trimmed down to the watermark (hot_tail=0): replay comes from PostgreSQL
        session_id = published[0].session_id
        mine = [m for m in published if m.session_id == session_id]
        cursor = mine[49].stream_id
        assert cursor is not None
        replayed: list[Message] = [m async for m in store.replay(session_id, after=cursor)]
        assert [m.id for m in replayed] == [m.id for m in mine[50:]]
        await Persister(store, PersisterSettings(consumer="check")).drain()
    for worker in workers:
        assert worker.terminate() == 0, worker.log()
    rows = await history_rows(pg_settings, {m.session_id for m in published})
    assert_exactly_once(published, rows, counts)
