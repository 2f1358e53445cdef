"""Deployment statistics: what `streamstore stats`, `check` and the worker's metrics report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis.exceptions

from streamstore.deployment import Deployment
from streamstore.errors import permission_denied
from streamstore.keys import GROUP
from streamstore.redis.server_check import used_memory

__all__ = ["DeploymentStats", "PartitionStats", "read_stats"]


@dataclass(frozen=True, slots=True)
class PartitionStats:
    """One partition feed and its consumer group.

    Attributes:
        partition: the partition number.
        published: entries ever added to the feed (messages and session events).
        backlog: entries still in the feed: not yet persisted, or persisted but not yet
            trimmed (the quantity ``max_lag`` bounds).
        lag: entries not yet delivered to any persister (None before the group exists or on
            servers older than Redis 7).
        pending: entries delivered but not yet acknowledged.
        consumers: persisters known to the group.
    """

    partition: int
    published: int
    backlog: int
    lag: int | None
    pending: int
    consumers: int


@dataclass(frozen=True, slots=True)
class DeploymentStats:
    """A snapshot of a deployment."""

    server: str
    server_version: str
    maxmemory_policy: str | None
    used_memory: int
    live_sessions: int
    dead_letters: int
    max_lag: int
    partitions: list[PartitionStats] = field(default_factory=list)
    data_lost_at: float | None = None
    """When a persister found that the server had lost its data (None: never)."""

    @property
    def backlog(self) -> int:
        """Entries not yet persisted and trimmed, over all partitions."""
        return sum(p.backlog for p in self.partitions)

    @property
    def pending(self) -> int:
        """Entries delivered to persisters and not yet acknowledged, over all partitions."""
        return sum(p.pending for p in self.partitions)

    @property
    def lagging(self) -> list[int]:
        """Partitions at or over the high-water mark (publishes there wait, then fail)."""
        return [p.partition for p in self.partitions if p.backlog >= self.max_lag]


async def read_stats(deployment: Deployment) -> DeploymentStats:
    """A snapshot of feeds, groups, sessions, dead letters and server memory (one pipeline).

    Raises:
        ConnectionLostError: the server cannot be reached.
        PermissionDeniedError: this Redis user may not read them (XINFO, ZCARD).
    """
    keys, server = deployment.keys, deployment.server
    with deployment.redis_errors():
        memory = await used_memory(deployment.topology)  # INFO: not in a pipeline
        async with deployment.client.pipeline(transaction=False) as pipe:
            pipe.xlen(keys.dead_letters)
            pipe.hget(keys.deployment, "data_lost_at")
            for p in range(keys.partitions):
                pipe.zcard(keys.index(p))
                pipe.xinfo_stream(keys.feed(p))
                pipe.xinfo_groups(keys.feed(p))
            replies = await pipe.execute(raise_on_error=False)
    for reply in replies:  # other errors: a feed that does not exist yet
        if isinstance(reply, redis.exceptions.NoPermissionError):
            raise permission_denied(str(reply), user=deployment.user) from reply
    dead, lost = replies[0], replies[1]
    partitions = []
    live = 0
    for p in range(keys.partitions):
        cardinality, stream, groups = replies[2 + 3 * p : 5 + 3 * p]
        live += cardinality
        partitions.append(_partition_stats(p, stream, groups))
    return DeploymentStats(
        server=server.name,
        server_version=".".join(map(str, server.version)),
        maxmemory_policy=server.maxmemory_policy,
        used_memory=memory,
        live_sessions=live,
        dead_letters=int(dead) if isinstance(dead, int) else 0,
        max_lag=deployment.settings.max_lag,
        partitions=partitions,
        data_lost_at=float(lost) if isinstance(lost, bytes) else None,
    )


def _partition_stats(partition: int, stream: Any, groups: Any) -> PartitionStats:
    """Stats of one feed from XINFO STREAM and XINFO GROUPS replies (errors: no feed yet)."""
    info: dict[str, Any] = stream if isinstance(stream, dict) else {}
    group: dict[str, Any] = {}
    if isinstance(groups, list):
        group = next((g for g in groups if g["name"] == GROUP.encode()), {})
    lag = group.get("lag")
    return PartitionStats(
        partition=partition,
        published=int(info.get("entries-added") or info.get("length") or 0),
        backlog=int(info.get("length") or 0),
        lag=None if lag is None else int(lag),
        pending=int(group.get("pending", 0)),
        consumers=int(group.get("consumers", 0)),
    )
