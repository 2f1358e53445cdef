"""Settings: typed, normalized once, contradictions refused when built; server checks at open."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import pytest
import redis

from streamstore import (
    ConfigurationError,
    EvictionPolicyError,
    PersisterSettings,
    Settings,
    StreamStore,
    SweeperSettings,
)
from streamstore.redis.embedded import EmbeddedServer


def test_durations_accept_timedelta_and_are_normalized() -> None:
    settings = Settings(dedup_window=timedelta(minutes=2), block=timedelta(seconds=1))
    assert settings.dedup_window == 120.0
    assert settings.dedup_window_s == 120.0
    assert settings.block_s == 1.0


@pytest.mark.parametrize(
    "bad",
    [
        {"partitions": 0},
        {"partitions": True},
        {"key_prefix": "has space"},
        {"key_prefix": "a:b"},
        {"block": 6, "socket_timeout": 10},
        {"dedup_window": -1},
        {"max_message_bytes": 0},
        {"eviction_check": "ignore"},
        {"max_lag": 0},
        {"tls_cert_file": "client.pem"},
    ],
)
def test_contradictions_fail_when_built(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        Settings(**bad)  # type: ignore[arg-type]


def test_from_env_parses_and_overrides() -> None:
    env = {
        "STREAMSTORE_REDIS_URL": "redis://example:6380/1",
        "STREAMSTORE_PARTITIONS": "8",
        "STREAMSTORE_SESSION_TTL": "none",
        "STREAMSTORE_DEDUP_WINDOW": "30.5",
    }
    settings = Settings.from_env(env, partitions=4)
    assert settings.redis_url == "redis://example:6380/1"
    assert settings.partitions == 4
    assert settings.session_ttl is None
    assert settings.dedup_window_s == 30.5
    with pytest.raises(ConfigurationError):
        Settings.from_env({"STREAMSTORE_PARTITIONS": "many"})
    persister = PersisterSettings.from_env({"STREAMSTORE_PERSISTER_BATCH_SIZE": "50"})
    assert persister.batch_size == 50
    sweeper = SweeperSettings.from_env({"STREAMSTORE_SWEEPER_MAX_SESSIONS": "10"})
    assert sweeper.max_sessions == 10


async def test_partition_count_is_fixed_per_deployment(settings: Settings, raw: object) -> None:
    async with StreamStore.open(settings=settings):
        pass
    with pytest.raises(ConfigurationError, match="partitions"):
        async with StreamStore.open(settings=settings.replace(partitions=settings.partitions + 1)):
            pass


async def test_evicting_server_is_refused_or_warned_about(
    tmp_path: Path, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = EmbeddedServer(data_dir=tmp_path / "valkey")
    server.start()
    try:
        redis.Redis.from_url(server.url).config_set("maxmemory-policy", "allkeys-lru")
        settings = Settings(redis_url=server.url, history_url="memory://", key_prefix=key_prefix)
        with pytest.raises(EvictionPolicyError, match="allkeys-lru"):
            async with StreamStore.open(settings=settings):
                pass
        with caplog.at_level(logging.WARNING):
            async with StreamStore.open(settings=settings.replace(eviction_check="warn")):
                pass
        assert "allkeys-lru" in caplog.text
    finally:
        server.stop()
