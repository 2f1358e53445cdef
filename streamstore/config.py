"""Typed settings: keyword-only frozen dataclasses built from arguments or ``STREAMSTORE_*``.

Durations are accepted as seconds or :class:`datetime.timedelta` and normalized to float seconds
once, when the object is built; contradictory values fail there, not at first use.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, TypeVar

from streamstore.errors import ConfigurationError

__all__ = ["PersisterSettings", "Settings", "SweeperSettings", "default_consumer_name"]

Duration = float | int | timedelta
EvictionCheck = Literal["refuse", "warn"]

_PREFIX = re.compile(r"[A-Za-z0-9_.\-]{1,32}")


def _seconds(name: str, value: Duration | None, *, allow_none: bool = False) -> float | None:
    if value is None:
        if allow_none:
            return None
        raise ConfigurationError(f"{name} must be a duration, not None")
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
        raise ConfigurationError(f"{name} must be a non-negative duration, got {value!r}")
    return float(seconds)


def _as_seconds(value: Duration) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    """Settings of a :class:`~streamstore.StreamStore` (and of the workers that share its keys).

    Attributes:
        redis_url: ``redis://``, ``rediss://`` or ``unix://``; for a Redis Cluster,
            ``redis+cluster://host:port[,host:port...]`` (``rediss+cluster://`` with TLS),
            naming any of its nodes: the client discovers the others; ``memory://NAME``: a
            server inside this process (fakeredis; nothing survives it). None starts the
            embedded server (shared by the processes of one data directory).
        history_url: ``sqlite:///path.db`` or ``memory://``.
        key_prefix: first part of every Redis key; lets several deployments share a server.
        partitions: number of partition feeds; fixed per deployment (checked at start).
        max_message_bytes: largest encoded message accepted by ``publish``.
        dedup_window: a repeated message id within this time returns the first stream id.
        session_ttl: default sliding idle time after which a session is closed (None: never).
        hot_tail: how long persisted messages stay in the session stream for fast replay.
        socket_timeout: redis-py socket timeout; at least twice ``block``.
        block: longest single blocking read (XREAD/XREADGROUP BLOCK).
        reconnect_timeout: how long readers retry a lost connection before raising.
        eviction_check: ``"refuse"`` (default) or ``"warn"`` when the server may evict keys.
        max_lag: high-water mark: entries of one partition feed not yet persisted; above it
            ``publish`` waits.
        max_block: how long ``publish`` waits for lag to fall (or memory to free) before it
            raises BackpressureError; 0 fails at once.
        embedded_dir: data directory of the embedded server (default: beside the SQLite file).
        max_connections: connections a store may open (each live subscriber holds one; all
            publishes together use two), per node on a cluster; past it, a call fails with
            ConnectionLostError.
        tls_ca_file: CA bundle that signs the server certificate (``rediss://``; default: the
            system store). Certificates and host names are always verified.
        tls_cert_file: client certificate, for servers that require one.
        tls_key_file: the client certificate's private key.
    """

    redis_url: str | None = None
    history_url: str = "sqlite:///streamstore.db"
    key_prefix: str = "ss"
    partitions: int = 16
    max_message_bytes: int = 64 * 1024
    dedup_window: Duration = 600.0
    session_ttl: Duration | None = 3600.0
    hot_tail: Duration = 10.0
    socket_timeout: Duration = 10.0
    block: Duration = 2.0
    reconnect_timeout: Duration = 30.0
    eviction_check: EvictionCheck = "refuse"
    max_lag: int = 100_000
    max_block: Duration = 5.0
    embedded_dir: str | None = None
    max_connections: int = 1000
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None

    def __post_init__(self) -> None:
        for name in (
            "dedup_window",
            "hot_tail",
            "socket_timeout",
            "block",
            "reconnect_timeout",
            "max_block",
        ):
            object.__setattr__(self, name, _seconds(name, getattr(self, name)))
        object.__setattr__(
            self, "session_ttl", _seconds("session_ttl", self.session_ttl, allow_none=True)
        )
        _positive_int("partitions", self.partitions)
        _positive_int("max_message_bytes", self.max_message_bytes)
        _positive_int("max_lag", self.max_lag)
        _positive_int("max_connections", self.max_connections)
        if not _PREFIX.fullmatch(self.key_prefix):
            raise ConfigurationError("key_prefix must be 1-32 of A-Z a-z 0-9 _ . -")
        if self.dedup_window_s < 0.001:
            raise ConfigurationError("dedup_window must be at least 1 ms")
        if self.block_s <= 0 or 2 * self.block_s > self.socket_timeout_s:
            raise ConfigurationError(
                "block must be positive and at most half of socket_timeout, "
                "or blocking reads would time out on the socket"
            )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigurationError("tls_cert_file and tls_key_file go together")
        if self.eviction_check not in ("refuse", "warn"):
            raise ConfigurationError("eviction_check must be 'refuse' or 'warn'")

    # Normalized views, typed as float (the fields accept timedelta on input).
    @property
    def dedup_window_s(self) -> float:
        return _as_seconds(self.dedup_window)

    @property
    def hot_tail_s(self) -> float:
        return _as_seconds(self.hot_tail)

    @property
    def max_block_s(self) -> float:
        return _as_seconds(self.max_block)

    @property
    def tombstone_ms(self) -> int:
        """How long a closed or deleted session's meta outlives its stream: past the dedup
        window, so a retried publish is still refused rather than found unknown."""
        return int((2 * self.dedup_window_s + 60) * 1000)

    @property
    def socket_timeout_s(self) -> float:
        return _as_seconds(self.socket_timeout)

    @property
    def block_s(self) -> float:
        return _as_seconds(self.block)

    @property
    def reconnect_timeout_s(self) -> float:
        return _as_seconds(self.reconnect_timeout)

    @property
    def session_ttl_s(self) -> float | None:
        return None if self.session_ttl is None else _as_seconds(self.session_ttl)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``STREAMSTORE_<FIELD>`` variables, then ``overrides`` on top.

        ``STREAMSTORE_SESSION_TTL=none`` disables the default idle timeout.

        Raises:
            ConfigurationError: a variable does not parse or the result is contradictory.
        """
        return _from_env(cls, "STREAMSTORE_", environ, overrides)

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


