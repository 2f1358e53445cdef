"""Coalescing concurrent calls of one script into pipelines.

A call made while no other is in flight goes straight to the server: no added latency when
idle. Calls made while one is in flight queue up; the first of them becomes the *leader* and
sends everything queued in one pipeline, then hands the lead to the next waiting call, if any.
So 100 concurrent publishers cost a few round trips, not 100, and hold two connections, not
100 — with no background task to own (the store stays usable from any task). The queue is
bounded: beyond it, callers wait for room.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import redis.exceptions
from redis.commands.core import AsyncScript

from streamstore.connection import Client

__all__ = ["ScriptCoalescer"]

MAX_BATCH = 256
"""Calls sent in one pipeline."""
MAX_QUEUED = 4096
"""Calls waiting at most; beyond it callers wait for room."""
RESENDS = 2
"""Times a call is sent again after a missing script or a dropped connection."""


@dataclass(eq=False)
class _Call:
    keys: Sequence[Any]
    args: Sequence[Any]
    wake: anyio.Event = field(default_factory=anyio.Event)
    done: bool = False
    result: Any = None
    error: BaseException | None = None


class ScriptCoalescer:
    """Runs one script for many concurrent callers."""

    def __init__(self, client: Client, script: AsyncScript) -> None:
        self._client = client
        self._script = script
        self._queue: deque[_Call] = deque()
        self._direct = False
        self._leader = False
        self._room = anyio.Semaphore(MAX_QUEUED)

    async def call(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run the script with ``keys`` and ``args``; returns its reply.

        Raises:
            redis.exceptions.RedisError: as the script or the connection raised it (the
                caller translates it at its boundary).
        """
        if not self._direct and not self._leader and not self._queue:
            self._direct = True
            try:
                return await self._script(keys=keys, args=args)
            finally:
                self._direct = False
                self._promote()
        async with self._room:
            pending = _Call(keys, args)
            self._queue.append(pending)
            try:
                if not self._leader:
                    await self._lead(pending)
                while not pending.done:
                    await pending.wake.wait()
                    pending.wake = anyio.Event()
                    if not pending.done and not self._leader:
                        await self._lead(pending)
            finally:
                if not pending.done and pending in self._queue:  # cancelled while queued
                    self._queue.remove(pending)
                    self._promote()
        if pending.error is not None:
            raise pending.error
        return pending.result

    async def _lead(self, own: _Call) -> None:
        """Send what is queued, in pipelines, until our own call is answered."""
        self._leader = True
        try:
            while not own.done and self._queue:
                batch = [self._queue.popleft() for _ in range(min(MAX_BATCH, len(self._queue)))]
                try:
                    await self._send(batch)
                finally:
                    for pending in batch:
                        pending.done = True
                        pending.wake.set()
        finally:
            self._leader = False
            self._promote()

    def _promote(self) -> None:
        """Wake the oldest waiting call so that it leads the next pipeline."""
        if not self._leader and self._queue:
            self._queue[0].wake.set()

    async def _send(self, batch: list[_Call]) -> None:
        """One pipeline of EVALSHA (on a cluster, one per node, sent together); calls that
        found the script missing on their node are sent again after it is loaded, and so are
        calls that met a dropped connection (a cluster pipeline hands those back instead of
        retrying them; publishes are idempotent).

        A pipeline that fails as a whole fails every call of it; a cancelled one too (and the
        cancellation goes on).
        """
        todo = batch
        for attempt in range(RESENDS + 1):
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for pending in todo:
                        pipe.execute_command(
                            "EVALSHA",
                            self._script.sha,
                            len(pending.keys),
                            *pending.keys,
                            *pending.args,
                        )
                    replies = await pipe.execute(raise_on_error=False)
            except anyio.get_cancelled_exc_class():
                for pending in todo:
                    pending.error = redis.exceptions.ConnectionError(
                        "the publishing call was cancelled"
                    )
                raise
            except Exception as exc:
                for pending in todo:
                    pending.error = exc
                return
            again = []
            for pending, reply in zip(todo, replies, strict=True):
                if isinstance(reply, _RESENT) and attempt < RESENDS:
                    again.append(pending)
                elif isinstance(reply, Exception):
                    pending.error = reply
                else:
                    pending.result = reply
            if not again:
                return
            if any(isinstance(reply, redis.exceptions.NoScriptError) for reply in replies):
                await self._client.script_load(self._script.script)  # on every primary
            todo = again


_RESENT = (
    redis.exceptions.NoScriptError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)
"""Replies after which a call is sent again."""
