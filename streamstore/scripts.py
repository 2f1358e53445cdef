"""The server-side Lua scripts, loaded once per client and called by SHA.

redis-py's ``Script`` objects reload a script transparently when the server answers NOSCRIPT
(after a restart or SCRIPT FLUSH), in plain calls and in pipelines alike. The methods here lay
out each script's KEYS and ARGV in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript

from streamstore.keys import GROUP, Keyspace
from streamstore.models import StreamId

__all__ = ["Scripts"]


def _load(client: Redis, name: str) -> AsyncScript:
    source = resources.files("streamstore").joinpath("lua", f"{name}.lua").read_text("utf-8")
    return client.register_script(source)


@dataclass(frozen=True, slots=True)
class Scripts:
    """The scripts, registered on one client."""

    publish: AsyncScript
    create_session: AsyncScript
    read_tail: AsyncScript
    _advance: AsyncScript
    _end_session: AsyncScript
    _retire: AsyncScript
    _reap_consumer: AsyncScript

    @classmethod
    def register(cls, client: Redis) -> Scripts:
        """Register every script on ``client`` (no round trip until first use)."""
        return cls(
            publish=_load(client, "publish"),
            create_session=_load(client, "create_session"),
            read_tail=_load(client, "read_tail"),
            _advance=_load(client, "advance"),
            _end_session=_load(client, "end_session"),
            _retire=_load(client, "retire"),
            _reap_consumer=_load(client, "reap_consumer"),
        )

    async def advance(
        self,
        keys: Keyspace,
        partition: int,
        *,
        now_ms: int,
        hot_ms: int,
        marks: Sequence[tuple[str, StreamId, bytes]] = (),
        client: Redis | Pipeline | None = None,
    ) -> Any:
        """Raise watermarks from ``marks`` (session, newest stream id, its feed id), apply
        deferred ones, trim session streams and the feed (see advance.lua)."""
        args: list[Any] = [
            GROUP,
            now_ms,
            hot_ms,
            keys.meta_prefix(partition),
            keys.stream_prefix(partition),
        ]
        for session_id, mark, feed_id in marks:
            args += [session_id, str(mark), feed_id]
        return await self._advance(
            keys=[keys.feed(partition), keys.deferred(partition)], args=args, client=client
        )

    async def end_session(
        self,
        keys: Keyspace,
        session_id: str,
        *,
        state: str,
        now: float,
        snapshot: bytes,
        tombstone_ms: int,
        idle_before: float | None = None,
    ) -> Any:
        """Close or delete a session (see end_session.lua); with ``idle_before``, only if its
        idle deadline is still at or before that time."""
        session = keys.session(session_id)
        return await self._end_session(
            keys=[
                session.meta,
                session.stream,
                session.index,
                session.deadlines,
                keys.closing(session.partition),
                session.feed,
            ],
            args=[
                session_id,
                state,
                repr(now),
                snapshot,
                tombstone_ms,
                "" if idle_before is None else repr(idle_before),
            ],
        )

    async def retire(self, keys: Keyspace, session_id: str, *, tombstone_ms: int) -> Any:
        """Drop a closed session's stream once all of it is persisted (see retire.lua)."""
        session = keys.session(session_id)
        return await self._retire(
            keys=[session.meta, session.stream, session.index, keys.closing(session.partition)],
            args=[session_id, tombstone_ms],
        )

    async def reap_consumer(
        self, keys: Keyspace, partition: int, consumer: bytes, *, idle_ms: int
    ) -> Any:
        """Remove an idle consumer that holds nothing pending (see reap_consumer.lua)."""
        return await self._reap_consumer(
            keys=[keys.feed(partition)], args=[GROUP, consumer, idle_ms]
        )
