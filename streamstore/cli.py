"""The ``streamstore`` command (also ``python -m streamstore``): a thin layer over the public API.

Global options (``--redis-url``, ``--json``, ``-v`` ...) go before or after the command.
Exit status: 0 ok, 1 a streamstore error (one line on stderr), 2 bad usage, 3 ``check`` found
the deployment unhealthy, 70 an unexpected error, that is a bug (one line on stderr; ``-v``
logs the traceback), 130 interrupted, 141 the output pipe was closed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import importlib.metadata
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import anyio
import orjson

from streamstore.cli_types import positive_float, positive_int
from streamstore.config import PersisterSettings, Settings, SweeperSettings
from streamstore.embedded import EmbeddedServer
from streamstore.errors import (
    ConnectionLostError,
    HistoryError,
    ServerError,
    StreamStoreError,
)
from streamstore.health import HealthReport
from streamstore.models import Message, Session
from streamstore.persister import Persister
from streamstore.stats import DeadLetter, DeploymentStats
from streamstore.store import StreamStore
from streamstore.sweeper import Sweeper

if TYPE_CHECKING:
    from streamstore.metrics import WorkerMetrics

__all__ = ["main"]

log = logging.getLogger("streamstore.cli")

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNHEALTHY: Final = 3
EXIT_SOFTWARE: Final = 70  # sysexits.h EX_SOFTWARE: an exception the CLI did not expect
EXIT_INTERRUPTED: Final = 130
EXIT_PIPE_CLOSED: Final = 141

Command = Callable[[argparse.Namespace], Awaitable[int]]

_EPILOG = """\
examples:
  streamstore server --data-dir ./redis-data    # a private server in the foreground; prints URL
  export STREAMSTORE_REDIS_URL=redis://127.0.0.1:6379/0
  streamstore worker --consumer worker-1 --metrics-port 9108
  streamstore sessions create --id support-42 --participant alice --participant bot
  streamstore publish support-42 --sender alice --recipient bot "where is my parcel?"
  echo "a longer text" | streamstore publish support-42 --sender alice -
  streamstore tail support-42 --recipient bot      # live, until Ctrl-C
  streamstore replay support-42 --after 1718000000000-0 --follow
  streamstore history support-42 --limit 20 --json
  streamstore stats
  streamstore check || echo "needs attention"
  streamstore sessions delete support-42 --yes     # asks first on a terminal

Without --redis-url (or $STREAMSTORE_REDIS_URL) a command starts a private embedded server
whose data lives beside the history file (./streamstore.db-redis). Only one process at a time
can use it: to run a worker and other commands together, start `streamstore server` and pass
its URL.

Global options go before or after the command (`streamstore stats --json -v`).

Messages print as `<stream id> <sender> -> <recipient or *>: <content>` (newlines in content
shown as \\n). With --json every message, session or dead letter is one JSON object per line;
stats and check print one object.

