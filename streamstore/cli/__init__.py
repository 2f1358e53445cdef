"""The ``streamstore`` command (also ``python -m streamstore``): a thin layer over the public API.

Global options (``--redis-url``, ``--json``, ``-v`` ...) go before or after the command.
Exit status: 0 ok, 1 a streamstore error (one line on stderr), 2 bad usage, 3 ``check`` found
the deployment unhealthy, 70 an unexpected error, that is a bug (one line on stderr; ``-v``
logs the traceback), 130 interrupted, 141 the output pipe was closed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

import anyio

from streamstore.cli.commands import Command
from streamstore.cli.output import (
    EXIT_INTERRUPTED,
    EXIT_PIPE_CLOSED,
    EXIT_SOFTWARE,
    EXIT_USAGE,
    fail,
    one_line,
)
from streamstore.cli.parser import DISTRIBUTION, build_parser
from streamstore.errors import StreamStoreError

__all__ = ["DISTRIBUTION", "main"]

log = logging.getLogger("streamstore.cli")


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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``streamstore`` command; returns the exit status.

    Whatever happens, a user sees one line on stderr, never a traceback (``-v`` logs it).
    """
    try:
        args = build_parser().parse_args(argv)
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
        return fail(one_line(exc))
    if isinstance(exc, Exception):  # a bug (ours or a library's): still no traceback
        log.debug("%s failed unexpectedly", args.command, exc_info=raised)
        print(
            f"streamstore: unexpected {type(exc).__name__}: {one_line(exc)} "
            "(run with -v for details)",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_SOFTWARE
    raise raised


if __name__ == "__main__":
    sys.exit(main())
