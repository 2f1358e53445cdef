"""A held load at a fixed rate with the persister stopped midway: memory, RSS and lag stay
bounded, backpressure engages and releases, the lag drains, nothing is lost.

``STREAMSTORE_HELD_LOAD_SECONDS`` (default 60) and ``STREAMSTORE_HELD_LOAD_RATE`` (default 500
messages/s over 200 sessions) make it longer or heavier.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
import redis.asyncio

from streamstore import BackpressureError, Message, Settings, StreamStore
from tests.faults.tally import Tally
from tests.workers import Worker

TallyFactory = Callable[[str, str, str], Tally]

pytestmark = [pytest.mark.faults, pytest.mark.slow]

SECONDS = float(os.environ.get("STREAMSTORE_HELD_LOAD_SECONDS", "60"))
RATE = int(os.environ.get("STREAMSTORE_HELD_LOAD_RATE", "500"))
SESSIONS = 200
STOP_AT, STOP_FOR = SECONDS / 3, min(10.0, SECONDS / 4)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.timeout(SECONDS * 3 + 120)
async def test_held_load_with_the_persister_stopped_midway(
    settings: Settings, raw: redis.asyncio.Redis, tmp_path: Path, tally: TallyFactory
) -> None:
    max_lag = int(RATE * STOP_FOR / settings.partitions / 2)  # the stop must hit it
    loaded = settings.replace(max_lag=max_lag, max_block=0.05, hot_tail=2.0)
    counts = tally(
        "held load",
        f"{RATE} msgs/s over {SESSIONS} sessions for {SECONDS:.0f} s; persister SIGSTOPped "
        f"{STOP_FOR:.0f} s",
        "SIGSTOP / SIGCONT of the worker",
    )
    acknowledged: list[Message] = []
    refused: list[float] = []
    acked_at: list[float] = []
    samples: list[tuple[float, int, float, int]] = []  # (t, used memory, worker RSS, backlog)
    async with StreamStore.open(settings=loaded) as store:
        worker = Worker(loaded, tmp_path, "held")
        worker.wait_ready()
        sessions = [(await store.create_session(["a"], ttl=None)).id for _ in range(SESSIONS)]
        base_memory = int((await raw.info("memory"))["used_memory"])
        started = time.monotonic()

        async def publish_one(session_id: str, n: int) -> None:
            try:
                acknowledged.append(
                    await store.publish(session_id, sender="a", content=f"{n:08d}" + "x" * 150)
                )
                acked_at.append(time.monotonic() - started)
            except BackpressureError:
                refused.append(time.monotonic() - started)

        async def load() -> None:
            n = 0
            tick = 0.01
            per_tick = max(1, int(RATE * tick))
            async with anyio.create_task_group() as tg:
                while (elapsed := time.monotonic() - started) < SECONDS:
                    for _ in range(per_tick):
                        tg.start_soon(publish_one, sessions[n % SESSIONS], n)
                        n += 1
                    await anyio.sleep(max(0.0, (n / per_tick) * tick - elapsed))

        async def chaos() -> None:
            await anyio.sleep(STOP_AT)
            worker.process.send_signal(signal.SIGSTOP)
            await anyio.sleep(STOP_FOR)
            worker.process.send_signal(signal.SIGCONT)

        async def sample() -> None:
            while time.monotonic() - started < SECONDS + 5:
                stats = await store.stats()
                samples.append(
                    (
                        time.monotonic() - started,
                        stats.used_memory,
                        rss_mib(worker.process.pid),
                        stats.backlog,
                    )
                )
                await anyio.sleep(1.0)

        async with anyio.create_task_group() as tg:
            tg.start_soon(load)
            tg.start_soon(chaos)
            tg.start_soon(sample)
        drained_at = time.monotonic()
        with anyio.fail_after(60):
            while await store.history_store.count_messages() < len(acknowledged):
                await anyio.sleep(0.2)
        counts.recovery_s = round(time.monotonic() - drained_at, 2)
        assert worker.terminate() == 0, worker.log()
        stored: list[Message] = []
        for session_id in sessions:
            stored += await store.history_store.read(session_id, limit=100_000)
        final = await store.stats()

    peak_backlog = max(s[3] for s in samples)
    peak_memory_mib = (max(s[1] for s in samples) - base_memory) / 2**20
    peak_rss = max(s[2] for s in samples)
    counts.notes.update(
        {
            "refused (backpressure)": len(refused),
            "peak backlog": peak_backlog,
            "backlog bound": loaded.max_lag * loaded.partitions,
            "peak Redis memory growth MiB": round(peak_memory_mib, 1),
            "peak worker RSS MiB": round(peak_rss, 1),
        }
    )
    counts.count(acknowledged, stored).assert_exactly_once()
    stop_window = (STOP_AT, STOP_AT + STOP_FOR + 2)
    assert any(stop_window[0] <= t <= stop_window[1] for t in refused), "backpressure never engaged"
    assert any(t > stop_window[1] for t in acked_at), "publishing never resumed"
    assert sum(1 for t in refused if t > stop_window[1] + 5) == 0, "backpressure never released"
    assert peak_backlog <= loaded.max_lag * loaded.partitions + SESSIONS
    assert peak_memory_mib < 64
    assert peak_rss < 256
    assert final.backlog < loaded.max_lag  # drained (the feed keeps at most a partial batch)
