"""One server or a Redis Cluster: the one place that knows which, and what differs between them.

Every script touches the keys of one partition, which share a hash tag and so one slot: most
calls are the same on both. What differs is answered here, and nowhere else asks:

* a held connection (one server) or none (a cluster routes every command by its keys);
* where a keyless command goes, and where a blocking read goes without a key lookup first;
* INFO of the server, or of every primary;
* commands that must happen together: one MULTI on one server, in order on a cluster;
* reading the feeds through the consumer group: one blocking XREADGROUP on one server, one
  non-blocking XREADGROUP per feed on a cluster (a command may not span slots);
* whether publishes are merged into one script call per partition (a cluster) or across
  partitions (one server).

A server inside this process (``memory://``, fakeredis) is a single server whose connections
have no socket: no held connections (pipelines serve its hot paths), and INFO, which fakeredis
does not implement, is answered from what it is by nature (see :class:`_InProcess`).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, Final

import anyio
import redis.asyncio.connection
from redis.asyncio import Redis, RedisCluster
from redis.typing import EncodableT

from streamstore.redis.connection import DEFAULT_PORT, Client
from streamstore.redis.held import HeldConnection
from streamstore.redis.inprocess import VERSION as IN_PROCESS_VERSION
from streamstore.redis.inprocess import in_process_url

__all__ = ["CLUSTER_IDLE_POLL", "Topology", "topology_of"]

Command = Sequence[EncodableT]

CLUSTER_IDLE_POLL: Final = 0.05
"""On a cluster, the pause after a group read found every feed empty (capped by ``block``)."""


class Topology(abc.ABC):
    """What differs between a single server and a cluster, for one client."""

    merges_per_partition: bool
    """Whether a merged script call may hold only one partition's batches (one slot)."""

    in_process: bool = False
    """Whether the server runs inside this process (``memory://``): it keeps nothing past the
    process, has no append-only file to replay and no ACL users to check."""

    @property
    @abc.abstractmethod
    def client(self) -> Client:
        """The redis-py client."""

    @abc.abstractmethod
    def held(self) -> HeldConnection | None:
        """A connection to keep out of the pool for a hot path (None: use pipelines)."""

    @abc.abstractmethod
    def route(self, key: str) -> dict[str, Any]:
        """Keyword arguments that send a command on ``key`` straight to its node.

        Give them to XREAD and XREADGROUP: a cluster client would otherwise ask a node for
        the command's keys (COMMAND GETKEYS) before each call."""

    @abc.abstractmethod
    def any_node(self) -> dict[str, Any]:
        """Keyword arguments sending a keyless command (HELLO, ACL DRYRUN) to one node."""

    @abc.abstractmethod
    async def infos(self, *section: str) -> list[dict[str, Any]]:
        """INFO of the server, or of every primary.

        Raises:
            redis.exceptions.RedisError: as the server or the connection raised it.
        """

    @abc.abstractmethod
    async def together(self, *steps: Sequence[Command]) -> None:
        """Run the steps' commands together: in one MULTI on one server; on a cluster, whose
        keys may lie in several slots, step after step, so that a failure leaves the earlier
        steps done and the later not (order them so that repeating them all is harmless).

        Raises:
            redis.exceptions.RedisError: as the server or the connection raised it.
        """

    @abc.abstractmethod
    async def read_group(
        self,
        group: str,
        consumer: str,
        feeds: Sequence[str],
        start: str,
        *,
        count: int,
        block_ms: int | None,
    ) -> list[Any]:
        """XREADGROUP on every feed: ``>`` for new entries, ``0`` for the consumer's pending
        ones; ``[(feed, [(entry id, fields), ...]), ...]``. With ``block_ms``, waits up to that
        long for new entries when there are none (on a cluster, :data:`CLUSTER_IDLE_POLL` at
        most, since each feed is read without blocking).

        Raises:
            redis.exceptions.RedisError: as the server or the connection raised it (on a
                cluster, after the other nodes were read: what they delivered stays pending).
        """

    @abc.abstractmethod
    async def describe(self) -> str:
        """``single node`` or ``cluster of N primaries``.

        Raises:
            redis.exceptions.RedisError: a cluster's layout could not be read.
        """

    @abc.abstractmethod
    def address(self) -> str:
        """The server's address as a URL without credentials, for messages."""

    @abc.abstractmethod
    def uses_tls(self) -> bool:
        """Whether the connections speak TLS."""


