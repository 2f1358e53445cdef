"""Connecting to the Redis-compatible server (TLS included) and checking that it is safe to use.

Credentials come with the URL (``redis://user:password@host:6379/0``), one ACL user per role
(see ``deploy/users.acl``); every check here works with the least privileged of those users.

A Redis Cluster is named by ``redis+cluster://host:port[,host:port...]`` (``rediss+cluster://``
with TLS): any reachable node lets the client discover the others. Every script call touches the
keys of one partition, which share a hash tag, so each one runs on the node owning that slot.

``memory://NAME`` (or ``memory://``) is a server inside this process, served by fakeredis
(:mod:`streamstore.redis.inprocess`): the same scripts and commands, no network, and nothing
survives the process.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final, TypeAlias, cast
from urllib.parse import SplitResult, parse_qs, urlsplit, urlunsplit

import redis.asyncio.connection
import redis.exceptions
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.typing import EncodableT

from streamstore.config import Settings
from streamstore.errors import (
    ConfigurationError,
    ConnectionLostError,
    ServerError,
)
from streamstore.redis._fastpath import ENABLED as fast_path_enabled
from streamstore.redis._fastpath import DirectExchange, HiredisPacking
from streamstore.redis.inprocess import SCHEME as IN_PROCESS_SCHEME
from streamstore.redis.inprocess import connect_in_process

__all__ = [
    "CONNECTION_CLASSES",
    "DEFAULT_PORT",
    "Client",
    "connect",
    "connect_timeout",
    "is_transient",
    "redact_url",
    "url_user",
]

log = logging.getLogger(__name__)

Client: TypeAlias = Redis | RedisCluster
"""What :func:`connect` returns: a client of one server, or of a Redis Cluster."""

_SCHEMES = ("redis", "rediss", "unix")
_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
DEFAULT_PORT = 6379


def url_user(url: str) -> str | None:
    """The Redis user a URL logs in as (None: the ``default`` user)."""
    return urlsplit(url).username or None


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, fit for logs and error messages."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hosts}"))


def connect(url: str, settings: Settings) -> Client:
    """A redis-py asyncio client for ``url`` that returns bytes and speaks RESP2: a
    :class:`~redis.asyncio.RedisCluster` for ``redis+cluster://`` and ``rediss+cluster://``
    URLs (``max_connections`` then applies per node), a :class:`~redis.asyncio.Redis` otherwise.
    ``memory://NAME`` gives a client of a server inside this process (fakeredis): one per NAME,
    shared by every client of that URL in the process, a private one for ``memory://``; it
    keeps nothing once the process ends (see :mod:`streamstore.redis.inprocess`).

    ``rediss://`` URLs always verify the server certificate (against ``settings.tls_ca_file``,
    else the system store) and its host name; ``tls_cert_file``/``tls_key_file`` present a
    client certificate. Nothing can turn verification off, and TLS options given with a
    plaintext URL are refused rather than ignored: streamstore never falls back to plaintext.
    Cluster nodes are reached at the addresses they announce, so with TLS their certificates
    must name those addresses.

    Nothing is sent before the first command.

    Raises:
        ConfigurationError: an unknown scheme, TLS options with a ``redis://``, ``unix://`` or
            ``memory://`` URL, ``ssl_*`` parameters in the URL, a TLS file that does not
            exist, a cluster URL with a database other than 0 or a malformed node address, or
            a ``memory://`` URL that is more than a name or lacks fakeredis and lupa.
    """
    parts = urlsplit(url)
    if parts.scheme == IN_PROCESS_SCHEME:
        return connect_in_process(url, settings)
    scheme = _CLUSTER_SCHEMES.get(parts.scheme, parts.scheme)
    if scheme not in _SCHEMES:
        raise ConfigurationError(
            "redis_url must start with redis://, rediss:// or unix:// (redis+cluster:// or "
            f"rediss+cluster:// for a Redis Cluster; memory:// in process), not "
            f"{parts.scheme!r}://"
        )
    tls_files = {
        "tls_ca_file": settings.tls_ca_file,
        "tls_cert_file": settings.tls_cert_file,
        "tls_key_file": settings.tls_key_file,
    }
    given = sorted(name for name, path in tls_files.items() if path is not None)
    if given and scheme != "rediss":
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
    options: dict[str, Any] = {
        "max_connections": settings.max_connections,
        "decode_responses": False,
        "protocol": 2,
        "socket_timeout": settings.socket_timeout_s,
        "socket_connect_timeout": connect_timeout(settings),
        "health_check_interval": 30,
        # A command that met a dropped connection (a server restart, CLIENT KILL) is sent
        # again on a new one. Everything streamstore sends may be repeated: publishes are
        # deduplicated by message id, the other scripts and XACK are idempotent, and entries
        # of a repeated group read stay pending until claimed. (A cluster client uses only
        # the count: it re-reads the cluster's layout between attempts.)
        "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries=3),
        "retry_on_error": [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
    }
    if scheme == "rediss":
        for name, path in tls_files.items():
            if path is not None and not Path(path).is_file():
                raise ConfigurationError(f"{name} {path!r} is not a readable file")
        options |= {
            "ssl_cert_reqs": "required",
            "ssl_check_hostname": True,
            "ssl_ca_certs": settings.tls_ca_file,
            "ssl_certfile": settings.tls_cert_file,
            "ssl_keyfile": settings.tls_key_file,
            "ssl_min_version": ssl.TLSVersion.TLSv1_2,
        }
    if parts.scheme in _CLUSTER_SCHEMES:
        return _connect_cluster(parts, scheme, options)
    # The URL's own options (query, credentials, database) win, as in ConnectionPool.from_url;
    # the connection class is ours whatever the URL says (the fast path's, when enabled).
    url_options = _url_options(url) | {"connection_class": CONNECTION_CLASSES[scheme]}
    pool = ConnectionPool(**(options | url_options))
    return Redis.from_pool(pool)  # closing the client closes the pool's connections


def connect_timeout(settings: Settings) -> float:
    """Seconds to open a connection (TCP and TLS handshakes): at most 5."""
    return min(settings.socket_timeout_s, 5.0)


def _url_options(url: str) -> dict[str, Any]:
    """redis-py's reading of a URL (host, port, credentials, database, query options).

    Raises:
        ConfigurationError: the URL does not parse (a port or database that is not a number,
            an unknown query option).
    """
    try:
        return dict(redis.asyncio.connection.parse_url(url))
    except ValueError as exc:
        raise ConfigurationError(f"invalid Redis URL {redact_url(url)!r}: {exc}") from None


def _connect_cluster(parts: SplitResult, scheme: str, options: dict[str, Any]) -> RedisCluster:
    """A cluster client for a ``redis+cluster://`` URL (``scheme`` is its plain scheme).

    Raises:
        ConfigurationError: a database other than 0, or a malformed node address.
    """
    userinfo, at, hosts = parts.netloc.rpartition("@")
    nodes = [_node_address(item) for item in hosts.split(",")]
    # The credentials, database and query of the first node's plain URL are those of all.
    host, port = nodes[0]
    first = f"{userinfo}{at}[{host}]:{port}" if ":" in host else f"{userinfo}{at}{host}:{port}"
    plain = urlunsplit(parts._replace(scheme=scheme, netloc=first))
    url_options = _url_options(plain)
    for name in ("host", "port", "connection_class"):
        url_options.pop(name, None)
    if url_options.pop("db", 0) != 0:
        raise ConfigurationError("a Redis Cluster has database 0 only: drop the /<db> part")
    return _Cluster(
        startup_nodes=[ClusterNode(host, port) for host, port in nodes],
        # redis:// or rediss://: a TCP or TLS connection class
        connection_class=cast(
            "type[redis.asyncio.connection.Connection]", CONNECTION_CLASSES[scheme]
        ),
        ssl=scheme == "rediss",
        **(options | url_options),
    )


def _node_address(text: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``host`` (port 6379) as (host, port).

    Raises:
        ConfigurationError: an empty host or a port that is not a number from 1 to 65535.
    """
    host, port = text, ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    elif ":" in text:
        host, _, port = text.rpartition(":")
    if not host or (port and not (port.isdigit() and 0 < int(port) < 65536)):
        raise ConfigurationError(f"cluster node address {text!r} is not host:port")
    return host, int(port) if port else DEFAULT_PORT