exit status: 0 ok, 1 a streamstore error (one line on stderr), 2 bad usage,
3 `check` found the deployment unhealthy, 70 an unexpected error: a bug (one line on
stderr; -v shows the traceback), 130 interrupted, 141 output pipe closed.
"""

_CHECK_EPILOG = """\
Unhealthy (exit 3): the server cannot be reached or opened, its maxmemory-policy may evict
keys, it would drop the scripts' writes on restart (a restricted `default` ACL user with the
append-only file on), the history store fails, a worker's history writes have been failing
for longer than its unhealthy_after, a partition's backlog is at or over the high-water mark
(max_lag: publishes there block, then fail - is a worker running?), or the server lost its
data (until `--acknowledge-data-loss`).
Warnings only (exit 0): dead letters (isolated entries that block nothing but need a look:
`streamstore dead-letters list`), append-only persistence off, INFO not permitted.
"""


# -- the parser ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamstore",
        description="A durable, replayable message bus for multi-agent chat on Redis Streams.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_global_options(after_command=False)],
    )
    parser.add_argument("--version", action=_Version, help="print `streamstore <version>` and exit")
    # Every command and action takes the global options too, defaults suppressed: a value
    # given before the command is kept unless it is given again after it.
    after = _global_options(after_command=True)
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="one of:"
    )

    def command(
        name: str,
        summary: str,
        run: Command | None = None,
        *,
        epilog: str | None = None,
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=summary,
            description=_sentence(summary),
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[after],
        )
        sub.set_defaults(run=run, service=False, confirm=None)
        return sub

    def actions(
        sub: argparse.ArgumentParser,
    ) -> Callable[[str, str, Command], argparse.ArgumentParser]:
        """``add(name, summary, run)`` for the actions of ``sessions`` or ``dead-letters``."""
        group = sub.add_subparsers(dest="action", required=True, metavar="ACTION", help="one of:")

        def add(name: str, summary: str, run: Command) -> argparse.ArgumentParser:
            action = group.add_parser(
                name, help=summary, description=_sentence(summary), parents=[after]
            )
            action.set_defaults(run=run)
            return action

        return add

    demo = command("demo", "agents chatting on a few sessions, persisted and replayed", _demo)
    demo.add_argument(
        "--sessions", type=positive_int, default=3, metavar="N", help="sessions (default: 3)"
    )

    worker = command("worker", "persist and sweep until SIGTERM or Ctrl-C", _worker)
    worker.set_defaults(service=True)
    worker.add_argument(
        "--consumer",
        metavar="NAME",
        help="consumer name, stable across restarts and unique per worker process "
        "(default: the host name)",
    )
    worker.add_argument(
        "--batch-size", type=positive_int, metavar="N", help="entries per batch (default: 1000)"
    )
    worker.add_argument(
        "--claim-idle",
        type=positive_float,
        metavar="SECONDS",
        help="take over entries another worker left pending this long (default: 30)",
    )
    worker.add_argument(
        "--metrics-port",
        type=_port,
        metavar="PORT",
        help="serve /healthz and Prometheus /metrics on this port, usually 9108 "
        "(0: any free port; default: off)",
    )
    worker.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address of the metrics server (default: 127.0.0.1)",
    )

    server = command("server", "run a private embedded server in the foreground", _server)
    server.set_defaults(service=True)
    server.add_argument("--port", type=_port, metavar="PORT", help="TCP port (default: a free one)")
    server.add_argument(
        "--data-dir", metavar="DIR", help="data directory (default: a temporary one)"
    )

    publish = command("publish", "publish one message; prints its stream id", _publish)
    publish.add_argument("session", metavar="SESSION", help="the session's id")
    publish.add_argument("content", metavar="CONTENT", help="the text, or - to read stdin")
    publish.add_argument("--sender", required=True, metavar="NAME", help="who sends it")
    publish.add_argument("--recipient", metavar="NAME", help="who it is for (default: everyone)")
    publish.add_argument(
        "--id", metavar="ID", help="idempotency key: a retry with it is stored once"
    )
    publish.add_argument("--metadata", type=_json_object, metavar="JSON", help="a JSON object")

    tail = command("tail", "print live messages until the session closes", _tail)
    tail.add_argument("session", metavar="SESSION", help="the session's id")
    tail.add_argument(
        "--recipient", metavar="NAME", help="only messages for NAME (or for everyone)"
    )

    replay = command("replay", "print a session from history, then Redis, in order", _replay)
    replay.add_argument("session", metavar="SESSION", help="the session's id")
    replay.add_argument("--after", metavar="ID", help="start after this stream id")
    replay.add_argument("--follow", action="store_true", help="then go on with live messages")
    replay.add_argument(
        "--recipient", metavar="NAME", help="only messages for NAME (or for everyone)"
    )

    history = command("history", "print a window of a session's messages", _history)
    history.add_argument("session", metavar="SESSION", help="the session's id")
    history.add_argument(
        "--limit", type=positive_int, default=50, metavar="N", help="messages (default: 50)"
    )
    window = history.add_mutually_exclusive_group()
    window.add_argument("--before", metavar="ID", help="the last N before this stream id")
    window.add_argument("--after", metavar="ID", help="the first N after this stream id")

    action = actions(command("sessions", "list, show, create, close or delete sessions"))
    listing = action("list", "sessions ordered by id, live and in history", _sessions_list)
    listing.add_argument("--after", metavar="ID", help="the page after this session id")
    listing.add_argument(
        "--limit", type=positive_int, default=100, metavar="N", help="sessions (default: 100)"
    )
    show = action("show", "one session in detail", _sessions_show)
    show.add_argument("id", metavar="ID", help="the session's id")
    create = action("create", "create a session; prints its id", _sessions_create)
    create.add_argument("--id", metavar="ID", help="default: a new time-ordered id")
    create.add_argument(
        "--participant",
        action="append",
        default=[],
        dest="participants",
        metavar="NAME",
        help="repeat for each participant",
    )
    create.add_argument(
        "--ttl",
        type=_ttl,
        default=argparse.SUPPRESS,
        metavar="SECONDS",
        help="idle time before it is closed, or 'none' (default: $STREAMSTORE_SESSION_TTL or 3600)",
    )
    create.add_argument("--metadata", type=_json_object, metavar="JSON", help="a JSON object")
    close = action("close", "refuse new messages; keep the session readable", _sessions_close)
    close.add_argument("id", metavar="ID", help="the session's id")
    delete = action("delete", "delete a session in Redis and in history", _sessions_delete)
    delete.set_defaults(confirm=_confirm_delete)
    delete.add_argument("id", metavar="ID", help="the session's id")
    delete.add_argument(
        "-y",
        "--yes",
        action="store_true",
        help="do not ask (needed when stdin is not a terminal)",
    )

    command("stats", "feeds, lag, sessions, dead letters and server memory", _stats)
    check = command(
        "check", "exit 0 if the deployment is healthy, 3 if not", _check, epilog=_CHECK_EPILOG
    )
    check.add_argument(
        "--acknowledge-data-loss",
        action="store_true",
        help="clear the record of a past loss of the server's data (after reviewing it)",
    )

    action = actions(
        command("dead-letters", "list or requeue entries the persister could not store")
    )
    dead_list = action("list", "the oldest dead letters and their reasons", _dead_letters_list)
    dead_list.add_argument(
        "--limit", type=positive_int, default=100, metavar="N", help="dead letters (default: 100)"
    )
    requeue = action(
        "requeue", "put one back on its feed, once its cause is fixed", _dead_letters_requeue
    )
    requeue.add_argument("id", metavar="ID", help="the dead letter's id (from `list`)")

    from streamstore.bench import add_bench_arguments

    bench = command(
        "bench",
        "measure streamstore against hand-written redis-py and sqlite3 (asyncpg for a "
        "PostgreSQL history)",
        _bench,
    )
    add_bench_arguments(bench)
    return parser


def _global_options(*, after_command: bool) -> argparse.ArgumentParser:
    """The options every command shares, as a parent parser.

    ``after_command``: the copy for the commands' own parsers, whose defaults are suppressed
    so that it sets only what is given after the command.
    """
    parent = argparse.ArgumentParser(add_help=False)
    options = parent.add_argument_group("global options (before or after the command)")
    none: Any = argparse.SUPPRESS if after_command else None
    false: Any = argparse.SUPPRESS if after_command else False
    options.add_argument(
        "--redis-url",
        metavar="URL",
        default=none,
        help="redis://, rediss://, unix://, or redis+cluster://host:port[,host:port...] for a "
        "Redis Cluster (default: $STREAMSTORE_REDIS_URL, else a private embedded server)",
    )
    options.add_argument(
        "--history-url",
        metavar="URL",
        default=none,
        help="sqlite:///path.db, postgresql://user@host/db or memory:// (default: "
        "$STREAMSTORE_HISTORY_URL, else sqlite:///streamstore.db)",
    )
    options.add_argument(
        "--key-prefix", metavar="PREFIX", default=none, help="Redis key prefix (default: ss)"
    )
    options.add_argument(
        "--partitions",
        type=positive_int,
        metavar="N",
        default=none,
        help="partition feeds; the same in every process of a deployment (default: 16)",
    )
    options.add_argument(
        "--json",
        dest="as_json",
        action="store_true",
        default=false,
        help="print data as JSON lines",
    )
    options.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=false,
        help="debug logging on stderr, and the traceback of an unexpected error",
    )
    return parent


class _Version(argparse.Action):
    """``--version``: looks the version up only when asked (a scan of installed packages)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        print(f"streamstore {_version()}", flush=True)
        parser.exit()


