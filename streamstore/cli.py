"""The ``streamstore`` command: a thin layer over the public API.

Exit codes: 0 success, 1 a streamstore error (the message says which), 2 bad usage.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

import anyio

from streamstore.config import PersisterSettings, Settings, SweeperSettings
from streamstore.embedded import EmbeddedServer
from streamstore.errors import StreamStoreError
from streamstore.persister import Persister
from streamstore.store import StreamStore
from streamstore.sweeper import Sweeper

__all__ = ["main"]

log = logging.getLogger("streamstore.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamstore",
        description="A durable, replayable message bus for multi-agent chat on Redis Streams.",
    )
    parser.add_argument(
        "--redis-url",
        help="redis://, rediss:// or unix:// URL (default: $STREAMSTORE_REDIS_URL, else a "
        "private embedded server)",
    )
    parser.add_argument(
        "--history-url",
        help="sqlite:///path.db or memory:// (default: $STREAMSTORE_HISTORY_URL, else "
        "sqlite:///streamstore.db)",
    )
    parser.add_argument("--key-prefix", help="Redis key prefix (default: ss)")
    parser.add_argument("--partitions", type=int, help="partition feeds (default: 16)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="agents chatting, persisted and replayed")
    demo.add_argument("--sessions", type=int, default=3, help="sessions to run (default: 3)")

    worker = commands.add_parser("worker", help="run the persister until SIGTERM")
    worker.add_argument(
        "--consumer", help="consumer name, unique per worker process (default: host name)"
    )
    worker.add_argument("--batch-size", type=int, help="entries per batch (default: 1000)")
    worker.add_argument(
        "--claim-idle", type=float, help="seconds before another worker's entry is claimed"
    )

    server = commands.add_parser("server", help="run the embedded server in the foreground")
    server.add_argument("--port", type=int, help="TCP port (default: a free one)")
    server.add_argument("--data-dir", help="data directory (default: a temporary one)")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        "redis_url": args.redis_url,
        "history_url": args.history_url,
        "key_prefix": args.key_prefix,
        "partitions": args.partitions,
    }
    return Settings.from_env(**{k: v for k, v in overrides.items() if v is not None})


async def _demo(args: argparse.Namespace) -> int:
    from streamstore.demo import run_demo

    async with StreamStore.open(settings=_settings(args)) as store:
        report = await run_demo(store, sessions=args.sessions)
    return 0 if report.lag == 0 and report.replay_matches else 1


async def _worker(args: argparse.Namespace) -> int:
    overrides = {
        "consumer": args.consumer,
        "batch_size": args.batch_size,
        "claim_idle": args.claim_idle,
    }
    persister_settings = PersisterSettings.from_env(
        **{k: v for k, v in overrides.items() if v is not None}
    )
    async with StreamStore.open(settings=_settings(args)) as store:
        persister = Persister(store, persister_settings)
        sweeper = Sweeper(store, SweeperSettings.from_env())
        async with anyio.create_task_group() as tg:
            tg.start_soon(_stop_on_signal, persister, sweeper)
            async with anyio.create_task_group() as workers:
                await workers.start(sweeper.run)
                await workers.start(persister.run)
                log.info(
                    "worker ready consumer=%s partitions=%d",
                    persister.consumer,
                    store.settings.partitions,
                )
            tg.cancel_scope.cancel()
        log.info("worker stopped %s", persister.stats.as_dict())
    return 0


async def _stop_on_signal(persister: Persister, sweeper: Sweeper) -> None:
    """SIGTERM / SIGINT: a graceful stop (the batch in hand is committed and acknowledged)."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("worker: signal %d, stopping gracefully", signum)
            persister.stop()
            sweeper.stop()
            return


def _server(args: argparse.Namespace) -> int:
    server = EmbeddedServer(data_dir=args.data_dir, port=args.port)
    server.start()
    print(server.url, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``streamstore`` command; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "server":
            return _server(args)
        runner = {"demo": _demo, "worker": _worker}[args.command]
        return anyio.run(runner, args)
    except StreamStoreError as exc:
        print(f"streamstore: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
