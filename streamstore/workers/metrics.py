"""The worker's health and Prometheus metrics, served over HTTP by ``streamstore worker
--metrics-port``: ``/healthz`` (200 or 503, JSON reasons) and ``/metrics`` (a registry of its own).

``/metrics`` carries no ``*_created`` series: prometheus_client (0.26) can only turn them off
process-wide (``disable_created_metrics``; no per-registry switch), which :class:`WorkerMetrics`
does when it is built. They are one timestamp series per counter and histogram, which
Prometheus stores as a sample like any other and our dashboards never read.
"""

from __future__ import annotations

import dataclasses
import http
import logging
from collections.abc import Iterator
from typing import Final

import anyio
import orjson
from anyio.abc import Listener, SocketAttribute, SocketStream, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from streamstore.deployment import Deployment, HasDeployment, deployment_of
from streamstore.errors import ConfigurationError, StreamStoreError
from streamstore.health import server_findings
from streamstore.stats import DeploymentStats, read_stats
from streamstore.workers.persister import Persister, PersisterStats
from streamstore.workers.sweeper import SweepReport

__all__ = ["WorkerMetrics"]

log = logging.getLogger(__name__)

BATCH_BUCKETS: Final = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000)
"""Entries per committed batch (the default batch size is 1000)."""
COMMIT_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
"""Seconds of one history commit."""
PING_TIMEOUT: Final = 2.0
"""How long ``/healthz`` waits for Redis to answer PING."""
STATS_TIMEOUT: Final = 5.0
"""How long ``/metrics`` waits for the deployment snapshot (under Prometheus' 10 s default)."""
REQUEST_TIMEOUT: Final = 10.0
"""A connection that has not sent its request and been answered by then is closed."""
MAX_REQUEST_HEAD: Final = 8192

_PERSISTER_COUNTERS: Final = {
    "read": "Feed entries read by this worker's persister",
    "persisted": "Messages this worker wrote to history for the first time",
    "duplicates": "Redelivered messages history already held (absorbed, not stored again)",
    "dead_lettered": "Entries this worker moved to the dead-letter stream",
    "claimed": "Entries this worker claimed from silent consumers (redeliveries)",
    "errors": "Redis or history errors this worker's persister retried after",
    "data_losses": "Times this worker found that the Redis server had lost its data",
}


