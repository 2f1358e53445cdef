"""``streamstore bench``: one workload through streamstore and through hand-written redis-py and
sqlite3 (or asyncpg) baselines, in one run, each figure printed beside its baseline and their
ratio.

A ratio is always streamstore / baseline: below 1 is slower for a throughput, above 1 is slower
for a latency or a memory figure. The machine may be shared and noisy: compare the ratios of
one run, not raw figures across runs. Every step works under a key prefix of its own, deletes
its keys when it ends (never FLUSHDB, on every primary of a cluster) and keeps its history in a
SQLite file in a temporary directory, or, with a ``postgresql://`` history URL, in a PostgreSQL
schema of its own that it drops when it ends.

``--hold SECONDS`` adds a step with no hand-written counterpart: a real ``streamstore worker``
subprocess persisting a load held at a fixed rate, its memory and CPU time read from /proc
(Linux only) to show whether its RSS stays flat.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import resource
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import anyio.abc
import anyio.to_thread
import orjson
from redis.asyncio import Redis, RedisCluster
from redis.typing import EncodableT, FieldT

from streamstore.cli_types import positive_float, positive_int
from streamstore.config import PersisterSettings, Settings
from streamstore.connection import Client, redact_url, routed
from streamstore.errors import HistoryUnavailableError
from streamstore.history import history_from_url
from streamstore.keys import Keyspace
from streamstore.persister import Persister
from streamstore.store import StreamStore

if TYPE_CHECKING:
    import asyncpg

__all__ = ["BenchReport", "Figure", "add_bench_arguments", "run_bench"]

CONTENT: Final = ("The planner asked the critic to check the Lisbon itinerary once more. " * 3)[
    :200
]
"""The content of every message: 200 characters, about what one chat turn carries."""

CONCURRENCY: Final = (8, 100)
"""Concurrent producers (asyncio tasks) of the concurrent publish steps."""

BATCH: Final = 100
"""Messages per publish_many call, and XADDs per pipeline in the baseline."""

READ_COUNT: Final = 1000
"""COUNT of the baseline's XREADGROUP; one SQLite transaction per read batch."""

QUICK_MESSAGES: Final = 10_000
DEFAULT_MESSAGES: Final = 50_000
QUICK_DURATION: Final = 3.0
DEFAULT_DURATION: Final = 10.0
DEFAULT_RATE: Final = 2_000.0
DEFAULT_HOLD_RATE: Final = 2_000.0
HOLD_PRODUCERS: Final = 8
"""Concurrent producers of the hold step, each awaiting every publish."""
HOLD_SESSIONS: Final = 32
"""Sessions the hold step publishes to, round robin."""

