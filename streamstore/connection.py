"""Connecting to the Redis-compatible server (TLS included) and checking that it is safe to use.

Credentials come with the URL (``redis://user:password@host:6379/0``), one ACL user per role
(see ``deploy/users.acl``); every check here works with the least privileged of those users.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import hiredis
import redis.asyncio.connection
import redis.exceptions
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from streamstore.config import Settings
from streamstore.errors import (
    ConfigurationError,
    ConnectionLostError,
    EvictionPolicyError,
    ServerError,
    translate_redis_errors,
)
from streamstore.keys import Keyspace

__all__ = ["ServerInfo", "check_server", "connect", "redact_url"]

log = logging.getLogger(__name__)

MIN_VERSION = (6, 2)
"""XAUTOCLAIM and exclusive XRANGE bounds arrived in Redis 6.2."""

_SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What streamstore learned about the server when it connected.

    ``maxmemory_policy`` and ``appendonly`` are None when this connection's user may not run
    INFO (a producer or subscriber under ``deploy/users.acl``): they were not verified.
    """

    name: str
    version: tuple[int, ...]
    maxmemory_policy: str | None
    appendonly: bool | None


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, fit for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


def connect(url: str, settings: Settings) -> Redis:
    """A redis-py asyncio client for ``url`` that returns bytes and speaks RESP2.

    ``rediss://`` URLs always verify the server certificate (against ``settings.tls_ca_file``,
    else the system store) and its host name; ``tls_cert_file``/``tls_key_file`` present a
    client certificate. Nothing can turn verification off, and TLS options given with a
    plaintext URL are refused rather than ignored: streamstore never falls back to plaintext.

    Raises:
        ConfigurationError: an unknown scheme, TLS options with a ``redis://`` or ``unix://``
            URL, ``ssl_*`` parameters in the URL, or a TLS file that does not exist.
    """
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES:
        raise ConfigurationError(
            f"redis_url must start with redis://, rediss:// or unix://, not {parts.scheme!r}://"
        )
    tls_files = {
        "tls_ca_file": settings.tls_ca_file,
        "tls_cert_file": settings.tls_cert_file,
        "tls_key_file": settings.tls_key_file,
    }
    given = sorted(name for name, path in tls_files.items() if path is not None)
    if given and parts.scheme != "rediss":
        raise ConfigurationError(
            f"{', '.join(given)} given with a plaintext {parts.scheme}:// URL: use rediss:// "
            "(streamstore does not fall back to plaintext when TLS is configured)"
        )
    url_tls = sorted(name for name in parse_qs(parts.query) if name.lower().startswith("ssl"))
    if url_tls:
        raise ConfigurationError(
            f"TLS parameters in the Redis URL ({', '.join(url_tls)}) are not accepted: set "
            "tls_ca_file, tls_cert_file and tls_key_file; certificate and host name "
            "verification cannot be turned off"
        )
    options: dict[str, Any] = {}
    if parts.scheme == "rediss":
        for name, path in tls_files.items():
            if path is not None and not Path(path).is_file():
                raise ConfigurationError(f"{name} {path!r} is not a readable file")
        options = {
            "ssl_cert_reqs": "required",
            "ssl_check_hostname": True,
            "ssl_ca_certs": settings.tls_ca_file,
            "ssl_certfile": settings.tls_cert_file,
            "ssl_keyfile": settings.tls_key_file,
            "ssl_min_version": ssl.TLSVersion.TLSv1_2,
        }
    pool = ConnectionPool.from_url(
        url,
        connection_class=_connection_class(parts.scheme),
        max_connections=settings.max_connections,
        decode_responses=False,
        protocol=2,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=min(settings.socket_timeout_s, 5.0),
        health_check_interval=30,
        # A command that met a dropped connection (a server restart, CLIENT KILL) is sent
        # again on a new one. Everything streamstore sends may be repeated: publishes are
        # deduplicated by message id, the other scripts and XACK are idempotent, and entries
        # of a repeated group read stay pending until claimed.
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries=3),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
        **options,
    )
    return Redis(connection_pool=pool)


