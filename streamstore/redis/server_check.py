"""What streamstore checks about a server before it writes anything: version, eviction policy,
whether a restart would replay what the scripts wrote, the partition count, and the
deployment's epoch (whose loss means the server lost acknowledged messages).

Every check works with each role of ``deploy/users.acl``; what a role may not ask is reported
as not verified, never guessed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import anyio
import redis.asyncio.connection
import redis.exceptions

from streamstore.config import Settings
from streamstore.errors import (
    BackpressureError,
    ConfigurationError,
    ConnectionLostError,
    DatabaseMissingError,
    EvictionPolicyError,
    PermissionDeniedError,
    ScriptReplayError,
    ServerError,
    translate_redis_errors,
)
from streamstore.keys import GROUP, Keyspace
from streamstore.redis.connection import Client, connect_timeout
from streamstore.redis.scripts import Scripts
from streamstore.redis.topology import Topology, topology_of

__all__ = ["ServerInfo", "check_server", "drops_script_writes", "used_memory"]

log = logging.getLogger(__name__)

MIN_VERSION = (6, 2)
"""XAUTOCLAIM and exclusive XRANGE bounds arrived in Redis 6.2."""


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What streamstore learned about the server when it connected.

    ``maxmemory_policy`` and ``appendonly`` are None when this connection's user may not run
    INFO (a producer or subscriber under ``deploy/users.acl``): they were not verified. On a
    cluster they describe the primaries together: the first policy other than ``noeviction``
    any of them has, and whether all of them log appends.
    """

    name: str
    version: tuple[int, ...]
    maxmemory_policy: str | None
    appendonly: bool | None
    replays_scripts: bool | None = None
    """Whether a restart replays what the scripts wrote (False: it would drop it, see
    :func:`drops_script_writes`); None when this user could not verify it."""
    epoch: str | None = None
    """The deployment's epoch (None: this user could not read or set it)."""
    in_process: bool = False
    """Whether the server runs inside this process (``memory://``, fakeredis): it never evicts
    and logs nothing to disk (``appendonly`` False, nothing to replay); nothing it holds
    survives the process."""


async def used_memory(topology: Topology) -> int:
    """Bytes of memory the server uses (summed over a cluster's primaries); 0 when this
    user may not run INFO.

    Raises:
        redis.exceptions.RedisError: as the server or the connection raised it.
    """
    try:
        infos = await topology.infos("memory")
    except redis.exceptions.NoPermissionError:
        return 0
    return sum(int(info.get("used_memory", 0)) for info in infos)


def drops_script_writes(name: str, version: tuple[int, ...]) -> bool:
    """Whether this server version, reloading its append-only file, drops what scripts wrote
    when the ``default`` ACL user may not run those commands.

    Since Redis 7 a script's writes are logged as MULTI/EXEC, and while the file is reloaded
    EXEC checks the ACL again as the ``default`` user (redis/redis#14541, fixed by #14545;
    valkey-io/valkey#3983, fixed by #3984): with that user disabled by a ``user default off``
    line, which also takes all its permissions, every such transaction is dropped while plain
    writes survive. Measured here (AOF, two writes in one EVAL, a clean restart): Redis
    7.0.15 and Valkey 9.0.0, 9.1.0 and 9.1.1 drop them; Valkey 9.1.2 keeps them. Which Redis
    release carries the fix was not verified, so every Redis counts as affected.
    """
    if name == "valkey":
        return version < (9, 1, 2)
    return True


