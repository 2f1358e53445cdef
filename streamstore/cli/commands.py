"""The commands: each parses nothing, opens the deployment through the public API, does one
thing and returns its exit status."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

import anyio

from streamstore.cli.output import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_UNHEALTHY,
    dead_letter_json,
    emit,
    fail,
    message_json,
    one_line,
    print_message,
    print_messages,
    session_details,
    session_json,
    session_line,
    stats_lines,
)
from streamstore.config import PersisterSettings, Settings, SweeperSettings
from streamstore.errors import ConnectionLostError, HistoryError, ServerError
from streamstore.health import HealthReport
from streamstore.redis.embedded import EmbeddedServer
from streamstore.store import StreamStore
from streamstore.workers.persister import Persister
from streamstore.workers.sweeper import Sweeper

if TYPE_CHECKING:
    from streamstore.workers.metrics import WorkerMetrics

log = logging.getLogger("streamstore.cli")

Command = Callable[[argparse.Namespace], Awaitable[int]]


def settings_from(args: argparse.Namespace) -> Settings:
    given = {
        "redis_url": args.redis_url,
        "history_url": args.history_url,
        "key_prefix": args.key_prefix,
        "partitions": args.partitions,
    }
    return Settings.from_env(**{k: v for k, v in given.items() if v is not None})


def open_store(args: argparse.Namespace) -> AbstractAsyncContextManager[StreamStore]:
    return StreamStore.open(settings=settings_from(args))


async def demo_command(args: argparse.Namespace) -> int:
    from streamstore.cli.demo import run_demo

    async with open_store(args) as store:
        report = await run_demo(store, sessions=args.sessions)
    return EXIT_OK if report.lag == 0 and report.replay_matches else EXIT_ERROR


async def worker_command(args: argparse.Namespace) -> int:
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
    async with open_store(args) as store:
        if args.metrics_port is None:
            persister = Persister(store, persister_settings)
            sweeper = Sweeper(store, sweeper_settings)
            endpoint = "off"
        else:
            from streamstore.workers.metrics import WorkerMetrics

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


async def server_command(args: argparse.Namespace) -> int:
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


async def publish_command(args: argparse.Namespace) -> int:
    content: str = args.content
    if content == "-":
        content = await anyio.to_thread.run_sync(sys.stdin.read)
        content = content.removesuffix("\n").removesuffix("\r")
    async with open_store(args) as store:
        message = await store.publish(
            args.session,
            sender=args.sender,
            content=content,
            recipient=args.recipient,
            metadata=args.metadata,
            id=args.id,
        )
    emit(args, str(message.stream_id), message_json(message))
    return EXIT_OK


async def tail_command(args: argparse.Namespace) -> int:
    async with open_store(args) as store:
        return await print_messages(args, store.subscribe(args.session, recipient=args.recipient))


async def replay_command(args: argparse.Namespace) -> int:
    async with open_store(args) as store:
        messages = store.replay(
            args.session, after=args.after, follow=args.follow, recipient=args.recipient
        )
        return await print_messages(args, messages)


async def history_command(args: argparse.Namespace) -> int:
    async with open_store(args) as store:
        page = await store.history(
            args.session, limit=args.limit, before=args.before, after=args.after
        )
    for message in page:
        print_message(args, message)
    return EXIT_OK


async def sessions_list_command(args: argparse.Namespace) -> int:
    async with open_store(args) as store:
        sessions = await store.list_sessions(after=args.after, limit=args.limit)
    for session in sessions:
        emit(args, session_line(session), session_json(session))
    return EXIT_OK


async def sessions_show_command(args: argparse.Namespace) -> int:
    async with open_store(args) as store:
        session = await store.get_session(args.id)
    emit(args, session_details(session), session_json(session))
    return EXIT_OK


async def sessions_create_command(args: argparse.Namespace) -> int:
    async with open_store(args) as store:
        session = await store.create_session(
            args.participants,
            id=args.id,
            ttl=getattr(args, "ttl", store.settings.session_ttl_s),
            metadata=args.metadata,
        )
    emit(args, session.id, session_json(session))
    return EXIT_OK


async def sessions_close_command(args: argparse.Namespace) -> int:
    async with open_store(args) as store:
        session = await store.close_session(args.id)
    emit(args, session_line(session), session_json(session))
    return EXIT_OK


def confirm_delete(args: argparse.Namespace) -> int | None:
    """Ask on a terminal before ``sessions delete`` (unless ``--yes``); None: go on, else the
    exit status. Run before the event loop, so that Ctrl-C at the prompt is a plain
    KeyboardInterrupt."""
    if args.yes:
        return None
    if not sys.stdin.isatty():
        return fail(f"not deleting session {args.id} without confirmation: pass --yes")
    print(f"delete session {args.id} and its history? [y/N] ", end="", file=sys.stderr, flush=True)
    if sys.stdin.readline().strip().lower() in ("y", "yes"):
        return None
    return fail(f"session {args.id} not deleted")


async def sessions_delete_command(args: argparse.Namespace) -> int:
    async with open_store(args) as store:
        await store.delete_session(args.id)
    emit(args, f"{args.id} deleted", {"id": args.id, "state": "deleted"})
    return EXIT_OK


async def stats_command(args: argparse.Namespace) -> int:
    async with open_store(args) as store:
        stats = await store.stats()
        stored = await store.history_store.count_messages()
    data = dataclasses.asdict(stats) | {
        "backlog": stats.backlog,
        "pending": stats.pending,
        "lagging": stats.lagging,
        "history_messages": stored,
    }
    emit(args, "\n".join(stats_lines(stats, stored)), data)
    return EXIT_OK


async def check_command(args: argparse.Namespace) -> int:
    try:
        async with open_store(args) as store:
            report = await store.check(acknowledge_data_loss=args.acknowledge_data_loss)
    except (ConnectionLostError, ServerError, HistoryError) as exc:  # could not even open it
        report = HealthReport("", reasons=(one_line(exc),))
    lines = [f"unhealthy: {reason}" for reason in report.reasons]
    lines = lines or [f"healthy: {report.summary}"]
    lines += [f"warning: {warning}" for warning in report.warnings]
    emit(args, "\n".join(lines), report.as_dict())
    return EXIT_OK if report.healthy else EXIT_UNHEALTHY


async def dead_letters_list_command(args: argparse.Namespace) -> int:
    async with open_store(args) as store:
        dead_letters = await store.dead_letters(limit=args.limit)
    for dead in dead_letters:
        emit(args, f"{dead.id} {dead.feed} {dead.entry_id}: {dead.reason}", dead_letter_json(dead))
    if not dead_letters and not args.as_json:
        print("no dead letters", flush=True)
    return EXIT_OK


async def dead_letters_requeue_command(args: argparse.Namespace) -> int:
    async with open_store(args) as store:
        requeued = await store.requeue_dead_letter(args.id)
    if not requeued:
        return fail(f"no dead letter {args.id}")
    emit(args, f"requeued {args.id}", {"id": args.id, "requeued": True})
    return EXIT_OK


async def bench_command(args: argparse.Namespace) -> int:
    from streamstore.bench import run_bench

    try:
        await run_bench(args, settings_from(args), functools.partial(print, flush=True))
    except RuntimeError as exc:  # streamstore lost or repeated a message during the run
        return fail(f"bench: {exc}")
    return EXIT_OK
