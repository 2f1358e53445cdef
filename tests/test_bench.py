"""The bench runs end to end at tiny counts and reports every figure; speed is never asserted."""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import orjson
import pytest
import redis.asyncio

from streamstore import Settings
from streamstore.bench import add_bench_arguments, run_bench

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
    "peak RSS / RSS at start",
}


async def test_quick_bench_reports_every_figure_and_cleans_up(
    settings: Settings,
    raw: redis.asyncio.Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    json_path = tmp_path / "bench.json"
    tiny = ["--messages", "300", "--rate", "400", "--duration", "0.25"]
    args = parser.parse_args(["--quick", *tiny, "--json", str(json_path)])
    lines: list[str] = []

    report = await run_bench(args, settings, lines.append)

    assert {figure.name for figure in report.figures} == FIGURES
    assert len(report.figures) == len(FIGURES)
    for figure in report.figures:
        assert figure.value > 0, figure
        assert figure.baseline > 0, figure
        assert math.isfinite(figure.ratio), figure
        assert figure.ratio > 0, figure
    written = orjson.loads(json_path.read_bytes())
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
    assert list(scratch.iterdir()) == []


def test_options_refuse_non_positive_counts() -> None:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    for bad in (["--messages", "0"], ["--rate", "-1"], ["--duration", "nan"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