def _version() -> str:
    """The version of the installed distribution that provides the ``streamstore`` package,
    whatever that distribution is called."""
    names = importlib.metadata.packages_distributions().get(__package__ or "streamstore", [])
    for name in dict.fromkeys([*names, "streamstore"]):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown (not installed)"


def _sentence(summary: str) -> str:
    return summary[0].upper() + summary[1:] + "."


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}")
    return value


def _ttl(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected positive seconds or 'none', got {text!r}")
    return value


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('expected a JSON object, like \'{"key": "value"}\'')
    return value


# -- shared ----------------------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> Settings:
    given = {
        "redis_url": args.redis_url,
        "history_url": args.history_url,
        "key_prefix": args.key_prefix,
        "partitions": args.partitions,
    }
    return Settings.from_env(**{k: v for k, v in given.items() if v is not None})


def _open(args: argparse.Namespace) -> AbstractAsyncContextManager[StreamStore]:
    return StreamStore.open(settings=_settings(args))


def _emit(args: argparse.Namespace, text: str, data: object) -> None:
    """Print ``data`` as one JSON line with --json, else ``text``; flushed at once."""
    print(orjson.dumps(data).decode() if args.as_json else text, flush=True)


def _message_json(message: Message) -> dict[str, object]:
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


def _message_line(message: Message) -> str:
    content = message.content.translate({ord("\n"): "\\n", ord("\r"): "\\r"})
    return f"{message.stream_id} {message.sender} -> {message.recipient or '*'}: {content}"


def _print_message(args: argparse.Namespace, message: Message) -> None:
    _emit(args, _message_line(message), _message_json(message))


async def _print_messages(args: argparse.Namespace, messages: AsyncIterator[Message]) -> int:
    async for message in messages:
        _print_message(args, message)
    return EXIT_OK


def _session_json(session: Session) -> dict[str, object]:
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


def _session_line(session: Session) -> str:
    participants = ",".join(session.participants) or "-"
    return (
        f"{session.id} {session.state} messages={session.message_count} "
        f"last_active={_time(session.last_active_at)} participants={participants}"
    )


def _session_details(session: Session) -> str:
    ttl = "never expires" if session.ttl is None else f"{session.ttl:g} s idle"
    return "\n".join(
        (
            f"id: {session.id}",
            f"state: {session.state}",
            f"participants: {', '.join(session.participants) or '-'}",
            f"messages: {session.message_count}",
            f"last stream id: {session.last_stream_id or '-'}",
            f"created: {_time(session.created_at)}",
            f"last active: {_time(session.last_active_at)}",
            f"ttl: {ttl}",
            f"metadata: {orjson.dumps(session.metadata).decode()}",
        )
    )


def _time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


# -- commands --------------------------------------------------------------------------------


async def _demo(args: argparse.Namespace) -> int:
    from streamstore.demo import run_demo

    async with _open(args) as store:
        report = await run_demo(store, sessions=args.sessions)
    return EXIT_OK if report.lag == 0 and report.replay_matches else EXIT_ERROR


async def _worker(args: argparse.Namespace) -> int:
    given = {
        "consumer": args.consumer,
        "batch_size": args.batch_size,
        "claim_idle": args.claim_idle,
    }
    persister_settings = PersisterSettings.from_env(
        **{k: v for k, v in given.items() if v is not None}
    )
    sweeper_settings = SweeperSettings.from_env()
    metrics: WorkerMetrics | None = None
    async with _open(args) as store:
        if args.metrics_port is None:
            persister = Persister(store, persister_settings)
            sweeper = Sweeper(store, sweeper_settings)
            endpoint = "off"
        else:
            from streamstore.metrics import WorkerMetrics

            metrics = WorkerMetrics(store, persister_settings.consumer)
            persister = Persister(store, persister_settings, on_batch=metrics.observe_batch)
            sweeper = Sweeper(store, sweeper_settings, on_sweep=metrics.observe_sweep)
            endpoint = await metrics.listen(args.metrics_host, args.metrics_port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_stop_on_signal, persister, sweeper)
            async with anyio.create_task_group() as workers:
                await workers.start(sweeper.run)
                if metrics is None:
                    await workers.start(persister.run)
                else:
                    tg.start_soon(metrics.serve)
                    await workers.start(metrics.run_persister, persister)
                log.info(
                    "worker ready consumer=%s partitions=%d metrics=%s",
                    persister.consumer,
                    store.settings.partitions,
                    endpoint,
                )
            tg.cancel_scope.cancel()
        counts = " ".join(f"{k}={v:g}" for k, v in persister.stats.as_dict().items())
        log.info("worker stopped consumer=%s %s", persister.consumer, counts)
    return EXIT_OK


async def _stop_on_signal(persister: Persister, sweeper: Sweeper) -> None:
    """SIGTERM / SIGINT: a graceful stop (the batch in hand is committed and acknowledged)."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("worker stopping signal=%d consumer=%s", signum, persister.consumer)
            persister.stop()
            sweeper.stop()
            return


async def _server(args: argparse.Namespace) -> int:
    server = EmbeddedServer(data_dir=args.data_dir, port=args.port)
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        await anyio.to_thread.run_sync(server.start)
        try:
            print(server.url, flush=True)
            log.info(
                "server ready url=%s pid=%s data_dir=%s", server.url, server.pid, server.data_dir
            )
            async for signum in signals:
                log.info("server stopping signal=%d", signum)
                break
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(server.stop)
    return EXIT_OK


async def _publish(args: argparse.Namespace) -> int:
    content: str = args.content
    if content == "-":
        content = await anyio.to_thread.run_sync(sys.stdin.read)
        content = content.removesuffix("\n").removesuffix("\r")
    async with _open(args) as store:
        message = await store.publish(
            args.session,
            sender=args.sender,
            content=content,
            recipient=args.recipient,
            metadata=args.metadata,
            id=args.id,
        )
    _emit(args, str(message.stream_id), _message_json(message))
    return EXIT_OK


async def _tail(args: argparse.Namespace) -> int:
    async with _open(args) as store:
        return await _print_messages(args, store.subscribe(args.session, recipient=args.recipient))


async def _replay(args: argparse.Namespace) -> int:
    async with _open(args) as store:
        messages = store.replay(
            args.session, after=args.after, follow=args.follow, recipient=args.recipient
        )
        return await _print_messages(args, messages)


async def _history(args: argparse.Namespace) -> int:
    async with _open(args) as store:
        page = await store.history(
            args.session, limit=args.limit, before=args.before, after=args.after
        )
    for message in page:
        _print_message(args, message)
    return EXIT_OK


async def _sessions_list(args: argparse.Namespace) -> int:
    async with _open(args) as store:
        sessions = await store.list_sessions(after=args.after, limit=args.limit)
    for session in sessions:
        _emit(args, _session_line(session), _session_json(session))
    return EXIT_OK


async def _sessions_show(args: argparse.Namespace) -> int:
    async with _open(args) as store:
        session = await store.get_session(args.id)
    _emit(args, _session_details(session), _session_json(session))
    return EXIT_OK


async def _sessions_create(args: argparse.Namespace) -> int:
    async with _open(args) as store:
        session = await store.create_session(
            args.participants,
            id=args.id,
            ttl=getattr(args, "ttl", store.settings.session_ttl_s),
            metadata=args.metadata,
        )
    _emit(args, session.id, _session_json(session))
    return EXIT_OK


async def _sessions_close(args: argparse.Namespace) -> int:
    async with _open(args) as store:
        session = await store.close_session(args.id)
    _emit(args, _session_line(session), _session_json(session))
    return EXIT_OK


def _confirm_delete(args: argparse.Namespace) -> int | None:
    """Ask on a terminal before ``sessions delete`` (unless ``--yes``); None: go on, else the
    exit status. Run before the event loop, so that Ctrl-C at the prompt is a plain
    KeyboardInterrupt."""
    if args.yes:
        return None
    if not sys.stdin.isatty():
        return _fail(f"not deleting session {args.id} without confirmation: pass --yes")
    print(f"delete session {args.id} and its history? [y/N] ", end="", file=sys.stderr, flush=True)
    if sys.stdin.readline().strip().lower() in ("y", "yes"):
        return None
    return _fail(f"session {args.id} not deleted")


async def _sessions_delete(args: argparse.Namespace) -> int:
    async with _open(args) as store:
        await store.delete_session(args.id)
    _emit(args, f"{args.id} deleted", {"id": args.id, "state": "deleted"})
    return EXIT_OK


async def _stats(args: argparse.Namespace) -> int:
    async with _open(args) as store:
        stats = await store.stats()
        stored = await store.history_store.count_messages()
    data = dataclasses.asdict(stats) | {
        "backlog": stats.backlog,
        "pending": stats.pending,
        "lagging": stats.lagging,
        "history_messages": stored,
    }
    _emit(args, "\n".join(_stats_lines(stats, stored)), data)
    return EXIT_OK


def _stats_lines(stats: DeploymentStats, stored: int) -> list[str]:
    lines = [
        f"server: {stats.server} {stats.server_version}, maxmemory-policy "
        f"{stats.maxmemory_policy or 'unknown'}, used memory {stats.used_memory / 2**20:.1f} MiB",
        f"live sessions: {stats.live_sessions}",
        f"history messages: {stored}",
        f"dead letters: {stats.dead_letters}",
        f"high-water mark: {stats.max_lag} entries per partition",
    ]
    if stats.data_lost_at is not None:
        lines.append(f"server lost its data at: {_time(stats.data_lost_at)}")
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


async def _check(args: argparse.Namespace) -> int:
    try:
        async with _open(args) as store:
            report = await store.check(acknowledge_data_loss=args.acknowledge_data_loss)
    except (ConnectionLostError, ServerError, HistoryError) as exc:  # could not even open it
        report = HealthReport("", reasons=(_one_line(exc),))
    lines = [f"unhealthy: {reason}" for reason in report.reasons]
    lines = lines or [f"healthy: {report.summary}"]
    lines += [f"warning: {warning}" for warning in report.warnings]
    _emit(args, "\n".join(lines), report.as_dict())
    return EXIT_OK if report.healthy else EXIT_UNHEALTHY


def _dead_letter_json(dead: DeadLetter) -> dict[str, object]:
    return {"id": dead.id, "feed": dead.feed, "entry_id": dead.entry_id, "reason": dead.reason}


async def _dead_letters_list(args: argparse.Namespace) -> int:
    async with _open(args) as store:
        dead_letters = await store.dead_letters(limit=args.limit)
    for dead in dead_letters:
        _emit(
            args, f"{dead.id} {dead.feed} {dead.entry_id}: {dead.reason}", _dead_letter_json(dead)
        )
    if not dead_letters and not args.as_json:
        print("no dead letters", flush=True)
    return EXIT_OK


async def _dead_letters_requeue(args: argparse.Namespace) -> int:
    async with _open(args) as store:
        requeued = await store.requeue_dead_letter(args.id)
    if not requeued:
        return _fail(f"no dead letter {args.id}")
    _emit(args, f"requeued {args.id}", {"id": args.id, "requeued": True})
    return EXIT_OK


async def _bench(args: argparse.Namespace) -> int:
    from streamstore.bench import run_bench

    try:
        await run_bench(args, _settings(args), functools.partial(print, flush=True))
    except RuntimeError as exc:  # streamstore lost or repeated a message during the run
        return _fail(f"bench: {exc}")
    return EXIT_OK


# -- entry point -----------------------------------------------------------------------------


async def _interruptible(args: argparse.Namespace) -> int:
    """Run a command until it returns or Ctrl-C, then 130.

    asyncio's own Ctrl-C handling cancels the main task once, and a redis-py call may swallow
    that cancellation (DESIGN.md section 7); an anyio cancel scope cancels again at every await.
    """
    command: Command = args.run
    loop = asyncio.get_running_loop()  # anyio.run's default backend
    with anyio.CancelScope() as scope:
        loop.add_signal_handler(signal.SIGINT, scope.cancel)
        try:
            return await command(args)
        finally:
            loop.remove_signal_handler(signal.SIGINT)
    return EXIT_INTERRUPTED


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _fail(message: str) -> int:
    print(f"streamstore: {message}", file=sys.stderr, flush=True)
    return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``streamstore`` command; returns the exit status.

    Whatever happens, a user sees one line on stderr, never a traceback (``-v`` logs it).
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    quiet = logging.INFO if args.service else logging.WARNING
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else quiet,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.confirm is not None and (refused := args.confirm(args)) is not None:
            return int(refused)
        code: int = anyio.run(args.run if args.service else _interruptible, args)
    except BaseException as exc:  # sorted by _exit_status; what is not an error goes on
        return _exit_status(args, exc)
    return code


def _exit_status(args: argparse.Namespace, raised: BaseException) -> int:
    """The exit status for what a command raised, after one line on stderr; re-raises
    SystemExit and other non-errors."""
    exc = raised
    # A task group wraps what its tasks raise: one error inside is reported as that error.
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, BrokenPipeError):  # the reader went away (`streamstore replay ID | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE_CLOSED
    if isinstance(exc, StreamStoreError):
        log.debug("%s failed", args.command, exc_info=raised)
        return _fail(_one_line(exc))
    if isinstance(exc, Exception):  # a bug (ours or a library's): still no traceback
        log.debug("%s failed unexpectedly", args.command, exc_info=raised)
        print(
            f"streamstore: unexpected {type(exc).__name__}: {_one_line(exc)} "
            "(run with -v for details)",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_SOFTWARE
    raise raised


if __name__ == "__main__":
    sys.exit(main())