def default_consumer_name() -> str:
    """The host name: stable across restarts, so a restarted worker re-reads its own pending
    entries. Give each worker process on one host its own name (``--consumer``)."""
    return socket.gethostname() or "worker"


@dataclass(frozen=True, kw_only=True, slots=True)
class PersisterSettings:
    """Settings of a :class:`~streamstore.Persister`.

    Attributes:
        consumer: consumer name in the group; stable across restarts of the same worker.
        batch_size: entries read per XREADGROUP (and committed per transaction); on a
            Redis Cluster, where each feed is read by its own XREADGROUP, per feed.
        claim_idle: a pending entry idle this long belongs to a dead consumer and is claimed.
        claim_interval: how often to look for such entries.
        max_deliveries: deliveries before an entry that fails to store is dead-lettered.
        retry_backoff: first pause after an error (doubles up to 5 s).
        unhealthy_after: once history writes have been failing for longer than this, the
            worker's ``/healthz`` answers 503 and its entry in the deployment's workers hash
            (read by ``streamstore check``) says so; healthy again after the next successful
            commit. Failing writes are retried all along. Environment:
            ``STREAMSTORE_PERSISTER_UNHEALTHY_AFTER`` (seconds).
    """

    consumer: str = field(default_factory=default_consumer_name)
    batch_size: int = 1000
    claim_idle: Duration = 30.0
    claim_interval: Duration = 5.0
    max_deliveries: int = 5
    retry_backoff: Duration = 0.1
    unhealthy_after: Duration = 30.0

    def __post_init__(self) -> None:
        for name in ("claim_idle", "claim_interval", "retry_backoff", "unhealthy_after"):
            object.__setattr__(self, name, _seconds(name, getattr(self, name)))
        _positive_int("batch_size", self.batch_size)
        _positive_int("max_deliveries", self.max_deliveries)
        if not self.consumer or len(self.consumer) > 200:
            raise ConfigurationError("consumer must be 1-200 characters")

    @property
    def claim_idle_s(self) -> float:
        return _as_seconds(self.claim_idle)

    @property
    def claim_interval_s(self) -> float:
        return _as_seconds(self.claim_interval)

    @property
    def retry_backoff_s(self) -> float:
        return _as_seconds(self.retry_backoff)

    @property
    def unhealthy_after_s(self) -> float:
        return _as_seconds(self.unhealthy_after)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> PersisterSettings:
        """Settings from ``STREAMSTORE_PERSISTER_<FIELD>`` variables, then ``overrides``.

        Raises:
            ConfigurationError: a variable does not parse or the result is contradictory.
        """
        return _from_env(cls, "STREAMSTORE_PERSISTER_", environ, overrides)


