"""What the command line prints: messages, sessions, stats and dead letters as text or JSON
lines, one-line errors, and the exit statuses."""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Final

import orjson

from streamstore.dead_letters import DeadLetter
from streamstore.models import Message, Session
from streamstore.stats import DeploymentStats

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNHEALTHY: Final = 3
EXIT_SOFTWARE: Final = 70  # sysexits.h EX_SOFTWARE: an exception the CLI did not expect
EXIT_INTERRUPTED: Final = 130
EXIT_PIPE_CLOSED: Final = 141


def emit(args: argparse.Namespace, text: str, data: object) -> None:
    """Print ``data`` as one JSON line with --json, else ``text``; flushed at once."""
    print(orjson.dumps(data).decode() if args.as_json else text, flush=True)


def message_json(message: Message) -> dict[str, object]:
    return {
        "stream_id": str(message.stream_id),
        "id": message.id,
        "session_id": message.session_id,
        "sender": message.sender,
        "recipient": message.recipient,
        "content": message.content,
        "metadata": message.metadata,
        "timestamp": message.timestamp,
    }


def message_line(message: Message) -> str:
    content = message.content.translate({ord("\n"): "\\n", ord("\r"): "\\r"})
    return f"{message.stream_id} {message.sender} -> {message.recipient or '*'}: {content}"


def print_message(args: argparse.Namespace, message: Message) -> None:
    emit(args, message_line(message), message_json(message))


async def print_messages(args: argparse.Namespace, messages: AsyncIterator[Message]) -> int:
    async for message in messages:
        print_message(args, message)
    return EXIT_OK


def session_json(session: Session) -> dict[str, object]:
    return {
        "id": session.id,
        "state": str(session.state),
        "participants": list(session.participants),
        "created_at": session.created_at,
        "last_active_at": session.last_active_at,
        "ttl": session.ttl,
        "metadata": session.metadata,
        "message_count": session.message_count,
        "last_stream_id": None if session.last_stream_id is None else str(session.last_stream_id),
    }


def session_line(session: Session) -> str:
    participants = ",".join(session.participants) or "-"
    return (
        f"{session.id} {session.state} messages={session.message_count} "
        f"last_active={timestamp_text(session.last_active_at)} participants={participants}"
    )


def session_details(session: Session) -> str:
    ttl = "never expires" if session.ttl is None else f"{session.ttl:g} s idle"
    return "\n".join(
        (
            f"id: {session.id}",
            f"state: {session.state}",
            f"participants: {', '.join(session.participants) or '-'}",
            f"messages: {session.message_count}",
            f"last stream id: {session.last_stream_id or '-'}",
            f"created: {timestamp_text(session.created_at)}",
            f"last active: {timestamp_text(session.last_active_at)}",
            f"ttl: {ttl}",
            f"metadata: {orjson.dumps(session.metadata).decode()}",
        )
    )


def timestamp_text(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def stats_lines(stats: DeploymentStats, stored: int) -> list[str]:
    lines = [
        f"server: {stats.server} {stats.server_version}, maxmemory-policy "
        f"{stats.maxmemory_policy or 'unknown'}, used memory {stats.used_memory / 2**20:.1f} MiB",
        f"live sessions: {stats.live_sessions}",
        f"history messages: {stored}",
        f"dead letters: {stats.dead_letters}",
        f"high-water mark: {stats.max_lag} entries per partition",
    ]
    if stats.data_lost_at is not None:
        lines.append(f"server lost its data at: {timestamp_text(stats.data_lost_at)}")
    rows = [("partition", "published", "backlog", "lag", "pending", "consumers")]
    rows += [
        (
            str(p.partition),
            str(p.published),
            str(p.backlog),
            "-" if p.lag is None else str(p.lag),
            str(p.pending),
            str(p.consumers),
        )
        for p in stats.partitions
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return lines


def dead_letter_json(dead: DeadLetter) -> dict[str, object]:
    return {"id": dead.id, "feed": dead.feed, "entry_id": dead.entry_id, "reason": dead.reason}


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def fail(message: str) -> int:
    print(f"streamstore: {message}", file=sys.stderr, flush=True)
    return EXIT_ERROR
