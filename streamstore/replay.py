"""Reading a session across both tiers, history then the Redis stream then live, with no gap.

The rule that makes it gapless: a session stream is trimmed only below its *floor*, and every
message below the floor is already in history. Each step reads the stream and the floor in one
atomic script; whatever lies between the reader's cursor and the floor comes from history, the
rest from the stream. A live read (XREAD BLOCK) is pipelined with a read of the floor, and its
result is discarded if the floor passed the cursor meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

import anyio

from streamstore.codec import F_DATA, decode_message
from streamstore.deployment import Deployment
from streamstore.errors import (
    ConnectionLostError,
    CorruptEntryError,
    ServerError,
    translate_redis_errors,
)
from streamstore.models import STREAM_START, Message, SessionState, StreamId
from streamstore.redis.connection import is_transient

__all__ = ["SessionReader"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_END = StreamId(2**63 - 1, 2**63 - 1)
"""Above every real stream id: the floor of a session that lives only in history."""

PAGE = 500
"""Stream entries read per step from Redis."""
HISTORY_PAGE = 2000
"""Messages read per call from history (one thread hop and one query each)."""


class SessionReader:
    """Gapless reads of one session for ``replay``, ``subscribe`` and ``history``."""

    def __init__(self, deployment: Deployment) -> None:
        self._topology = deployment.topology
        self._scripts = deployment.scripts
        self._history = deployment.history
        self._keys = deployment.keys
        self._settings = deployment.settings

    async def follow(
        self, session_id: str, *, after: StreamId, follow: bool, history_page: int | None = None
    ) -> AsyncGenerator[list[Message], None]:
        """Every message with stream id > ``after``, in order, each once; with ``follow``, then
        the live ones until the session is closed. They come in pages (non-empty lists) as
        read, so a caller's own generator is the only one that a message passes through.
        ``history_page`` caps the messages read from history per call (default
        :data:`HISTORY_PAGE`), for a caller that wants few.

        Raises:
            ConnectionLostError: the server stayed unreachable for ``reconnect_timeout``.
        """
        page_size = history_page or HISTORY_PAGE
        cursor = after
        while True:
            state, floor, entries = await self._snapshot(session_id, "fwd", cursor, PAGE)
            while floor > cursor:  # the part below the floor: in history only
                older = await self._history.read(
                    session_id, after=cursor, before=floor, limit=page_size
                )
                if older:
                    yield older
                    cursor = older[-1].stream_id or cursor
                if len(older) < page_size:
                    break
            if entries:
                yield entries
                cursor = entries[-1].stream_id or cursor
            if len(entries) == PAGE:
                continue
            if not follow or state is not SessionState.ACTIVE:
                return
            live = self._live(session_id, cursor)
            async with contextlib.aclosing(live):
                async for page in live:
                    cursor = page[-1].stream_id or cursor
                    yield page

    async def page(
        self,
        session_id: str,
        *,
        limit: int,
        before: StreamId | None,
        after: StreamId | None,
    ) -> list[Message]:
        """A window of at most ``limit`` messages in ascending order: the first ones after
        ``after`` if it is given, else the last ones before ``before`` (or the newest)."""
        if after is not None:
            out: list[Message] = []
            pages = self.follow(
                session_id, after=after, follow=False, history_page=min(limit, HISTORY_PAGE)
            )
            async with contextlib.aclosing(pages):
                async for page in pages:
                    out.extend(page)
                    if len(out) >= limit:
                        break
            return out[:limit]
        top = "+" if before is None else str(before)
        _, floor, entries = await self._snapshot(session_id, "rev", top, limit)
        newest = list(reversed(entries))
        missing = limit - len(newest)
        if missing > 0 and floor > STREAM_START:
            bound = min(floor, before or _END)
            if newest and newest[0].stream_id is not None:
                bound = min(bound, newest[0].stream_id)
            older = await self._history.read(
                session_id, before=bound, limit=missing, newest_first=True
            )
            newest = list(reversed(older)) + newest
        return newest

    async def _snapshot(
        self, session_id: str, direction: str, bound: StreamId | str, count: int
    ) -> tuple[SessionState | None, StreamId, list[Message]]:
        keys = self._keys.session(session_id)
        raw = await self._retrying(
            lambda: self._scripts.read_tail(
                keys=[keys.meta, keys.stream], args=[direction, str(bound), count]
            )
        )
        state_raw, floor_raw, entries = raw
        if not state_raw:  # no live keys: the session is entirely in history (or unknown)
            return None, _END, []
        floor = StreamId.parse(floor_raw) if floor_raw else STREAM_START
        return SessionState(state_raw.decode()), floor, self._decode(session_id, entries)

    async def _live(self, session_id: str, cursor: StreamId) -> AsyncGenerator[list[Message], None]:
        """Blocking reads after ``cursor``, a page (non-empty) per read that found messages;
        returns when the floor passes the cursor (the caller then catches up from history) or
        the session stops being active."""
        keys = self._keys.session(session_id)
        block_ms = max(1, int(self._settings.block_s * 1000))
        # A follower reads again and again: on one server it keeps a connection (a blocking
        # read holds one anyway) rather than check one out of the pool for every read.
        held = self._topology.held()

        async def read() -> list[Any]:
            # Both keys are in one slot: on a cluster too, one round trip to one node.
            xread = ("XREAD", "COUNT", PAGE, "BLOCK", block_ms, "STREAMS", keys.stream, str(cursor))
            meta = ("HMGET", keys.meta, "floor", "state")
            if held is not None:
                replies = await held.exchange([xread, meta])
            else:
                client = self._topology.client
                async with client.pipeline(transaction=False) as pipe:
                    pipe.execute_command(*xread, **self._topology.route(keys.stream))
                    pipe.execute_command(*meta)
                    replies = await pipe.execute(raise_on_error=False)
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            return replies

        try:
            while True:
                streams, (floor_raw, state_raw) = await self._retrying(read)
                floor = StreamId.parse(floor_raw) if floor_raw else STREAM_START
                if not state_raw or floor > cursor:
                    return
                entries = streams[0][1] if streams else []
                if entries:
                    # Past every entry read, the undecodable ones too (skipped, not re-read).
                    cursor = StreamId.parse(entries[-1][0])
                    page = self._decode(session_id, entries)
                    if page:
                        yield page
                if not entries and state_raw != b"active":
                    return
        finally:
            if held is not None:
                await held.release()

    @staticmethod
    def _decode(session_id: str, entries: list[Any]) -> list[Message]:
        out = []
        for entry_id, fields in entries:
            # XREAD replies come parsed into a dict; a script's XRANGE reply is a flat list.
            data = fields.get(F_DATA) if isinstance(fields, dict) else _flat_get(fields, F_DATA)
            try:
                out.append(decode_message(session_id, StreamId.parse(entry_id), data))
            except CorruptEntryError:
                # Only the publish script writes session streams; a foreign entry is skipped
                # here (the feed copy is dead-lettered by the persister).
                log.warning("skipping undecodable entry %s in session %s", entry_id, session_id)
        return out

    async def _retrying(self, call: Callable[[], Awaitable[_T]]) -> _T:
        """Run a read, retrying lost connections (and a cluster that is down or moving a
        slot) with backoff for ``reconnect_timeout``."""
        deadline = time.monotonic() + self._settings.reconnect_timeout_s
        delay = 0.05
        while True:
            try:
                with translate_redis_errors():
                    return await call()
            except (ConnectionLostError, ServerError) as exc:
                if not is_transient(exc) or time.monotonic() + delay > deadline:
                    raise
                log.info("%s while reading; retrying in %.2f s", exc, delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)


def _flat_get(fields: list[bytes], name: bytes) -> bytes | None:
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == name:
            return fields[i + 1]
    return None
