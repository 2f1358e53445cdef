"""The ``--hold`` step: a real ``streamstore worker`` subprocess persisting a load held at a
fixed rate, its memory and CPU time sampled from /proc, and the figures those samples make."""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import anyio
import anyio.abc

from streamstore.bench.report import Figure
from streamstore.bench.workload import CONTENT, HOLD_PRODUCERS, HOLD_SESSIONS, RECIPIENT, SENDER
from streamstore.config import Settings
from streamstore.errors import first_error
from streamstore.store import StreamStore

_HOLD_WARM_UP: Final = 0.1
"""The share of the hold after which the worker's RSS is taken as its start."""
_HOLD_SAMPLE_EVERY: Final = 1.0
"""Seconds between samples of the worker, unless the hold is too short for
``_HOLD_SAMPLES`` of them."""
_HOLD_SAMPLES: Final = 30
"""Samples of the worker over the hold, at least: half of them make its RSS growth."""
_HOLD_PROGRESS_EVERY: Final = 10.0
"""Seconds between progress lines during the hold."""
_WORKER_READY_TIMEOUT: Final = 30.0
_WORKER_STOP_TIMEOUT: Final = 30.0
"""Seconds the worker has to exit after SIGTERM before it is killed."""
_DRAIN_TIMEOUT: Final = 120.0
"""Seconds the worker has to persist what is left once the hold's publishing ends."""
_WORKER_READY: Final = "worker ready"
"""What ``streamstore worker`` logs once it reads its feeds (cli.py)."""
_HOLD_CONSUMER: Final = "bench-hold"
_PROC: Final = Path("/proc")


async def hold_step(
    open_store: Callable[[], contextlib.AbstractAsyncContextManager[StreamStore]],
    seconds: float,
    *,
    rate: float,
    scratch: Path,
    say: Callable[[str], None],
) -> list[Figure]:
    """A real ``streamstore worker`` subprocess, on the run's server under a key prefix and
    history of the step's own (the store that ``open_store`` opens and cleans up after),
    persisting ``seconds`` of load held at ``rate`` (``--hold-rate``; ``HOLD_PRODUCERS`` paced
    producers over ``HOLD_SESSIONS`` sessions), while its RSS and CPU time are read from /proc
    and the feed backlog from :meth:`StreamStore.stats`; then every message is awaited in
    history and the worker stopped with SIGTERM. Returns the step's figures. Skipped, with a
    line that says so and no figures, where there is no /proc. The worker's log goes to
    ``scratch``; progress lines to ``say``.

    Raises:
        BackpressureError: the worker fell so far behind that a publish was refused.
        RuntimeError: the worker did not start, died, lost or repeated a message, did not
            catch up within ``_DRAIN_TIMEOUT`` seconds, or exited with an error.
        OSError: the worker could not be started.
    """
    if not (_PROC / "self" / "status").exists():
        say("hold: skipped, no /proc to read a worker's memory")
        return []
    total = max(1, round(rate * seconds))
    async with open_store() as store:
        sessions = [
            (await store.create_session([SENDER, RECIPIENT])).id for _ in range(HOLD_SESSIONS)
        ]
        log_path = scratch / f"{store.keys.prefix}-worker.log"
        async with _HoldWorker.run(store.settings, log_path) as worker:
            ready_s = await worker.wait_ready()
            say(
                f"hold: worker pid {worker.pid} ready in {ready_s:.1f} s; {total:,} messages at "
                f"{rate:,.0f} msg/s for {seconds:g} s from {HOLD_PRODUCERS} producers over "
                f"{HOLD_SESSIONS} sessions"
            )
            held = await _held_load(
                store, worker, sessions, rate=rate, total=total, seconds=seconds, say=say
            )
            code = await worker.stop()
            if code != 0:
                raise RuntimeError(
                    f"the hold's worker exited with code {code} after SIGTERM; {worker.log_tail()}"
                )
    return _hold_figures(held, seconds, rate=rate, say=say)


