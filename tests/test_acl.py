"""deploy/users.acl on a real server: each role works with its own user alone, and each user is
refused (NOPERM) outside its role and outside the key prefix; the default user is disabled.

The servers run ``deploy/redis.conf`` and an ACL file rendered from ``deploy/users.acl`` for
the test's own key prefix and passwords (plus an admin user for the test's own inspection).
On a three-master Redis Cluster (tests/cluster.py) the rendered users are added to every node
with ACL SETUSER, the same rules the file would load, and each role does its work through
``redis+cluster://`` URLs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

from streamstore import (
    ConfigurationError,
    PermissionDeniedError,
    Persister,
    PersisterSettings,
    ServerError,
    Settings,
    StreamStore,
    Sweeper,
    SweeperSettings,
)
from streamstore.errors import EmbeddedServerError
from streamstore.keys import GROUP, Keyspace
from streamstore.redis.embedded import find_server_binary
from tests.cluster import LocalCluster

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
ROLES = ("producer", "subscriber", "persister", "sweeper", "worker")
PARTITIONS = 4
ADMIN = "testadmin"
NO_RETRY = Retry(NoBackoff(), 0)
"""Refusals are the point here: no client-side retries with backoff."""
NO_SERVER = pytest.mark.skip(reason="no valkey-server or redis-server binary")
SCRIPT_REFUSED = re.compile(r"Redis user\b.* may not run ([A-Z]|a command in the \w+)")
"""How streamstore words an ACL refusal, of a command run inside one of its scripts or not
(the servers' own texts differ: Redis 7.0 names only the script's hash)."""
CLUSTER_DISCOVERY: list[tuple[str, ...]] = [
    ("CLUSTER", "SLOTS"),
    ("COMMAND",),
    ("COMMAND", "GETKEYS", "XREAD", "STREAMS", "k", "0"),
]
"""What redis-py's asyncio cluster client sends on its own: CLUSTER SLOTS to learn (and, after
a MOVED, relearn) the layout, COMMAND for the key positions of every command, COMMAND GETKEYS
for commands whose keys move (it is sent only for those not routed by streamstore)."""
CLUSTER_CHANGES: list[tuple[str, ...]] = [
    ("CLUSTER", "RESET", "HARD"),
    ("CLUSTER", "FAILOVER"),
    ("CLUSTER", "FORGET", "0" * 40),
    ("CLUSTER", "MEET", "127.0.0.1", "1"),
    ("CLUSTER", "ADDSLOTS", "0"),
    ("CLUSTER", "SETSLOT", "0", "STABLE"),
    ("CLUSTER", "FLUSHSLOTS"),
    ("READWRITE",),
]


# -- the shipped file, as text ---------------------------------------------------------------------


@dataclass(frozen=True)
class AclUser:
    """One line of an ACL file: the user's root rules and its selectors."""

    name: str
    enabled: bool
    root: frozenset[str]
    selectors: frozenset[frozenset[str]]

    @property
    def commands(self) -> frozenset[str]:
        """Every ``+command`` the user may run, in the root or in a selector."""
        found = {r for r in self.root if r.startswith("+")}
        for selector in self.selectors:
            found |= {r for r in selector if r.startswith("+")}
        return frozenset(found)


def parse_acl(text: str) -> dict[str, AclUser]:
    users = {}
    for line in text.splitlines():
        assert line.strip(), "the ACL file format has no blank or comment lines to rely on"
        selectors = frozenset(frozenset(body.split()) for body in re.findall(r"\(([^)]*)\)", line))
        words = re.sub(r"\([^)]*\)", "", line).split()
        assert words[0] == "user", line
        rules = frozenset(words[2:])
        users[words[1]] = AclUser(words[1], "on" in rules, rules, selectors)
    return users


def shipped_users() -> dict[str, AclUser]:
    return parse_acl((DEPLOY / "users.acl").read_text())