_HEAD_START: Final = 0.1
"""Seconds a latency reader gets to issue its first blocking read before publishing starts,
so that the first messages do not measure the reader's start-up."""
_STEPS: Final = 7
"""Steps without ``--hold``, which adds one."""
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
_GROUP: Final = "bench"
_SENDER: Final = "agent-1"
_RECIPIENT: Final = "agent-2"
_RAW_TABLE: Final = (
    "CREATE TABLE messages (pk INTEGER PRIMARY KEY, session_id TEXT NOT NULL, "
    "stream_id TEXT NOT NULL, sender TEXT NOT NULL, recipient TEXT, content TEXT NOT NULL, "
    "timestamp REAL NOT NULL)"
)
_RAW_INSERT: Final = (
    "INSERT INTO messages (session_id, stream_id, sender, recipient, content, timestamp) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
_RAW_SELECT: Final = (
    "SELECT stream_id, sender, recipient, content, timestamp FROM messages "
    "WHERE session_id = ? ORDER BY pk"
)
# The same table and reads in PostgreSQL, in the step's schema ("{schema}": a key prefix of
# the bench's own making, [a-z0-9] only, which is why it may be quoted into the statement).
_PG_RAW_TABLE: Final = (
    'CREATE TABLE "{schema}".raw_messages (pk bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, '
    "session_id text NOT NULL, stream_id text NOT NULL, sender text NOT NULL, recipient text, "
    "content text NOT NULL, timestamp double precision NOT NULL)"
)
_PG_RAW_COLUMNS: Final = ("session_id", "stream_id", "sender", "recipient", "content", "timestamp")
_PG_RAW_SELECT: Final = (
    'SELECT stream_id, sender, recipient, content, timestamp FROM "{schema}".raw_messages '
    "WHERE session_id = $1 ORDER BY pk"
)
_PG_OWN_OPTIONS: Final = frozenset({"schema", "pool_size", "command_timeout", "connect_timeout"})
"""The options of a ``postgresql://`` history URL that are streamstore's, not asyncpg's (as
:meth:`PostgresHistory.from_url <streamstore.history.postgres.PostgresHistory.from_url>` reads
them)."""

Row = tuple[str, str, str, str, str, float]
"""A baseline history row: session, stream id, sender, recipient, content, timestamp."""


@dataclass(frozen=True, slots=True)
class Figure:
    """One measured figure beside the same work done by hand.

    Attributes:
        name: what was measured and against what, stable across runs.
        unit: ``msg/s``, ``ms``, ``MiB``, ``MiB/min``, ``entries`` or ``%``.
        value: the streamstore figure.
        baseline: the hand-written baseline's figure; for the hold's worker, what its figure
            is compared with (its RSS after warm-up, the rate asked for); None where nothing
            compares (its RSS growth, backlog and CPU).
        higher_is_better: True for throughputs, False for latencies and memory.
    """

    name: str
    unit: str
    value: float
    baseline: float | None
    higher_is_better: bool = True

    @property
    def ratio(self) -> float | None:
        """streamstore / baseline (None without a baseline)."""
        return None if self.baseline is None else self.value / self.baseline

    def as_dict(self) -> dict[str, object]:
        """The figure as a JSON object."""
        return {
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "baseline": self.baseline,
            "ratio": self.ratio,
            "higher_is_better": self.higher_is_better,
        }


@dataclass(frozen=True, slots=True)
class BenchReport:
    """Every figure of one run and what the run was.

    Attributes:
        server: the server's name and version (the oldest primary's on a cluster).
        topology: ``single node`` or ``cluster of N primaries``.
        history: the history the steps used: ``SQLite <version>`` or ``PostgreSQL <version>``.
        hold: the seconds of ``--hold`` (None: not asked for), at ``hold_rate`` messages/s.
    """

    server: str
    topology: str
    history: str
    messages: int
    rate: float
    duration: float
    seconds: float
    figures: tuple[Figure, ...]
    hold: float | None
    hold_rate: float

    def as_dict(self) -> dict[str, object]:
        """The report as a JSON object (what ``--json`` writes)."""
        return {
            "server": self.server,
            "topology": self.topology,
            "history": self.history,
            "messages": self.messages,
            "rate": self.rate,
            "duration": self.duration,
            "seconds": self.seconds,
            "hold": self.hold,
            "hold_rate": self.hold_rate,
            "figures": [figure.as_dict() for figure in self.figures],
        }

    def table(self) -> list[str]:
        """The figures as aligned text lines: figure | streamstore | baseline | ratio."""
        rows = [("figure", "streamstore", "baseline", "ratio")]
        rows += [
            (
                f.name,
                _format(f.value, f.unit),
                _format(f.baseline, f.unit),
                "-" if f.ratio is None else f"{f.ratio:.2f}x",
            )
            for f in self.figures
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]

        def line(row: tuple[str, str, str, str]) -> str:
            first, *numbers = row
            cells = [first.ljust(widths[0])]
            cells += [cell.rjust(width) for cell, width in zip(numbers, widths[1:], strict=True)]
            return " | ".join(cells)

        rule = "-+-".join("-" * width for width in widths)
        return [line(rows[0]), rule, *(line(row) for row in rows[1:])]


@dataclass(frozen=True, kw_only=True, slots=True)
class _Options:
    messages: int
    rate: float
    duration: float
    hold: float | None
    hold_rate: float
    json_path: Path | None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> _Options:
        quick = bool(args.quick)
        return cls(
            messages=args.messages or (QUICK_MESSAGES if quick else DEFAULT_MESSAGES),
            rate=args.rate,
            duration=args.duration or (QUICK_DURATION if quick else DEFAULT_DURATION),
            hold=args.hold,
            hold_rate=args.hold_rate,
            json_path=None if args.json is None else Path(args.json),
        )


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``streamstore bench`` to ``parser``."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"small counts ({QUICK_MESSAGES:,} messages per step, {QUICK_DURATION:g} s of "
        "latency): well under a minute",
    )
    parser.add_argument(
        "--messages",
        type=positive_int,
        metavar="N",
        help=f"messages per throughput step (default: {DEFAULT_MESSAGES:,}; "
        f"--quick: {QUICK_MESSAGES:,})",
    )
    parser.add_argument(
        "--rate",
        type=positive_float,
        default=DEFAULT_RATE,
        metavar="R",
        help=f"messages per second of the latency step (default: {DEFAULT_RATE:,.0f})",
    )
    parser.add_argument(
        "--duration",
        type=positive_float,
        metavar="SECONDS",
        help=f"length of the latency step (default: {DEFAULT_DURATION:g}; "
        f"--quick: {QUICK_DURATION:g})",
    )
    parser.add_argument(
        "--hold",
        type=positive_float,
        metavar="SECONDS",
        help="then run a real `streamstore worker` for SECONDS under a load held at --hold-rate "
        f"({HOLD_PRODUCERS} producers, {HOLD_SESSIONS} sessions) and report its RSS over time "
        "(Linux only; default: off)",
    )
    parser.add_argument(
        "--hold-rate",
        type=positive_float,
        default=DEFAULT_HOLD_RATE,
        metavar="MSGS_PER_S",
        help=f"messages per second of --hold (default: {DEFAULT_HOLD_RATE:,.0f})",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every figure to PATH as JSON")


async def run_bench(
    args: argparse.Namespace, settings: Settings, say: Callable[[str], None] = print
) -> BenchReport:
    """Run every step on the server of ``settings`` (the embedded one when ``redis_url`` is
    None, a Redis Cluster for a ``redis+cluster://`` URL), report progress through ``say``,
    then the table; write ``--json`` if asked.

    ``key_prefix`` is not used: each step has a prefix of its own. Nor is the history store
    that ``history_url`` names: with a ``postgresql://`` URL each step opens a PostgreSQL
    history in that database, in a schema of its own (the URL's ``schema`` is replaced) that
    is dropped when the step ends, and the baseline writes and reads there with asyncpg. With
    any other URL each step has a SQLite file in a temporary directory removed at the end, and
    the baseline uses sqlite3.

    With ``--hold`` a ``streamstore worker`` subprocess runs on the same server and history
    (see :meth:`_Bench.hold`); it is stopped before the run returns or raises.

    Raises:
        StreamStoreError: the server cannot be used (as from :meth:`StreamStore.open`).
        ConfigurationError: the ``postgresql://`` history URL is malformed.
        HistoryUnavailableError: PostgreSQL cannot be reached or refuses the login.
        HistoryError: a step's PostgreSQL history cannot be opened.
        BackpressureError: during the hold, the worker fell so far behind that a publish was
            refused.
        RuntimeError: streamstore lost or repeated a message during the run, or the hold's
            worker did not start, died, fell behind or exited with an error.
        OSError: the hold's worker could not be started.
    """
    options = _Options.from_args(args)
    started = time.perf_counter()
    rss_at_start = _peak_rss_mib()
    with tempfile.TemporaryDirectory(prefix="streamstore-bench-") as scratch:
        base = settings.replace(
            history_url=_sqlite_url(Path(scratch) / "server.db"), key_prefix=_new_prefix()
        )
        async with (
            _history_baseline(settings.history_url, Path(scratch)) as history,
            StreamStore.open(settings=base) as host,
            contextlib.AsyncExitStack() as stack,
        ):
            stack.push_async_callback(_delete_keys, host.client, host.keys.prefix)
            raw = _raw_client(host.url, base)
            stack.push_async_callback(raw.aclose)
            server = f"{host.server.name} {'.'.join(map(str, host.server.version))}"
            topology = await _topology(host.client)
            held = (
                ""
                if options.hold is None
                else f"; a worker held at {options.hold_rate:,.0f} msg/s for {options.hold:g} s"
            )
            say(
                f"streamstore bench: {server}, {topology}, at {redact_url(host.url)}; history "
                f"{history.kind}; {base.partitions} partitions, {options.messages:,} messages "
                f"per step, latency at {options.rate:,.0f} msg/s for {options.duration:g} s"
                f"{held}"
            )
            bench = _Bench(
                base.replace(redis_url=host.url), raw, history, options, say, scratch=Path(scratch)
            )
            await bench.publish(producers=1, step=1)
            for step, producers in enumerate(CONCURRENCY, start=2):
                await bench.publish(producers=producers, step=step)
            await bench.publish_batched(step=4)
            await bench.persist_and_replay(step=5)
            await bench.latency(step=6)
            if options.hold is not None:
                await bench.hold(options.hold, step=7)
    peak = _peak_rss_mib()
    bench.add(Figure("peak RSS / RSS at start", "MiB", peak, rss_at_start, False))
    last = bench.steps
    say(f"[{last}/{last}] peak RSS: {peak:,.1f} MiB ({rss_at_start:,.1f} MiB at start)")
    report = BenchReport(
        server=server,
        topology=topology,
        history=history.kind,
        messages=options.messages,
        rate=options.rate,
        duration=options.duration,
        seconds=time.perf_counter() - started,
        figures=tuple(bench.figures),
        hold=options.hold,
        hold_rate=options.hold_rate,
    )
    for line in report.table():
        say(line)
    if options.json_path is not None:
        options.json_path.write_bytes(orjson.dumps(report.as_dict(), option=orjson.OPT_INDENT_2))
        say(f"figures written to {options.json_path}")
    return report


class _Bench:
    """The steps, each measuring streamstore and its baseline back to back on one server."""

    def __init__(
        self,
        settings: Settings,
        raw: Client,
        history: _HistoryBaseline,
        options: _Options,
        say: Callable[[str], None],
        *,
        scratch: Path,
    ) -> None:
        self._settings = settings
        self._raw = raw
        self._history = history
        self._scratch = scratch
        self._options = options
        self._say = say
        self.figures: list[Figure] = []
        self.steps = _STEPS if options.hold is None else _STEPS + 1
        """How many steps the progress lines count."""

    def add(self, figure: Figure) -> None:
        """Record a figure for the report."""
        self.figures.append(figure)

    @contextlib.asynccontextmanager
    async def _store(self, **changes: Any) -> AsyncIterator[StreamStore]:
        """A store under a new key prefix, with a history of its own named after it; its keys
        (and those of the baseline, under the same prefix) and its history (the baseline's
        table with it) are deleted afterwards."""
        prefix = _new_prefix()
        settings = self._settings.replace(
            key_prefix=prefix, history_url=self._history.url(prefix), **changes
        )
        try:
            async with StreamStore.open(settings=settings) as store:
                yield store
        finally:
            try:
                await _delete_keys(self._raw, prefix)
            finally:
                await self._history.drop(prefix)

    async def publish(self, *, producers: int, step: int) -> None:
        """``store.publish`` vs unpipelined XADD, each producer awaiting every call."""
        each = max(1, self._options.messages // producers)
        async with self._store() as store:
            keys = [_raw_key(store.keys.prefix, f"s{p}") for p in range(producers)]
            sessions = [(await store.create_session([_SENDER, _RECIPIENT])).id for _ in keys]

            async def by_hand(p: int) -> None:
                await self._raw.xadd(keys[p], _raw_fields())

            async def streamstore(p: int) -> None:
                await store.publish(
                    sessions[p], sender=_SENDER, recipient=_RECIPIENT, content=CONTENT
                )

            raw_s = await _producers(producers, each, by_hand)
            store_s = await _producers(producers, each, streamstore)
        total = producers * each
        plural = "s" if producers > 1 else ""
        self._throughput(
            step,
            f"publish, {producers} producer{plural} / XADD",
            total,
            store_s,
            raw_s,
        )

    async def publish_batched(self, *, step: int) -> None:
        """``store.publish_many`` vs pipelined XADD, batches of ``BATCH``."""
        calls = max(1, self._options.messages // BATCH)
        async with self._store() as store:
            key = _raw_key(store.keys.prefix, "batched")
            session = (await store.create_session([_SENDER, _RECIPIENT])).id
            raw_s = await _producers(1, calls, lambda _: _xadd_pipelined(self._raw, key, BATCH))
            store_s = await _producers(1, calls, lambda _: _publish_many(store, session, BATCH))
        self._throughput(
            step,
            f"publish_many x{BATCH} / pipelined XADD x{BATCH}",
            calls * BATCH,
            store_s,
            raw_s,
        )

    async def persist_and_replay(self, *, step: int) -> None:
        """Persister.drain() vs XREADGROUP + XACK and a hand-written history write (sqlite3
        executemany or asyncpg COPY); then replay from history (the stream trimmed to its
        watermark: ``hot_tail=0``) vs one SELECT."""
        count = self._options.messages
        async with self._store(hot_tail=0) as store:
            key = _raw_key(store.keys.prefix, "persist")
            session = (await store.create_session([_SENDER, _RECIPIENT])).id
            for start in range(0, count, BATCH):
                size = min(BATCH, count - start)
                await _xadd_pipelined(self._raw, key, size)
                await _publish_many(store, session, size)

            await self._raw.xgroup_create(key, _GROUP, id="0")
            started = time.perf_counter()
            batches = await _read_and_ack(self._raw, key, session)
            read_s = time.perf_counter() - started
            write_s = await self._history.write(store.keys.prefix, batches)

            persister = Persister(store, PersisterSettings(consumer=_GROUP))
            started = time.perf_counter()
            stats = await persister.drain()
            drain_s = time.perf_counter() - started
            stored = await store.history_store.count_messages(session)
            if stored != count:
                raise RuntimeError(f"published {count} messages but history holds {stored}")
            tail = await store.client.xlen(store.keys.session(session).stream)

            select_s, selected = await self._history.select(store.keys.prefix, session)
            started = time.perf_counter()
            replayed = 0
            async for _ in store.replay(session):
                replayed += 1
            replay_s = time.perf_counter() - started
        if replayed != count or selected != count:
            raise RuntimeError(
                f"replay yielded {replayed} and SELECT {selected} of {count} messages"
            )
        persist = count / drain_s
        writes = self._history.writes
        figures = [
            Figure("persist / XREADGROUP+XACK", "msg/s", persist, count / read_s),
            Figure(f"persist / {writes}", "msg/s", persist, count / write_s),
            Figure("persist / read+ack+write", "msg/s", persist, count / (read_s + write_s)),
        ]
        self.figures.extend(figures)
        self._say(
            f"[{step}/{self.steps}] persist, {count:,} messages: streamstore {persist:,.0f} msg/s; "
            f"XREADGROUP+XACK {count / read_s:,.0f} msg/s, {writes} {count / write_s:,.0f} "
            f"msg/s, both {figures[-1].baseline:,.0f} msg/s ({figures[-1].ratio:.2f}x); history "
            f"commits took {stats.commit_seconds:.2f} of {drain_s:.2f} s; {tail} entries left in "
            "the trimmed stream"
        )
        name = f"replay from history / {self._history.reads}"
        self._throughput(step, name, count, replay_s, select_s)

    async def latency(self, *, step: int) -> None:
        """Publish -> subscriber latency at a fixed rate: ``store.publish`` and
        ``store.subscribe`` vs XADD and XREAD BLOCK."""
        total = max(1, round(self._options.rate * self._options.duration))
        async with self._store() as store:
            key = _raw_key(store.keys.prefix, "latency")
            session = (await store.create_session([_SENDER, _RECIPIENT])).id

            async def by_hand(i: int) -> None:
                await self._raw.xadd(key, {"i": i, **_raw_fields()})

            async def streamstore(i: int) -> None:
                await store.publish(
                    session, sender=_SENDER, recipient=_RECIPIENT, content=CONTENT, id=f"m{i}"
                )

            raw_lat, raw_rate = await self._paced(
                by_hand, lambda sent: _xread_latencies(self._raw, key, sent), total
            )
            store_lat, store_rate = await self._paced(
                streamstore, lambda sent: _subscribe_latencies(store, session, sent), total
            )
        for label, q in (("p50", 0.50), ("p99", 0.99), ("max", 1.0)):
            self.add(
                Figure(
                    f"latency {label} / XADD -> XREAD BLOCK",
                    "ms",
                    _percentile(store_lat, q) * 1000,
                    _percentile(raw_lat, q) * 1000,
                    False,
                )
            )
        p50, p99 = self.figures[-3], self.figures[-2]
        self._say(
            f"[{step}/{self.steps}] latency, {total:,} messages at {store_rate:,.0f} msg/s "
            f"(baseline {raw_rate:,.0f}): p50 {p50.value:.2f} ms vs {p50.baseline:.2f}, "
            f"p99 {p99.value:.2f} ms vs {p99.baseline:.2f}"
        )

    async def hold(self, seconds: float, *, step: int) -> None:
        """A real ``streamstore worker`` subprocess, on the run's server under a key prefix and
        history of the step's own, persisting ``seconds`` of load held at ``--hold-rate``
        (``HOLD_PRODUCERS`` paced producers over ``HOLD_SESSIONS`` sessions), while its RSS
        and CPU time are read from /proc and the feed backlog from :meth:`StreamStore.stats`;
        then every message is awaited in history and the worker stopped with SIGTERM. Skipped,
        with a line that says so, where there is no /proc.

        Raises:
            BackpressureError: the worker fell so far behind that a publish was refused.
            RuntimeError: the worker did not start, died, lost or repeated a message, did not
                catch up within ``_DRAIN_TIMEOUT`` seconds, or exited with an error.
            OSError: the worker could not be started.
        """
        if not (_PROC / "self" / "status").exists():
            self._say(f"[{step}/{self.steps}] hold: skipped, no /proc to read a worker's memory")
            return
        rate = self._options.hold_rate
        total = max(1, round(rate * seconds))
        async with self._store() as store:
            sessions = [
                (await store.create_session([_SENDER, _RECIPIENT])).id for _ in range(HOLD_SESSIONS)
            ]
            log_path = self._scratch / f"{store.keys.prefix}-worker.log"
            async with _HoldWorker.run(store.settings, log_path) as worker:
                ready_s = await worker.wait_ready()
                self._say(
                    f"[{step}/{self.steps}] hold: worker pid {worker.pid} ready in "
                    f"{ready_s:.1f} s; {total:,} messages at {rate:,.0f} msg/s for {seconds:g} s "
                    f"from {HOLD_PRODUCERS} producers over {HOLD_SESSIONS} sessions"
                )
                held = await self._held_load(
                    store, worker, sessions, total=total, seconds=seconds, step=step
                )
                code = await worker.stop()
                if code != 0:
                    raise RuntimeError(
                        f"the hold's worker exited with code {code} after SIGTERM; "
                        f"{worker.log_tail()}"
                    )
        self._hold_figures(held, seconds, step=step)

    async def _held_load(
        self,
        store: StreamStore,
        worker: _HoldWorker,
        sessions: list[str],
        *,
        total: int,
        seconds: float,
        step: int,
    ) -> _Held:
        """Publish ``total`` messages at ``--hold-rate`` (for ``seconds``) while sampling
        ``worker``, then wait until history holds every message; the last sample is taken then.

        Raises:
            BackpressureError: a publish was refused.
            RuntimeError: the worker died, or history did not get every message (exactly once)
                within ``_DRAIN_TIMEOUT`` seconds.
        """
        rate = self._options.hold_rate
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
                    self._say(
                        f"[{step}/{self.steps}] hold: {last.t:.0f} of {seconds:g} s, "
                        f"{published:,} published; worker RSS {last.rss:,.1f} MiB, CPU "
                        f"{cpu:.0%} of a core; backlog {last.backlog:,}"
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
                    sender=_SENDER,
                    recipient=_RECIPIENT,
                    content=CONTENT,
                )
                published += 1

        with _first_error():
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

    def _hold_figures(self, held: _Held, seconds: float, *, step: int) -> None:
        """The hold's figures from its samples: the worker's RSS after warm-up (the first
        ``_HOLD_WARM_UP`` of the hold), at its peak and at the end, its growth over the second
        half of the publishing (a least-squares slope), the rate achieved, the largest
        backlog, and the worker's CPU time over wall time.

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
        slope = statistics.linear_regression([s.t for s in half], [s.rss for s in half]).slope
        peak = max(s.rss for s in samples)
        backlog = max(s.backlog for s in samples)
        achieved = held.total / held.publish_s
        cpu = (end.cpu - samples[0].cpu) / (end.t - samples[0].t)
        self.figures.extend(
            [
                Figure("hold: worker RSS peak / after warm-up", "MiB", peak, warm.rss, False),
                Figure("hold: worker RSS at end / after warm-up", "MiB", end.rss, warm.rss, False),
                Figure("hold: worker RSS growth, 2nd half", "MiB/min", slope * 60, None, False),
                Figure(
                    "hold: publish rate / --hold-rate", "msg/s", achieved, self._options.hold_rate
                ),
                Figure("hold: max backlog", "entries", float(backlog), None, False),
                Figure("hold: worker CPU", "%", cpu * 100, None, False),
            ]
        )
        self._say(
            f"[{step}/{self.steps}] hold, {held.total:,} messages at {achieved:,.0f} msg/s: "
            f"worker RSS {warm.rss:,.1f} MiB after warm-up, peak {peak:,.1f}, {end.rss:,.1f} at "
            f"the end, {slope * 60:+.2f} MiB/min over the second half ({len(half)} samples); "
            f"max backlog {backlog:,}; worker CPU {cpu:.0%} of a core; all persisted "
            f"{held.drain_s:.1f} s after the last publish; worker stopped, exit code 0"
        )

    async def _paced(
        self,
        publish: Callable[[int], Awaitable[None]],
        receive: Callable[[list[float]], Awaitable[list[float]]],
        total: int,
    ) -> tuple[list[float], float]:
        """Publish ``total`` messages at the configured rate while ``receive`` collects each
        one's latency; returns the latencies and the rate achieved."""
        rate = self._options.rate
        sent = [0.0] * total
        latencies: list[float] = []

        async def collect() -> None:
            latencies.extend(await receive(sent))

        with anyio.fail_after(total / rate + 30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(collect)
                await anyio.sleep(_HEAD_START)
                started = time.perf_counter()
                for i in range(total):
                    delay = started + i / rate - time.perf_counter()
                    if delay > 0:
                        await anyio.sleep(delay)
                    sent[i] = time.perf_counter()
                    await publish(i)
                achieved = total / max(time.perf_counter() - started, 1e-9)
        return latencies, achieved

    def _throughput(self, step: int, name: str, count: int, store_s: float, raw_s: float) -> None:
        figure = Figure(name, "msg/s", count / store_s, count / raw_s)
        self.add(figure)
        self._say(
            f"[{step}/{self.steps}] {name}, {count:,} messages: streamstore {figure.value:,.0f} "
            f"msg/s, baseline {figure.baseline:,.0f} msg/s ({figure.ratio:.2f}x)"
        )


async def _producers(producers: int, each: int, send: Callable[[int], Awaitable[None]]) -> float:
    """Seconds for ``producers`` concurrent tasks to await ``send(p)`` ``each`` times, after one
    untimed call per producer (connections opened, scripts loaded)."""

    async def produce(p: int, calls: int) -> None:
        for _ in range(calls):
            await send(p)

    async def run(calls: int) -> float:
        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for p in range(producers):
                tg.start_soon(produce, p, calls)
        return time.perf_counter() - started

    await run(1)
    return await run(each)


@dataclass(frozen=True, slots=True)
class _Sample:
    """The hold's worker at one moment."""

    t: float
    """Seconds since publishing started."""
    rss: float
    """Resident memory (VmRSS), MiB."""
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

    def usage(self) -> tuple[float, float]:
        """The worker's resident memory (VmRSS, MiB) and CPU time (user + system, seconds).

        Raises:
            RuntimeError: the worker has exited.
        """
        proc = _PROC / str(self.pid)
        try:
            status = (proc / "status").read_text()
            stat = (proc / "stat").read_text()
        except OSError as exc:  # exited and reaped
            raise self._died() from exc
        rss = [line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")]
        if not rss:  # a zombie: exited, not yet reaped
            raise self._died()
        # proc(5): utime and stime are fields 14 and 15; the name (2) may hold spaces.
        utime, stime = stat.rpartition(")")[2].split()[11:13]
        return int(rss[0]) / 1024, (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")

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
    rss, cpu = worker.usage()
    stats = await store.stats()
    return _Sample(t, rss, cpu, stats.backlog)


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


@contextlib.contextmanager
def _first_error() -> Iterator[None]:
    """Raise the first error of failed (nested) task groups as itself, one of those the steps
    document, not wrapped in groups."""
    try:
        yield
    except BaseExceptionGroup as group:
        first: BaseException = group
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None


def _raw_fields() -> dict[FieldT, EncodableT]:
    """What a hand-written publisher puts in an entry."""
    return {"sender": _SENDER, "recipient": _RECIPIENT, "content": CONTENT, "ts": time.time()}


async def _xadd_pipelined(raw: Client, key: str, count: int) -> None:
    async with raw.pipeline(transaction=False) as pipe:
        for _ in range(count):
            pipe.xadd(key, _raw_fields())
        await pipe.execute()


async def _publish_many(store: StreamStore, session_id: str, count: int) -> None:
    spec = {"sender": _SENDER, "recipient": _RECIPIENT, "content": CONTENT}
    await store.publish_many(session_id, [spec] * count)


async def _read_and_ack(raw: Client, key: str, session_id: str) -> list[list[Row]]:
    """The hand-written consumer: XREADGROUP COUNT 1000, turn entries into rows, XACK."""
    batches: list[list[Row]] = []
    while True:
        reply = _streams(
            await raw.execute_command(
                *("XREADGROUP", "GROUP", _GROUP, "consumer", "COUNT", READ_COUNT),
                *("STREAMS", key, ">"),
                **routed(raw, key),
            )
        )
        if not reply:
            return batches
        entries = reply[0][1]
        batches.append(
            [
                (
                    session_id,
                    entry_id.decode(),
                    fields[b"sender"].decode(),
                    fields[b"recipient"].decode(),
                    fields[b"content"].decode(),
                    float(fields[b"ts"]),
                )
                for entry_id, fields in entries
            ]
        )
        await raw.xack(key, _GROUP, *(entry_id for entry_id, _ in entries))


def _connect_raw(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = FULL")
    return connection


def _write_rows(path: Path, batches: list[list[Row]]) -> float:
    """The hand-written history: executemany, one transaction per read batch; returns the
    seconds the writes took."""
    connection = _connect_raw(path)
    try:
        connection.execute(_RAW_TABLE)
        started = time.perf_counter()
        for rows in batches:
            with connection:
                connection.executemany(_RAW_INSERT, rows)
        return time.perf_counter() - started
    finally:
        connection.close()


def _select_rows(path: Path, session_id: str) -> tuple[float, int]:
    """The hand-written replay: one SELECT of the session's rows; returns seconds and rows."""
    connection = _connect_raw(path)
    try:
        started = time.perf_counter()
        rows = connection.execute(_RAW_SELECT, (session_id,)).fetchall()
        return time.perf_counter() - started, len(rows)
    finally:
        connection.close()


class _HistoryBaseline(Protocol):
    """Where each step keeps its history, and the same writes and reads done by hand there."""

    kind: str
    """What the history is, for the report: ``SQLite <version>`` or ``PostgreSQL <version>``."""
    writes: str
    """How the baseline writes, as figure names say it."""
    reads: str
    """How the baseline reads, as figure names say it."""

    def url(self, name: str) -> str:
        """The history URL of the step whose key prefix is ``name``."""
        ...

    async def write(self, name: str, batches: list[list[Row]]) -> float:
        """Store ``batches`` in a plain table of the step's, one transaction each; returns the
        seconds the writes took."""
        ...

    async def select(self, name: str, session_id: str) -> tuple[float, int]:
        """One SELECT of the session's rows from that table; returns seconds and rows."""
        ...

    async def drop(self, name: str) -> None:
        """Remove what the step stored, even when the step was cancelled."""
        ...


class _SQLiteBaseline:
    """Each step's history is a SQLite file in the scratch directory (removed at the end of the
    run); the baseline writes a file of its own with sqlite3 executemany, in a thread."""

    writes = "sqlite3 executemany"
    reads = "sqlite3 SELECT"

    def __init__(self, scratch: Path) -> None:
        self.kind = f"SQLite {sqlite3.sqlite_version}"
        self._scratch = scratch

    def url(self, name: str) -> str:
        return _sqlite_url(self._scratch / f"{name}.db")

    async def write(self, name: str, batches: list[list[Row]]) -> float:
        return await anyio.to_thread.run_sync(_write_rows, self._raw_path(name), batches)

    async def select(self, name: str, session_id: str) -> tuple[float, int]:
        return await anyio.to_thread.run_sync(_select_rows, self._raw_path(name), session_id)

    async def drop(self, name: str) -> None:
        """Nothing to do: the files go with the scratch directory."""

    def _raw_path(self, name: str) -> Path:
        return self._scratch / f"{name}-raw.db"


class _PostgresBaseline:
    """Each step's history is a schema of its own, named after its key prefix, in the database
    of the history URL, dropped when the step ends; the baseline COPYs into a plain table in
    that schema, one transaction per read batch, on one asyncpg connection kept for the run."""

    writes = "asyncpg COPY"
    reads = "asyncpg SELECT"

    def __init__(self, url: str, connection: asyncpg.Connection[asyncpg.Record]) -> None:
        version = connection.get_settings().server_version.split()[0]  # "15.6 (Debian ...)"
        self.kind = f"PostgreSQL {version}"
        self._url = url
        self._connection = connection

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, url: str) -> AsyncIterator[_PostgresBaseline]:
        """The baseline for the database of ``url``, a ``postgresql://`` history URL.

        Raises:
            ConfigurationError: the URL is malformed.
            HistoryUnavailableError: PostgreSQL cannot be reached or refuses the login.
        """
        history_from_url(url)  # checks the URL as every step's store will read it
        connection = await _connect_postgres(url)
        try:
            yield cls(url, connection)
        finally:
            with anyio.CancelScope(shield=True):
                await connection.close(timeout=10)

    def url(self, name: str) -> str:
        head, _, query = self._url.partition("?")
        options = [o for o in parse_qsl(query, keep_blank_values=True) if o[0] != "schema"]
        return f"{head}?{urlencode([*options, ('schema', name)])}"

    async def write(self, name: str, batches: list[list[Row]]) -> float:
        # The step's store created the schema when it opened.
        await self._connection.execute(_PG_RAW_TABLE.format(schema=name))
        started = time.perf_counter()
        for rows in batches:
            async with self._connection.transaction():
                await self._connection.copy_records_to_table(
                    "raw_messages", records=rows, columns=_PG_RAW_COLUMNS, schema_name=name
                )
        return time.perf_counter() - started

    async def select(self, name: str, session_id: str) -> tuple[float, int]:
        started = time.perf_counter()
        rows = await self._connection.fetch(_PG_RAW_SELECT.format(schema=name), session_id)
        return time.perf_counter() - started, len(rows)

    async def drop(self, name: str) -> None:
        """DROP SCHEMA ... CASCADE on a connection of its own (the shared one may be in the
        middle of the cancelled step's statement).

        Raises:
            HistoryUnavailableError: PostgreSQL cannot be reached.
            asyncpg.PostgresError: PostgreSQL refused the statement.
        """
        with anyio.move_on_after(30, shield=True):
            connection = await _connect_postgres(self._url)
            try:
                await connection.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
            finally:
                await connection.close(timeout=10)


@contextlib.asynccontextmanager
async def _history_baseline(url: str, scratch: Path) -> AsyncIterator[_HistoryBaseline]:
    """PostgreSQL for a ``postgresql://`` (or ``postgres://``) history URL, else SQLite files
    in ``scratch``.

    Raises:
        ConfigurationError: the ``postgresql://`` URL is malformed.
        HistoryUnavailableError: PostgreSQL cannot be reached or refuses the login.
    """
    if urlsplit(url).scheme in ("postgresql", "postgres"):
        async with _PostgresBaseline.open(url) as postgres:
            yield postgres
    else:
        yield _SQLiteBaseline(scratch)


async def _connect_postgres(url: str) -> asyncpg.Connection[asyncpg.Record]:
    """An asyncpg connection to the database of a history URL (without streamstore's options).

    Raises:
        HistoryUnavailableError: PostgreSQL cannot be reached or refuses the login.
    """
    import asyncpg  # noqa: PLC0415 - the optional postgres extra, needed with PostgreSQL only

    head, _, query = url.partition("?")
    theirs = [o for o in parse_qsl(query, keep_blank_values=True) if o[0] not in _PG_OWN_OPTIONS]
    dsn = head + (f"?{urlencode(theirs)}" if theirs else "")
    try:
        return await asyncpg.connect(dsn, timeout=10)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        # Not the URL: it may hold the password.
        raise HistoryUnavailableError(
            f"the bench cannot connect to PostgreSQL: {type(exc).__name__}: {exc}"
        ) from exc


def _raw_client(url: str, settings: Settings) -> Client:
    """The baseline's client, made as a user would with stock redis-py: ``Redis.from_url``, or
    ``RedisCluster.from_url`` on the first node of a ``redis+cluster://`` URL (it finds the
    others), with the TLS files of ``settings`` for ``rediss``. Not
    :func:`streamstore.connection.connect`: its hiredis packing is part of what is measured."""
    parts = urlsplit(url)
    scheme = parts.scheme.removesuffix("+cluster")
    tls: dict[str, Any] = {}
    if scheme == "rediss":
        tls = {
            "ssl_ca_certs": settings.tls_ca_file,
            "ssl_certfile": settings.tls_cert_file,
            "ssl_keyfile": settings.tls_key_file,
        }
    if scheme == parts.scheme:
        return Redis.from_url(url, **tls)
    userinfo, at, nodes = parts.netloc.rpartition("@")
    first = f"{userinfo}{at}{nodes.split(',')[0]}"
    return RedisCluster.from_url(urlunsplit(parts._replace(scheme=scheme, netloc=first)), **tls)


async def _topology(client: Client) -> str:
    """``single node`` or ``cluster of N primaries``.

    Raises:
        redis.exceptions.RedisError: a cluster client could not read the cluster's layout.
    """
    if not isinstance(client, RedisCluster):
        return "single node"
    await client.initialize()  # done already by the checks at open: nothing is sent
    primaries = len(client.get_primaries())
    return f"cluster of {primaries} {'primary' if primaries == 1 else 'primaries'}"


async def _xread_latencies(raw: Client, key: str, sent: list[float]) -> list[float]:
    """The hand-written subscriber: XREAD BLOCK from the start of a new stream."""
    latencies: list[float] = []
    cursor: bytes | str = "0-0"
    while len(latencies) < len(sent):
        reply = _streams(
            await raw.execute_command(
                *("XREAD", "COUNT", READ_COUNT, "BLOCK", 1000, "STREAMS", key, cursor),
                **routed(raw, key),
            )
        )
        for _, entries in reply:
            for entry_id, fields in entries:
                latencies.append(time.perf_counter() - sent[int(fields[b"i"])])
                cursor = entry_id
    return latencies


async def _subscribe_latencies(
    store: StreamStore, session_id: str, sent: list[float]
) -> list[float]:
    """``store.subscribe`` from the start of a new session (message ids are ``m<index>``)."""
    latencies: list[float] = []
    # subscribe() is an async generator: close it at once when leaving early, not at GC.
    subscription = store.subscribe(session_id, after="0")
    async with contextlib.aclosing(subscription) as messages:
        async for message in messages:
            latencies.append(time.perf_counter() - sent[int(message.id[1:])])
            if len(latencies) == len(sent):
                break
    return latencies


def _streams(reply: object) -> list[Any]:
    """An XREAD/XREADGROUP reply of the baseline client: ``[[key, [(id, fields), ...]], ...]``
    (redis-py's RESP2-shaped default), empty when nothing arrived.

    The baseline sends both reads with ``execute_command`` and :func:`routed`, straight to the
    key's node on a cluster as streamstore does: redis-py's cluster client would otherwise ask
    a node for their keys (COMMAND GETKEYS) before every read, a round trip streamstore does
    not pay."""
    return cast("list[Any]", reply or [])


def _percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (``q`` from 0 to 1) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def _delete_keys(client: Client, prefix: str) -> None:
    """Delete every key under ``prefix`` (SCAN + UNLINK; the server may be shared), even when
    the step was cancelled. A cluster client SCANs every primary and sends one UNLINK per
    slot."""
    with anyio.move_on_after(30, shield=True):
        pattern = Keyspace(prefix, 1).pattern
        keys = [key async for key in client.scan_iter(match=pattern, count=1000)]
        for start in range(0, len(keys), 1000):
            await client.unlink(*keys[start : start + 1000])


def _new_prefix() -> str:
    return f"bench{uuid.uuid4().hex[:10]}"


def _raw_key(prefix: str, name: str) -> str:
    """A baseline stream, named as a user would by hand, under the step's prefix so that the
    step's clean-up deletes it with streamstore's keys."""
    return f"{prefix}:raw:{name}"


def _sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes vs KiB


def _format(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("msg/s", "entries"):
        return f"{value:,.0f} {unit}"
    if unit == "ms":
        return f"{value:,.2f} {unit}"
    if unit == "MiB/min":
        return f"{value:+,.2f} {unit}"
    return f"{value:,.1f} {unit}"
