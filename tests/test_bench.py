"""The bench runs end to end at tiny counts and reports every figure; speed is never asserted.

It runs on the embedded server with SQLite history and, when ``STREAMSTORE_TEST_POSTGRES_URL``
names a database, on the three-master cluster of tests/cluster.py with PostgreSQL history; with
``--hold``, a real worker subprocess for a few seconds.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import tempfile
from pathlib import Path

import asyncpg
import orjson
import pytest
import redis.asyncio

from streamstore import Settings
from streamstore.bench import BenchReport, add_bench_arguments, run_bench
from tests.cluster import LocalCluster

POSTGRES_URL = os.environ.get("STREAMSTORE_TEST_POSTGRES_URL", "")
TINY = ["--quick", "--messages", "300", "--rate", "400", "--duration", "0.25"]

FIGURES = {
    "publish, 1 producer / XADD",
    "publish, 8 producers / XADD",
    "publish, 100 producers / XADD",
    "publish_many x100 / pipelined XADD x100",
    "persist / XREADGROUP+XACK",
    "persist / sqlite3 executemany",
    "persist / read+ack+write",
    "replay from history / sqlite3 SELECT",
    "latency p50 / XADD -> XREAD BLOCK",
    "latency p99 / XADD -> XREAD BLOCK",
    "latency max / XADD -> XREAD BLOCK",
    "latency p50 in process (memory://) / on the server",
    "latency p99 in process (memory://) / on the server",
    "peak RSS / RSS at start",
}
POSTGRES_FIGURES = (
    FIGURES - {"persist / sqlite3 executemany", "replay from history / sqlite3 SELECT"}
) | {"persist / asyncpg COPY", "replay from history / asyncpg SELECT"}
HOLD_COMPARED = {
    "hold: worker RSS peak / after warm-up",
    "hold: worker RSS at end / after warm-up",
    "hold: worker RssAnon at end / after warm-up",
    "hold: publish rate / --hold-rate",
}
HOLD_ALONE = {
    "hold: worker RSS growth, 2nd half",
    "hold: worker RssAnon growth, 2nd half",
    "hold: max backlog",
    "hold: worker CPU",
}
"""The hold's figures that have no baseline."""


def tiny_args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return parser.parse_args([*TINY, *extra])


def assert_every_figure(
    report: BenchReport, names: set[str], *, alone: frozenset[str] = frozenset()
) -> None:
    """Every figure in ``names`` once, finite; positive and with a baseline unless ``alone``."""
    assert {figure.name for figure in report.figures} == names
    assert len(report.figures) == len(names)
    for figure in report.figures:
        assert math.isfinite(figure.value), figure
        if figure.name in alone:
            assert (figure.baseline, figure.ratio) == (None, None), figure
            continue
        assert figure.value > 0, figure
        assert figure.baseline is not None, figure
        assert figure.baseline > 0, figure
        assert figure.ratio is not None, figure
        assert math.isfinite(figure.ratio), figure
        assert figure.ratio > 0, figure


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the bench's temporary directories go, so that a test can see none is left."""
    directory = tmp_path / "scratch"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


