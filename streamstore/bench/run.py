"""``run_bench``: open the server and the history, run the steps in order, then print the
report and write it as JSON if asked."""

from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from streamstore.bench.baselines import history_baseline, raw_client, sqlite_url
from streamstore.bench.report import BenchReport, Figure
from streamstore.bench.steps import Bench, delete_keys, new_prefix
from streamstore.bench.workload import CONCURRENCY, Options
from streamstore.config import Settings
from streamstore.redis.connection import redact_url
from streamstore.store import StreamStore


async def run_bench(
    args: argparse.Namespace, settings: Settings, say: Callable[[str], None] = print
) -> BenchReport:
    """Run every step on the server of ``settings`` (the embedded one when ``redis_url`` is
    None, a Redis Cluster for a ``redis+cluster://`` URL), report progress through ``say``,
    then the table; write ``--output`` if asked.

    ``key_prefix`` is not used: each step has a prefix of its own. Nor is the history store
    that ``history_url`` names: with a ``postgresql://`` URL each step opens a PostgreSQL
    history in that database, in a schema of its own (the URL's ``schema`` is replaced) that
    is dropped when the step ends, and the baseline writes and reads there with asyncpg. With
    any other URL each step has a SQLite file in a temporary directory removed at the end, and
    the baseline uses sqlite3.

    With ``--hold`` a ``streamstore worker`` subprocess runs on the same server and history
    (see :func:`~streamstore.bench.hold.hold_step`); it is stopped before the run returns or raises.

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
    options = Options.from_args(args)
    started = time.perf_counter()
    rss_at_start = _peak_rss_mib()
    with tempfile.TemporaryDirectory(prefix="streamstore-bench-") as scratch:
        base = settings.replace(
            history_url=sqlite_url(Path(scratch) / "server.db"), key_prefix=new_prefix()
        )
        async with (
            history_baseline(settings.history_url, Path(scratch)) as history,
            StreamStore.open(settings=base) as host,
            contextlib.AsyncExitStack() as stack,
        ):
            stack.push_async_callback(delete_keys, host.client, host.keys.prefix)
            raw = raw_client(host.url, base)
            stack.push_async_callback(raw.aclose)
            server = f"{host.server.name} {'.'.join(map(str, host.server.version))}"
            topology = await host.deployment.topology.describe()
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
            bench = Bench(
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


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes vs KiB
