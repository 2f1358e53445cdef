"""streamstore.health: the workers hash as `streamstore check` reads it, judged at a given time."""

from __future__ import annotations

import orjson
import pytest
import redis.asyncio

from streamstore import StreamStore
from streamstore.health import STALE_AFTER, WorkerHealth, encode_status, judge, worker_health

NOW = 1_800_000_000.0


def entry(
    updated_at: float, failing_since: float | None = None, reason: str | None = None
) -> bytes:
    return encode_status(updated_at=updated_at, failing_since=failing_since, reason=reason)


@pytest.mark.parametrize(
    ("value", "stale", "healthy"),
    [
        (entry(NOW - 3), False, True),  # writes succeed
        (entry(NOW - 3, NOW - 10, "READONLY"), False, True),  # failing, not for long enough
        (entry(NOW - 3, NOW - 31, "READONLY"), False, False),  # failing for longer: unhealthy
        (entry(NOW - STALE_AFTER - 1, NOW - 3600, "READONLY"), True, True),  # stale, not failing
        (entry(NOW - STALE_AFTER + 1, NOW - 3600, "READONLY"), False, False),
        (b"not json", True, True),
        (b'{"failing_since": null}', True, True),
        (b'{"updated_at": "yesterday"}', True, True),
    ],
    ids=["ok", "failing-briefly", "failing", "stale", "almost-stale", "junk", "no-time", "text"],
)
def test_judge(value: bytes, stale: bool, healthy: bool) -> None:
    health = judge("w1", value, now=NOW, unhealthy_after=30.0, stale_after=STALE_AFTER)
    assert (health.consumer, health.stale, health.healthy) == ("w1", stale, healthy)


def test_describe() -> None:
    failing = judge(
        "w1",
        entry(NOW - 1, NOW - 42, "SQLITE_READONLY"),
        now=NOW,
        unhealthy_after=30,
        stale_after=600,
    )
    assert failing == WorkerHealth("w1", NOW - 1, NOW - 42, "SQLITE_READONLY", False, False)
    assert failing.describe(NOW) == (
        "worker w1: history writes failing for 42 s (since 2027-01-15T07:59:18+00:00): "
        "SQLITE_READONLY"
    )
    stale = judge("w2", entry(NOW - 700), now=NOW, unhealthy_after=30, stale_after=600)
    assert stale.describe(NOW) == "worker w2: no report since 2027-01-15T07:48:20+00:00 (stale)"
    ok = judge("w3", entry(NOW), now=NOW, unhealthy_after=30, stale_after=600)
    assert ok.describe(NOW) == "worker w3: history writes succeed"


async def test_worker_health_reads_every_entry(
    store: StreamStore, raw: redis.asyncio.Redis
) -> None:
    assert await worker_health(store.client, store.keys, now=NOW) == []
    await raw.hset(
        store.keys.workers,
        mapping={
            "w2": entry(NOW - 1, NOW - 60, "disk full"),
            "w1": entry(NOW - 1),
            "w3": entry(NOW - 3600, NOW - 4000, "READONLY"),
        },
    )
    judged = await worker_health(store.client, store.keys, now=NOW, unhealthy_after=30)
    assert [(w.consumer, w.healthy, w.stale) for w in judged] == [
        ("w1", True, False),
        ("w2", False, False),
        ("w3", True, True),
    ]
    assert judged[1].reason == "disk full"
    later = await worker_health(store.client, store.keys, now=NOW, unhealthy_after=120)
    assert all(w.healthy for w in later)
    assert orjson.loads(entry(1.5, None, None)) == {
        "updated_at": 1.5,
        "failing_since": None,
        "reason": None,
        "unhealthy_after": None,
    }


def test_a_workers_own_threshold_judges_it() -> None:
    """A worker records its unhealthy_after: `check` in another process, with another
    setting, judges it as its /healthz does."""
    own = encode_status(
        updated_at=NOW, failing_since=NOW - 5, reason="READONLY", unhealthy_after=2.0
    )
    assert not judge("w", own, now=NOW, unhealthy_after=30.0, stale_after=600).healthy
    lenient = encode_status(
        updated_at=NOW, failing_since=NOW - 5, reason="READONLY", unhealthy_after=60.0
    )
    assert judge("w", lenient, now=NOW, unhealthy_after=1.0, stale_after=600).healthy