class WorkerMetrics(Collector):
    """Health and metrics of one worker process.

    Per-batch and per-sweep figures arrive through :meth:`observe_batch` and
    :meth:`observe_sweep` (the persister's and sweeper's hooks); the persister's counters and
    the deployment's feeds are read when ``/metrics`` is scraped.
    """

    def __init__(self, deployment: Deployment | HasDeployment, consumer: str) -> None:
        # Process-wide (see the module docstring); read at scrape time, so calling it here
        # also covers metrics made before.
        disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in 0.26
        self._deployment = deployment_of(deployment)
        self._consumer = consumer
        self._persister: Persister | None = None
        self._persister_running = False
        self._snapshot: DeploymentStats | None = None
        self._listener: Listener[SocketStream] | None = None
        self.registry = CollectorRegistry()
        Gauge(
            "streamstore_worker_info",
            "This worker's consumer name and partition count",
            ["consumer", "partitions"],
            registry=self.registry,
        ).labels(consumer, str(self._deployment.settings.partitions)).set(1)
        self._batch_size = Histogram(
            "streamstore_persister_batch_size",
            "Entries per batch committed to history",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self._commit_seconds = Histogram(
            "streamstore_persister_commit_seconds",
            "Seconds per history commit",
            buckets=COMMIT_BUCKETS,
            registry=self.registry,
        )
        self._sweeps = Counter(
            "streamstore_sweeps", "Sweeps completed by this worker", registry=self.registry
        )
        self._swept = Counter(
            "streamstore_swept",
            "What this worker's sweeps did: sessions closed and retired, history rows deleted, "
            "idle consumers removed",
            ["kind"],
            registry=self.registry,
        )
        for kind in _sweep_kinds():
            self._swept.labels(kind)
        self.registry.register(self)

    # -- hooks --------------------------------------------------------------------------------

    def observe_batch(self, size: int, seconds: float) -> None:
        """Record one committed batch (``Persister(on_batch=...)``)."""
        self._batch_size.observe(size)
        self._commit_seconds.observe(seconds)

    def observe_sweep(self, report: SweepReport) -> None:
        """Record one completed sweep (``Sweeper(on_sweep=...)``)."""
        self._sweeps.inc()
        for kind, count in dataclasses.asdict(report).items():
            self._swept.labels(kind).inc(count)

    async def run_persister(
        self, persister: Persister, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run ``persister`` like :meth:`Persister.run`, exporting its counters and reporting
        its loop as running from readiness until it returns."""
        self._persister = persister
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(persister.run)
                self._persister_running = True
                task_status.started()
        finally:
            self._persister_running = False

    # -- HTTP ---------------------------------------------------------------------------------

    async def listen(self, host: str, port: int) -> str:
        """Bind the HTTP endpoint (``port`` 0: any free port) and return its URL.

        Raises:
            ConfigurationError: the address cannot be bound (in use, not local, refused).
        """
        try:
            self._listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
            ) from exc
        address = self._listener.extra(SocketAttribute.local_address)  # noqa: S610 (anyio)
        bound_host, bound_port = str(address[0]), address[1]
        if ":" in bound_host:
            bound_host = f"[{bound_host}]"
        return f"http://{bound_host}:{bound_port}"

    async def serve(self) -> None:
        """Answer ``GET /healthz`` and ``GET /metrics`` on the endpoint bound by :meth:`listen`
        (one request per connection) until cancelled, then close it."""
        if self._listener is None:
            raise RuntimeError("call listen() before serve()")
        async with self._listener:
            await self._listener.serve(self._handle)

    async def health(self) -> tuple[bool, dict[str, object]]:
        """Whether the persister loop runs, its history writes succeed (or have failed for no
        longer than ``unhealthy_after``) and Redis answers, with the reasons if not."""
        reasons = []
        server_concerns, server_warnings = server_findings(self._deployment.server)
        if not self._persister_running:
            reasons.append("the persister loop is not running")
        persister = self._persister
        history_problem = None if persister is None else persister.history_problem()
        if history_problem is not None:
            reasons.append(history_problem)
        try:
            with anyio.fail_after(PING_TIMEOUT), self._deployment.redis_errors():
                await self._deployment.client.ping()
            redis_ok = True
        except (TimeoutError, StreamStoreError) as exc:
            redis_ok = False
            reasons.append(f"Redis does not answer: {exc or f'no reply in {PING_TIMEOUT:g} s'}")
        body: dict[str, object] = {
            "status": "unhealthy" if reasons else "ok",
            "consumer": self._consumer,
            "persister_running": self._persister_running,
            "redis": redis_ok,
            "history": {
                "failing_since": None if persister is None else persister.failing_since,
                "reason": None if persister is None else persister.failure_reason,
            },
            "reasons": reasons,
            # What `streamstore check` also reports about the server; a worker stays live
            # beside it (restarting it would not change the server).
            "warnings": [*server_concerns, *server_warnings],
        }
        return not reasons, body

    async def exposition(self, accept: str) -> tuple[bytes, str]:
        """The registry in the format ``accept`` asks for, with a fresh deployment snapshot
        (left out, and ``streamstore_redis_up`` 0, when Redis does not answer)."""
        try:
            with anyio.fail_after(STATS_TIMEOUT):
                self._snapshot = await read_stats(self._deployment)
        except (TimeoutError, StreamStoreError) as exc:
            self._snapshot = None
            log.warning("metrics: no deployment snapshot: %s", exc or "timed out")
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type

    def collect(self) -> Iterator[Metric]:
        """The figures read at scrape time: this persister's counters, the deployment's feeds."""
        yield GaugeMetricFamily(
            "streamstore_persister_running",
            "1 while this worker's persister loop runs",
            value=int(self._persister_running),
        )
        stats = self._persister.stats if self._persister is not None else PersisterStats()
        for name, documentation in _PERSISTER_COUNTERS.items():
            yield CounterMetricFamily(
                f"streamstore_persister_{name}", documentation, value=getattr(stats, name)
            )
        snapshot = self._snapshot
        yield GaugeMetricFamily(
            "streamstore_redis_up",
            "1 when the last scrape could read the deployment from Redis",
            value=int(snapshot is not None),
        )
        if snapshot is not None:
            yield from _deployment_metrics(snapshot)

    async def _handle(self, stream: SocketStream) -> None:
        async with stream:
            try:
                with anyio.fail_after(REQUEST_TIMEOUT):
                    head = await BufferedByteReceiveStream(stream).receive_until(
                        b"\r\n\r\n", MAX_REQUEST_HEAD
                    )
                    method, status, content_type, body = await self._answer(head)
                    await stream.send(_response(status, content_type, body, method == "HEAD"))
            except (
                TimeoutError,
                OSError,
                anyio.EndOfStream,
                anyio.IncompleteRead,
                anyio.DelimiterNotFound,
                anyio.BrokenResourceError,
            ) as exc:
                log.debug("metrics: dropped a connection: %r", exc)

    async def _answer(self, head: bytes) -> tuple[str, int, str, bytes]:
        """(method, status, content type, body) for one request head."""
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3:
            return "", 400, "text/plain", b"bad request\n"
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            return method, 405, "text/plain", b"only GET and HEAD\n"
        path = target.split("?", 1)[0]
        if path == "/healthz":
            healthy, report = await self.health()
            return method, 200 if healthy else 503, "application/json", orjson.dumps(report)
        if path == "/metrics":
            headers = dict(_header(line) for line in header_lines if ":" in line)
            body, content_type = await self.exposition(headers.get("accept", ""))
            return method, 200, content_type, body
        return method, 404, "text/plain", b"not found: try /metrics or /healthz\n"


def _deployment_metrics(snapshot: DeploymentStats) -> Iterator[Metric]:
    """Feeds, groups, sessions, dead letters and memory, as every worker of a deployment sees
    them (aggregate across workers with max, not sum)."""
    per_partition = {
        "backlog": GaugeMetricFamily(
            "streamstore_feed_backlog",
            "Entries in the partition feed: not yet persisted, or persisted and not yet trimmed",
            labels=["partition"],
        ),
        "lag": GaugeMetricFamily(
            "streamstore_feed_lag",
            "Entries of the partition feed not yet delivered to any persister",
            labels=["partition"],
        ),
        "pending": GaugeMetricFamily(
            "streamstore_feed_pending",
            "Entries delivered to a persister and not yet acknowledged",
            labels=["partition"],
        ),
        "consumers": GaugeMetricFamily(
            "streamstore_feed_consumers",
            "Persisters known to the partition's consumer group",
            labels=["partition"],
        ),
    }
    published = CounterMetricFamily(
        "streamstore_feed_published",
        "Entries ever added to the partition feed (messages and session events)",
        labels=["partition"],
    )
    for partition in snapshot.partitions:
        label = [str(partition.partition)]
        published.add_metric(label, partition.published)
        for field, family in per_partition.items():
            value = getattr(partition, field)
            if value is not None:
                family.add_metric(label, value)
    yield published
    yield from per_partition.values()
    gauges = (
        (
            "streamstore_feed_high_water_mark",
            "Backlog of one partition at which publishes there block (max_lag)",
            snapshot.max_lag,
        ),
        ("streamstore_dead_letters", "Entries in the dead-letter stream", snapshot.dead_letters),
        ("streamstore_live_sessions", "Sessions with live Redis keys", snapshot.live_sessions),
        (
            "streamstore_redis_used_memory_bytes",
            "Memory the Redis server uses",
            snapshot.used_memory,
        ),
    )
    for name, documentation, value in gauges:
        yield GaugeMetricFamily(name, documentation, value=value)
    if snapshot.data_lost_at is not None:
        yield GaugeMetricFamily(
            "streamstore_data_lost_timestamp_seconds",
            "When a persister found that the Redis server had lost its data",
            value=snapshot.data_lost_at,
        )


def _sweep_kinds() -> list[str]:
    return [field.name for field in dataclasses.fields(SweepReport)]


def _header(line: str) -> tuple[str, str]:
    name, _, value = line.partition(":")
    return name.strip().lower(), value.strip()


def _response(status: int, content_type: str, body: bytes, head_only: bool) -> bytes:
    head = (
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")
    return head if head_only else head + body
