"""The command line's grammar: commands, options, help texts and the global options that go
before or after the command."""

from __future__ import annotations

import argparse
import importlib.metadata
from collections.abc import Callable, Sequence
from typing import Any, Final

from streamstore.cli import commands
from streamstore.cli.commands import Command
from streamstore.cli.types import json_object, port, positive_float, positive_int, ttl

__all__ = ["DISTRIBUTION", "build_parser"]

EPILOG = """\
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
whose data lives beside the history file (./streamstore.db-redis), or joins the one another
process on that directory already runs (a worker and other commands share it); the server
stops when the last of them leaves.

Global options go before or after the command (`streamstore stats --json -v`).

Messages print as `<stream id> <sender> -> <recipient or *>: <content>` (newlines in content
shown as \\n). With --json every message, session or dead letter is one JSON object per line;
stats and check print one object.

exit status: 0 ok, 1 a streamstore error (one line on stderr), 2 bad usage,
3 `check` found the deployment unhealthy, 70 an unexpected error: a bug (one line on
stderr; -v shows the traceback), 130 interrupted, 141 output pipe closed.
"""

CHECK_EPILOG = """\
Unhealthy (exit 3): the server cannot be reached or opened, its maxmemory-policy may evict
keys, it would drop the scripts' writes on restart (a restricted `default` ACL user with the
append-only file on), the history store fails, a worker's history writes have been failing
for longer than its unhealthy_after, a partition's backlog is at or over the high-water mark
(max_lag: publishes there block, then fail - is a worker running?), or the server lost its
data (until `--acknowledge-data-loss`).
Warnings only (exit 0): dead letters (isolated entries that block nothing but need a look:
`streamstore dead-letters list`), append-only persistence off, INFO not permitted.
"""


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: every command, its options and help, the global options."""
    parser = argparse.ArgumentParser(
        prog="streamstore",
        description="A durable, replayable message bus for multi-agent chat on Redis Streams.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_global_options(after_command=False)],
    )
    parser.add_argument("--version", action=_Version, help="print `streamstore <version>` and exit")
    # Every command and action takes the global options too, defaults suppressed: a value
    # given before the command is kept unless it is given again after it.
    after = _global_options(after_command=True)
    subcommands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="one of:"
    )

    def command(
        name: str,
        summary: str,
        run: Command | None = None,
        *,
        epilog: str | None = None,
    ) -> argparse.ArgumentParser:
        sub = subcommands.add_parser(
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

    demo = command(
        "demo", "agents chatting on a few sessions, persisted and replayed", commands.demo_command
    )
    demo.add_argument(
        "--sessions", type=positive_int, default=3, metavar="N", help="sessions (default: 3)"
    )

    worker = command("worker", "persist and sweep until SIGTERM or Ctrl-C", commands.worker_command)
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
        type=port,
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

    server = command(
        "server", "run a private embedded server in the foreground", commands.server_command
    )
    server.set_defaults(service=True)
    server.add_argument("--port", type=port, metavar="PORT", help="TCP port (default: a free one)")
    server.add_argument(
        "--data-dir", metavar="DIR", help="data directory (default: a temporary one)"
    )

    publish = command(
        "publish", "publish one message; prints its stream id", commands.publish_command
    )
    publish.add_argument("session", metavar="SESSION", help="the session's id")
    publish.add_argument("content", metavar="CONTENT", help="the text, or - to read stdin")
    publish.add_argument("--sender", required=True, metavar="NAME", help="who sends it")
    publish.add_argument("--recipient", metavar="NAME", help="who it is for (default: everyone)")
    publish.add_argument(
        "--id", metavar="ID", help="idempotency key: a retry with it is stored once"
    )
    publish.add_argument("--metadata", type=json_object, metavar="JSON", help="a JSON object")

    tail = command("tail", "print live messages until the session closes", commands.tail_command)
    tail.add_argument("session", metavar="SESSION", help="the session's id")
    tail.add_argument(
        "--recipient", metavar="NAME", help="only messages for NAME (or for everyone)"
    )

    replay = command(
        "replay", "print a session from history, then Redis, in order", commands.replay_command
    )
    replay.add_argument("session", metavar="SESSION", help="the session's id")
    replay.add_argument("--after", metavar="ID", help="start after this stream id")
    replay.add_argument("--follow", action="store_true", help="then go on with live messages")
    replay.add_argument(
        "--recipient", metavar="NAME", help="only messages for NAME (or for everyone)"
    )

    history = command("history", "print a window of a session's messages", commands.history_command)
    history.add_argument("session", metavar="SESSION", help="the session's id")
    history.add_argument(
        "--limit", type=positive_int, default=50, metavar="N", help="messages (default: 50)"
    )
    window = history.add_mutually_exclusive_group()
    window.add_argument("--before", metavar="ID", help="the last N before this stream id")
    window.add_argument("--after", metavar="ID", help="the first N after this stream id")

    action = actions(command("sessions", "list, show, create, close or delete sessions"))
    listing = action(
        "list", "sessions ordered by id, live and in history", commands.sessions_list_command
    )
    listing.add_argument("--after", metavar="ID", help="the page after this session id")
    listing.add_argument(
        "--limit", type=positive_int, default=100, metavar="N", help="sessions (default: 100)"
    )
    show = action("show", "one session in detail", commands.sessions_show_command)
    show.add_argument("id", metavar="ID", help="the session's id")
    create = action("create", "create a session; prints its id", commands.sessions_create_command)
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
        type=ttl,
        default=argparse.SUPPRESS,
        metavar="SECONDS",
        help="idle time before it is closed, or 'none' (default: $STREAMSTORE_SESSION_TTL or 3600)",
    )
    create.add_argument("--metadata", type=json_object, metavar="JSON", help="a JSON object")
    close = action(
        "close", "refuse new messages; keep the session readable", commands.sessions_close_command
    )
    close.add_argument("id", metavar="ID", help="the session's id")
    delete = action(
        "delete", "delete a session in Redis and in history", commands.sessions_delete_command
    )
    delete.set_defaults(confirm=commands.confirm_delete)
    delete.add_argument("id", metavar="ID", help="the session's id")
    delete.add_argument(
        "-y",
        "--yes",
        action="store_true",
        help="do not ask (needed when stdin is not a terminal)",
    )

    command("stats", "feeds, lag, sessions, dead letters and server memory", commands.stats_command)
    check = command(
        "check",
        "exit 0 if the deployment is healthy, 3 if not",
        commands.check_command,
        epilog=CHECK_EPILOG,
    )
    check.add_argument(
        "--acknowledge-data-loss",
        action="store_true",
        help="clear the record of a past loss of the server's data (after reviewing it)",
    )

    action = actions(
        command("dead-letters", "list or requeue entries the persister could not store")
    )
    dead_list = action(
        "list", "the oldest dead letters and their reasons", commands.dead_letters_list_command
    )
    dead_list.add_argument(
        "--limit", type=positive_int, default=100, metavar="N", help="dead letters (default: 100)"
    )
    requeue = action(
        "requeue",
        "put one back on its feed, once its cause is fixed",
        commands.dead_letters_requeue_command,
    )
    requeue.add_argument("id", metavar="ID", help="the dead letter's id (from `list`)")

    from streamstore.bench import add_bench_arguments

    bench = command(
        "bench",
        "measure streamstore against hand-written redis-py and sqlite3 (asyncpg for a "
        "PostgreSQL history)",
        commands.bench_command,
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


DISTRIBUTION: Final = "streamstore-bus"
"""The name this project installs under (pyproject.toml): ``streamstore`` on the public package
index is an unrelated project, so never look that one up."""


def _version() -> str:
    """The version of the installed ``streamstore-bus`` distribution."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _sentence(summary: str) -> str:
    return summary[0].upper() + summary[1:] + "."
