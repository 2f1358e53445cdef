"""What the bench sends and how much: the message, the batch and producer counts, and the
options of ``streamstore bench`` that size the run."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from streamstore.cli.types import positive_float, positive_int

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
SENDER: Final = "agent-1"
RECIPIENT: Final = "agent-2"
"""Who sends every message of the bench, and to whom."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Options:
    """The run's options, the ``--quick`` or full defaults filled in."""

    messages: int
    rate: float
    duration: float
    hold: float | None
    hold_rate: float
    json_path: Path | None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Options:
        quick = bool(args.quick)
        return cls(
            messages=args.messages or (QUICK_MESSAGES if quick else DEFAULT_MESSAGES),
            rate=args.rate,
            duration=args.duration or (QUICK_DURATION if quick else DEFAULT_DURATION),
            hold=args.hold,
            hold_rate=args.hold_rate,
            json_path=None if args.output is None else Path(args.output),
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
    # Not --json: that is the global option of every command (JSON lines on stdout).
    parser.add_argument("--output", metavar="PATH", help="also write every figure to PATH as JSON")
