"""Persister processes that stall or never come back: claims hand their work over."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from streamstore import Message, Settings, StreamStore
from tests.faults.tally import Tally
from tests.test_persister import history_rows, publish_load, wait_for_count
from tests.workers import Worker

TallyFactory = Callable[[str, str, str], Tally]

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def stored(rows: dict[str, list[Message]]) -> list[Message]:
    return [m for session_rows in rows.values() for m in session_rows]


async def test_survivor_reclaims_from_a_persister_that_never_returns(
    store: StreamStore, settings: Settings, tmp_path: Path, tally: TallyFactory
) -> None:
    claim_idle = 1.0
    counts = tally(
        "one of two persisters never returns",
        "SIGKILL holding a batch; never restarted",
        "crash point after_read",
    )
    published = await publish_load(store, sessions=10, per_session=100)
    doomed = Worker(settings, tmp_path, "doomed", crash_point="after_read")
    assert doomed.wait_exit() == -signal.SIGKILL
    died = time.monotonic()
    survivor = Worker(settings, tmp_path, "survivor", claim_idle=claim_idle)
    survivor.wait_ready()
    assert await wait_for_count(settings, len(published)) == len(published)
    counts.recovery_s = round(time.monotonic() - died, 2)
    counts.notes["claim_idle s"] = claim_idle
    counts.notes["claim_interval s"] = 0.2
    assert survivor.terminate() == 0
    rows = await history_rows(settings, {m.session_id for m in published})
    counts.count(published, stored(rows)).assert_exactly_once()


async def test_stalled_persister_resumes_after_its_work_was_claimed(
    store: StreamStore, settings: Settings, tmp_path: Path, tally: TallyFactory
) -> None:
    counts = tally(
        "persister stalled past claim_idle",
        "SIGSTOP 3 s (claim_idle 1 s), then SIGCONT",
        "SIGSTOP / SIGCONT",
    )
    stalled = Worker(settings, tmp_path, "stalled", claim_idle=1.0, batch_size=50)
    other = Worker(settings, tmp_path, "other", claim_idle=1.0, batch_size=50)
    stalled.wait_ready()
    other.wait_ready()
    published: list[Message] = []
    sessions = [await store.create_session(["a"]) for _ in range(20)]
    async with anyio.create_task_group() as tg:

        async def publish() -> None:
            for i in range(100):
                for session in sessions:
                    published.append(await store.publish(session.id, sender="a", content=f"{i}"))
                await anyio.sleep(0.005)

        tg.start_soon(publish)
        await anyio.sleep(0.2)
        stalled.process.send_signal(signal.SIGSTOP)
        await anyio.sleep(3.0)
        stalled.process.send_signal(signal.SIGCONT)
    assert await wait_for_count(settings, len(published)) == len(published)
    assert stalled.terminate() == 0, stalled.log()
    assert other.terminate() == 0, other.log()
    rows = await history_rows(settings, {s.id for s in sessions})
    counts.count(published, stored(rows)).assert_exactly_once()
