"""The server-side Lua scripts, loaded once per client and called by SHA.

redis-py's ``Script`` objects reload a script transparently when the server answers NOSCRIPT
(after a restart or SCRIPT FLUSH) in plain calls; a script queued in a pipeline is sent as a
bare EVALSHA (a cluster pipeline takes no other form), and whoever executes the pipeline loads
the scripts (:meth:`Scripts.load`) and sends it again on NOSCRIPT. The methods here lay out each
script's KEYS and ARGV in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline
from redis.commands.core import AsyncScript

from streamstore.codec import encode_session
from streamstore.errors import name_script
from streamstore.keys import GROUP, Keyspace
from streamstore.models import Session, StreamId
from streamstore.redis.connection import Client

__all__ = ["ROLES", "Scripts"]

ROLES: Final = {
    "publish": "producer",
    "create_session": "producer",
    "end_session": "producer",
    "read_tail": "subscriber",
    "advance": "persister",
    "retire": "sweeper",
    "reap_consumer": "sweeper",
    "deployment": "worker",
}
"""Each script, and the role of deploy/users.acl whose work it is (named by ACL refusals)."""


def _load(client: Client, name: str) -> AsyncScript:
    source = resources.files("streamstore.redis").joinpath("lua", f"{name}.lua").read_text("utf-8")
    script = client.register_script(source)
    name_script(script.sha, name.replace("_", " "), ROLES[name])
    return script


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
    _deployment: AsyncScript

    @classmethod
    def register(cls, client: Client) -> Scripts:
        """Register every script on ``client`` (no round trip until first use)."""
        return cls(
            publish=_load(client, "publish"),
            create_session=_load(client, "create_session"),
            read_tail=_load(client, "read_tail"),
            _advance=_load(client, "advance"),
            _end_session=_load(client, "end_session"),
            _retire=_load(client, "retire"),
            _reap_consumer=_load(client, "reap_consumer"),
            _deployment=_load(client, "deployment"),
        )

    async def load(self, client: Client) -> None:
        """SCRIPT LOAD every script (on a cluster: on every primary).

        Raises:
            redis.exceptions.RedisError: as the server or the connection raised it.
        """
        for script in (
            self.publish,
            self.create_session,
            self.read_tail,
            self._advance,
            self._end_session,
            self._retire,
            self._reap_consumer,
            self._deployment,
        ):
            await client.script_load(script.script)

    async def deployment_epoch(self, keys: Keyspace, epoch: str, *, now: float) -> tuple[str, str]:
        """The deployment's epoch, given it (``epoch``) if it has none, and what was found:
        ``"kept"``, ``"new"`` or ``"lost"`` (a partition count without an epoch: the server
        lost data; see deployment.lua).

        Raises:
            redis.exceptions.RedisError: as the server or the connection raised it.
        """
        found, state = await self._deployment(keys=[keys.deployment], args=[epoch, repr(now)])
        return found.decode(), state.decode()

    async def advance(self, keys: Keyspace, partition: int, *, now_ms: int, hot_ms: int) -> Any:
        """Apply a partition's deferred watermarks, trim its session streams and its feed
        (see advance.lua)."""
        call_keys, args = _advance_call(keys, partition, now_ms, hot_ms, ())
        return await self._advance(keys=call_keys, args=args)

    def queue_advance(
        self,
        pipe: Pipeline | ClusterPipeline,
        keys: Keyspace,
        partition: int,
        *,
        now_ms: int,
        hot_ms: int,
        marks: Sequence[tuple[str, StreamId, bytes]],
    ) -> None:
        """Queue :meth:`advance` in ``pipe``, raising watermarks from ``marks`` (session,
        newest stream id, its feed id) first; its reply is NoScriptError when the server
        lacks the script (then :meth:`load` and send the pipeline again)."""
        call_keys, args = _advance_call(keys, partition, now_ms, hot_ms, marks)
        pipe.execute_command("EVALSHA", self._advance.sha, len(call_keys), *call_keys, *args)

    async def end_session(
        self,
        keys: Keyspace,
        ended: Session,
        *,
        now: float,
        tombstone_ms: int,
        idle_before: float | None = None,
    ) -> Any:
        """Close or delete a session (see end_session.lua): ``ended`` is its snapshot in the
        new state, sent down the feed to history; with ``idle_before``, only if its idle
        deadline is still at or before that time. Returns the state it had (None: no live
        keys)."""
        session = keys.session(ended.id)
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
                ended.id,
                str(ended.state),
                repr(now),
                encode_session(ended),
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


def _advance_call(
    keys: Keyspace,
    partition: int,
    now_ms: int,
    hot_ms: int,
    marks: Sequence[tuple[str, StreamId, bytes]],
) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of advance.lua."""
    args: list[Any] = [
        GROUP,
        now_ms,
        hot_ms,
        keys.meta_prefix(partition),
        keys.stream_prefix(partition),
    ]
    for session_id, mark, feed_id in marks:
        args += [session_id, str(mark), feed_id]
    return [keys.feed(partition), keys.deferred(partition)], args