@dataclass(frozen=True, kw_only=True, slots=True)
class SweeperSettings:
    """Settings of a :class:`~streamstore.Sweeper` (DESIGN.md section 4, retention).

    Attributes:
        interval: pause between sweeps in ``run()``.
        retention: messages older than this are deleted from history (None: kept forever).
        max_messages_per_session: history keeps at most this many per session (oldest go).
        max_sessions: the catalog keeps at most this many sessions (least recently active
            closed or deleted ones go first; active sessions are never removed).
        consumer_idle: a consumer idle this long with nothing pending leaves the group.
        batch: sessions handled per partition and step.
    """

    interval: Duration = 10.0
    retention: Duration | None = None
    max_messages_per_session: int | None = None
    max_sessions: int | None = None
    consumer_idle: Duration = 3600.0
    batch: int = 500

    def __post_init__(self) -> None:
        for name in ("interval", "consumer_idle"):
            object.__setattr__(self, name, _seconds(name, getattr(self, name)))
        object.__setattr__(
            self, "retention", _seconds("retention", self.retention, allow_none=True)
        )
        for name in ("max_messages_per_session", "max_sessions"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        _positive_int("batch", self.batch)

    @property
    def interval_s(self) -> float:
        return _as_seconds(self.interval)

    @property
    def retention_s(self) -> float | None:
        return None if self.retention is None else _as_seconds(self.retention)

    @property
    def consumer_idle_s(self) -> float:
        return _as_seconds(self.consumer_idle)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> SweeperSettings:
        """Settings from ``STREAMSTORE_SWEEPER_<FIELD>`` variables, then ``overrides``.

        Raises:
            ConfigurationError: a variable does not parse or the result is contradictory.
        """
        return _from_env(cls, "STREAMSTORE_SWEEPER_", environ, overrides)


_T = TypeVar("_T")


def _from_env(
    cls: type[_T], prefix: str, environ: Mapping[str, str] | None, overrides: dict[str, Any]
) -> _T:
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        raw = env.get(prefix + f.name.upper())
        if raw is None or f.name in overrides:
            continue
        values[f.name] = _parse(f.name, raw, f.type)
    values.update(overrides)
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigurationError(str(exc)) from None


def _parse(name: str, raw: str, annotation: object) -> object:
    kind = str(annotation)
    if raw.strip().lower() == "none" and "None" in kind:
        return None
    if kind in ("int", "int | None"):
        try:
            return int(raw)
        except ValueError:
            raise ConfigurationError(f"{name}: expected an integer, got {raw!r}") from None
    if "Duration" in kind:
        try:
            return float(raw)
        except ValueError:
            raise ConfigurationError(f"{name}: expected seconds, got {raw!r}") from None
    return raw
