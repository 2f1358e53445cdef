"""Deployment statistics: what `streamstore stats`, `check` and the worker's metrics report."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DeadLetter", "DeploymentStats", "PartitionStats"]


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


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An entry the persister could not decode or store, moved aside with its reason."""

    id: str
    feed: str
    entry_id: str
    reason: str
    fields: dict[bytes, bytes]