async def _held_load(
    store: StreamStore,
    worker: _HoldWorker,
    sessions: list[str],
    *,
    rate: float,
    total: int,
    seconds: float,
    say: Callable[[str], None],
) -> _Held:
    """Publish ``total`` messages at ``rate`` (for ``seconds``) while sampling ``worker``, then
    wait until history holds every message; the last sample is taken then.

    Raises:
        BackpressureError: a publish was refused.
        RuntimeError: the worker died, or history did not get every message (exactly once)
            within ``_DRAIN_TIMEOUT`` seconds.
    """
    every = min(_HOLD_SAMPLE_EVERY, seconds / _HOLD_SAMPLES)
    samples: list[_Sample] = []
    published = 0
    started = time.perf_counter()

    async def sample() -> None:
        ticks = 0
        progress_at = _HOLD_PROGRESS_EVERY
        while True:
            samples.append(await _sample(store, worker, started))
            last = samples[-1]
            if progress_at <= last.t < seconds:
                progress_at += _HOLD_PROGRESS_EVERY
                cpu = (last.cpu - samples[0].cpu) / max(last.t - samples[0].t, 1e-9)
                say(
                    f"hold: {last.t:.0f} of {seconds:g} s, {published:,} published; worker RSS "
                    f"{last.rss:,.1f} MiB ({last.anon:,.1f} private), CPU {cpu:.0%} of a core; "
                    f"backlog {last.backlog:,}"
                )
            ticks += 1
            await anyio.sleep(max(0.0, started + ticks * every - time.perf_counter()))

    async def produce(p: int) -> None:
        nonlocal published
        for i in range(p, total, HOLD_PRODUCERS):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await anyio.sleep(delay)
            await store.publish(
                sessions[i % len(sessions)],
                sender=SENDER,
                recipient=RECIPIENT,
                content=CONTENT,
            )
            published += 1

    with first_error():
        async with anyio.create_task_group() as sampling:
            sampling.start_soon(sample)
            async with anyio.create_task_group() as producers:
                for p in range(HOLD_PRODUCERS):
                    producers.start_soon(produce, p)
            publish_s = time.perf_counter() - started
            drain_s = await _persisted(store, total)
            sampling.cancel_scope.cancel()
    samples.append(await _sample(store, worker, started))
    return _Held(total, publish_s, drain_s, samples)


def _hold_figures(
    held: _Held, seconds: float, *, rate: float, say: Callable[[str], None]
) -> list[Figure]:
    """The hold's figures from its samples: the worker's RSS after warm-up (the first
    ``_HOLD_WARM_UP`` of the hold), at its peak and at the end, its growth over the second
    half of the publishing (a least-squares slope), the rate achieved against ``rate``, the
    largest backlog, and the worker's CPU time over wall time.

    Raises:
        RuntimeError: fewer than two samples fell in the second half (a starved sampler).
    """
    samples, end = held.samples, held.samples[-1]
    warm = next(s for s in samples if s.t >= _HOLD_WARM_UP * seconds)
    half = [s for s in samples if held.publish_s / 2 <= s.t <= held.publish_s]
    if len(half) < 2:
        raise RuntimeError(
            f"only {len(half)} sample(s) of the worker in the second half of the hold"
        )
    times = [s.t for s in half]
    slope = statistics.linear_regression(times, [s.rss for s in half]).slope
    anon_slope = statistics.linear_regression(times, [s.anon for s in half]).slope
    peak = max(s.rss for s in samples)
    backlog = max(s.backlog for s in samples)
    achieved = held.total / held.publish_s
    cpu = (end.cpu - samples[0].cpu) / (end.t - samples[0].t)
    figures = [
        Figure("hold: worker RSS peak / after warm-up", "MiB", peak, warm.rss, False),
        Figure("hold: worker RSS at end / after warm-up", "MiB", end.rss, warm.rss, False),
        Figure("hold: worker RSS growth, 2nd half", "MiB/min", slope * 60, None, False),
        Figure("hold: worker RssAnon at end / after warm-up", "MiB", end.anon, warm.anon, False),
        Figure("hold: worker RssAnon growth, 2nd half", "MiB/min", anon_slope * 60, None, False),
        Figure("hold: publish rate / --hold-rate", "msg/s", achieved, rate),
        Figure("hold: max backlog", "entries", float(backlog), None, False),
        Figure("hold: worker CPU", "%", cpu * 100, None, False),
    ]
    say(
        f"hold, {held.total:,} messages at {achieved:,.0f} msg/s: worker RSS {warm.rss:,.1f} MiB "
        f"after warm-up, peak {peak:,.1f}, {end.rss:,.1f} at the end, {slope * 60:+.2f} MiB/min "
        f"over the second half ({len(half)} samples), of which private memory (RssAnon) "
        f"{anon_slope * 60:+.2f} MiB/min ({warm.anon:,.1f} -> {end.anon:,.1f}); max backlog "
        f"{backlog:,}; worker CPU {cpu:.0%} of a core; all persisted {held.drain_s:.1f} s "
        "after the last publish; worker stopped, exit code 0"
    )
    return figures


