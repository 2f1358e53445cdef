"""Health: the one judgement of a deployment that ``streamstore check`` prints and a worker's
``/healthz`` shares, and worker health as other processes see it (each running persister keeps
an entry in the deployment's workers hash: since when its history writes fail, and why).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import orjson
from redis.asyncio import Redis, RedisCluster

from streamstore.config import PersisterSettings
from streamstore.deployment import Deployment
from streamstore.errors import (
    ConnectionLostError,
    HistoryError,
    ServerError,
    translate_redis_errors,
)
from streamstore.keys import Keyspace
from streamstore.redis.connection import redact_url
from streamstore.redis.server_check import ServerInfo
from streamstore.stats import read_stats

__all__ = [
    "STALE_AFTER",
    "STATUS_INTERVAL",
    "HealthReport",
    "WorkerHealth",
    "check_deployment",
    "encode_status",
    "server_findings",
    "worker_health",
]

STATUS_INTERVAL: Final = 5.0
"""How often a running persister rewrites its entry (and at once when its state changes)."""
STALE_AFTER: Final = 600.0
"""An entry not rewritten for this long belongs to a worker that is gone or cut off from Redis:
reported as stale, whatever it said last."""


@dataclass(frozen=True, slots=True)
class WorkerHealth:
    """One worker's last report, judged at ``now``.

    Attributes:
        consumer: the worker's consumer name (the hash field).
        updated_at: when it last wrote its entry (wall clock, seconds; 0.0 if unreadable).
        failing_since: since when its history writes have been failing, or None.
        reason: the last history error it met while failing, or None.
        stale: the entry was not rewritten for ``stale_after`` (or is unreadable): the worker
            is gone or cannot reach Redis, so its state is unknown, not failing.
        healthy: False when a fresh entry says history writes have been failing for longer
            than ``unhealthy_after``; True otherwise (stale entries included: see ``stale``).
    """

    consumer: str
    updated_at: float
    failing_since: float | None
    reason: str | None
    stale: bool
    healthy: bool

    def describe(self, now: float) -> str:
        """One line for people: what this worker's entry says at ``now``."""
        if self.stale:
            return f"worker {self.consumer}: no report since {_iso(self.updated_at)} (stale)"
        if self.failing_since is None:
            return f"worker {self.consumer}: history writes succeed"
        return (
            f"worker {self.consumer}: history writes failing for "
            f"{max(0.0, now - self.failing_since):.0f} s (since {_iso(self.failing_since)}): "
            f"{self.reason or 'no reason given'}"
        )


@dataclass(frozen=True, slots=True)
class HealthReport:
    """A judgement: unhealthy with ``reasons`` (exit 3 of ``check``, 503 of ``/healthz``),
    ``warnings`` that need a look but block nothing, and what was checked (``summary``)."""

    summary: str
    reasons: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def healthy(self) -> bool:
        """No reasons."""
        return not self.reasons

    def as_dict(self) -> dict[str, object]:
        """As ``check --json`` prints it."""
        return {
            "healthy": self.healthy,
            "server": self.summary,
            "reasons": list(self.reasons),
            "warnings": list(self.warnings),
        }


def server_findings(server: ServerInfo) -> tuple[list[str], list[str]]:
    """Reasons and warnings from what the checks at connect found: a server that may evict
    keys or drop the scripts' writes on restart (reached when ``eviction_check`` is
    ``warn``), persistence off, what this user could not verify."""
    reasons, warnings = [], []
    policy = server.maxmemory_policy
    if policy is None:
        warnings.append("this user may not run INFO: eviction policy not verified")
    elif policy != "noeviction":
        reasons.append(f"maxmemory-policy is {policy!r}: the server may evict streams")
    if server.replays_scripts is False:
        reasons.append(
            "a restart of the server would drop every message acknowledged since its last "
            "append-only rewrite: it replays the scripts' writes as the 'default' ACL user, "
            "which may not run them (deploy/README.md)"
        )
    if server.appendonly is False:
        warnings.append(
            "append-only persistence is off: a server restart loses what is not persisted"
        )
    return reasons, warnings


