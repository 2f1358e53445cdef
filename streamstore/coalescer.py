"""Coalescing concurrent publishes into few script calls.

A publish made while no other is in flight goes straight to the server: no added latency when
idle. Publishes made while one is in flight queue up; the first of them becomes the *leader*
and sends everything queued: the batches of many callers merged into one call of the publish
script (on a cluster, one call per partition, since a script may only touch one slot), all
calls in one pipeline. When the round is answered, every waiting publish wakes: the answered
ones return and the first of the others leads the next round. So 100 concurrent publishers
cost a few round trips and a few script runs, not 100 of each, and hold two connections (kept
out of the pool, see :mod:`streamstore.held`), not 100 — with no background task to own (the
store stays usable from any task). The queue is bounded: beyond it, callers wait for a round.

Each caller's batch stays atomic on its own inside a merged call (publish.lua checks and
answers it separately), so merging changes no outcome, only the cost.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import redis.exceptions
from redis.commands.core import AsyncScript

from streamstore.connection import Client
from streamstore.held import HeldConnection, held_connection

__all__ = ["PublishBatch", "PublishCoalescer"]

MAX_BATCH = 1000
"""Messages in one publish call at most: a bound on how long one script call holds the
server (and on the arguments its Lua unpacks at once)."""
MAX_MESSAGES = 512
"""Messages merged into one script call (a longer script would hold up the server)."""
MAX_CALLS = 64
"""Script calls sent in one pipeline."""
MAX_QUEUED = 4096
"""Publishes waiting at most; beyond it callers wait for a round to be answered."""
RESENDS = 2
"""Times a call is sent again after a missing script or a dropped connection."""


@dataclass(frozen=True, slots=True)
class PublishBatch:
    """One caller's messages for one session: the script's six keys for it, the session id,
    the flattened (message id, payload) pairs, and the partition (which decides, on a
    cluster, the node that runs it)."""

    keys: Sequence[str]
    session_id: str
    pairs: Sequence[str | bytes]
    partition: int


@dataclass(eq=False, slots=True)
class _Pending:
    batch: PublishBatch
    done: bool = False
    result: list[Any] | None = None
    error: BaseException | None = None

    def answer(self) -> list[Any]:
        """The result, or the error raised."""
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class PublishCoalescer:
    """Runs publish.lua for many concurrent callers.

    ``high_water`` and ``dedup_lifetime_ms`` are the script's per-deployment arguments;
    ``by_partition`` splits merged calls per partition (a cluster's slots).
    """

    def __init__(
        self,
        client: Client,
        script: AsyncScript,
        *,
        high_water: int,
        dedup_lifetime_ms: int,
        by_partition: bool,
    ) -> None:
        self._client = client
        self._script = script
        self._settings = (high_water, dedup_lifetime_ms)
        self._by_partition = by_partition
        self._queue: deque[_Pending] = deque()
        self._busy = False  # a publish is in flight on its own
        self._leader = False
        self._answered: anyio.Event | None = None  # set when a round of publishes is answered
        # The direct path and the leader may each have an exchange in flight: one held
        # connection each (on a cluster, whose calls go to several nodes, the pipeline
        # does the routing).
        self._held_direct = held_connection(client)
        self._held_leader = held_connection(client)

    async def publish(self, batch: PublishBatch) -> list[Any]:
        """Publish ``batch``; returns the script's answer for it: stream id and 1 (new) or 0
        (duplicate) per message, flattened.

        Raises:
            redis.exceptions.ResponseError: the script refused the batch (SSNOSESSION,
                SSCLOSED <state>, SSBACKPRESSURE, SSWRONGTYPE ...).
            redis.exceptions.RedisError: as the connection raised it (the caller translates
                it at its boundary).
        """
        pending = _Pending(batch)
        if not self._busy and not self._leader and not self._queue:
            self._busy = True
            try:
                await self._send([[pending]], self._held_direct)
            finally:
                self._busy = False
                self._next_round()
            return pending.answer()
        while len(self._queue) >= MAX_QUEUED:
            await self._round().wait()
        self._queue.append(pending)
        try:
            while not pending.done:
                if self._leader:
                    await self._round().wait()
                else:
                    await self._lead(pending)
        finally:
            if not pending.done and pending in self._queue:  # cancelled while queued
                self._queue.remove(pending)
                self._next_round()
        return pending.answer()

    async def release(self) -> None:
        """Give the held connections back to the pool (the coalescer stays usable)."""
        for held in (self._held_direct, self._held_leader):
            if held is not None:
                await held.release()

    async def _lead(self, own: _Pending) -> None:
        """Send what is queued, in pipelines, until our own publish is answered; but first
        let the publishes that are ready to run join the queue (one scheduling round)."""
        self._leader = True
        try:
            await anyio.lowlevel.checkpoint()
            while not own.done and self._queue:
                calls = self._take()
                try:
                    await self._send(calls, self._held_leader)
                finally:
                    for call in calls:
                        for pending in call:
                            pending.done = True
                    self._next_round()
        finally:
            self._leader = False
            self._next_round()

    def _round(self) -> anyio.Event:
        """The event set when the publishes in flight are answered."""
        if self._answered is None:
            self._answered = anyio.Event()
        return self._answered

    def _next_round(self) -> None:
        """Wake every waiting publish: the answered ones return, the first of the others
        leads the next round."""
        if self._answered is not None:
            self._answered.set()
            self._answered = None

    def _take(self) -> list[list[_Pending]]:
        """Take queued publishes off the queue, grouped into script calls: in queue order,
        at most :data:`MAX_MESSAGES` per call (a larger batch goes alone), one partition per
        call when ``by_partition``, at most :data:`MAX_CALLS` calls."""
        calls: list[list[_Pending]] = []
        sizes: list[int] = []
        open_call: dict[int, int] = {}  # route -> index of the call still taking batches
        while self._queue:
            pending = self._queue[0]
            size = len(pending.batch.pairs) // 2
            route = pending.batch.partition if self._by_partition else 0
            index = open_call.get(route)
            if index is None or sizes[index] + size > MAX_MESSAGES:
                if len(calls) == MAX_CALLS:
                    break
                index = open_call[route] = len(calls)
                calls.append([])
                sizes.append(0)
            self._queue.popleft()
            calls[index].append(pending)
            sizes[index] += size
        return calls

    def _call_of(self, batches: Sequence[PublishBatch]) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of one publish.lua call carrying ``batches``."""
        high_water, lifetime_ms = self._settings
        keys: list[str] = []
        args: list[Any] = [repr(time.time()), lifetime_ms, high_water]
        for batch in batches:
            keys.extend(batch.keys)
            args.append(batch.session_id)
            args.append(len(batch.pairs) // 2)
            args.extend(batch.pairs)
        return keys, args

    async def _send(self, calls: list[list[_Pending]], held: HeldConnection | None) -> None:
        """The calls' EVALSHA in one exchange; calls that found the script missing (on their
        node) are sent again after it is loaded, and so are calls that met a dropped
        connection (a cluster pipeline hands those back instead of retrying them; publishes
        are idempotent).

        An exchange that fails as a whole fails every publish of it; a cancelled one too (and
        the cancellation goes on).
        """
        todo = calls
        for attempt in range(RESENDS + 1):
            commands = []
            for call in todo:
                keys, args = self._call_of([pending.batch for pending in call])
                commands.append(("EVALSHA", self._script.sha, len(keys), *keys, *args))
            try:
                replies = await self._exchange(commands, held)
            except anyio.get_cancelled_exc_class():
                _fail(todo, redis.exceptions.ConnectionError("the publishing call was cancelled"))
                raise
            except Exception as exc:
                _fail(todo, exc)
                return
            again = []
            for call, reply in zip(todo, replies, strict=True):
                if isinstance(reply, _RESENT) and attempt < RESENDS:
                    again.append(call)
                elif isinstance(reply, Exception):
                    _fail([call], reply)
                else:
                    _answer(call, reply)
            if not again:
                return
            if any(isinstance(reply, redis.exceptions.NoScriptError) for reply in replies):
                await self._client.script_load(self._script.script)  # on every primary
            todo = again

    async def _exchange(
        self, commands: list[tuple[Any, ...]], held: HeldConnection | None
    ) -> list[Any]:
        """Replies to ``commands`` (refusals in place): on the held connection if there is
        one, else through a pipeline (on a cluster: to the nodes owning the keys).

        Raises:
            redis.exceptions.RedisError: the exchange failed as a whole (after the client's
                retries).
        """
        if held is not None:
            return await held.exchange(commands)
        async with self._client.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            return await pipe.execute(raise_on_error=False)


def _answer(call: list[_Pending], reply: list[Any]) -> None:
    """Give each publish of ``call`` its part of the script's flat reply: after ``ok``, a
    stream id and a flag per message of its batch; else the refusal alone, raised to it as a
    :class:`~redis.exceptions.ResponseError`."""
    at = 0
    for pending in call:
        status = reply[at]
        if status == b"ok":
            end = at + 1 + len(pending.batch.pairs)
            pending.result = reply[at + 1 : end]
            at = end
        else:
            pending.error = redis.exceptions.ResponseError(status.decode("utf-8", "replace"))
            at += 1


def _fail(calls: list[list[_Pending]], error: BaseException) -> None:
    for call in calls:
        for pending in call:
            pending.error = error


_RESENT = (
    redis.exceptions.NoScriptError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)
"""Replies after which a call is sent again."""
