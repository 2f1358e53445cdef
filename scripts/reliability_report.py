"""Run the fault suite and write RELIABILITY.md from what it counted (never typed by hand).

Usage: python scripts/reliability_report.py [extra pytest arguments]
Set STREAMSTORE_TEST_REDIS_URL to include the system Redis as a second server.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/faults", "tests/test_persister.py", "tests/test_sweeper.py"]

HEADER = """# Reliability

Every row is a scenario of the fault suite (`tests/faults/`, plus the crash-point tests of
`tests/test_persister.py`), run against a real server with the fault injected for real. It
counts the messages acknowledged by `publish()`, those found in history afterwards, and those
lost, duplicated or unexpected (in history but never acknowledged, and not from a publish
that raised). Recovery is the time from the end of the fault to the last message persisted.

This file is written by `scripts/reliability_report.py` (`make reliability`) from one run:
{when}, Python {python}, {machine}; pytest exit code {code}.

{table_header}
"""

TABLE = (
    "| scenario | fault | injected by | server | acked | persisted | lost | dup | unexp "
    "| recovery s | notes |\n|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"
)

FOOTER = """
Expected non-zero figures: *server restarted empty* loses exactly the acknowledged messages
that were not yet persisted when a server without an append-only file restarted; the loss is
detected (a changed deployment epoch), logged, counted and reported by `stats()` and
`streamstore check`, and the pipeline carries on. *restricted default user, check bypassed*
runs the server streamstore refuses (*restricted default user*: `user default off` with no
permissions, the layout `deploy/users.acl` shipped before) with the check turned into a
warning: on servers that replay the scripts' writes as the `default` user (Redis 7.0, Valkey
before 9.1.2) a restart loses every acknowledged message, and the loss is detected (the epoch,
written by a script, is gone) and reported by `streamstore check` (exit 3); Valkey 9.1.2
loses nothing.

Breaking the code on purpose shows which scenarios guard what (see the notes of the issues):
acknowledging before the commit, trimming without the watermark, or dropping the dedup check
each turns scenarios of this table red.
"""


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.jsonl"
        env = dict(os.environ, STREAMSTORE_RELIABILITY_OUT=str(out))
        code = subprocess.call(  # noqa: S603 (our own interpreter and test paths)
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS, *sys.argv[1:]],
            cwd=ROOT,
            env=env,
        )
        rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    lines = [
        HEADER.format(
            when=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            python=platform.python_version(),
            machine=f"{os.cpu_count()} cores, {platform.machine()}",
            code=code,
            table_header=TABLE,
        )
    ]
    for row in sorted(rows, key=lambda r: (r["scenario"], r["server"])):
        notes = "; ".join(f"{k}: {v}" for k, v in row["notes"].items())
        recovery = "" if row["recovery_s"] is None else f"{row['recovery_s']}"
        lines.append(
            f"| {row['scenario']} | {row['fault']} | {row['injection']} | {row['server']} "
            f"| {row['acknowledged']} | {row['persisted']} | {row['lost']} | {row['duplicated']} "
            f"| {row['unexpected']} | {recovery} | {notes} |\n"
        )
    lines.append(FOOTER)
    (ROOT / "RELIABILITY.md").write_text("".join(lines))
    print(f"RELIABILITY.md: {len(rows)} rows, pytest exit code {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
