"""The ``memory://`` live tier: a Redis served inside this process by fakeredis (with lupa, so
the same Lua scripts run), for tests, demos and single-process use. Nothing survives the process.

``memory://NAME`` names one server per process: every client made for that URL, by any
deployment in the process, shares its data until the process ends (``forget`` drops it).
``memory://`` alone is a fresh, private server for each client (each ``Deployment.open``).

fakeredis is an optional dependency: the ``memory`` extra (``pip install '.[memory]'`` in
streamstore's source tree).
"""

from __future__ import annotations

import importlib.util
import logging
import re
import threading
import weakref
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

from redis.asyncio import ConnectionPool, Redis

from streamstore.config import Settings
from streamstore.errors import ConfigurationError

if TYPE_CHECKING:
    from fakeredis import FakeServer

__all__ = ["SCHEME", "VERSION", "connect_in_process", "forget", "in_process_url"]

log = logging.getLogger(__name__)

SCHEME: Final = "memory"
VERSION: Final = (7, 4)
"""The Redis version fakeredis is asked to behave as (and reported as the server's version)."""

_NAME: Final = re.compile(r"[A-Za-z0-9_.-]{0,64}")
_servers: dict[str, FakeServer] = {}
_servers_lock = threading.Lock()
_urls: weakref.WeakKeyDictionary[Redis, str] = weakref.WeakKeyDictionary()


def connect_in_process(url: str, settings: Settings) -> Redis:
    """A redis-py asyncio client (bytes, RESP2) of the in-process server ``url`` names:
    ``memory://NAME`` shares one per name in this process, ``memory://`` makes a private one.

    Raises:
        ConfigurationError: fakeredis or lupa is not installed, the URL has more than a name
            (credentials, a port, a path or a query), or TLS options are set.
    """
    parts = urlsplit(url)
    name = parts.netloc
    if parts.scheme != SCHEME or not _NAME.fullmatch(name) or parts.path not in ("", "/"):
        raise ConfigurationError(  # the URL itself is not shown: it may hold a password
            "an in-process Redis URL is memory:// or memory://NAME (NAME: up to 64 of "
            "A-Z a-z 0-9 _ . -), with no credentials, port, database or options"
        )
    if parts.query or parts.fragment:
        raise ConfigurationError("memory:// URLs take no options")
    tls = [
        option
        for option in ("tls_ca_file", "tls_cert_file", "tls_key_file")
        if getattr(settings, option) is not None
    ]
    if tls:
        raise ConfigurationError(f"{', '.join(tls)} given with memory://: it has no network")
    if any(importlib.util.find_spec(module) is None for module in ("fakeredis", "lupa")):
        raise ConfigurationError(  # fakeredis serves the commands, lupa runs the Lua scripts
            "redis_url memory:// needs fakeredis and lupa: the memory extra "
            "(pip install '.[memory]' in streamstore's source tree)"
        )
    from fakeredis import FakeServer  # noqa: PLC0415  (optional: imported only for memory://)
    from fakeredis.aioredis import FakeAsyncRedisConnection  # noqa: PLC0415

    with _servers_lock:
        server = _servers.get(name) if name else None
        fresh = server is None
        if server is None:
            server = FakeServer(version=VERSION, server_type="redis")
            if name:
                _servers[name] = server
    pool = ConnectionPool(
        connection_class=FakeAsyncRedisConnection,
        server=server,
        version=VERSION,
        server_type="redis",
        lua_modules=None,
        client_class=Redis,
        max_connections=settings.max_connections,
        socket_timeout=settings.socket_timeout_s,
        decode_responses=False,
        protocol=2,
    )
    client = Redis.from_pool(pool)
    shown = f"memory://{name}"
    _urls[client] = shown
    log.info(
        "opened the in-process Redis %s (fakeredis, %s): nothing in it survives this "
        "process, and no other process can reach it",
        shown,
        "a new server" if fresh else "shared with this process's other clients of that name",
    )
    return client


def in_process_url(client: object) -> str | None:
    """``memory://NAME`` when ``client`` was made by :func:`connect_in_process`, else None."""
    return _urls.get(client) if isinstance(client, Redis) else None


def forget(name: str) -> bool:
    """Drop the named in-process server (its clients keep what they hold); whether one was
    there. The next ``memory://NAME`` starts empty."""
    with _servers_lock:
        return _servers.pop(name, None) is not None
