"""streamstore.workers.metrics: the worker's /metrics exposition, in process."""

from __future__ import annotations

from streamstore import Persister, PersisterSettings, StreamStore
from streamstore.workers.metrics import WorkerMetrics


async def test_metrics_have_no_created_series(store: StreamStore) -> None:
    metrics = WorkerMetrics(store, "w1")
    persister = Persister(store, PersisterSettings(consumer="w1"), on_batch=metrics.observe_batch)
    session = await store.create_session(["a"])
    await store.publish_many(session.id, [{"sender": "a", "content": "x"}] * 3)
    await persister.drain()
    metrics.observe_batch(3, 0.01)
    body, _ = await metrics.exposition("")
    text = body.decode()
    assert "streamstore_persister_batch_size_count " in text
    assert "streamstore_sweeps_total 0.0" in text
    assert [line for line in text.splitlines() if "_created" in line] == []
    openmetrics, content_type = await metrics.exposition("application/openmetrics-text")
    assert content_type.startswith("application/openmetrics-text")
    assert b"_created" not in openmetrics


async def test_health_reports_history_failures_after_unhealthy_after(store: StreamStore) -> None:
    metrics = WorkerMetrics(store, "w1")
    healthy, body = await metrics.health()
    assert not healthy  # the persister loop is not running
    assert body["history"] == {"failing_since": None, "reason": None}
