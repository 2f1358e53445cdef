"""Redis Cluster: the end-to-end guarantees on a real three-master cluster (tests/cluster.py).

Here the ``redis_url`` and ``raw`` fixtures name the cluster, so the single-server tests
imported below run again, unchanged, against it; the tests written here cover what only a
cluster has: scripts on every node, scripts flushed from the nodes, TLS, a master restarted mid-run,
a slot moved under load (ASK, TRYAGAIN, then MOVED).
"""

from __future__ import annotations

import logging
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis.asyncio import RedisCluster
from redis.crc import key_slot

from streamstore import (
    ConfigurationError,
    EvictionPolicyError,
    Message,
    Persister,
    PersisterSettings,
    Settings,
    StreamStore,
    Sweeper,
    SweeperSettings,
)
from streamstore.errors import ConnectionLostError, StreamStoreError
from streamstore.redis.connection import CONNECTION_CLASSES, connect, redact_url
from streamstore.redis.embedded import EmbeddedServer
from streamstore.redis.server_check import _describe
from streamstore.redis.topology import topology_of
from tests.cluster import LocalCluster, TlsFiles
from tests.faults.tally import Tally
from tests.test_persister import (  # noqa: F401  (collected again here, on the cluster)
    history_rows,
    publish_load,
    test_drain_persists_everything_once_and_trims,
    test_group_deleted_mid_run_recovers_without_duplicates,
    test_poison_entry_is_dead_lettered_and_does_not_block,
    test_sigkill_at_crash_point_then_restart_loses_and_duplicates_nothing,
    test_sigkill_during_claim_then_another_worker_finishes,
    wait_for_count,
)
from tests.test_publish import (  # noqa: F401
    test_concurrent_producers_keep_one_order,
    test_publish_lands_in_session_stream_and_feed,
    test_publish_many_is_one_atomic_batch,
    test_publish_writes_neither_stream_when_the_feed_write_would_fail,
    test_repeated_message_id_is_stored_once,
)
from tests.test_replay import (  # noqa: F401
    test_concurrent_replays_see_every_message_once_while_trimming,
    test_replay_after_trim_reads_trimmed_part_from_history,
    test_replay_spans_history_and_stream_in_order,
    test_subscriber_survives_client_kill_without_gap_or_duplicate,
)
from tests.test_tls import REDIS_SERVER, _openssl
from tests.workers import Worker

TallyFactory = Callable[[str, str, str], Tally]


@pytest.fixture(scope="session")
def redis_url(redis_cluster: LocalCluster) -> str:
    return redis_cluster.url


@pytest.fixture
def tally() -> TallyFactory:
    def make(scenario: str, fault: str, injection: str) -> Tally:
        return Tally(scenario, fault, injection, server="cluster")

    return make


class ClusterAdmin(RedisCluster):
    """The tests' own client on the cluster: its CLIENT KILL reaches every node, as the
    single-server tests' reaches their one server."""

    async def client_kill_filter(self, *args: Any, **kwargs: Any) -> Any:
        return await super().client_kill_filter(*args, target_nodes=self.PRIMARIES, **kwargs)


