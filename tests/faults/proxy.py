"""A small asyncio TCP proxy between a client and the server, for real network faults:
lost replies, cut connections, added latency and jitter, half-open links."""

from __future__ import annotations

import asyncio
import random
import socket
from dataclasses import dataclass, field


@dataclass
class Faults:
    """What the proxy does to traffic right now (tests flip these while it runs)."""

    latency: float = 0.0
    jitter: float = 0.0
    drop_next_reply: int = 0
    """Swallow the next N server->client chunks, then cut that connection."""
    blackhole: bool = False
    """Forward nothing in either direction and close nothing (a half-open link)."""
    dropped: list[bytes] = field(default_factory=list)


class Proxy:
    """Listens on a free loopback port and forwards to ``target``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.faults = Faults()
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def cut_all(self) -> None:
        """Close every proxied connection now (both sides see a reset)."""
        for writer in list(self._writers):
            writer.close()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        self._writers |= {client_w, server_w}
        up = asyncio.create_task(self._pipe(client_r, server_w, client_w, upstream=True))
        down = asyncio.create_task(self._pipe(server_r, client_w, server_w, upstream=False))
        self._tasks |= {up, down}
        await asyncio.gather(up, down, return_exceptions=True)
        self._tasks -= {up, down}
        for writer in (client_w, server_w):
            self._writers.discard(writer)
            writer.close()

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        other: asyncio.StreamWriter,
        *,
        upstream: bool,
    ) -> None:
        try:
            while data := await reader.read(65536):
                while self.faults.blackhole:
                    await asyncio.sleep(0.01)
                if self.faults.latency or self.faults.jitter:
                    await asyncio.sleep(self.faults.latency + random.uniform(0, self.faults.jitter))
                if not upstream and self.faults.drop_next_reply > 0:
                    self.faults.drop_next_reply -= 1
                    self.faults.dropped.append(data)
                    writer.close()
                    other.close()
                    return
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
