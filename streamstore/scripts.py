"""The server-side Lua scripts, loaded once per client and called by SHA.

redis-py's ``Script`` objects reload a script transparently when the server answers NOSCRIPT
(after a restart or SCRIPT FLUSH), in plain calls and in pipelines alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

__all__ = ["Scripts"]


def _source(name: str) -> str:
    return resources.files("streamstore").joinpath("lua", f"{name}.lua").read_text("utf-8")


@dataclass(frozen=True, slots=True)
class Scripts:
    """The scripts, registered on one client."""

    publish: AsyncScript
    create_session: AsyncScript
    read_tail: AsyncScript
    advance: AsyncScript

    @classmethod
    def register(cls, client: Redis) -> Scripts:
        """Register every script on ``client`` (no round trip until first use)."""
        return cls(
            publish=client.register_script(_source("publish")),
            create_session=client.register_script(_source("create_session")),
            read_tail=client.register_script(_source("read_tail")),
            advance=client.register_script(_source("advance")),
        )