def test_every_role_has_a_user_and_default_is_disabled() -> None:
    """Nobody may log in as ``default`` (off, no password), yet it keeps every permission: a
    server reloading its append-only file checks the scripts' writes against it
    (tests/faults/test_aof_restart.py restarts one)."""
    users = shipped_users()
    assert set(ROLES) <= set(users)
    default = users["default"]
    assert not default.enabled
    assert "resetpass" in default.root
    assert "nopass" not in default.root
    assert not any(rule.startswith((">", "#")) for rule in default.root)
    assert {"~*", "&*", "+@all"} <= default.root
    for name, user in users.items():
        if not user.enabled:
            continue
        assert "nopass" not in user.root, name
        assert any(re.fullmatch(r"#[0-9a-f]{64}", r) for r in user.root), (
            f"{name}: passwords are stored as SHA-256 hashes only"
        )


def test_enabled_users_are_confined_to_the_prefix() -> None:
    """No enabled user may touch a key outside ``ss:``, a channel, or a whole category."""
    for name, user in shipped_users().items():
        if not user.enabled:
            continue
        rules = set(user.root).union(*user.selectors)
        keys = {r for r in rules if r.startswith(("~", "%"))}
        assert all(re.fullmatch(r"~ss:\S+", k) for k in keys), (name, keys)
        assert not any(r.startswith("&") or r in ("allkeys", "allchannels") for r in rules)
        assert not any(r.startswith("+@") for r in rules), f"{name}: grant commands one by one"
        assert "-@all" in user.root, name
        assert "resetchannels" in user.root, name
        for selector in user.selectors:
            assert "-@all" not in selector  # a selector only adds, it starts from nothing


def test_worker_user_is_exactly_persister_and_sweeper() -> None:
    """``streamstore worker`` runs both loops on one connection: its user is their union."""
    users = shipped_users()

    def grants(user: AclUser) -> set[tuple[str, frozenset[str]]]:
        """(command, key patterns that allow it) for every grant of the user."""
        out: set[tuple[str, frozenset[str]]] = set()
        for rules in (user.root, *user.selectors):
            keys = frozenset(r for r in rules if r.startswith("~"))
            out |= {(r, keys) for r in rules if r.startswith("+")}
        return out

    assert grants(users["worker"]) == grants(users["persister"]) | grants(users["sweeper"])


# -- servers ---------------------------------------------------------------------------------------


