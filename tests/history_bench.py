"""Write throughput of SQLiteHistory.write_batch against raw sqlite3 executemany baselines.

Not collected by pytest (no ``test_`` prefix); run ``.venv/bin/python tests/history_bench.py``.
Every variant writes the same rows, in the same batches, one transaction per batch, to a fresh
file in WAL mode with synchronous=FULL. Rounds alternate between variants so that a noisy disk
hurts all of them alike; the best round of each is reported, with the median beside it.

* raw-plain:  executemany into a table with only an ascending INTEGER PRIMARY KEY (the target
  ratio is measured against this one);
* raw-schema: executemany, one row per statement, into SQLiteHistory's own schema (its two
  unique indexes), with no Python work: what this layout costs written the plain way;
* history:    SQLiteHistory.write_batch from Message objects (thread hop, encoding, grouping,
  100 rows per INSERT, duplicate accounting, deleted-session guard, catalog and message_ages
  updates).

With 100 sessions every commit dirties about one page of the position index per session, and
the COMMIT (fsync of those pages) is most of a batch's time: no row layout with the two unique
indexes the protocol asks for gets near raw-plain there. ``--sessions 1 --batch 1000`` is the
persister's own shape in ``streamstore bench`` (one session, reads of 1000).

``--retention`` then fills one more file and times enforce_retention: by age (half of it), per
session cap (half of the rest), catalog cap (half of the sessions, closed), with how long each
of its chunk transactions held the writer.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streamstore.history import sqlite as sqlite_history
from streamstore.history.sqlite import _SCHEMA, SQLiteHistory
from streamstore.models import Message, Session, SessionState, StreamId, new_message_id

_COLUMNS = (
    "session_id, stream_ms, stream_seq, message_id, sender, recipient, content, metadata, timestamp"
)
_PLAIN = f"CREATE TABLE messages (pk INTEGER PRIMARY KEY, {_COLUMNS})"
_INSERT = f"INSERT INTO messages ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
_INSERT_OR_IGNORE = _INSERT.replace("INSERT", "INSERT OR IGNORE", 1)


def make_batches(count: int, batch: int, sessions: int) -> list[list[Message]]:
    """``count`` messages round-robin over ``sessions``, stream ids ascending per session."""
    content = "x" * 200
    base_ms = int(time.time() * 1000)
    messages = []
    for i in range(count):
        position = i // sessions  # how many this session already has
        messages.append(
            Message(
                id=new_message_id(),
                session_id=f"session-{i % sessions:04d}",
                sender="agent-1",
                recipient="agent-2" if i % 2 else None,
                content=content,
                timestamp=base_ms / 1000 + i / 10_000,
                stream_id=StreamId(base_ms + position // 4, position % 4),
            )
        )
    return [messages[i : i + batch] for i in range(0, count, batch)]


def as_rows(batches: list[list[Message]]) -> list[list[tuple[Any, ...]]]:
    return [
        [
            (m.session_id, *m.stream_id, m.id, m.sender, m.recipient, m.content, None, m.timestamp)  # type: ignore[misc]
            for m in batch
        ]
        for batch in batches
    ]


def raw(
    path: Path, schema: tuple[str, ...], insert: str, rows: list[list[tuple[Any, ...]]]
) -> float:
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = FULL")
        for statement in schema:
            connection.execute(statement)
        started = time.perf_counter()
        for batch in rows:
            connection.execute("BEGIN IMMEDIATE")
            connection.executemany(insert, batch)
            connection.execute("COMMIT")
        return time.perf_counter() - started
    finally:
        connection.close()


def history(path: Path, batches: list[list[Message]]) -> float:
    async def main() -> float:
        store = SQLiteHistory(path)
        await store.open()
        try:
            started = time.perf_counter()
            written = 0
            for batch in batches:
                written += await store.write_batch(batch)
            elapsed = time.perf_counter() - started
            assert written == sum(map(len, batches)), written
            return elapsed
        finally:
            await store.close()

    return asyncio.run(main())


def retention(path: Path, batches: list[list[Message]], sessions: int) -> None:
    """Time each retention pass and each of its chunk transactions (the writer's hold)."""
    held: list[float] = []

    def timed(function: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args)
            finally:
                held.append(time.perf_counter() - started)

        return run

    for name in ("_expire_ranges_sync", "_delete_oldest_sync", "_remove_sessions_sync"):
        setattr(sqlite_history, name, timed(getattr(sqlite_history, name)))
    timestamps = sorted(m.timestamp for batch in batches for m in batch)
    per_session = len(timestamps) // sessions

    async def main() -> None:
        store = SQLiteHistory(path)
        await store.open()
        try:
            for batch in batches:
                await store.write_batch(batch)
            ended = [
                Session(id=f"session-{i:04d}", state=SessionState.CLOSED)
                for i in range(0, sessions, 2)
            ]
            await store.write_batch([], ended)
            passes: list[tuple[str, dict[str, Any]]] = [
                ("age", {"older_than": timestamps[len(timestamps) // 2]}),
                ("per-session", {"max_messages_per_session": per_session // 4}),
                ("sessions", {"max_sessions": sessions - len(ended)}),
            ]
            for name, limits in passes:
                held.clear()
                started = time.perf_counter()
                result = await store.enforce_retention(**limits)
                elapsed = time.perf_counter() - started
                print(
                    f"  {name:<11} {result.messages:>7,} messages, {result.sessions:>3} sessions "
                    f"in {elapsed:5.2f} s ({result.messages / elapsed:>9,.0f} rows/s); "
                    f"{len(held)} transactions, median {statistics.median(held) * 1000:.1f} ms, "
                    f"longest {max(held) * 1000:.1f} ms"
                )
        finally:
            await store.close()

    asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the files go (default: a temp dir)")
    parser.add_argument("--retention", action="store_true", help="then time enforce_retention")
    args = parser.parse_args()

    batches = make_batches(args.messages, args.batch, args.sessions)
    rows = as_rows(batches)
    variants: dict[str, Callable[[Path], float]] = {
        "raw-plain": lambda path: raw(path, (_PLAIN,), _INSERT, rows),
        "raw-schema": lambda path: raw(path, _SCHEMA, _INSERT_OR_IGNORE, rows),
        "history": lambda path: history(path, batches),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        for round_number in range(args.rounds):
            for name, run in variants.items():
                path = Path(directory) / f"{name}-{round_number}.db"
                times[name].append(run(path))
                for suffix in ("", "-wal", "-shm"):
                    with_suffix = path.with_name(path.name + suffix)
                    if with_suffix.exists():
                        os.unlink(with_suffix)

    print(
        f"{args.messages} messages, batches of {args.batch}, {args.sessions} sessions, "
        f"200-byte content, WAL + synchronous=FULL, best (median) of {args.rounds} rounds"
    )
    best = {name: args.messages / min(elapsed) for name, elapsed in times.items()}
    for name, elapsed in times.items():
        median = args.messages / statistics.median(elapsed)
        ratio = best[name] / best["raw-plain"]
        print(f"  {name:<11} {best[name]:>9,.0f} rows/s ({median:>9,.0f})  {ratio:5.2f}x raw-plain")
    print(f"  history / raw-schema: {best['history'] / best['raw-schema']:.2f}x")
    if args.retention:
        print(f"retention, chunks of {sqlite_history._RETENTION_CHUNK} messages:")
        with tempfile.TemporaryDirectory(dir=args.dir) as directory:
            retention(Path(directory) / "retention.db", batches, args.sessions)


if __name__ == "__main__":
    main()