async def check_server(
    client: Client,
    settings: Settings,
    keys: Keyspace,
    scripts: Scripts,
    *,
    user: str | None = None,
) -> ServerInfo:
    """Verify version, eviction policy, script replay and partition count, and read or set the
    deployment's epoch, before anything is written. ``scripts`` are registered on ``client``;
    ``user`` is the connection's Redis user.

    A server inside this process (``memory://``) is described by its topology: it never evicts
    and has no append-only file, so nothing is replayed and ACL DRYRUN (which fakeredis lacks)
    is not needed.

    Works with each role of ``deploy/users.acl``: a user that may not run INFO is checked by
    HELLO for the version, with a warning that the eviction policy was not verified; one that
    may not run ACL DRYRUN leaves the replay check unverified (a worker's user verifies it);
    a user that may not write the deployment hash only reads it. CONFIG is never used. On a
    cluster, every primary's INFO is read: the oldest version counts, any node that may evict
    fails the check, and nodes that disagree on the policy are reported.

    A deployment whose partition count is recorded but whose epoch is gone has lost data
    (see deployment.lua): the loss is logged and recorded (``data_lost_at``, reported by
    ``stats()`` and ``streamstore check`` until acknowledged).

    Raises:
        ConnectionLostError: the server cannot be reached within the connect timeout, or the
            TLS handshake failed (the message says why: untrusted certificate, host name
            mismatch, not a TLS port, a cluster URL for a server that is not in cluster mode).
        ConfigurationError: the URL names a database the server does not have or that this
            user may not select; or the deployment was set up with another partition count.
        ServerError: the server refused the credentials, may not be asked its version, or is
            older than Redis 6.2; or this user may not read the deployment hash.
        EvictionPolicyError: ``maxmemory-policy`` is not ``noeviction`` and
            ``settings.eviction_check == "refuse"``.
        ScriptReplayError: the server logs appends, drops script writes on reload and its
            ``default`` user may not run them, and ``settings.eviction_check == "refuse"``.
    """
    topology = topology_of(client)
    with _first_contact(topology, settings):
        name, version, policy, appendonly = await _describe(topology)
    if version[:2] < MIN_VERSION:
        shown = ".".join(map(str, version))
        raise ServerError(f"{name} {shown} is too old: streamstore needs Redis >= 6.2")
    refuse = settings.eviction_check == "refuse"
    if policy is not None and policy != "noeviction":
        message = (
            f"the server's maxmemory-policy is {policy!r}: it may evict streams holding "
            "acknowledged messages; set it to noeviction"
        )
        if refuse:
            raise EvictionPolicyError(message)
        log.warning(message)
    replays: bool | None = True  # also when nothing is replayed: no append-only file
    if appendonly is None:  # this user may not run INFO
        replays = None
    elif appendonly and drops_script_writes(name, version):
        with translate_redis_errors(user=user):
            replays = await _default_user_replays(topology, keys)
    if replays is False:
        shown = ".".join(map(str, version))
        message = (
            f"{name} {shown} with append-only persistence would drop every message "
            "acknowledged since its last rewrite when it restarts: it replays the scripts' "
            "writes as the 'default' ACL user, which may not run them; give that user its "
            "permissions and keep it off (`user default off resetpass ~* &* +@all`, as "
            "deploy/users.acl does)"
        )
        if refuse:
            raise ScriptReplayError(message)
        log.warning(message)
    if appendonly is False and not topology.in_process:  # in process: said when it opened
        log.warning(
            "the server runs without append-only persistence: a restart loses "
            "messages not yet persisted to history"
        )
    with translate_redis_errors(user=user):
        epoch = await _record_deployment(client, settings, keys, scripts)
    return ServerInfo(name, version, policy, appendonly, replays, epoch, topology.in_process)


def _replay_probes(keys: Keyspace) -> list[tuple[str, ...]]:
    """Every write the scripts make, as logged in the append-only file, on a key of each kind
    they write: what the ``default`` user must be allowed for a reload to keep them."""
    stream = keys.stream_prefix(0) + "probe"
    meta = keys.meta_prefix(0) + "probe"
    feed = keys.feed(0)
    hashes = (meta, keys.deployment, keys.dedup(0, 0), keys.deferred(0))
    sets = (keys.index(0), keys.deadlines(0), keys.closing(0))
    return [
        ("XADD", stream, "1-1", "d", "x"),
        ("XADD", feed, "1-1", "k", "m"),
        ("XDEL", stream, "1-1"),
        ("XTRIM", stream, "MINID", "1-1"),
        ("XTRIM", feed, "MINID", "1-1"),
        ("XGROUP", "DELCONSUMER", feed, GROUP, "probe"),
        ("DEL", stream),
        ("PEXPIREAT", meta, "1"),
        ("PEXPIREAT", keys.dedup(0, 0), "1"),
        *(("HSET", key, "f", "v") for key in hashes),
        ("HDEL", keys.deferred(0), "f"),
        *(("ZADD", key, "0", "s") for key in sets),
        *(("ZREM", key, "s") for key in sets),
    ]