class _Cluster(RedisCluster):
    """redis-py's cluster client with three changes.

    Its node connections pack commands with hiredis. Failing to reach any node raises
    ConnectionError like any other lost connection (redis-py raises RedisClusterException,
    which is not a RedisError: neither its own retries nor streamstore's error translation
    would see it). And a command redirected too often ("TTL exhausted") raises TryAgainError,
    which streamstore treats as transient: redis-py 8.1 sends ASKING and the command it
    precedes on two different pooled connections, so while a slot is being migrated every
    command on a key already moved ping-pongs between the two nodes until it gives up. The
    command is retried by streamstore (readers, the persister, ``publish`` within
    ``max_block``) and succeeds once the slot is moved.
    """

    def __init__(
        self,
        *,
        connection_class: type[redis.asyncio.connection.Connection],
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # RedisCluster picks Connection or SSLConnection itself; every node is built from
        # these kwargs (the startup nodes already were).
        self.connection_kwargs["connection_class"] = connection_class
        for node in self.nodes_manager.startup_nodes.values():
            node.connection_class = connection_class

    async def initialize(
        self,
        additional_startup_nodes_info: list[tuple[str, int]] | None = None,
        last_failed_node_name: str | None = None,
    ) -> RedisCluster:
        try:
            return await super().initialize(additional_startup_nodes_info, last_failed_node_name)
        except redis.exceptions.RedisClusterException as exc:
            raise redis.exceptions.ConnectionError(str(exc)) from exc

    async def execute_command(self, *args: EncodableT, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except redis.exceptions.ClusterError as exc:
            if isinstance(exc, redis.exceptions.ResponseError):  # CLUSTERDOWN
                raise
            raise redis.exceptions.TryAgainError(
                f"{exc} (redirected too often: the cluster is moving a slot)"
            ) from exc


def is_transient(error: BaseException) -> bool:
    """Whether a translated error means "try again soon": a lost connection, or a Redis
    Cluster that is down (a node failed) or moving a slot, still so after redis-py's own
    retries."""
    if isinstance(error, ConnectionLostError):
        return True
    return isinstance(error, ServerError) and isinstance(
        error.__cause__, redis.exceptions.ClusterDownError | redis.exceptions.TryAgainError
    )


class _ClosedUnderUs(redis.asyncio.connection.AbstractConnection):
    """Raises ConnectionError, to be retried like any lost connection, where redis-py 8.1
    raises AttributeError: on a connection another task closed while this one was using it.
    The cluster client does that: after a connection error or a redirection storm it closes
    every connection to every node, those in use by other tasks included."""

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        try:
            await super().send_packed_command(command, check_health)
        except AttributeError as exc:
            raise redis.exceptions.ConnectionError("connection closed while sending") from exc

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except AttributeError as exc:
            raise redis.exceptions.ConnectionError("connection closed while reading") from exc


class _TCPConnection(_ClosedUnderUs, redis.asyncio.connection.Connection):
    pass


class _TLSConnection(_ClosedUnderUs, redis.asyncio.connection.SSLConnection):
    pass


class _UnixConnection(_ClosedUnderUs, redis.asyncio.connection.UnixDomainSocketConnection):
    pass


class _FastTCPConnection(HiredisPacking, DirectExchange, _TCPConnection):
    pass


class _FastTLSConnection(HiredisPacking, DirectExchange, _TLSConnection):
    pass


class _FastUnixConnection(HiredisPacking, DirectExchange, _UnixConnection):
    pass


CONNECTION_CLASSES: Final[dict[str, type[redis.asyncio.connection.AbstractConnection]]] = (
    {"redis": _FastTCPConnection, "rediss": _FastTLSConnection, "unix": _FastUnixConnection}
    if fast_path_enabled
    else {"redis": _TCPConnection, "rediss": _TLSConnection, "unix": _UnixConnection}
)
"""The connection class of each plain scheme: with the fast path
(:mod:`streamstore.redis._fastpath`) when it is enabled, else redis-py's own with streamstore's
repairs."""
