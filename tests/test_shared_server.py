"""Several processes on one data directory share one embedded server (SharedEmbeddedServer),
which stops when the last of them leaves, gracefully or killed; real processes throughout."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from streamstore.errors import EmbeddedServerError
from streamstore.redis.embedded import EmbeddedServer, SharedEmbeddedServer

BOUND_S = 30.0  # generous: the machine is shared; nothing here waits for it on success
PER_AGENT = 50

# An agent: opens SessionPersistence on a shared storage path, says so, waits for `go` (a file)
# so that every agent is connected at once, adds its messages to its own session, says which
# server it used, then waits for `leave` (a file) before closing, or is killed.
AGENT = """
import json, os, sys, time
from pathlib import Path
from streamstore import ChatMessage, SessionPersistence
storage, name, gate = sys.argv[1], sys.argv[2], Path(sys.argv[3])
p = SessionPersistence(storage_type="sqlite", storage_path=storage)
print(json.dumps({"open": os.getpid()}), flush=True)
while not (gate / "go").exists():
    time.sleep(0.01)
p.create_session(name, [name])
for k in range(int(sys.argv[4])):
    p.add_message(ChatMessage(id=f"{name}-{k}", session_id=name, sender=name, content=str(k)))
print(json.dumps({"added": p.get_session(name).message_count}), flush=True)
while not (gate / f"leave-{name}").exists():
    time.sleep(0.01)
p.close()
"""

READER = """
import json, sys
from streamstore import SessionPersistence
with SessionPersistence(storage_type="sqlite", storage_path=sys.argv[1]) as p:
    print(json.dumps({n: [m.id for m in p.get_messages(n, limit=10_000)] for n in sys.argv[2:]}))
"""


def server_pids(data_dir: Path) -> set[int]:
    """Pids of the running valkey-server/redis-server processes with ``--dir data_dir``."""
    found = set()
    wanted = str(data_dir.resolve()).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        named = argv and b"-server" in Path(os.fsdecode(argv[0])).name.encode()
        if named and any(a == b"--dir" and b == wanted for a, b in itertools.pairwise(argv)):
            found.add(int(entry.name))
    return found


def wait_until(condition: object, bound: float = BOUND_S) -> bool:
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return True
        time.sleep(0.05)
    return False


class Census:
    """Every server pid seen for a data directory while it runs (polled in a thread)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.seen |= server_pids(self.data_dir)
            time.sleep(0.02)

    def stop(self) -> set[int]:
        self._stop.set()
        self._thread.join()
        self.seen |= server_pids(self.data_dir)
        return self.seen


class Agent:
    def __init__(self, storage: Path, name: str, gate: Path, count: int = PER_AGENT) -> None:
        self.name, self.gate = name, gate
        self.process = subprocess.Popen(
            [sys.executable, "-c", AGENT, str(storage), name, str(gate), str(count)],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def read(self, key: str) -> int:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, f"agent {self.name} exited with {self.process.wait()} before {key!r}"
        value: int = json.loads(line)[key]
        return value

    def leave(self) -> None:
        (self.gate / f"leave-{self.name}").touch()
        assert self.process.wait(timeout=BOUND_S) == 0


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[Agent]]:
    made: list[Agent] = []
    yield made
    for agent in made:
        if agent.process.poll() is None:
            agent.process.kill()
        agent.process.wait()
        assert agent.process.stdout is not None
        agent.process.stdout.close()
    for pid in server_pids(tmp_path / "sessions" / "redis"):  # a failed test leaves none
        os.kill(pid, signal.SIGKILL)


def read_back(storage: Path, names: list[str]) -> dict[str, list[str]]:
    result = subprocess.run(
        [sys.executable, "-c", READER, str(storage), *names],
        capture_output=True,
        text=True,
        timeout=BOUND_S * 2,
        check=True,
    )
    ids: dict[str, list[str]] = json.loads(result.stdout)
    return ids


def test_four_processes_share_one_server_that_stops_after_the_last(
    tmp_path: Path, agents: list[Agent]
) -> None:
    storage, gate = tmp_path / "sessions", tmp_path / "gate"
    gate.mkdir()
    data_dir = storage / "redis"
    census = Census(data_dir)
    names = [f"agent-{i}" for i in range(4)]
    agents.extend(Agent(storage, name, gate) for name in names)
    for agent in agents:
        agent.read("open")
    assert len(server_pids(data_dir)) == 1  # all four are connected now
    (gate / "go").touch()
    assert [agent.read("added") for agent in agents] == [PER_AGENT] * 4
    for agent in agents:
        agent.leave()
    assert wait_until(lambda: not server_pids(data_dir)), "the server outlived its last user"

    ids = read_back(storage, names)  # starts the server again, and stops it
    assert wait_until(lambda: not server_pids(data_dir))
    assert len(census.stop()) == 2  # one for the four agents, one for the reader
    for name in names:
        assert ids[name] == [f"{name}-{k}" for k in range(PER_AGENT)]  # none lost, none twice


