"""Sweeper: closes idle sessions, retires persisted ones from Redis, enforces retention.

Every step is idempotent and checked atomically on the server (close only a session whose idle
deadline has passed, retire only a session whose every message is persisted, remove only a
consumer holding nothing pending), so several workers may sweep at once without a lease.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import TaskStatus

from streamstore.codec import decode_session_meta
from streamstore.config import SweeperSettings
from streamstore.deployment import Deployment, HasDeployment, deployment_of
from streamstore.errors import (
    ConnectionLostError,
    CorruptEntryError,
    HistoryError,
    ServerError,
)
from streamstore.keys import GROUP
from streamstore.models import SessionState

__all__ = ["SweepReport", "Sweeper"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SweepReport:
    """What one sweep did."""

    closed: int = 0
    retired: int = 0
    messages_deleted: int = 0
    sessions_deleted: int = 0
    consumers_removed: int = 0


class Sweeper:
    """Expiry, retention and trimming for one deployment.

    ``sweep_once(now=...)`` does one deterministic pass (tests and cron); ``run()`` sweeps every
    ``interval`` until cancelled or :meth:`stop`.
    """

    def __init__(
        self,
        deployment: Deployment | HasDeployment,
        settings: SweeperSettings | None = None,
        *,
        clock: Callable[[], float] = time.time,
        on_sweep: Callable[[SweepReport], None] | None = None,
    ) -> None:
        """
        Args:
            deployment: the deployment to sweep (or a StreamStore, for its deployment).
            settings: retention and timing (default: from the environment).
            clock: the time source of ``sweep_once()`` without ``now`` (tests inject one).
            on_sweep: called with the report of each completed sweep (metrics).
        """
        self._deployment = deployment_of(deployment)
        self._client = self._deployment.client
        self._keys = self._deployment.keys
        self._settings = settings if settings is not None else SweeperSettings.from_env()
        self._scripts = self._deployment.scripts
        self._clock = clock
        self._on_sweep = on_sweep
        self._stopping = False
        self._wake: anyio.Event | None = None

    def stop(self) -> None:
        """Ask :meth:`run` to return after the sweep in hand."""
        self._stopping = True
        if self._wake is not None:
            self._wake.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Sweep every ``interval`` until cancelled or stopped; errors are logged and retried."""
        self._wake = anyio.Event()
        task_status.started()
        while not self._stopping:
            try:
                report = await self.sweep_once()
                if report != SweepReport():
                    log.info("sweep %s", dataclasses.asdict(report))
            except (ConnectionLostError, ServerError, HistoryError) as exc:
                log.warning("sweep failed: %s; retrying next interval", exc)
            with anyio.move_on_after(self._settings.interval_s):
                await self._wake.wait()

    async def sweep_once(self, *, now: float | None = None) -> SweepReport:
        """One pass: close idle sessions, apply deferred watermarks and trim, retire closed
        sessions that are fully persisted, enforce history retention, remove idle consumers.

        Raises:
            ConnectionLostError, ServerError: Redis failed (the pass may be repeated).
            HistoryError: the history store failed (the pass may be repeated).
        """
        at = self._clock() if now is None else now
        closed = retired = reaped = 0
        for partition in range(self._keys.partitions):
            closed += await self._close_idle(partition, at)
            with self._deployment.redis_errors():
                await self._scripts.advance(
                    self._keys,
                    partition,
                    now_ms=int(at * 1000),
                    hot_ms=int(self._deployment.settings.hot_tail_s * 1000),
                )
            retired += await self._retire_closed(partition)
            reaped += await self._reap_consumers(partition)
        retention = self._settings.retention_s
        result = await self._deployment.history.enforce_retention(
            older_than=None if retention is None else at - retention,
            max_messages_per_session=self._settings.max_messages_per_session,
            max_sessions=self._settings.max_sessions,
        )
        report = SweepReport(closed, retired, result.messages, result.sessions, reaped)
        if self._on_sweep is not None:
            self._on_sweep(report)
        return report

    async def _close_idle(self, partition: int, now: float) -> int:
        with self._deployment.redis_errors():
            idle = await self._client.zrangebyscore(
                self._keys.deadlines(partition), "-inf", now, start=0, num=self._settings.batch
            )
        closed = 0
        for session_id in _ids(idle):
            with self._deployment.redis_errors():
                meta = await self._client.hgetall(self._keys.session(session_id).meta)
            if not meta:
                continue
            try:
                current = decode_session_meta(session_id, meta)
            except CorruptEntryError:
                log.warning("session %s has a malformed meta hash; not closing it", session_id)
                continue
            ended = dataclasses.replace(current, state=SessionState.CLOSED)
            with self._deployment.redis_errors():
                previous = await self._scripts.end_session(
                    self._keys,
                    ended,
                    now=now,
                    tombstone_ms=self._deployment.settings.tombstone_ms,
                    idle_before=now,
                )
            if previous == b"active":
                closed += 1
                log.info("closed idle session %s", session_id)
        return closed

    async def _retire_closed(self, partition: int) -> int:
        with self._deployment.redis_errors():
            closing = await self._client.zrange(
                self._keys.closing(partition), 0, self._settings.batch - 1
            )
            retired = 0
            for session_id in _ids(closing):
                retired += await self._scripts.retire(
                    self._keys, session_id, tombstone_ms=self._deployment.settings.tombstone_ms
                )
        return retired

    async def _reap_consumers(self, partition: int) -> int:
        feed = self._keys.feed(partition)
        idle_ms = int(self._settings.consumer_idle_s * 1000)
        removed = 0
        try:
            with self._deployment.redis_errors():
                consumers = await self._client.xinfo_consumers(feed, GROUP)
        except ServerError:  # no group yet: no persister has started
            return 0
        for consumer in consumers:
            if consumer["pending"] == 0 and consumer["idle"] >= idle_ms:
                with self._deployment.redis_errors():
                    removed += await self._scripts.reap_consumer(
                        self._keys, partition, consumer["name"], idle_ms=idle_ms
                    )
        return removed


def _ids(members: Any) -> list[str]:
    """Session ids from a sorted-set reply (bytes)."""
    return [m.decode() if isinstance(m, bytes) else str(m) for m in members]