async def _default_user_replays(topology: Topology, keys: Keyspace) -> bool | None:
    """Whether the ``default`` user may run every write the scripts make (ACL DRYRUN); None
    when this user may not ask, or the server has no ACL DRYRUN (before Redis 7).

    Raises:
        ConnectionLostError: the server cannot be reached.
    """
    execute: Callable[..., Awaitable[object]] = topology.client.execute_command
    for probe in _replay_probes(keys):
        try:
            with translate_redis_errors():
                answer = await execute("ACL", "DRYRUN", "default", *probe, **topology.any_node())
        except ServerError as exc:  # this user may not ask (PermissionDeniedError), or Redis 6
            log.info("the replay of script writes was not verified: %s", _first_line(exc))
            return None
        if answer not in (b"OK", "OK"):
            log.info("the default user may not run %s: %s", probe[0], _text(answer))
            return False
    return True


async def _record_deployment(
    client: Client, settings: Settings, keys: Keyspace, scripts: Scripts
) -> str | None:
    """Read or set the epoch, record a loss it reveals, then check the partition count (or
    record it, after the epoch: a count without an epoch means the epoch was lost). Returns
    the epoch, None when this user may not read it or the server is out of memory.

    Raises:
        ConfigurationError: the deployment uses another partition count.
        PermissionDeniedError: this user may not read the deployment hash.
        redis.exceptions.RedisError: as the server or the connection raised it.
    """
    epoch: str | None
    try:
        with translate_redis_errors():
            epoch, state = await scripts.deployment_epoch(
                keys, os.urandom(8).hex(), now=time.time()
            )
    except (BackpressureError, PermissionDeniedError) as exc:  # full, or a read-only role
        log.info("the deployment's epoch was not set: %s", exc)
        epoch = _text(await client.hget(keys.deployment, "epoch"))
        partitions = await client.hget(keys.deployment, "partitions")
        state = "lost" if epoch is None and partitions is not None else "kept"
    if state == "lost":
        await _record_loss(client, keys)
    await _check_partitions(client, settings, keys)
    return epoch


async def _record_loss(client: Client, keys: Keyspace) -> None:
    """Log a loss of the server's data and record when it was found (a plain write, which
    survives what dropped the scripts' writes) where ``stats()`` and ``check`` report it."""
    log.error(
        "the Redis server lost data (its deployment epoch is gone while its partition count "
        "is not: it restarted without persistence, was flushed, or dropped the scripts' "
        "writes on reload): messages it acknowledged and nobody had persisted are lost; "
        "`streamstore check` reports it until `--acknowledge-data-loss`"
    )
    try:
        await client.hsetnx(keys.deployment, "data_lost_at", repr(time.time()))
    except redis.exceptions.NoPermissionError:
        log.error("this Redis user may not record the loss: run `streamstore check` as a worker")


async def _describe(topology: Topology) -> tuple[str, tuple[int, ...], str | None, bool | None]:
    """Name, version, eviction policy and AOF state from INFO; from HELLO (version only) when
    this user may not run INFO."""
    try:
        infos = await topology.infos()  # the default sections: server, memory, cluster, ...
    except redis.exceptions.ResponseError as exc:  # NOPERM under a least-privilege ACL
        _refuse_database(topology, exc)
        log.warning(
            "this Redis user may not run INFO (%s): the eviction policy and persistence are "
            "not verified by this connection (a worker's user verifies them at its start)",
            _first_line(exc),
        )
        try:
            execute: Callable[..., Awaitable[object]] = topology.client.execute_command
            hello = await execute("HELLO", "2", **topology.any_node())
        except redis.exceptions.ResponseError as hello_exc:
            raise ServerError(
                "cannot tell the server's version: this Redis user was refused "
                f"({_first_line(exc)}; then {_first_line(hello_exc)}); it needs +info or "
                "+hello, and on a cluster +cluster|slots +command (see deploy/users.acl)"
            ) from hello_exc
        fields = _pairs(hello)
        name = _text(fields.get("server")) or "redis"
        return name, _version(_text(fields.get("version"))), None, None
    if not topology.merges_per_partition and any(i.get("cluster_enabled") for i in infos):
        log.warning(
            "%s is a node of a Redis Cluster: unless it serves every slot, name the cluster "
            "with a redis+cluster://host:port[,host:port...] URL",
            topology.address(),
        )
    name = "valkey" if any("valkey_version" in info for info in infos) else "redis"
    if topology.in_process:
        name = "fakeredis"  # its version is the Redis version it behaves as
    version = min(
        _version(str(info.get("valkey_version") or info.get("redis_version", "0")))
        for info in infos
    )
    policies = {str(info.get("maxmemory_policy")) for info in infos}
    if len(policies) > 1:
        log.warning("the cluster's primaries disagree on maxmemory-policy: %s", sorted(policies))
    risky = sorted(policies - {"noeviction", "None"})
    policy = risky[0] if risky else policies.pop()
    aof = {str(info.get("aof_enabled")) for info in infos}
    return (
        name,
        version,
        None if policy == "None" else policy,
        None if aof == {"None"} else aof == {"1"},
    )


