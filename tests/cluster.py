"""A real Redis Cluster for the tests: three masters on loopback, built from the embedded server
binary with CLUSTER ADDSLOTSRANGE and CLUSTER MEET (no redis-cli, no containers).

Each node has its own data directory with its ``nodes.conf`` and append-only file, so a node
killed with SIGKILL comes back on the same port with the same identity, slots and data.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from streamstore.redis.embedded import find_server_binary

SLOTS = 16384
BUS_PORT_OFFSET = 10000
"""Redis Cluster nodes talk to each other on their client port + 10000."""


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port_pair(taken: set[int]) -> int:
    """A free loopback port whose cluster bus port (+10000) is free too."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        bus = port + BUS_PORT_OFFSET
        if port in taken or bus > 65535 or not _port_is_free(bus):
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


@dataclass(frozen=True)
class TlsFiles:
    """Certificate and key of every node, and the CA that signed them."""

    cert: Path
    key: Path
    ca: Path


class ClusterNodeProcess:
    """One ``--cluster-enabled`` server process with its own data directory; with ``tls``,
    on a TLS-only port (the cluster bus in TLS too)."""

    def __init__(
        self, binary: Path, data_dir: Path, port: int, tls: TlsFiles | None = None
    ) -> None:
        self.binary = binary
        self.data_dir = data_dir
        self.port = port
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None
        data_dir.mkdir(parents=True, exist_ok=True)

    def client(self) -> redis.Redis:
        if self.tls is None:
            return redis.Redis("127.0.0.1", self.port, protocol=2, socket_timeout=5)
        return redis.Redis(
            "127.0.0.1",
            self.port,
            protocol=2,
            socket_timeout=5,
            ssl=True,
            ssl_ca_certs=str(self.tls.ca),
        )

    def start(self) -> None:
        if self.tls is None:
            listen = ["--port", str(self.port)]
        else:
            listen = [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls.cert),
                "--tls-key-file", str(self.tls.key),
                "--tls-ca-cert-file", str(self.tls.ca),
                "--tls-auth-clients", "no",
                "--tls-cluster", "yes",
            ]  # fmt: skip
        args = [
            str(self.binary),
            "--bind", "127.0.0.1",
            *listen,
            "--dir", str(self.data_dir),
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(self.data_dir / "nodes.conf"),
            "--cluster-node-timeout", "2000",
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--maxmemory-policy", "noeviction",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "server.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, cwd=self.data_dir, start_new_session=True
        )
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.exceptions.RedisError), self.client() as client:
                if client.ping():
                    return
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.data_dir / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"cluster node on port {self.port} did not start:\n{log}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final fsync (appendfsync always already wrote it all)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def node_id(self) -> str:
        with self.client() as client:
            raw = client.execute_command("CLUSTER", "MYID")
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def info(self, section: str) -> dict[str, str]:
        with self.client() as client:
            raw = client.execute_command("CLUSTER", section.upper())
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return dict(
            line.split(":", 1) for line in text.splitlines() if ":" in line and line.strip()
        )


class LocalCluster:
    """Masters sharing the slot range (three by default), reachable as a
    ``redis+cluster://`` URL (``rediss+cluster://`` with ``tls``)."""

    def __init__(
        self,
        root: Path,
        masters: int = 3,
        *,
        binary: Path | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        server = binary or find_server_binary()
        self.tls = tls
        ports: set[int] = set()
        self.nodes: list[ClusterNodeProcess] = []
        for i in range(masters):
            port = _free_port_pair(ports)
            ports.add(port)
            self.nodes.append(ClusterNodeProcess(server, root / f"node{i}", port, tls))

    @property
    def url(self) -> str:
        scheme = "redis" if self.tls is None else "rediss"
        nodes = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)
        return f"{scheme}+cluster://{nodes}"

    def start(self) -> None:
        """Start every node, give each a third of the slots, join them, wait until ok."""
        for node in self.nodes:
            node.start()
        share = SLOTS // len(self.nodes)
        for i, node in enumerate(self.nodes):
            first = i * share
            last = SLOTS - 1 if i == len(self.nodes) - 1 else first + share - 1
            with node.client() as client:
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
        with self.nodes[0].client() as client:
            for node in self.nodes[1:]:
                client.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
        self.wait_ok()

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every node reports ``cluster_state:ok`` and knows every master.

        Raises:
            RuntimeError: not within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                states = [node.info("info") for node in self.nodes]
                if all(
                    s.get("cluster_state") == "ok"
                    and int(s.get("cluster_known_nodes", 0)) == len(self.nodes)
                    and int(s.get("cluster_slots_ok", 0)) == SLOTS
                    for s in states
                ):
                    return
            except redis.exceptions.RedisError as exc:
                states = [{"error": str(exc)}]
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok after {timeout} s: {states}")
            time.sleep(0.05)

    def owner(self, slot: int) -> int:
        """The index of the node serving ``slot``."""
        with self.nodes[0].client() as client:
            for first, last, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if first <= slot <= last:
                    port = int(primary[1])
                    return next(i for i, n in enumerate(self.nodes) if n.port == port)
        raise LookupError(f"slot {slot} is not served")

    def migrate_slot(self, slot: int, target: int, pause: float = 0.0) -> int:
        """Move ``slot`` and its keys to node ``target`` the way redis-cli --cluster reshard
        does (IMPORTING/MIGRATING, MIGRATE, then SETSLOT NODE on every node), one key at a
        time with ``pause`` between keys, so that clients meet ASK and TRYAGAIN during the
        move and MOVED after it. Returns the number of keys moved."""
        source = self.nodes[self.owner(slot)]
        dest = self.nodes[target]
        source_id, dest_id = source.node_id(), dest.node_id()
        with source.client() as src, dest.client() as dst:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dest_id)
            moved = 0
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1):
                src.execute_command("MIGRATE", "127.0.0.1", dest.port, keys[0], 0, 5000)
                moved += 1
                time.sleep(pause)  # commands run meanwhile on a half-moved slot
        for node in (dest, source, *self.nodes):
            with node.client() as client:
                client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dest_id)
        self.wait_ok()
        return moved

    def restart(self, index: int, down_for: float = 0.0) -> None:
        """SIGKILL one master, keep it down ``down_for`` seconds, start it again on the same
        port and data directory (its nodes.conf and append-only file), wait until ok."""
        node = self.nodes[index]
        node.kill()
        time.sleep(down_for)
        node.start()
        self.wait_ok()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