def _free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServerProcess:
    """A redis-server/valkey-server child started from ``deploy/redis.conf`` for one test."""

    def __init__(self, binary: str, workdir: Path, acl_file: Path) -> None:
        self.binary = binary  # not resolved: /usr/bin/redis-server is a symlink named for its mode
        self.workdir = workdir
        self.port = _free_port()
        self.conf = workdir / "redis.conf"
        self.conf.write_text(render_conf((DEPLOY / "redis.conf").read_text(), workdir, acl_file))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        log = self.workdir / "server.log"
        errors = (self.workdir / "stderr.log").open("wb")
        with errors:
            self.process = subprocess.Popen(
                [
                    *(self.binary, str(self.conf), "--port", str(self.port)),
                    *("--bind", "127.0.0.1", "--daemonize", "no", "--logfile", str(log)),
                    *("--appendfsync", "always"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errors,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while b"Ready to accept connections" not in _read(log):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (_read(self.workdir / "stderr.log") + _read(log))[-2000:]
                pytest.fail(f"{self.binary} did not start: {tail.decode(errors='replace')}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


def _read(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


def render_conf(text: str, workdir: Path, acl_file: Path) -> str:
    """deploy/redis.conf with the container paths (``dir``, ``aclfile``) pointed at the test's
    own; every other directive is kept as shipped."""
    text, dirs = re.subn(r"(?m)^dir .*$", f"dir {workdir}", text)
    text, acls = re.subn(r"(?m)^aclfile .*$", f"aclfile {acl_file}", text)
    assert (dirs, acls) == (1, 1), "redis.conf must set dir and aclfile once each"
    return text


def render_acl(text: str, prefix: str, passwords: dict[str, str]) -> str:
    """users.acl for another key prefix and passwords, plus an admin user for the test."""
    out = []
    for shipped in text.splitlines():
        name = shipped.split()[1]
        line = shipped.replace("~ss:", f"~{prefix}:")
        if name in passwords:
            digest = hashlib.sha256(passwords[name].encode()).hexdigest()
            line, count = re.subn(r"#[0-9a-f]{64}", f"#{digest}", line)
            assert count == 1, name
        out.append(line)
    out.append(f"user {ADMIN} on >{passwords[ADMIN]} ~* &* +@all")
    return "\n".join(out) + "\n"


def server_binaries() -> list[str]:
    """The servers to run: the embedded one (Valkey) and Debian's Redis 7.0 when present."""
    found: list[str] = []
    with contextlib.suppress(EmbeddedServerError):
        found.append(str(find_server_binary()))
    debian = "/usr/bin/redis-server"
    if Path(debian).exists() and debian not in found:
        found.append(debian)
    return found


@dataclass
class AclServer:
    """A running server loaded with the rendered ACL file, or a cluster (``cluster_nodes``:
    ``host:port,...``) whose nodes have the rendered users; ``port`` is then its first node's."""

    port: int
    prefix: str
    passwords: dict[str, str]
    tmp: Path
    cluster_nodes: str | None = None

    def url(self, user: str) -> str:
        if self.cluster_nodes is not None:
            return f"redis+cluster://{user}:{self.passwords[user]}@{self.cluster_nodes}"
        return f"redis://{user}:{self.passwords[user]}@127.0.0.1:{self.port}/0"

    def settings(self, user: str) -> Settings:
        return Settings(
            redis_url=self.url(user),
            history_url=f"sqlite:///{self.tmp}/history.db",
            key_prefix=self.prefix,
            partitions=PARTITIONS,
            block=0.5,
            socket_timeout=5.0,
            reconnect_timeout=5.0,
        )

    def client(self, user: str) -> redis.Redis:
        """A client of the server (of a cluster's first node)."""
        password = self.passwords[user]
        return redis.Redis("127.0.0.1", self.port, username=user, password=password, protocol=2)

    def admin(self) -> redis.Redis | redis.RedisCluster:
        """The test's admin user: of the server, or of the whole cluster."""
        if self.cluster_nodes is None:
            return self.client(ADMIN)
        password = self.passwords[ADMIN]
        return redis.RedisCluster(
            "127.0.0.1", self.port, username=ADMIN, password=password, protocol=2
        )

    @property
    def keys(self) -> Keyspace:
        return Keyspace(self.prefix, PARTITIONS)


SERVER_PARAMS: list[object] = [*server_binaries()] or [pytest.param("", marks=NO_SERVER)]


@pytest.fixture(
    scope="module",
    params=SERVER_PARAMS,
    ids=lambda binary: Path(binary).name,
)
def acl_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AclServer]:
    tmp = tmp_path_factory.mktemp("acl")
    prefix = f"sst{uuid.uuid4().hex[:10]}"
    passwords = {name: secrets.token_hex(12) for name in (*ROLES, "healthcheck", ADMIN)}
    acl_file = tmp / "users.acl"
    acl_file.write_text(render_acl((DEPLOY / "users.acl").read_text(), prefix, passwords))
    server = ServerProcess(request.param, tmp, acl_file)
    server.start()
    yield AclServer(server.port, prefix, passwords, tmp)
    server.stop()


def emptied(server: AclServer) -> AclServer:
    """``server`` with nothing under the prefix (and a fresh history file)."""
    with server.admin() as admin:
        for key in admin.scan_iter(match=server.keys.pattern):
            admin.delete(key)
    (server.tmp / "history.db").unlink(missing_ok=True)
    return server


@pytest.fixture
async def fresh(acl_server: AclServer) -> AclServer:
    return emptied(acl_server)


def add_users(cluster: LocalCluster, acl_text: str, users: set[str]) -> None:
    """Give every node of ``cluster`` the ``users`` of an ACL file's text, as ACL LOAD would."""
    for node in cluster.nodes:
        with node.client() as client:
            for line in acl_text.splitlines():
                _, name, *rules = re.findall(r"\([^)]*\)|\S+", line)  # a selector is one rule
                if name in users:
                    client.execute_command("ACL", "SETUSER", name, "reset", *rules)


@pytest.fixture(scope="module", params=SERVER_PARAMS, ids=lambda binary: Path(binary).name)
def acl_cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalCluster, AclServer]]:
    """A three-master cluster of each server binary (the embedded one's is the session's
    ``redis_cluster``) with the rendered role users on every node; its default user is left
    as it is, for the cluster helper and the test's inspection."""
    tmp = tmp_path_factory.mktemp("acl-cluster")
    embedded = ""
    with contextlib.suppress(EmbeddedServerError):
        embedded = str(find_server_binary())
    with contextlib.ExitStack() as stack:
        if request.param == embedded:
            cluster: LocalCluster = request.getfixturevalue("redis_cluster")
        else:
            cluster = LocalCluster(tmp, binary=Path(request.param))
            stack.callback(cluster.stop)
            cluster.start()
        prefix = f"sst{uuid.uuid4().hex[:10]}"
        passwords = {name: secrets.token_hex(12) for name in (*ROLES, "healthcheck", ADMIN)}
        acl_text = render_acl((DEPLOY / "users.acl").read_text(), prefix, passwords)
        add_users(cluster, acl_text, set(passwords))
        stack.callback(remove_users, cluster, set(passwords))
        nodes = ",".join(f"127.0.0.1:{node.port}" for node in cluster.nodes)
        yield cluster, AclServer(cluster.nodes[0].port, prefix, passwords, tmp, nodes)


def remove_users(cluster: LocalCluster, users: set[str]) -> None:
    for node in cluster.nodes:
        with node.client() as client:
            client.execute_command("ACL", "DELUSER", *users)


# -- the shipped server configuration --------------------------------------------------------------


def test_shipped_acl_file_loads_as_is(tmp_path: Path) -> None:
    """The file itself (not a rendering) loads, and its hashes are the documented dev passwords."""
    binaries = server_binaries()
    if not binaries:
        pytest.skip("no valkey-server or redis-server binary")
    for binary in binaries:
        workdir = tmp_path / Path(binary).name
        workdir.mkdir()
        server = ServerProcess(binary, workdir, DEPLOY / "users.acl")
        server.start()
        try:
            anonymous = redis.Redis(port=server.port, protocol=2, retry=NO_RETRY)
            with anonymous, pytest.raises(redis.exceptions.AuthenticationError):
                anonymous.ping()
            for user in ("healthcheck", *ROLES):
                client = redis.Redis(
                    port=server.port, username=user, password=f"dev-{user}-password", protocol=2
                )
                with client:
                    assert client.ping()
        finally:
            server.stop()


def test_server_runs_as_streamstore_requires(acl_server: AclServer) -> None:
    with acl_server.client(ADMIN) as admin:
        info = admin.info()
    assert info["maxmemory_policy"] == "noeviction"
    assert info["aof_enabled"] == 1
    assert int(info["maxmemory"]) > 0


def test_default_user_is_disabled(acl_server: AclServer) -> None:
    anonymous = redis.Redis(port=acl_server.port, protocol=2, retry=NO_RETRY)
    with anonymous, pytest.raises(redis.exceptions.AuthenticationError, match="required"):
        anonymous.ping()
    as_default = redis.Redis(
        port=acl_server.port, username="default", password="x", protocol=2, retry=NO_RETRY
    )
    with as_default, pytest.raises(redis.exceptions.AuthenticationError):
        as_default.ping()


async def test_open_without_credentials_says_so(acl_server: AclServer) -> None:
    settings = acl_server.settings("producer").replace(
        redis_url=f"redis://127.0.0.1:{acl_server.port}/0"
    )
    with pytest.raises(ServerError, match="refused the credentials: Authentication required"):
        async with StreamStore.open(settings=settings):
            pass
    wrong = settings.replace(redis_url=acl_server.url("producer").replace("@", "x@"))
    with pytest.raises(ServerError, match="refused the credentials") as caught:
        async with StreamStore.open(settings=wrong):
            pass
    assert acl_server.passwords["producer"] not in str(caught.value)


# -- each role works with its own user alone -------------------------------------------------------


async def test_each_role_works_with_its_own_user(fresh: AclServer) -> None:
    await every_role_does_its_work(fresh)


async def test_each_role_works_with_its_own_user_on_a_cluster(
    acl_cluster: tuple[LocalCluster, AclServer],
) -> None:
    """The same work through ``redis+cluster://`` URLs, and nothing refused on the way but
    what streamstore expects and works around (CLIENT SETINFO; INFO for the roles without it)."""
    cluster, server = acl_cluster
    for node in cluster.nodes:
        with node.client() as client:
            client.execute_command("ACL", "LOG", "RESET")

    await every_role_does_its_work(emptied(server))

    refused: set[tuple[str, str]] = set()
    for node in cluster.nodes:
        with node.client() as client:
            for entry in client.acl_log():
                if entry["username"] in server.passwords:
                    refused.add((entry["username"], entry["object"]))
    expected = {(role, "client|setinfo") for role in ROLES}
    expected |= {("producer", "info"), ("subscriber", "info")}
    assert refused <= expected


@pytest.mark.parametrize("role", [*ROLES, "healthcheck"])
def test_roles_may_discover_a_cluster_but_not_change_it(
    acl_cluster: tuple[LocalCluster, AclServer], role: str
) -> None:
    """ACL DRYRUN on a cluster node: checked, never run."""
    cluster, _ = acl_cluster
    with cluster.nodes[0].client() as client:

        def allowed(command: tuple[str, ...]) -> bool:
            return client.execute_command("ACL", "DRYRUN", role, *command) in (b"OK", "OK")

        if role != "healthcheck":  # a PING to one node: no cluster client
            assert [c for c in CLUSTER_DISCOVERY if not allowed(c)] == []
        assert [c for c in CLUSTER_CHANGES if allowed(c)] == []


async def every_role_does_its_work(fresh: AclServer) -> None:
    """Each role's part of a session's life, with its own user alone."""
    admin = fresh.admin()
    keys = fresh.keys
    persister_settings = PersisterSettings(consumer="p1", claim_idle=60.0)
    open_ = StreamStore.open
    async with open_(settings=fresh.settings("persister")) as persisting:  # records partitions
        persister = Persister(persisting, persister_settings)
        await persister.drain()  # creates the consumer group on every feed
        async with (
            open_(settings=fresh.settings("producer")) as producing,
            open_(settings=fresh.settings("subscriber")) as reading,
            open_(settings=fresh.settings("sweeper")) as sweeping,
        ):
            assert producing.server.maxmemory_policy is None  # INFO is not the producer's
            assert persisting.server.maxmemory_policy == "noeviction"

            # producer: create, publish (one and many), read session meta
            session = await producing.create_session(["alice", "bob"], ttl=60)
            first = await producing.publish(session.id, sender="alice", content="one")
            assert first.stream_id is not None
            cursor = first.stream_id

            # subscriber: live messages, as they are published
            received: list[str] = []

            async def listen() -> None:
                async for message in reading.subscribe(session.id, after=cursor):
                    received.append(message.content)
                    if len(received) == 2:
                        return

            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(listen)
                    await anyio.sleep(0.2)
                    await producing.publish_many(
                        session.id,
                        [
                            {"sender": "bob", "content": "two", "recipient": "alice"},
                            {"sender": "alice", "content": "three"},
                        ],
                    )
            assert received == ["two", "three"]
            assert (await producing.get_session(session.id)).message_count == 3
            assert [s.id for s in await producing.list_sessions()] == [session.id]

            # persister: into history; a poison entry goes to the dead letters
            admin.xadd(keys.session(session.id).feed, {"k": "m", "junk": "\xff"})
            stats = await persister.drain()
            assert (stats.persisted, stats.dead_lettered) == (3, 1)
            assert admin.xlen(keys.dead_letters) == 1

            # subscriber: replay across history and Redis, windowed history, wait_for
            assert [m.content async for m in reading.replay(session.id)] == [
                "one",
                "two",
                "three",
            ]
            assert [m.content for m in await reading.history(session.id, limit=2)] == [
                "two",
                "three",
            ]
            reply = await reading.wait_for(session.id, recipient="alice", after=cursor, timeout=5)
            assert reply.content == "two"

            # sweeper: close the idle session and, as all of it is persisted, retire it
            sweeper = Sweeper(sweeping, SweeperSettings(consumer_idle=0.0))
            later = time.time() + 3600
            report = await sweeper.sweep_once(now=later)
            assert (report.closed, report.retired) == (1, 1)
            assert report.consumers_removed >= 1  # p1: idle, nothing pending
            assert not admin.exists(keys.session(session.id).stream)
            await persister.drain()  # the close, into the history catalog

            # producer: close and delete its sessions
            other = await producing.create_session(["carol"])
            await producing.publish(other.id, sender="carol", content="bye")
            await producing.close_session(other.id)
            await producing.delete_session(other.id)
            assert not admin.exists(keys.session(other.id).stream)

    # worker (`streamstore worker` runs persister and sweeper on one connection)
    async with open_(settings=fresh.settings("worker")) as working:
        stats = await Persister(working, PersisterSettings(consumer="w1")).drain()
        # "bye" and the sessions created, closed and deleted (the deletion wins over "bye")
        assert (stats.read, stats.sessions, stats.dead_lettered) == (4, 3, 0)
        await Sweeper(working, SweeperSettings(consumer_idle=0.0)).sweep_once(now=later)
        snapshot = await working.stats()  # what the worker's /metrics serves
        assert snapshot.used_memory > 0
        assert snapshot.dead_letters == 1
        assert sum(p.published for p in snapshot.partitions) > 0
    admin.close()


async def test_first_reader_before_any_worker_warns(
    fresh: AclServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A read-only user on a deployment no worker has started: it opens (and says so)."""
    async with StreamStore.open(settings=fresh.settings("subscriber")):
        pass
    assert "may not record it" in caplog.text
    with fresh.client(ADMIN) as admin:
        assert not admin.exists(fresh.keys.deployment)
        admin.hset(fresh.keys.deployment, "partitions", PARTITIONS + 1)
    with pytest.raises(ConfigurationError, match="partitions"):  # read, compared, refused
        async with StreamStore.open(settings=fresh.settings("subscriber")):
            pass


# -- and is refused outside it ---------------------------------------------------------------------


def refused_commands(role: str, keys: Keyspace) -> list[tuple[str, ...]]:
    """Commands each role must be refused: another role's work, destruction, administration."""
    outside = Keyspace("other", PARTITIONS)
    session = keys.session("s1")
    feed, stream, meta, dead = session.feed, session.stream, session.meta, keys.dead_letters
    everyone: list[tuple[str, ...]] = [
        ("HGET", outside.deployment, "partitions"),
        ("GET", "unprefixed"),
        ("XADD", outside.feed(0), "*", "k", "v"),
        ("FLUSHALL",),
        ("CONFIG", "GET", "requirepass"),
        ("KEYS", "*"),
        ("SCAN", "0"),
        ("ACL", "LIST"),
        ("SHUTDOWN", "NOSAVE"),
        ("MONITOR",),
        ("PUBLISH", "channel", "x"),
        ("SELECT", "1"),
        ("UNLINK", stream),
        ("RENAME", feed, stream),
        *CLUSTER_CHANGES,  # refused before a single server could say it has no cluster
    ]
    by_role: dict[str, list[tuple[str, ...]]] = {
        "producer": [
            ("XREADGROUP", "GROUP", GROUP, "c", "STREAMS", feed, ">"),
            ("XACK", feed, GROUP, "0-1"),
            ("XGROUP", "DESTROY", feed, GROUP),
            ("XTRIM", feed, "MAXLEN", "0"),
            ("XRANGE", stream, "-", "+"),
            ("XREAD", "STREAMS", stream, "0"),
            ("DEL", feed),
            ("DEL", meta),
            ("PEXPIRE", feed, "1"),
            ("XADD", dead, "*", "k", "v"),
            ("INFO",),
        ],
        "subscriber": [
            ("XADD", stream, "*", "d", "x"),
            ("HSET", meta, "state", "closed"),
            ("HSETNX", keys.deployment, "partitions", "1"),
            ("DEL", stream),
            ("XREADGROUP", "GROUP", GROUP, "c", "STREAMS", feed, ">"),
            ("ZADD", keys.index(0), "0", "s1"),
            ("INFO",),
        ],
        "persister": [
            ("XADD", feed, "*", "k", "v"),
            ("XADD", stream, "*", "d", "x"),
            ("DEL", stream),
            ("PEXPIRE", meta, "1"),
            ("HDEL", meta, "state"),
            ("XTRIM", dead, "MAXLEN", "0"),
            ("XGROUP", "DESTROY", feed, GROUP),
            ("XGROUP", "DELCONSUMER", feed, GROUP, "c"),
            ("ZADD", keys.index(0), "0", "s1"),
        ],
        "sweeper": [
            ("XREADGROUP", "GROUP", GROUP, "c", "STREAMS", feed, ">"),
            ("XACK", feed, GROUP, "0-1"),
            ("XAUTOCLAIM", feed, GROUP, "c", "0", "0"),
            ("XGROUP", "DESTROY", feed, GROUP),
            ("XADD", stream, "*", "d", "x"),
            ("XADD", dead, "*", "k", "v"),
            ("DEL", feed),
            ("PEXPIRE", feed, "1"),
            ("HINCRBY", meta, "count", "1"),
        ],
        "worker": [
            ("XADD", stream, "*", "d", "x"),
            ("DEL", feed),
            ("PEXPIRE", feed, "1"),
            ("XGROUP", "DESTROY", feed, GROUP),
            ("HINCRBY", meta, "count", "1"),
        ],
        "healthcheck": [("HGET", keys.deployment, "partitions"), ("INFO",)],
    }
    return everyone + by_role[role]


@pytest.mark.parametrize("role", [*ROLES, "healthcheck"])
def test_each_user_is_refused_outside_its_role(acl_server: AclServer, role: str) -> None:
    with acl_server.client(role) as client:
        allowed = []
        for command in refused_commands(role, acl_server.keys):
            try:
                client.execute_command(*command)
            except redis.exceptions.NoPermissionError:
                continue
            except redis.exceptions.ResponseError as exc:  # refused, but not by the ACL
                allowed.append(f"{' '.join(command)} ({exc})")
            else:
                allowed.append(" ".join(command))
        assert not allowed, f"{role} may run: {allowed}"


@pytest.mark.parametrize(
    ("role", "attempt"),
    [
        ("subscriber", "publish"),
        ("subscriber", "create"),
        ("sweeper", "publish"),
        ("persister", "create"),
        ("producer", "persist"),
        ("subscriber", "persist"),
        ("producer", "sweep"),
        ("subscriber", "sweep"),
    ],
)
async def test_library_refuses_clearly_outside_the_role(
    fresh: AclServer, role: str, attempt: str
) -> None:
    """The scripts run with the caller's ACL: a role cannot borrow another's work by script."""
    async with StreamStore.open(settings=fresh.settings("worker")) as working:
        await Persister(working, PersisterSettings(consumer="w")).drain()
    async with StreamStore.open(settings=fresh.settings("producer")) as producing:
        session = await producing.create_session(["a"])
    async with StreamStore.open(settings=fresh.settings(role)) as store:
        work: dict[str, Callable[[], Awaitable[object]]] = {
            "publish": lambda: store.publish(session.id, sender="a", content="x"),
            "create": lambda: store.create_session(["a"]),
            "persist": lambda: Persister(store, PersisterSettings(consumer="x")).drain(),
            "sweep": lambda: Sweeper(store, SweeperSettings()).sweep_once(now=time.time() + 7200),
        }
        with pytest.raises(PermissionDeniedError, match=SCRIPT_REFUSED) as refused:
            await work[attempt]()
        if refused.value.script is not None:  # a script's work: it names the role that may
            assert refused.value.user == role
            assert refused.value.role not in (None, role)


async def test_no_user_reaches_another_prefix(fresh: AclServer) -> None:
    for role in ROLES:
        other = fresh.settings(role).replace(key_prefix="other")
        with pytest.raises(PermissionDeniedError, match=rf"Redis user '{role}' may not run"):
            async with StreamStore.open(settings=other):
                pass


PRODUCE_THREE = ("--count", "3", "--interval", "0")


def test_example_producer_needs_only_the_producer_user(fresh: AclServer) -> None:
    """deploy/examples/producer.py, as compose runs it, with the producer's credentials."""
    with fresh.client(ADMIN) as admin:
        admin.hset(fresh.keys.deployment, "partitions", PARTITIONS)  # as a worker would
        settings = fresh.settings("producer")
        env = {
            **os.environ,
            "STREAMSTORE_REDIS_URL": fresh.url("producer"),
            "STREAMSTORE_HISTORY_URL": "memory://",
            "STREAMSTORE_KEY_PREFIX": settings.key_prefix,
            "STREAMSTORE_PARTITIONS": str(settings.partitions),
        }
        result = subprocess.run(
            [sys.executable, str(DEPLOY / "examples" / "producer.py"), *PRODUCE_THREE],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
            env=env,
        )
        assert result.returncode == 0, result.stderr
        assert "closed after 3 messages" in result.stderr
        assert fresh.passwords["producer"] not in result.stderr + result.stdout
        published = sum(admin.xlen(feed) for feed in fresh.keys.feeds())
    assert published == 5  # the session created, three messages, the session closed