@dataclass(frozen=True, slots=True)
class _Sample:
    """The hold's worker at one moment."""

    t: float
    """Seconds since publishing started."""
    rss: float
    """Resident memory (VmRSS), MiB."""
    anon: float
    """Its private part (RssAnon), MiB: the heaps, where a leak would show. The rest is
    mapped files and shared memory, such as SQLite's WAL index, which grows with the WAL."""
    cpu: float
    """CPU time so far, user + system, seconds."""
    backlog: int
    """Feed entries not yet persisted and trimmed, over all partitions."""


@dataclass(frozen=True, slots=True)
class _Held:
    """What the hold published and sampled."""

    total: int
    publish_s: float
    """Seconds from the first publish to the last one's return."""
    drain_s: float
    """Seconds from then until history held every message."""
    samples: list[_Sample]
    """Every ``_HOLD_SAMPLE_EVERY`` seconds (or ``_HOLD_SAMPLES`` over a short hold) until all
    was persisted, then once more."""


class _HoldWorker:
    """``python -m streamstore worker`` as a subprocess of the bench, its output in a log file,
    its memory and CPU time read from /proc."""

    def __init__(self, process: anyio.abc.Process, log_path: Path) -> None:
        self._process = process
        self._log_path = log_path
        self._started = time.perf_counter()

    @classmethod
    @contextlib.asynccontextmanager
    async def run(cls, settings: Settings, log_path: Path) -> AsyncIterator[_HoldWorker]:
        """Start a worker with ``settings`` and default persister and sweeper settings (as the
        persist step's persister has); stop it (:meth:`stop`) when leaving, even when
        cancelled. ``settings`` go as ``STREAMSTORE_*`` variables, replacing any the bench
        inherited: arguments would show the URLs' passwords to ``ps``. The worker has a session
        of its own, so that Ctrl-C reaches the bench only, which stops it.

        Raises:
            OSError: the interpreter cannot be started.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSTORE_")}
        for name in Settings.__dataclass_fields__:
            value = getattr(settings, name)
            env[f"STREAMSTORE_{name.upper()}"] = "none" if value is None else str(value)
        command = [sys.executable, "-m", "streamstore", "worker", "--consumer", _HOLD_CONSUMER]
        # Shielded: a cancellation must not leave a started process without its owner.
        with log_path.open("wb") as log, anyio.CancelScope(shield=True):
            process = await anyio.open_process(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        worker = cls(process, log_path)
        try:
            yield worker
        finally:
            await worker.stop()

    @property
    def pid(self) -> int:
        return self._process.pid

    async def wait_ready(self) -> float:
        """Seconds from the start until the worker logged that it reads its feeds.

        Raises:
            RuntimeError: it exited first, or was not ready within ``_WORKER_READY_TIMEOUT``.
        """
        with anyio.move_on_after(_WORKER_READY_TIMEOUT):
            while _WORKER_READY not in self._log_path.read_text(errors="replace"):
                if self._process.returncode is not None:
                    raise RuntimeError(
                        f"the hold's worker exited with code {self._process.returncode} "
                        f"before it was ready; {self.log_tail()}"
                    )
                await anyio.sleep(0.05)
            return time.perf_counter() - self._started
        raise RuntimeError(
            f"the hold's worker was not ready within {_WORKER_READY_TIMEOUT:g} s; {self.log_tail()}"
        )

    def usage(self) -> tuple[float, float, float]:
        """The worker's resident memory (VmRSS, MiB), its private part (RssAnon, MiB) and CPU
        time (user + system, seconds).

        Raises:
            RuntimeError: the worker has exited.
        """
        proc = _PROC / str(self.pid)
        try:
            status = (proc / "status").read_text()
            stat = (proc / "stat").read_text()
        except OSError as exc:  # exited and reaped
            raise self._died() from exc
        kib = {
            name: int(value.split()[0])
            for name, _, value in (line.partition(":") for line in status.splitlines())
            if name in {"VmRSS", "RssAnon"}
        }
        if len(kib) < 2:  # a zombie: exited, not yet reaped
            raise self._died()
        # proc(5): utime and stime are fields 14 and 15; the name (2) may hold spaces.
        utime, stime = stat.rpartition(")")[2].split()[11:13]
        cpu = (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")
        return kib["VmRSS"] / 1024, kib["RssAnon"] / 1024, cpu

    async def stop(self) -> int:
        """SIGTERM, then SIGKILL if it still runs ``_WORKER_STOP_TIMEOUT`` seconds later (done
        even when cancelled); returns the exit code (negative: the signal that ended it)."""
        with anyio.CancelScope(shield=True):
            if self._process.returncode is None:
                with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                    self._process.send_signal(signal.SIGTERM)
                with anyio.move_on_after(_WORKER_STOP_TIMEOUT):
                    await self._process.wait()
                if self._process.returncode is None:
                    self._process.kill()
            await self._process.aclose()
        return await self._process.wait()  # it has exited: this returns at once

    def log_tail(self, lines: int = 10) -> str:
        """The last lines of the worker's log, for an error message."""
        tail = self._log_path.read_text(errors="replace").splitlines()[-lines:]
        return "its log ends:\n" + "\n".join(tail)

    def _died(self) -> RuntimeError:
        return RuntimeError(f"the hold's worker (pid {self.pid}) died; {self.log_tail()}")


