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

from streamstore.bench.report import BenchReport, Figure
from streamstore.bench.run import run_bench
from streamstore.bench.workload import add_bench_arguments

__all__ = ["BenchReport", "Figure", "add_bench_arguments", "run_bench"]
