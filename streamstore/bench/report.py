"""The bench's report: each figure beside its baseline and their ratio, as a table and as JSON."""

from __future__ import annotations

from dataclasses import dataclass


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
        """The report as a JSON object (what ``--output`` writes)."""
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
