"""The fast path: where streamstore relies on redis-py's private internals for speed.

Two mixins for redis-py's asyncio connection classes, used only when the installed redis-py is
in the range they were tested with (:data:`TESTED_REDIS`) and ``STREAMSTORE_FAST_PATH`` is not
``off``; otherwise streamstore uses redis-py's public connection API, which the test suite also
runs (``make test`` runs the publish and replay tests again with ``STREAMSTORE_FAST_PATH=off``).

* :class:`HiredisPacking` packs commands with hiredis: ~11 µs less client CPU per command.
* :class:`DirectExchange` writes and reads a held connection's streams itself, with its own
  hiredis reader (``_reader``, ``_writer``, ``redis._parsers``): ~30 µs less per exchange.

:func:`exchange` is the one entry point for a held connection, fast or not.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Sequence
from typing import Any, Final

import hiredis
import redis
import redis.asyncio.connection
import redis.exceptions
from redis._parsers import BaseParser
from redis.typing import EncodableT

__all__ = ["ENABLED", "TESTED_REDIS", "DirectExchange", "HiredisPacking", "exchange"]

TESTED_REDIS: Final = ((8, 1), (8, 3))
"""redis-py versions the fast path was tested with: from the first, up to (not including) the
second. pyproject.toml pins the same range."""


def _enabled(version: str, switch: str | None) -> bool:
    """Whether to take the fast path with this redis-py version and STREAMSTORE_FAST_PATH."""
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    low, high = TESTED_REDIS
    return low <= parts < high and (switch or "on").lower() not in ("off", "0", "no", "false")


ENABLED: Final = _enabled(redis.__version__, os.environ.get("STREAMSTORE_FAST_PATH"))
"""Whether connections pack with hiredis and held connections exchange directly."""


class HiredisPacking:
    """Packs commands with hiredis (C) instead of redis-py's Python code, which costs about
    11 µs more per command: a tenth of a publish. Same bytes on the wire."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str):  # "SCRIPT LOAD" and the like are several words
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        return [hiredis.pack_command(args)]

    def pack_commands(self, commands: Iterable[Iterable[Any]]) -> list[bytes]:
        return [b"".join(self.pack_command(*command)[0] for command in commands)]


class DirectExchange(redis.asyncio.connection.AbstractConnection):
    """Sends commands and reads their replies straight on the connection's streams, with a
    hiredis reader of its own: for a connection held out of the pool by one owner
    (:mod:`streamstore.redis.held`, through :func:`exchange`). redis-py's ``send_packed_command``
    and ``read_response`` add health checks, a timeout context per reply,
    maintenance-notification and push handling and observability hooks: about 30 µs of CPU
    per exchange on top of the ~50 µs that the loopback round trip itself costs the event
    loop here."""

    _exchange_reader: hiredis.Reader | None = None
    _exchange_stream: asyncio.StreamReader | None = None  # the link the reader was made for

    async def exchange(self, packed: bytes, count: int) -> list[Any]:
        """Write ``packed`` (``count`` commands) and return one reply per command, a refusal
        as its :class:`~redis.exceptions.ResponseError` in its place; all replies are read
        within ``socket_timeout``. The caller drops the connection when this raises (replies
        may be left unread).

        Raises:
            redis.exceptions.ConnectionError: the link is closed or failed, or the server is
                loading its data set.
            redis.exceptions.TimeoutError: the replies did not all come within
                ``socket_timeout``.
        """
        if not self.is_connected:
            # As send_packed_command does: the handshake once (the caller's retries repeat
            # it), not connect()'s own retry loop around it.
            await self.connect_check_health(check_health=False)
        stream, writer = self._reader, self._writer
        if stream is None or writer is None:  # closed under us by another task
            raise redis.exceptions.ConnectionError(f"{self._host_error()}: connection closed")
        reader = self._exchange_reader
        if reader is None or self._exchange_stream is not stream:  # a new link
            reader = self._exchange_reader = hiredis.Reader(
                protocolError=redis.exceptions.InvalidResponse,
                replyError=BaseParser.parse_error,
                notEnoughData=_NOT_ENOUGH_DATA,
            )
            self._exchange_stream = stream
        replies: list[Any] = []
        try:
            writer.write(packed)
            async with asyncio.timeout(self.socket_timeout):
                while len(replies) < count:
                    reply = reader.gets()
                    if reply is _NOT_ENOUGH_DATA:
                        data = await stream.read(_READ_SIZE)
                        if not data:
                            raise redis.exceptions.ConnectionError(
                                f"{self._host_error()}: connection closed by the server"
                            )
                        reader.feed(data)
                    elif isinstance(reply, redis.exceptions.ConnectionError):
                        raise reply  # LOADING: retried like a lost link
                    else:
                        replies.append(reply)
        except TimeoutError as exc:
            raise redis.exceptions.TimeoutError(
                f"Timeout reading from {self._host_error()}"
            ) from exc
        except OSError as exc:
            raise redis.exceptions.ConnectionError(f"{self._host_error()}: {exc}") from exc
        return replies


_NOT_ENOUGH_DATA: Final = object()
_READ_SIZE: Final = 65536


async def exchange(
    connection: redis.asyncio.connection.AbstractConnection,
    commands: Sequence[Sequence[EncodableT]],
) -> list[Any]:
    """Send ``commands`` in one write and read one reply each, a refusal as its
    :class:`~redis.exceptions.ResponseError` in its place: directly on a
    :class:`DirectExchange` connection, else through redis-py's public connection API.

    Raises:
        redis.exceptions.ConnectionError, redis.exceptions.TimeoutError: the link failed.
    """
    if isinstance(connection, DirectExchange):
        packed = b"".join(connection.pack_commands(commands))
        return await connection.exchange(packed, len(commands))
    await connection.send_packed_command(connection.pack_commands(commands))
    replies: list[Any] = []
    for _ in commands:
        try:
            replies.append(await connection.read_response())
        except redis.exceptions.ResponseError as refused:
            replies.append(refused)
    return replies
