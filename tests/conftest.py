"""Shared fixtures: a private embedded server per test run, the machine's Redis when
``STREAMSTORE_TEST_REDIS_URL`` is set, and a store per test under its own key prefix."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio

from streamstore import Settings, StreamStore
from streamstore.redis.embedded import EmbeddedServer
from tests.cluster import LocalCluster
from tests.faults.tally import Tally

SYSTEM_REDIS = os.environ.get("STREAMSTORE_TEST_REDIS_URL")


@pytest.fixture(scope="session")
def embedded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """One private Valkey for the whole run, with every write fsynced."""
    server = EmbeddedServer(data_dir=tmp_path_factory.mktemp("valkey"), appendfsync="always")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A real three-master Redis Cluster for the whole run (tests/cluster.py), started on
    first use."""
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(
    scope="session",
    params=["embedded", pytest.param("system", marks=pytest.mark.system_redis)],
)
def redis_url(request: pytest.FixtureRequest) -> str:
    """Each guarantee test runs on the embedded Valkey and, when configured, the system Redis."""
    if request.param == "system":
        if not SYSTEM_REDIS:
            pytest.skip("STREAMSTORE_TEST_REDIS_URL is not set")
        return SYSTEM_REDIS
    server: EmbeddedServer = request.getfixturevalue("embedded_server")
    return server.url


@pytest.fixture
def key_prefix() -> str:
    """A prefix of this test's own: tests never touch keys they did not create."""
    return f"sst{uuid.uuid4().hex[:10]}"


@pytest.fixture
def settings(redis_url: str, key_prefix: str, tmp_path: Path, raw: redis.asyncio.Redis) -> Settings:
    """Settings under the test's own key prefix (cleaned up afterwards through ``raw``)."""
    return Settings(
        redis_url=redis_url,
        history_url=f"sqlite:///{tmp_path}/history.db",
        key_prefix=key_prefix,
        partitions=4,
        block=0.5,
        socket_timeout=5.0,
        reconnect_timeout=10.0,
    )


@pytest.fixture
async def raw(redis_url: str, key_prefix: str) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain redis-py client; deletes every key under the test's prefix afterwards."""
    client = redis.asyncio.Redis.from_url(redis_url, protocol=2)
    yield client
    keys = [key async for key in client.scan_iter(match=f"{key_prefix}:*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
async def store(settings: Settings, raw: redis.asyncio.Redis) -> AsyncIterator[StreamStore]:
    async with StreamStore.open(settings=settings) as opened:
        yield opened


@pytest.fixture
def tally(request: pytest.FixtureRequest) -> Callable[[str, str, str], Tally]:
    callspec = getattr(request.node, "callspec", None)
    server = "system" if callspec is not None and "system" in callspec.id else "embedded"

    def make(scenario: str, fault: str, injection: str) -> Tally:
        return Tally(scenario, fault, injection, server=server)

    return make