@pytest.fixture
async def raw(redis_cluster: LocalCluster, key_prefix: str) -> AsyncIterator[ClusterAdmin]:
    """A cluster client; deletes every key under the test's prefix afterwards."""
    client = ClusterAdmin(host="127.0.0.1", port=redis_cluster.nodes[0].port, protocol=2)
    yield client
    keys = [key async for key in client.scan_iter(match=f"{key_prefix}:*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def one_session_per_partition(store: StreamStore) -> list[str]:
    """Session ids, one in each partition (4 partitions: feeds on all three nodes)."""
    ids: dict[int, str] = {}
    n = 0
    while len(ids) < store.keys.partitions:
        ids.setdefault(store.keys.partition_of(f"s{n}"), f"s{n}")
        n += 1
    return [ids[p] for p in sorted(ids)]


def feed_nodes(store: StreamStore, cluster: LocalCluster) -> set[int]:
    return {cluster.owner(key_slot(feed.encode())) for feed in store.keys.feeds()}


# -- scripts ----------------------------------------------------------------------------------


async def test_every_script_runs_on_every_node(
    store: StreamStore, redis_cluster: LocalCluster
) -> None:
    assert feed_nodes(store, redis_cluster) == {0, 1, 2}
    ids = one_session_per_partition(store)
    for p, sid in enumerate(ids):  # every key a script is given shares the partition's slot
        keys = store.keys.session(sid)
        names = [keys.meta, keys.stream, keys.feed, keys.index, keys.deadlines]
        names += [store.keys.deferred(p), store.keys.closing(p), store.keys.dedup(p, 7)]
        assert len({key_slot(name.encode()) for name in names}) == 1
    for sid in ids:  # create_session.lua
        await store.create_session(["a"], id=sid, ttl=60)
    published: list[Message] = []

    async def publish(sid: str) -> None:  # publish.lua, direct and coalesced
        for i in range(20):
            published.append(await store.publish(sid, sender="a", content=f"{sid}:{i}"))

    async with anyio.create_task_group() as tg:
        for sid in ids:
            tg.start_soon(publish, sid)
    stats = await Persister(store, PersisterSettings(consumer="c1", batch_size=7)).drain()
    assert stats.persisted == len(published)  # advance.lua, pipelined with XACK
    for sid in ids:  # read_tail.lua
        assert [m.content async for m in store.replay(sid)] == [f"{sid}:{i}" for i in range(20)]
    await store.close_session(ids[0])  # end_session.lua
    await store.delete_session(ids[1])
    await Persister(store, PersisterSettings(consumer="c1")).drain()
    sweeper = Sweeper(store, SweeperSettings(consumer_idle=0))
    report = await sweeper.sweep_once(now=time.time() + 3600)  # end_session, advance, retire
    assert (report.closed, report.retired) == (2, 3)
    assert report.consumers_removed == store.keys.partitions  # reap_consumer.lua
    assert [s.id for s in await store.list_sessions()] == sorted(ids)
    await Persister(store, PersisterSettings(consumer="c1")).drain()  # the sweeper's closes
    deployment = await store.stats()
    assert deployment.used_memory > 0  # INFO of every primary, summed
    assert (deployment.live_sessions, deployment.backlog, deployment.pending) == (0, 0, 0)


async def test_scripts_flushed_on_every_node_are_loaded_again(
    store: StreamStore, redis_cluster: LocalCluster
) -> None:
    ids = one_session_per_partition(store)
    for sid in ids:
        await store.create_session(["a"], id=sid)
    await store.publish(ids[0], sender="a", content="loads the scripts")
    for node in redis_cluster.nodes:
        with node.client() as client:
            client.script_flush()
    published: list[Message] = []

    async def publish(sid: str) -> None:
        for i in range(10):
            published.append(await store.publish(sid, sender="a", content=str(i)))

    async with anyio.create_task_group() as tg:  # concurrent: coalesced into pipelines
        for sid in ids:
            tg.start_soon(publish, sid)
    for node in redis_cluster.nodes:
        with node.client() as client:
            client.script_flush()
    stats = await Persister(store, PersisterSettings(consumer="c1")).drain()
    assert stats.persisted == len(published) + 1
    assert (await store.stats()).backlog == 0  # the advance script ran: feeds trimmed


async def test_dead_letter_is_requeued_across_slots(store: StreamStore, raw: ClusterAdmin) -> None:
    """The dead-letter stream and the feeds live in different slots: dead-lettering and
    requeueing take two steps there, never one MULTI."""
    session = await store.create_session(["a"])
    feed = store.keys.session(session.id).feed
    assert key_slot(feed.encode()) != key_slot(store.keys.dead_letters.encode())
    await raw.xadd(feed, {b"garbage": b"entirely"})
    persister = Persister(store, PersisterSettings(consumer="c1"))
    assert (await persister.drain()).dead_lettered == 1
    (dead,) = await store.dead_letters()
    assert await store.requeue_dead_letter(dead.id)
    assert (await store.stats()).dead_letters == 0
    assert (await persister.drain()).dead_lettered == 2  # refused again, with its reason
    assert [d.feed for d in await store.dead_letters()] == [feed]


# -- connecting -------------------------------------------------------------------------------


def test_cluster_urls() -> None:
    settings = Settings(history_url="memory://")
    client = connect("redis+cluster://u:p%40ss@127.0.0.1:7001,[::1]:7002,example.org", settings)
    assert isinstance(client, RedisCluster)
    assert list(client.nodes_manager.startup_nodes) == [
        "127.0.0.1:7001",
        "::1:7002",
        "example.org:6379",
    ]
    kwargs = client.get_connection_kwargs()
    assert (kwargs["username"], kwargs["password"]) == ("u", "p@ss")
    tcp = CONNECTION_CLASSES["redis"]  # hiredis packing on every node, on the fast path
    assert kwargs["connection_class"] is tcp
    assert all(n.connection_class is tcp for n in client.startup_nodes)
    tls = connect("rediss+cluster://10.0.0.1:7001/0", settings)
    assert isinstance(tls, RedisCluster)
    tls_kwargs = tls.get_connection_kwargs()
    assert tls_kwargs["connection_class"] is CONNECTION_CLASSES["rediss"]
    assert (tls_kwargs["ssl_cert_reqs"], tls_kwargs["ssl_check_hostname"]) == ("required", True)
    assert redact_url("redis+cluster://u:secret@h1:1,h2:2/0") == "redis+cluster://u:***@h1:1,h2:2/0"


@pytest.mark.parametrize(
    ("url", "tls", "message"),
    [
        ("redis+cluster://h:1/3", {}, "database 0 only"),
        ("redis+cluster://h:1,h:x", {}, "not host:port"),
        ("redis+cluster://h:1,,h:2", {}, "not host:port"),
        ("redis+cluster://h:1", {"tls_ca_file": "ca.crt"}, "plaintext redis\\+cluster://"),
        ("rediss+cluster://h:1?ssl_cert_reqs=none", {}, "cannot be turned off"),
        ("cluster://h:1", {}, "redis\\+cluster://"),
    ],
)
def test_bad_cluster_urls_are_refused_before_any_connection(
    url: str, tls: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        connect(url, Settings(history_url="memory://", **tls))  # type: ignore[arg-type]


async def test_cluster_url_to_a_plain_server_fails_clearly(
    embedded_server: EmbeddedServer, key_prefix: str
) -> None:
    url = embedded_server.url.replace("redis://", "redis+cluster://")
    settings = Settings(redis_url=url, history_url="memory://", key_prefix=key_prefix)
    with pytest.raises(ConnectionLostError, match="not in cluster mode: use a redis://"):
        async with StreamStore.open(settings=settings):
            pass


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A one-node cluster (every slot) of Debian's TLS-capable redis-server on a TLS-only
    port. Its certificate names 127.0.0.1: cluster clients reach nodes at the addresses the
    cluster announces."""
    if shutil.which("openssl") is None or not Path(REDIS_SERVER).exists():
        pytest.skip(f"needs the openssl command and {REDIS_SERVER}")
    root = tmp_path_factory.mktemp("tls-cluster")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=streamstore test cluster ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=root,
    )  # fmt: skip
    (root / "node.ext").write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1\n"
    )
    _openssl("req", *ec, "-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=node", cwd=root)
    _openssl(
        "x509", "-req", "-in", "node.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "node.crt", "-days", "2", "-extfile", "node.ext",
        cwd=root,
    )  # fmt: skip
    tls = TlsFiles(cert=root / "node.crt", key=root / "node.key", ca=root / "ca.crt")
    cluster = LocalCluster(root, masters=1, binary=Path(REDIS_SERVER), tls=tls)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


async def test_tls_cluster_verifies_and_carries_everything(
    tls_cluster: LocalCluster, key_prefix: str
) -> None:
    assert tls_cluster.tls is not None
    settings = Settings(
        redis_url=tls_cluster.url,
        history_url="memory://",
        key_prefix=key_prefix,
        partitions=4,
        tls_ca_file=str(tls_cluster.tls.ca),
    )
    async with StreamStore.open(settings=settings) as store:
        session = await store.create_session(["a"])
        await store.publish(session.id, sender="a", content="over TLS")
        assert (await Persister(store, PersisterSettings(consumer="c1")).drain()).persisted == 1
        assert [m.content async for m in store.replay(session.id)] == ["over TLS"]
        assert isinstance(store.client, RedisCluster)
        connections = [c for node in store.client.get_nodes() for c in node._connections]
        assert connections
        assert all(type(c) is CONNECTION_CLASSES["rediss"] for c in connections)
    with pytest.raises(ConnectionLostError, match=r"not trusted.*tls_ca_file"):
        async with StreamStore.open(settings=settings.replace(tls_ca_file=None)):
            pass


async def test_plain_url_to_a_cluster_node_warns(
    redis_cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    client = connect(f"redis://127.0.0.1:{redis_cluster.nodes[0].port}", Settings())
    try:
        with caplog.at_level(logging.WARNING, logger="streamstore.redis.server_check"):
            await _describe(topology_of(client))
    finally:
        await client.aclose()
    assert "is a node of a Redis Cluster" in caplog.text
    assert "redis+cluster://" in caplog.text


async def test_eviction_policy_is_checked_on_every_primary(
    settings: Settings, redis_cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    last = redis_cluster.nodes[-1]
    with last.client() as client:
        client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        with pytest.raises(EvictionPolicyError, match="allkeys-lru"):
            async with StreamStore.open(settings=settings):
                pass
        with caplog.at_level(logging.WARNING, logger="streamstore.redis.server_check"):
            async with StreamStore.open(settings=settings.replace(eviction_check="warn")) as s:
                assert s.server.maxmemory_policy == "allkeys-lru"
        assert "primaries disagree on maxmemory-policy" in caplog.text
    finally:
        with last.client() as client:
            client.config_set("maxmemory-policy", "noeviction")


# -- faults -----------------------------------------------------------------------------------


async def publish_until(
    store: StreamStore, ids: list[str], stop: anyio.Event, acked: list[Message], tried: set[str]
) -> None:
    """Publish to every session in turn until ``stop``; a failed publish is retried with the
    same message id until it is acknowledged (what a careful producer does)."""
    n = 0
    while not stop.is_set():
        sid = ids[n % len(ids)]
        message_id = f"m{n}"
        tried.add(message_id)
        while True:
            try:
                acked.append(await store.publish(sid, sender="a", content=str(n), id=message_id))
                break
            except StreamStoreError:
                await anyio.sleep(0.05)
        n += 1
        await anyio.sleep(0.002)


async def run_under_load(store: StreamStore, fault: Callable[[], None], counts: Tally) -> None:
    """Publish to a session in every partition, follow one and persist while ``fault`` runs in
    a thread; then let everything drain and check: every acknowledged message in history
    exactly once, and seen live exactly once, in order."""
    ids = one_session_per_partition(store)
    for sid in ids:
        await store.create_session(["a"], id=sid)
    persister = Persister(store, PersisterSettings(consumer="c1", retry_backoff=0.05))
    acked: list[Message] = []
    tried: set[str] = set()
    seen: list[Message] = []
    stop = anyio.Event()

    async def subscriber() -> None:
        async for message in store.subscribe(ids[0], after="0"):
            seen.append(message)
            if message.content == "the end":
                return

    with anyio.fail_after(90):
        async with anyio.create_task_group() as tg:
            await tg.start(persister.run)
            tg.start_soon(subscriber)
            async with anyio.create_task_group() as producing:
                producing.start_soon(publish_until, store, ids, stop, acked, tried)
                await anyio.sleep(0.5)
                await anyio.to_thread.run_sync(fault)
                await anyio.sleep(0.5)
                stop.set()
            # The producer has returned: "the end" is the followed session's last message (two
            # publishes in flight at once may be answered in either order).
            acked.append(await store.publish(ids[0], sender="a", content="the end"))
            while await store.history_store.count_messages() < len(acked):
                await anyio.sleep(0.05)
            persister.stop()
    rows = await history_rows(store.settings, set(ids))
    counts.count(acked, [m for r in rows.values() for m in r], attempted_ids=tried)
    counts.notes["persister errors"] = persister.stats.errors
    counts.assert_exactly_once()
    # one producer per session, retrying with the same id: acknowledged in stream order
    assert [m.id for m in seen] == [m.id for m in acked if m.session_id == ids[0]]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("victim", "down_for"),
    [("followed", 0.5), ("default", 0.5), ("followed", 4.0)],
    ids=["followed-node-brief", "client-default-node-brief", "past-node-timeout"],
)
async def test_master_restarted_mid_run_loses_and_repeats_nothing(
    store: StreamStore,
    redis_cluster: LocalCluster,
    tally: TallyFactory,
    victim: str,
    down_for: float,
) -> None:
    """A master is killed (SIGKILL) and restarted on its port, data dir and nodes.conf while
    producers publish, a subscriber follows and the persister runs: the master serving the
    followed session, or the one redis-py's client asks about the cluster (its default
    node). Down past the node timeout, the whole cluster answers CLUSTERDOWN until the master
    is back."""
    counts = tally(
        f"cluster master restarted ({down_for:g} s down, {victim} node)",
        "SIGKILL of a master, restart from its append-only file and nodes.conf",
        "kill -9 of one of three masters",
    )
    if victim == "default":
        port = int(store.client.get_default_node().port)  # type: ignore[union-attr]
        index = next(i for i, node in enumerate(redis_cluster.nodes) if node.port == port)
    else:
        index = redis_cluster.owner(key_slot(store.keys.feed(0).encode()))
    await run_under_load(store, lambda: redis_cluster.restart(index, down_for=down_for), counts)


@pytest.mark.slow
async def test_slot_moved_under_load_loses_and_repeats_nothing(
    store: StreamStore, redis_cluster: LocalCluster, tally: TallyFactory
) -> None:
    """The slot of a partition (its feed, session streams, meta, dedup hashes, consumer group)
    moves to another node while producers publish, a subscriber follows and the persister
    runs; clients meet ASK and TRYAGAIN during the move and MOVED after it."""
    counts = tally(
        "cluster slot moved",
        "CLUSTER SETSLOT MIGRATING/IMPORTING, MIGRATE key by key, SETSLOT NODE",
        "resharding one partition's slot",
    )
    slot = key_slot(store.keys.feed(0).encode())
    source = redis_cluster.owner(slot)
    target = (source + 1) % len(redis_cluster.nodes)
    moved: list[int] = []

    def move() -> None:
        moved.append(redis_cluster.migrate_slot(slot, target, pause=0.05))

    try:
        await run_under_load(store, move, counts)
    finally:
        if redis_cluster.owner(slot) != source:
            redis_cluster.migrate_slot(slot, source)
    assert moved[0] >= 5  # the partition's feed, index, and its session's stream, meta, dedup


@pytest.mark.slow
async def test_three_workers_one_killed_after_commit_then_restarted(
    store: StreamStore, settings: Settings, tmp_path: Path, tally: TallyFactory
) -> None:
    """A worker is SIGKILLed between its commit and its XACK; two others start, take the
    feeds of all three nodes while more is published, and claim what it left pending; then it
    comes back under its own name."""
    counts = tally(
        "3 persisters on a cluster, one killed after commit",
        "SIGKILL between commit and XACK, restart with the same consumer name",
        "crash point after_commit",
    )
    published = await publish_load(store, sessions=6, per_session=100)
    crashing = Worker(settings, tmp_path, "w3", crash_point="after_commit", claim_idle=0.5)
    assert crashing.wait_exit() == -signal.SIGKILL, crashing.log()
    workers = [Worker(settings, tmp_path, f"w{i}", claim_idle=0.5) for i in (1, 2)]
    for worker in workers:
        worker.wait_ready()
    published += await publish_load(store, sessions=6, per_session=100)
    workers.append(Worker(settings, tmp_path, "w3", claim_idle=0.5))
    workers[-1].wait_ready()  # a SIGTERM before its handlers are installed would kill it
    assert await wait_for_count(settings, len(published)) == len(published)
    for worker in workers:
        assert worker.terminate() == 0, worker.log()
    rows = await history_rows(settings, {m.session_id for m in published})
    counts.count(published, [m for r in rows.values() for m in r]).assert_exactly_once()
