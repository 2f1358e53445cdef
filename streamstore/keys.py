"""Every Redis key, hash tag and group name streamstore uses; no key is built anywhere else.

A session's keys and its partition's keys share the hash tag ``{p<n>}``, so one script can
touch a session's stream, its meta and its partition feed in one Redis Cluster slot.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass

__all__ = ["GROUP", "Keyspace", "SessionKeys"]

GROUP = "persisters"
"""The consumer group every persister joins on every partition feed."""


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """The keys one publish touches (all in one slot)."""

    partition: int
    meta: str
    stream: str
    feed: str
    index: str
    deadlines: str


@dataclass(frozen=True, slots=True)
class Keyspace:
    """Key names under ``prefix`` for a deployment with ``partitions`` feeds."""

    prefix: str
    partitions: int

    def partition_of(self, session_id: str) -> int:
        """The partition of a session: a stable hash (CRC-32) of its id."""
        return zlib.crc32(session_id.encode()) % self.partitions

    def _tag(self, partition: int) -> str:
        return f"{self.prefix}:{{p{partition}}}"

    def session(self, session_id: str) -> SessionKeys:
        """The keys of one session and of its partition."""
        return _session_keys(self, session_id)

    def meta_prefix(self, partition: int) -> str:
        """Session meta hashes of a partition are this prefix + the session id (scripts that
        visit sessions they were not handed build the key from it)."""
        return f"{self._tag(partition)}:m:"

    def stream_prefix(self, partition: int) -> str:
        """Session streams of a partition are this prefix + the session id."""
        return f"{self._tag(partition)}:s:"

    def deferred(self, partition: int) -> str:
        """Hash ``session -> "<watermark> <feed id>"`` of marks waiting for the safe point."""
        return f"{self._tag(partition)}:deferred"

    def closing(self, partition: int) -> str:
        """Sorted set of closed sessions whose Redis keys await retirement, by close time."""
        return f"{self._tag(partition)}:closing"

    def feed(self, partition: int) -> str:
        """The partition feed: every message of the partition's sessions, for the persister."""
        return f"{self._tag(partition)}:feed"

    def feeds(self) -> list[str]:
        """All partition feeds, in partition order."""
        return [self.feed(p) for p in range(self.partitions)]

    def index(self, partition: int) -> str:
        """Sorted set of the partition's live session ids (all scores 0, ordered by id)."""
        return f"{self._tag(partition)}:sessions"

    def deadlines(self, partition: int) -> str:
        """Sorted set of the partition's session ids scored by idle deadline (ms)."""
        return f"{self._tag(partition)}:deadlines"

    def dedup(self, partition: int, bucket: int) -> str:
        """Hash ``<session>:<message id> -> stream id`` for one dedup time bucket."""
        return f"{self._tag(partition)}:dedup:{bucket}"

    @property
    def dead_letters(self) -> str:
        """Entries that could not be decoded or stored, with the reason."""
        return f"{self.prefix}:dead"

    @property
    def deployment(self) -> str:
        """Hash of deployment-wide facts (the partition count) checked at start."""
        return f"{self.prefix}:deployment"

    @property
    def workers(self) -> str:
        """Hash ``consumer -> JSON status`` of running persisters (streamstore.health)."""
        return f"{self.prefix}:workers"

    @property
    def pattern(self) -> str:
        """A SCAN pattern matching every key of this deployment (for tests and clean-up)."""
        return f"{self.prefix}:*"


@functools.lru_cache(maxsize=4096)
def _session_keys(keys: Keyspace, session_id: str) -> SessionKeys:
    """:meth:`Keyspace.session`, remembered for the sessions in use (every publish asks)."""
    p = keys.partition_of(session_id)
    tag = keys._tag(p)
    return SessionKeys(
        partition=p,
        meta=keys.meta_prefix(p) + session_id,
        stream=keys.stream_prefix(p) + session_id,
        feed=f"{tag}:feed",
        index=f"{tag}:sessions",
        deadlines=f"{tag}:deadlines",
    )