class _SingleServer(Topology):
    merges_per_partition = False

    def __init__(self, client: Redis) -> None:
        self._client = client

    @property
    def client(self) -> Redis:
        return self._client

    def held(self) -> HeldConnection | None:
        return HeldConnection(self._client)

    def route(self, key: str) -> dict[str, Any]:
        return {}

    def any_node(self) -> dict[str, Any]:
        return {}

    async def infos(self, *section: str) -> list[dict[str, Any]]:
        return [await self._client.info(*section)]

    async def together(self, *steps: Sequence[Command]) -> None:
        async with self._client.pipeline(transaction=True) as pipe:
            for step in steps:
                for command in step:
                    pipe.execute_command(*command)
            await pipe.execute()

    async def read_group(
        self,
        group: str,
        consumer: str,
        feeds: Sequence[str],
        start: str,
        *,
        count: int,
        block_ms: int | None,
    ) -> list[Any]:
        reply = await self._client.xreadgroup(
            group, consumer, dict.fromkeys(feeds, start), count=count, block=block_ms
        )
        return list(reply or [])

    async def describe(self) -> str:
        return "single node"

    def address(self) -> str:
        kwargs = self._client.connection_pool.connection_kwargs
        if "path" in kwargs:
            return f"unix://{kwargs['path']}"
        scheme = "rediss" if self.uses_tls() else "redis"
        return f"{scheme}://{kwargs.get('host', 'localhost')}:{kwargs.get('port', DEFAULT_PORT)}"

    def uses_tls(self) -> bool:
        connection_class: type = self._client.connection_pool.connection_class
        return issubclass(connection_class, redis.asyncio.connection.SSLConnection)


class _Cluster(Topology):
    merges_per_partition = True

    def __init__(self, client: RedisCluster) -> None:
        self._client = client

    @property
    def client(self) -> RedisCluster:
        return self._client

    def held(self) -> None:
        return None

    def route(self, key: str) -> dict[str, Any]:
        return {"target_nodes": self._client.get_node_from_key(key)}

    def any_node(self) -> dict[str, Any]:
        return {"target_nodes": self._client.get_default_node()}

    async def infos(self, *section: str) -> list[dict[str, Any]]:
        await self._client.initialize()
        return [
            await self._client.info(*section, target_nodes=node)
            for node in self._client.get_primaries()
        ]

    async def together(self, *steps: Sequence[Command]) -> None:
        for step in steps:
            async with self._client.pipeline(transaction=False) as pipe:
                for command in step:
                    pipe.execute_command(*command)
                await pipe.execute()

    async def read_group(
        self,
        group: str,
        consumer: str,
        feeds: Sequence[str],
        start: str,
        *,
        count: int,
        block_ms: int | None,
    ) -> list[Any]:
        async with self._client.pipeline(transaction=False) as pipe:
            for feed in feeds:
                pipe.execute_command(
                    *("XREADGROUP", "GROUP", group, consumer, "COUNT", count),
                    *("STREAMS", feed, start),
                    **self.route(feed),
                )
            replies: list[Any] = await pipe.execute()
        streams = [stream for reply in replies for stream in reply or []]
        if not any(entries for _, entries in streams) and block_ms is not None:
            await anyio.sleep(min(CLUSTER_IDLE_POLL, block_ms / 1000))
        return streams

    async def describe(self) -> str:
        await self._client.initialize()  # done already by the checks at open: nothing is sent
        primaries = len(self._client.get_primaries())
        return f"cluster of {primaries} {'primary' if primaries == 1 else 'primaries'}"

    def address(self) -> str:
        scheme = "rediss" if self.uses_tls() else "redis"
        nodes = ",".join(self._client.nodes_manager.startup_nodes)  # "host:port" names
        return f"{scheme}+cluster://{nodes}"

    def uses_tls(self) -> bool:
        connection_class = self._client.get_connection_kwargs().get("connection_class")
        return isinstance(connection_class, type) and issubclass(
            connection_class, redis.asyncio.connection.SSLConnection
        )


class _InProcess(_SingleServer):
    """A fakeredis server inside this process (``memory://``).

    fakeredis answers neither INFO nor ACL DRYRUN: its INFO is what it is by nature (it never
    evicts, has no append-only file, no memory accounting). Its connections have no socket
    for a held connection to exchange on directly; each command is served in the event loop.
    """

    in_process = True

    def __init__(self, client: Redis, url: str) -> None:
        super().__init__(client)
        self._url = url

    def held(self) -> None:
        return None

    async def infos(self, *section: str) -> list[dict[str, Any]]:
        await self._client.ping()  # a round trip, as INFO would be: errors surface alike
        return [
            {
                "redis_version": ".".join(map(str, (*IN_PROCESS_VERSION, 0))),
                "redis_mode": "standalone",
                "maxmemory_policy": "noeviction",
                "aof_enabled": 0,
                "used_memory": 0,
                "cluster_enabled": 0,
            }
        ]

    async def describe(self) -> str:
        return "single node in this process (fakeredis)"

    def address(self) -> str:
        return self._url

    def uses_tls(self) -> bool:
        return False


def topology_of(client: Client) -> Topology:
    """The topology of a client made by :func:`streamstore.redis.connection.connect` (or any
    redis-py asyncio client)."""
    if isinstance(client, RedisCluster):
        return _Cluster(client)
    url = in_process_url(client)
    if url is not None:
        return _InProcess(client, url)
    return _SingleServer(client)
