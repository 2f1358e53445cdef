"""Back up a live SQLite history file with SQLite's online backup API, then verify the copy.

A plain file copy of a database in WAL mode, taken while a worker writes, can miss committed
transactions still in the ``-wal`` file or catch a half-written page. The backup API copies a
consistent snapshot while the worker goes on writing. The copy is created 0600 (it holds
message content), written beside the destination and renamed into place once it checks out.

    python deploy/backup_history.py /var/lib/streamstore/history.db /backups/history-$(date +%F).db

Exit status: 0 the backup is written and passed ``PRAGMA integrity_check``; 1 it failed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sqlite3
import sys
from pathlib import Path


def backup(source: Path, destination: Path, *, busy_timeout_ms: int = 30_000) -> int:
    """Copy ``source`` to ``destination`` online and verify it; return the copy's page count.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        sqlite3.DatabaseError: the source cannot be read or the copy is not intact.
    """
    if not source.is_file():
        raise FileNotFoundError(f"no database at {source}")
    partial = destination.with_name(destination.name + ".partial")
    partial.unlink(missing_ok=True)
    os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        with (
            contextlib.closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as src,
            contextlib.closing(sqlite3.connect(partial)) as dst,
        ):
            src.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            # One step: a single read transaction, a consistent snapshot. In WAL mode the worker
            # keeps writing meanwhile; stepped copies would restart on every write it makes.
            src.backup(dst)
            (verdict,) = dst.execute("PRAGMA integrity_check").fetchone()
            if verdict != "ok":
                raise sqlite3.DatabaseError(f"the copy failed its integrity check: {verdict}")
            (pages,) = dst.execute("PRAGMA page_count").fetchone()
        partial.replace(destination)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return int(pages)


def main() -> int:
    """Parse the arguments, back up, report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the live history file (sqlite)")
    parser.add_argument("destination", type=Path, help="the backup file to write")
    args = parser.parse_args()
    try:
        pages = backup(args.source, args.destination)
    except (OSError, sqlite3.Error) as exc:
        print(f"backup failed: {exc}", file=sys.stderr)
        return 1
    print(f"backed up {args.source} to {args.destination} ({pages} pages, integrity ok)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