class _HiredisPacking:
    """Packs commands with hiredis (C) instead of redis-py's Python code, which costs about
    11 µs more per command: a tenth of a publish. Same bytes on the wire."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str):  # "SCRIPT LOAD" and the like are several words
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        return [hiredis.pack_command(args)]

    def pack_commands(self, commands: Iterable[Iterable[Any]]) -> list[bytes]:
        return [b"".join(self.pack_command(*command)[0] for command in commands)]


class _TCPConnection(_HiredisPacking, redis.asyncio.connection.Connection):
    pass


class _TLSConnection(_HiredisPacking, redis.asyncio.connection.SSLConnection):
    pass


class _UnixConnection(_HiredisPacking, redis.asyncio.connection.UnixDomainSocketConnection):
    pass


def _connection_class(scheme: str) -> type[redis.asyncio.connection.AbstractConnection]:
    if scheme == "rediss":
        return _TLSConnection
    if scheme == "unix":
        return _UnixConnection
    return _TCPConnection


async def check_server(client: Redis, settings: Settings, keys: Keyspace) -> ServerInfo:
    """Verify version, eviction policy and partition count before anything is written.

    Works with each role of ``deploy/users.acl``: a user that may not run INFO is checked by
    HELLO for the version, with a warning that the eviction policy was not verified; a user
    that may not write the deployment hash only reads the partition count (and warns when no
    worker has recorded it yet). CONFIG is never used.

    Raises:
        ConnectionLostError: the server cannot be reached, or the TLS handshake failed (the
            message says why: untrusted certificate, host name mismatch, not a TLS port).
        ServerError: the server refused the credentials, may not be asked its version, or is
            older than Redis 6.2; or this user may not read the deployment hash.
        EvictionPolicyError: ``maxmemory-policy`` is not ``noeviction`` and
            ``settings.eviction_check == "refuse"``.
        ConfigurationError: the deployment was set up with another partition count.
    """
    with _first_contact(client):
        name, version, policy, appendonly = await _describe(client)
    if version[:2] < MIN_VERSION:
        shown = ".".join(map(str, version))
        raise ServerError(f"{name} {shown} is too old: streamstore needs Redis >= 6.2")
    with translate_redis_errors():
        await _check_partitions(client, settings, keys)
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


async def _describe(client: Redis) -> tuple[str, tuple[int, ...], str | None, bool | None]:
    """Name, version, eviction policy and AOF state from INFO; from HELLO (version only) when
    this user may not run INFO."""
    try:
        info = await client.info()  # the default sections: server, memory, persistence, ...
    except redis.exceptions.ResponseError as exc:  # NOPERM under a least-privilege ACL
        log.warning(
            "this Redis user may not run INFO (%s): the eviction policy and persistence are "
            "not verified by this connection (a worker's user verifies them at its start)",
            _first_line(exc),
        )
        try:
            execute: Callable[..., Awaitable[object]] = client.execute_command
            hello = await execute("HELLO", "2")
        except redis.exceptions.ResponseError as hello_exc:
            raise ServerError(
                "cannot tell the server's version: this Redis user may run neither INFO nor "
                f"HELLO ({_first_line(hello_exc)}); grant it +hello"
            ) from hello_exc
        fields = _pairs(hello)
        name = _text(fields.get("server")) or "redis"
        return name, _version(_text(fields.get("version"))), None, None
    name = "valkey" if "valkey_version" in info else "redis"
    version = _version(str(info.get("valkey_version") or info.get("redis_version", "0")))
    policy = info.get("maxmemory_policy")
    aof = info.get("aof_enabled")
    return (
        name,
        version,
        None if policy is None else str(policy),
        None if aof is None else str(aof) == "1",
    )


async def _check_partitions(client: Redis, settings: Settings, keys: Keyspace) -> None:
    """Compare the recorded partition count with ours; record it when it is absent (and this
    user may write it)."""
    recorded = await client.hget(keys.deployment, "partitions")
    if recorded is None:
        try:
            if await client.hsetnx(keys.deployment, "partitions", settings.partitions):
                return
        except redis.exceptions.NoPermissionError:
            log.warning(
                "deployment %r has no recorded partition count yet and this Redis user may not "
                "record it: start a worker first (it records %d at its start)",
                keys.prefix,
                settings.partitions,
            )
            return
        recorded = await client.hget(keys.deployment, "partitions")  # another process won
    try:
        existing = int(recorded or 0)
    except ValueError:
        existing = 0
    if existing != settings.partitions:
        raise ConfigurationError(
            f"this deployment (key prefix {keys.prefix!r}) uses {existing} partitions, "
            f"not {settings.partitions}: every process must use the same count"
        )


@contextlib.contextmanager
def _first_contact(client: Redis) -> Iterator[None]:
    """Translate failures of the first round trip into errors that say what to fix."""
    where = _address(client)
    try:
        with translate_redis_errors():
            yield
    except ConnectionLostError as exc:
        cause = exc.__cause__
        if isinstance(cause, redis.exceptions.AuthenticationError):
            raise ServerError(
                f"the Redis server at {where} refused the credentials: {_first_line(cause)} "
                "(give a role's user and password in the URL: redis://USER:PASSWORD@host)"
            ) from cause
        reason = _first_line(cause) if cause is not None else str(exc)
        hint = _tls_hint(client, cause)
        raise ConnectionLostError(f"cannot connect to {where}: {reason}{hint}") from cause


def _tls_hint(client: Redis, cause: BaseException | None) -> str:
    tls = _is_tls(client)
    chain: list[BaseException] = []
    while cause is not None and len(chain) < 5:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    text = " ".join(str(c) for c in chain)
    verify_failed = any(isinstance(c, ssl.SSLCertVerificationError) for c in chain) or (
        "CERTIFICATE_VERIFY_FAILED" in text
    )
    if tls and "mismatch" in text.lower():
        return (
            " (TLS: the server certificate does not name this host; connect with a host name "
            "the certificate lists)"
        )
    if tls and verify_failed:
        return (
            " (TLS: the server certificate is not trusted; set tls_ca_file to the CA that "
            "signed it)"
        )
    if tls and any(isinstance(c, ssl.SSLError) for c in chain):
        return " (TLS handshake failed: is this a TLS port of the server?)"
    if tls and "timeout" in text.lower():
        return " (no TLS handshake answer in time: is this a TLS port of the server?)"
    if not tls and any(word in text.lower() for word in ("closed by server", "reset by peer")):
        return " (if the server accepts only TLS, use a rediss:// URL)"
    return ""


def _is_tls(client: Redis) -> bool:
    connection_class = client.connection_pool.connection_class
    return "SSL" in getattr(connection_class, "__name__", "")


def _address(client: Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    scheme = "rediss" if _is_tls(client) else "redis"
    return f"{scheme}://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


def _pairs(reply: object) -> dict[str, object]:
    """A HELLO reply (a flat list under RESP2, a map under RESP3) as a dict with str keys."""
    if isinstance(reply, dict):
        return {str(_text(k)): v for k, v in reply.items()}
    if isinstance(reply, list):
        return {str(_text(reply[i])): reply[i + 1] for i in range(0, len(reply) - 1, 2)}
    return {}


def _version(raw: str | None) -> tuple[int, ...]:
    return tuple(int(p) for p in (raw or "0").split(".") if p.isdigit())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _text(value: object) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)