def _refuse_database(topology: Topology, exc: redis.exceptions.ResponseError) -> None:
    """Raise what a refused SELECT (sent by redis-py as the connection opens) means.

    Raises:
        ConfigurationError: the URL's database does not exist, or this user may not select it.
    """
    db = topology.client.get_connection_kwargs().get("db", 0)
    try:
        with translate_redis_errors():
            raise exc
    except DatabaseMissingError:
        raise ConfigurationError(
            f"the Redis URL names database {db}, which this server does not have "
            "(it has fewer databases): use /0"
        ) from None
    except PermissionDeniedError as refused:
        if refused.command == "SELECT":
            raise ConfigurationError(
                f"this Redis user may not select database {db}: use database 0 (/0), as "
                "every role of deploy/users.acl does"
            ) from None
    except ServerError:
        pass  # another refusal (INFO): the caller goes on without INFO


async def _check_partitions(client: Client, settings: Settings, keys: Keyspace) -> None:
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
def _first_contact(topology: Topology, settings: Settings) -> Iterator[None]:
    """Translate failures of the first round trip into errors that say what to fix, within
    the connect timeout (and a little more): redis-py's retries of a connection that timed out
    (a TLS handshake with a plaintext port never answers) would otherwise take four times it.

    Raises:
        ConnectionLostError, ServerError, ConfigurationError: as :func:`check_server` says.
    """
    where = topology.address()
    deadline = connect_timeout(settings) + 0.5
    try:
        with anyio.fail_after(deadline), translate_redis_errors():
            yield
    except TimeoutError as exc:
        hint = " (no TLS handshake answer: is this a TLS port of the server?)" * topology.uses_tls()
        raise ConnectionLostError(
            f"cannot connect to {where}: no answer within {deadline:g} s{hint}"
        ) from exc
    except ConnectionLostError as exc:
        cause = exc.__cause__
        if isinstance(cause, redis.exceptions.AuthenticationError):
            raise ServerError(
                f"the Redis server at {where} refused the credentials: {_first_line(cause)} "
                "(give a role's user and password in the URL: redis://USER:PASSWORD@host)"
            ) from cause
        reason = _first_line(cause) if cause is not None else str(exc)
        hint = _hint(topology.uses_tls(), cause)
        raise ConnectionLostError(f"cannot connect to {where}: {reason}{hint}") from cause


def _hint(tls: bool, cause: BaseException | None) -> str:
    chain: list[BaseException] = []
    while cause is not None and len(chain) < 5:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    text = " ".join(str(c) for c in chain)
    verify_failed = any(isinstance(c, ssl.SSLCertVerificationError) for c in chain) or (
        "CERTIFICATE_VERIFY_FAILED" in text
    )
    if "Cluster mode is not enabled" in text:
        return " (this server is not in cluster mode: use a redis:// or rediss:// URL)"
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
    closed = ("closed by server", "closed by the server", "reset by peer")  # redis-py 8.1, 8.2
    if not tls and any(word in text.lower() for word in closed):
        return " (if the server accepts only TLS, use a rediss:// URL)"
    return ""


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