async def test_quick_bench_reports_every_figure_and_cleans_up(
    settings: Settings, raw: redis.asyncio.Redis, tmp_path: Path, scratch: Path
) -> None:
    json_path = tmp_path / "bench.json"
    lines: list[str] = []

    report = await run_bench(tiny_args("--output", str(json_path)), settings, lines.append)

    assert_every_figure(report, FIGURES)
    assert (report.topology, report.history.split()[0]) == ("single node", "SQLite")
    assert "single node" in lines[0]
    written = orjson.loads(json_path.read_bytes())
    assert (written["topology"], written["history"]) == (report.topology, report.history)
    assert [f["name"] for f in written["figures"]] == [f.name for f in report.figures]
    for entry in written["figures"]:
        assert set(entry) >= {"name", "value", "unit", "baseline", "ratio"}
        assert entry["ratio"] == pytest.approx(entry["value"] / entry["baseline"])
    table = report.table()
    assert [cell.strip() for cell in table[0].split("|")] == [
        "figure",
        "streamstore",
        "baseline",
        "ratio",
    ]
    assert all(line in lines for line in table)
    assert sum(line.startswith("[") for line in lines) >= 7  # progress: a line per step
    # Nothing left behind: no bench keys on the (shared) server, no scratch files.
    assert [key async for key in raw.scan_iter(match="bench*")] == []
    assert os.listdir(scratch) == []


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="the hold reads /proc")
async def test_hold_runs_a_worker_reports_its_memory_and_stops_it(
    settings: Settings, raw: redis.asyncio.Redis, scratch: Path
) -> None:
    lines: list[str] = []

    report = await run_bench(tiny_args("--hold", "3", "--hold-rate", "300"), settings, lines.append)

    assert_every_figure(report, FIGURES | HOLD_COMPARED | HOLD_ALONE, alone=frozenset(HOLD_ALONE))
    figures = {figure.name: figure for figure in report.figures}
    peak = figures["hold: worker RSS peak / after warm-up"]
    assert peak.ratio is not None
    assert peak.ratio >= 1  # the peak is over every sample, the one after warm-up too
    assert peak.value >= figures["hold: worker RSS at end / after warm-up"].value
    anon = figures["hold: worker RssAnon at end / after warm-up"]
    assert 0 < anon.value < figures["hold: worker RSS at end / after warm-up"].value
    assert figures["hold: max backlog"].value >= 0
    assert figures["hold: worker CPU"].value > 0
    assert (report.hold, report.hold_rate) == (3, 300)
    assert report.as_dict()["hold"] == 3
    growth = next(line for line in report.table() if line.startswith("hold: worker RSS growth"))
    assert [cell.strip() for cell in growth.split("|")][2:] == ["-", "-"]  # no baseline
    hold_lines = [line for line in lines if line.startswith("[7/8] hold")]
    assert len(hold_lines) >= 2  # the worker ready, then the figures
    assert lines[-len(report.table()) - 1].startswith("[8/8] peak RSS")
    # Nothing left behind: the worker stopped and reaped, no keys, no scratch files.
    ready = re.search(r"worker pid (\d+) ready", hold_lines[0])
    assert ready is not None, hold_lines[0]
    with pytest.raises(ProcessLookupError):
        os.kill(int(ready[1]), 0)
    assert [key async for key in raw.scan_iter(match="bench*")] == []
    assert os.listdir(scratch) == []


async def test_quick_bench_on_a_cluster_with_postgres_history(
    redis_cluster: LocalCluster, scratch: Path
) -> None:
    """Raw baseline through RedisCluster, history in a PostgreSQL schema per step; every key
    (on every primary) and every schema is gone afterwards."""
    if not POSTGRES_URL:
        pytest.skip("STREAMSTORE_TEST_POSTGRES_URL is not set")
    settings = Settings(
        redis_url=redis_cluster.url,
        history_url=f"{POSTGRES_URL}{'&' if '?' in POSTGRES_URL else '?'}schema=ignored",
        partitions=4,
        block=0.5,
        socket_timeout=5.0,
    )
    schemas_before = await bench_schemas()
    lines: list[str] = []

    report = await run_bench(tiny_args(), settings, lines.append)

    assert_every_figure(report, POSTGRES_FIGURES)
    assert report.topology == "cluster of 3 primaries"
    assert report.history.startswith("PostgreSQL 1")
    assert "cluster of 3 primaries" in lines[0]
    assert "PostgreSQL" in lines[0]
    for node in redis_cluster.nodes:
        with node.client() as client:
            assert list(client.scan_iter(match="bench*")) == []
    assert await bench_schemas() == schemas_before
    assert os.listdir(scratch) == []


async def bench_schemas() -> set[str]:
    """Schemas that look like the bench's (``bench<hex>``), and the one it was told to use."""
    connection = await asyncpg.connect(POSTGRES_URL)
    try:
        rows = await connection.fetch(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'bench%' OR nspname = 'ignored'"
        )
    finally:
        await connection.close()
    return {row["nspname"] for row in rows}


def test_options_refuse_non_positive_counts() -> None:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    for bad in (
        ["--messages", "0"],
        ["--rate", "-1"],
        ["--duration", "nan"],
        ["--hold", "0"],
        ["--hold-rate", "inf"],
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    assert parser.parse_args([]).hold is None  # the hold is off unless asked for