async def _sample(store: StreamStore, worker: _HoldWorker, started: float) -> _Sample:
    """The worker's memory and CPU time now, and the feeds' backlog.

    Raises:
        RuntimeError: the worker has exited.
        ConnectionLostError: the server cannot be reached.
    """
    t = time.perf_counter() - started
    rss, anon, cpu = worker.usage()
    stats = await store.stats()
    return _Sample(t, rss, anon, cpu, stats.backlog)


async def _persisted(store: StreamStore, total: int) -> float:
    """Seconds until the history of ``store`` holds ``total`` messages.

    Raises:
        RuntimeError: it holds more (a message stored twice), or still fewer after
            ``_DRAIN_TIMEOUT`` seconds.
    """
    started = time.perf_counter()
    stored = 0
    with anyio.move_on_after(_DRAIN_TIMEOUT):
        # Another process writes that history: nothing to wait on but its count.
        while (stored := await store.history_store.count_messages()) < total:  # noqa: ASYNC110
            await anyio.sleep(0.1)
        if stored > total:
            raise RuntimeError(f"published {total} messages but history holds {stored}")
        return time.perf_counter() - started
    raise RuntimeError(
        f"the hold's worker persisted {stored} of {total} messages "
        f"{_DRAIN_TIMEOUT:g} s after the last publish"
    )