def test_the_owner_leaves_first_and_the_server_stays_for_the_others(
    tmp_path: Path, agents: list[Agent]
) -> None:
    storage, gate = tmp_path / "sessions", tmp_path / "gate"
    gate.mkdir()
    data_dir = storage / "redis"
    agents.append(Agent(storage, "owner", gate, count=1))
    agents[0].read("open")
    (server,) = server_pids(data_dir)
    agents.append(Agent(storage, "other", gate))
    agents[1].read("open")
    (gate / "go").touch()
    agents[0].read("added")
    agents[0].leave()  # the owner closes and exits while "other" still uses the server
    time.sleep(1.0)
    assert server_pids(data_dir) == {server}
    assert agents[1].read("added") == PER_AGENT
    agents[1].leave()
    assert wait_until(lambda: not server_pids(data_dir)), "the server outlived its last user"
    assert read_back(storage, ["other"])["other"] == [f"other-{k}" for k in range(PER_AGENT)]


def test_killed_users_do_not_keep_the_server_alive(tmp_path: Path, agents: list[Agent]) -> None:
    storage, gate = tmp_path / "sessions", tmp_path / "gate"
    gate.mkdir()
    data_dir = storage / "redis"
    agents.append(Agent(storage, "owner", gate))
    agents[0].read("open")
    (server,) = server_pids(data_dir)
    agents.append(Agent(storage, "other", gate))
    agents[1].read("open")
    os.killpg(agents[0].process.pid, signal.SIGKILL)  # the owner dies: the other still uses it
    agents[0].process.wait()
    time.sleep(1.0)
    assert server_pids(data_dir) == {server}
    # Its owner is dead but its watchdog guards it: not an orphan to take over.
    with pytest.raises(EmbeddedServerError, match=r"its watchdog \(pid \d+\) stops it"):
        EmbeddedServer(data_dir=data_dir).start()
    (gate / "go").touch()
    assert agents[1].read("added") == PER_AGENT
    os.killpg(agents[1].process.pid, signal.SIGKILL)  # the last user dies: its LOCK_SH with it
    agents[1].process.wait()
    assert wait_until(lambda: not server_pids(data_dir)), "a killed user kept the server alive"
    assert read_back(storage, ["other"])["other"] == [f"other-{k}" for k in range(PER_AGENT)]


# -- in one process: each SharedEmbeddedServer holds its own open file, as processes do ------


def test_join_detach_and_last_leave_in_process(tmp_path: Path) -> None:
    first, second = SharedEmbeddedServer(tmp_path), SharedEmbeddedServer(tmp_path)
    try:
        url = first.open()
        assert first.owner
        assert (tmp_path / "server.url").read_text().split() == [url, str(first.server_pid)]
        assert second.open() == url
        assert not second.owner
        assert second.server_pid == first.server_pid
        pid = first.server_pid
        first.close()  # detaches: the watchdog now waits for the last user
        with redis.Redis.from_url(url) as r:
            assert r.ping()
        assert server_pids(tmp_path) == {pid}
        # A plain EmbeddedServer on a directory in use is still refused.
        with pytest.raises(EmbeddedServerError, match=f"its server: pid {pid}"):
            EmbeddedServer(data_dir=tmp_path).start()
        second.close()
        assert wait_until(lambda: not server_pids(tmp_path))
    finally:
        first.close()
        second.close()


def test_last_owner_leaving_stops_the_server_and_a_newcomer_starts_again(tmp_path: Path) -> None:
    with SharedEmbeddedServer(tmp_path) as url:
        with redis.Redis.from_url(url) as r:
            r.set("k", "v")
        (pid,) = server_pids(tmp_path)
    assert not server_pids(tmp_path)  # stopped by close(), not later
    assert not (tmp_path / "server.url").exists()
    with SharedEmbeddedServer(tmp_path) as url, redis.Redis.from_url(url) as r:
        assert r.get("k") == b"v"
        assert server_pids(tmp_path) != {pid}


def test_a_directory_held_by_an_unshared_server_is_refused(tmp_path: Path) -> None:
    with EmbeddedServer(data_dir=tmp_path) as server:
        with pytest.raises(EmbeddedServerError, match="which does not share it"):
            SharedEmbeddedServer(tmp_path).open()
        assert server.pid is not None


def test_close_without_open_and_twice_does_nothing(tmp_path: Path) -> None:
    shared = SharedEmbeddedServer(tmp_path)
    shared.close()
    with pytest.raises(EmbeddedServerError, match="not open"):
        _ = shared.url
    shared.open()
    with pytest.raises(EmbeddedServerError, match="already using"):
        shared.open()
    shared.close()
    shared.close()
    assert wait_until(lambda: not server_pids(tmp_path))
