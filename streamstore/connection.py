"""Connecting to the Redis-compatible server and checking that it is safe to use."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis.exceptions
from redis.asyncio import Redis

from streamstore.config import Settings
from streamstore.errors import (
    ConfigurationError,
    EvictionPolicyError,
    ServerError,
    translate_redis_errors,
)
from streamstore.keys import Keyspace

__all__ = ["ServerInfo", "check_server", "connect"]

log = logging.getLogger(__name__)

MIN_VERSION = (6, 2)
"""XAUTOCLAIM and exclusive XRANGE bounds arrived in Redis 6.2."""


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What streamstore learned about the server when it connected."""

    name: str
    version: tuple[int, ...]
    maxmemory_policy: str | None
    appendonly: bool | None


def connect(url: str, settings: Settings) -> Redis:
    """A redis-py asyncio client for ``url`` that returns bytes and speaks RESP2.

    ``rediss://`` URLs verify the server certificate and host name (redis-py's default);
    streamstore never downgrades them to plaintext.
    """
    return Redis.from_url(
        url,
        decode_responses=False,
        protocol=2,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=min(settings.socket_timeout_s, 5.0),
        health_check_interval=30,
    )


async def check_server(client: Redis, settings: Settings, keys: Keyspace) -> ServerInfo:
    """Verify version, eviction policy and partition count before anything is written.

    Raises:
        ConnectionLostError: the server cannot be reached.
        ServerError: the server is older than Redis 6.2.
        EvictionPolicyError: ``maxmemory-policy`` is not ``noeviction`` and
            ``settings.eviction_check == "refuse"``.
        ConfigurationError: the deployment was set up with another partition count.
    """
    with translate_redis_errors():
        info = await client.info("server")
        name = "valkey" if "valkey_version" in info else "redis"
        raw_version = str(info.get("valkey_version") or info.get("redis_version", "0"))
        version = tuple(int(p) for p in raw_version.split(".") if p.isdigit())
        if version[:2] < MIN_VERSION:
            raise ServerError(f"{name} {raw_version} is too old: streamstore needs Redis >= 6.2")
        policy, appendonly = await _read_config(client)
        stored = await client.hsetnx(keys.deployment, "partitions", settings.partitions)
        if not stored:
            existing = int(await client.hget(keys.deployment, "partitions") or 0)
            if existing != settings.partitions:
                raise ConfigurationError(
                    f"this deployment (key prefix {keys.prefix!r}) uses {existing} partitions, "
                    f"not {settings.partitions}: every process must use the same count"
                )
    if policy is not None and policy != "noeviction":
        message = (
            f"the server's maxmemory-policy is {policy!r}: it may evict streams holding "
            "acknowledged messages; set it to noeviction"
        )
        if settings.eviction_check == "refuse":
            raise EvictionPolicyError(message)
        log.warning(message)
    if appendonly is False:
        log.warning(
            "the server runs without append-only persistence: a restart loses "
            "messages not yet persisted to history"
        )
    return ServerInfo(name, version, policy, appendonly)


async def _read_config(client: Redis) -> tuple[str | None, bool | None]:
    try:
        config = await client.config_get("maxmemory-policy")
        aof = await client.config_get("appendonly")
    except redis.exceptions.ResponseError:  # CONFIG may be refused by ACL or a managed service
        log.warning("cannot read the server's CONFIG: eviction policy not verified")
        return None, None
    policy = next(iter(config.values()), None)
    appendonly = next(iter(aof.values()), None)
    return (
        _text(policy),
        None if appendonly is None else _text(appendonly) == "yes",
    )


def _text(value: object) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)
