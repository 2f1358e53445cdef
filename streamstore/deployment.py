"""A deployment, opened once from settings: the server (started when embedded), its client and
topology, the key space, the scripts, what the server checks found, and the history store.

:class:`~streamstore.StreamStore` (the application's facade), :class:`~streamstore.Persister`,
:class:`~streamstore.Sweeper` and the worker's metrics all take one; none of them reaches
through another.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import anyio
import anyio.to_thread

from streamstore.config import Settings
from streamstore.errors import translate_redis_errors
from streamstore.history import HistoryStore, history_from_url, history_url_on
from streamstore.keys import Keyspace
from streamstore.redis.connection import Client, connect, url_user
from streamstore.redis.embedded import EmbeddedServer, SharedEmbeddedServer
from streamstore.redis.scripts import Scripts
from streamstore.redis.server_check import ServerInfo, check_server
from streamstore.redis.topology import Topology, topology_of

__all__ = ["Deployment", "HasDeployment", "deployment_of"]


@dataclass(frozen=True, eq=False, slots=True)
class Deployment:
    """Everything a deployment's processes share, built once by :meth:`open`.

    Attributes:
        settings: the settings it was opened with.
        url: the Redis URL in use (the embedded server's when none was configured).
        topology: single server or cluster, and the client (``topology.client``).
        keys: every Redis key of the deployment.
        scripts: the server-side scripts, registered on the client.
        server: what the checks at connect found.
        history: the durable tier, open.
    """

    settings: Settings
    url: str
    topology: Topology
    keys: Keyspace
    scripts: Scripts
    server: ServerInfo
    history: HistoryStore

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, settings: Settings) -> AsyncIterator[Deployment]:
        """Start the embedded server when no Redis URL is set (or join the one other processes
        on the same data directory share, see
        :class:`~streamstore.redis.embedded.SharedEmbeddedServer`), connect, check the server
        and open history; undo all of it on exit.

        Raises:
            ConfigurationError: the URLs are unusable, or the partition count differs from
                the deployment's.
            EmbeddedServerError: no server binary, or it failed to start.
            UnsafeServerError: the server may evict keys or would drop the scripts' writes on
                restart (see ``eviction_check``).
            ConnectionLostError, ServerError: the server cannot be reached or refused.
            HistoryError: the history store cannot be opened.
        """
        async with contextlib.AsyncExitStack() as stack:
            url = settings.redis_url
            if url is None:
                data_dir = _embedded_dir(settings)
                if data_dir is None:  # a private temporary directory: nobody else can join
                    server = EmbeddedServer()
                    stack.push_async_callback(_stop, server.stop)
                    await anyio.to_thread.run_sync(server.start)
                    url = server.url
                else:  # other processes on this data directory share the server
                    shared = SharedEmbeddedServer(data_dir)
                    stack.push_async_callback(_stop, shared.close)
                    url = await anyio.to_thread.run_sync(shared.open)
            client = connect(url, settings)
            stack.push_async_callback(client.aclose)
            keys = Keyspace(settings.key_prefix, settings.partitions)
            scripts = Scripts.register(client)
            info = await check_server(client, settings, keys, scripts, user=url_user(url))
            history = history_from_url(history_url_on(settings.history_url, url))
            await history.open()
            stack.push_async_callback(history.close)
            yield cls(
                settings=settings,
                url=url,
                topology=topology_of(client),
                keys=keys,
                scripts=scripts,
                server=info,
                history=history,
            )

    @property
    def client(self) -> Client:
        """The redis-py client: a ``RedisCluster`` for a ``redis+cluster://`` URL."""
        return self.topology.client

    @property
    def user(self) -> str | None:
        """The Redis user of the URL (None: ``default``)."""
        return url_user(self.url)

    def redis_errors(self) -> contextlib.AbstractContextManager[None]:
        """Translate redis-py errors at the boundary, naming this deployment's Redis user in
        ACL refusals (see :func:`~streamstore.errors.translate_redis_errors`)."""
        return translate_redis_errors(user=self.user)


class HasDeployment(Protocol):
    """What holds a deployment: a :class:`~streamstore.StreamStore`."""

    @property
    def deployment(self) -> Deployment:
        """The deployment."""
        ...


def deployment_of(source: Deployment | HasDeployment) -> Deployment:
    """``source`` itself, or the deployment it holds (workers take either, so that
    ``Persister(store)`` works beside ``Persister(deployment)``)."""
    return source if isinstance(source, Deployment) else source.deployment


async def _stop(stop: Callable[[], None]) -> None:
    """Stop (or leave) the embedded server, off the event loop; safe if it never started."""
    await anyio.to_thread.run_sync(stop)


def _embedded_dir(settings: Settings) -> Path | None:
    """Where the embedded server keeps its append-only file: ``embedded_dir`` if set, else
    beside the SQLite history file (so unpersisted messages survive a restart), else a
    temporary directory."""
    if settings.embedded_dir is not None:
        return Path(settings.embedded_dir)
    parts = urlsplit(settings.history_url)
    if parts.scheme == "sqlite" and parts.path not in ("", "/"):
        return Path(parts.path[1:] + "-redis")
    return None