async def check_deployment(
    deployment: Deployment, *, acknowledge_data_loss: bool = False, now: float | None = None
) -> HealthReport:
    """Judge a deployment: the server's facts, every partition's backlog against the
    high-water mark, a loss of the server's data not yet acknowledged (cleared first with
    ``acknowledge_data_loss``), each worker's history writes, and history itself.

    Raises:
        Nothing for what it finds unhealthy (reasons in the report), Redis and history
        failures included.
    """
    at = time.time() if now is None else now
    server = deployment.server
    summary = f"{server.name} {'.'.join(map(str, server.version))} at {redact_url(deployment.url)}"
    reasons, warnings = server_findings(server)
    try:
        stats = await read_stats(deployment)
        for partition in stats.lagging:
            backlog = stats.partitions[partition].backlog
            reasons.append(
                f"partition {partition} holds {backlog} entries, at or over the high-water "
                f"mark {stats.max_lag}: publishes there block (is a worker running?)"
            )
        if stats.data_lost_at is not None and acknowledge_data_loss:
            with deployment.redis_errors():
                await deployment.client.hdel(deployment.keys.deployment, "data_lost_at")
        elif stats.data_lost_at is not None:
            reasons.append(
                f"the server lost its data at {_iso(stats.data_lost_at)}: messages it had "
                "acknowledged and not yet persisted then are gone (once reviewed: "
                "`streamstore check --acknowledge-data-loss`)"
            )
        if stats.dead_letters:
            warnings.append(
                f"{stats.dead_letters} dead letters (see `streamstore dead-letters list`)"
            )
        unhealthy_after = PersisterSettings.from_env().unhealthy_after_s
        for worker in await worker_health(
            deployment.client, deployment.keys, now=at, unhealthy_after=unhealthy_after
        ):
            if not worker.healthy:
                reasons.append(worker.describe(at))
        await deployment.history.count_messages()
    except (ConnectionLostError, ServerError, HistoryError) as exc:
        reasons.append(_first_line(exc))
    return HealthReport(summary, tuple(reasons), tuple(warnings))


def encode_status(
    *,
    updated_at: float,
    failing_since: float | None,
    reason: str | None,
    unhealthy_after: float | None = None,
) -> bytes:
    """A worker's entry in the workers hash: ``{"updated_at", "failing_since", "reason",
    "unhealthy_after"}`` (the worker's own threshold, by which others judge it too)."""
    return orjson.dumps(
        {
            "updated_at": updated_at,
            "failing_since": failing_since,
            "reason": reason,
            "unhealthy_after": unhealthy_after,
        }
    )


def judge(
    consumer: str, value: bytes | str, *, now: float, unhealthy_after: float, stale_after: float
) -> WorkerHealth:
    """Classify one entry of the workers hash at ``now`` (an unreadable one is stale)."""
    try:
        fields = orjson.loads(value)
        updated_at = _number(fields["updated_at"])
        failing_since = fields.get("failing_since")
        failing_since = None if failing_since is None else _number(failing_since)
        reason = fields.get("reason")
        reason = None if reason is None else str(reason)[:500]
        own = fields.get("unhealthy_after")  # the worker's own threshold, when it says
        unhealthy_after = unhealthy_after if own is None else _number(own)
    except (orjson.JSONDecodeError, TypeError, KeyError, ValueError, AttributeError):
        return WorkerHealth(consumer, 0.0, None, "unreadable status entry", True, True)
    stale = now - updated_at > stale_after
    failing = failing_since is not None and now - failing_since > unhealthy_after
    return WorkerHealth(
        consumer, updated_at, failing_since, reason, stale, healthy=stale or not failing
    )


async def worker_health(
    client: Redis | RedisCluster,
    keys: Keyspace,
    *,
    now: float,
    unhealthy_after: float = 30.0,
    stale_after: float = STALE_AFTER,
) -> list[WorkerHealth]:
    """Every worker's entry in the workers hash, judged at ``now`` (wall clock, seconds),
    ordered by consumer name.

    A worker is unhealthy when its entry, rewritten less than ``stale_after`` ago, says its
    history writes have been failing for longer than its own ``unhealthy_after`` (recorded in
    the entry; ``unhealthy_after`` here stands in for entries without it). Workers that stop
    gracefully remove their entry; killed ones leave it to go stale.

    Raises:
        ConnectionLostError: Redis cannot be reached.
        ServerError: Redis refused the read (PermissionDeniedError: the user lacks HGETALL).
    """
    with translate_redis_errors():
        entries = await client.hgetall(keys.workers)
    out = []
    for field, value in entries.items():
        consumer = field.decode(errors="replace") if isinstance(field, bytes) else str(field)
        out.append(
            judge(
                consumer, value, now=now, unhealthy_after=unhealthy_after, stale_after=stale_after
            )
        )
    return sorted(out, key=lambda health: health.consumer)


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError("not a time")
    return float(value)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")
