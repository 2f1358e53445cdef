"""The process that started the embedded server dies: its server must not outlive it, and a
server that did (its watchdog killed too) must not lock the data directory forever."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from streamstore.errors import EmbeddedServerError
from streamstore.redis.embedded import EmbeddedServer
from tests.faults.tally import Tally, record

TallyFactory = Callable[[str, str, str], Tally]

pytestmark = pytest.mark.faults

BOUND_S = 10.0  # generous: the machine is shared; the measured time is recorded, not asserted

# A real owner: starts the server (every write fsynced), starts a child of its own with
# close_fds=False (the watchdog's pipe must not leak into it, or the owner's death would go
# unnoticed while the child lives), prints the pids, then waits to be killed.
OWNER = """
import json, subprocess, sys, time
from streamstore.redis.embedded import EmbeddedServer
from streamstore.errors import EmbeddedServerError
server = EmbeddedServer(data_dir=sys.argv[1], appendfsync="always")
server.start()
child = subprocess.Popen(["sleep", "600"], close_fds=False, start_new_session=True)
print(json.dumps({"server": server.pid, "watchdog": server.watchdog_pid, "url": server.url,
                  "child": child.pid}), flush=True)
time.sleep(600)
"""


def running(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped by init) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return False
    return stat.rpartition(b")")[2].split()[0] not in (b"Z", b"X")


def wait_gone(pid: int, bound: float = BOUND_S) -> float:
    """Seconds until ``pid`` stopped running (polled), or about ``bound`` if it never did."""
    started = time.monotonic()
    while running(pid) and time.monotonic() - started < bound:
        time.sleep(0.005)
    return time.monotonic() - started


class Owner:
    def __init__(self, data_dir: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", OWNER, str(data_dir)],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own group, as a shell job in a terminal
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, f"owner exited with {self.process.wait()} before starting its server"
        started = json.loads(line)
        self.server: int = started["server"]
        self.watchdog: int = started["watchdog"]
        self.child: int = started["child"]
        self.url: str = started["url"]


@pytest.fixture
def owners() -> Iterator[Callable[[Path], Owner]]:
    """Start owner processes; whatever they started is killed (by pid) after the test."""
    made: list[Owner] = []

    def start(data_dir: Path) -> Owner:
        owner = Owner(data_dir)
        made.append(owner)
        return owner

    yield start
    for owner in made:
        for pid in (owner.watchdog, owner.server, owner.child):
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        if owner.process.poll() is None:
            owner.process.kill()
        owner.process.wait()
        assert owner.process.stdout is not None
        owner.process.stdout.close()


@pytest.fixture
def servers() -> Iterator[Callable[[Path], EmbeddedServer]]:
    made: list[EmbeddedServer] = []

    def make(data_dir: Path) -> EmbeddedServer:
        server = EmbeddedServer(data_dir=data_dir, appendfsync="always")
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop(timeout=2.0)


@pytest.mark.parametrize(
    "signum", [signal.SIGKILL, signal.SIGHUP, signal.SIGTERM], ids=lambda s: s.name
)
def test_server_dies_with_its_owner_and_the_next_owner_finds_its_data(
    tmp_path: Path,
    signum: signal.Signals,
    owners: Callable[[Path], Owner],
    servers: Callable[[Path], EmbeddedServer],
    tally: TallyFactory,
) -> None:
    counts = tally(
        "embedded owner killed",
        f"{signum.name} of the process that started the embedded server",
        f"kill -{signum.name.removeprefix('SIG')} of the owner's process group",
    )
    data_dir = tmp_path / "data"
    owner = owners(data_dir)
    with redis.Redis.from_url(owner.url) as r:
        r.set("k", "acknowledged")  # appendfsync always: on disk when the reply comes

    killed = time.monotonic()
    os.killpg(owner.process.pid, signum)  # what a closed terminal or `kill -9` does
    assert owner.process.wait(timeout=BOUND_S) != 0
    wait_gone(owner.server)
    server_gone_s = time.monotonic() - killed
    watchdog_gone_s = wait_gone(owner.watchdog)
    child_survived = running(owner.child)  # in its own session: the signal did not reach it

    started = time.monotonic()
    server = servers(data_dir)
    server.start()
    with redis.Redis.from_url(server.url) as r:
        value = r.get("k")
    restart_s = time.monotonic() - started

    counts.acknowledged = 1
    counts.persisted = int(value == b"acknowledged")
    counts.lost = 1 - counts.persisted
    counts.recovery_s = round(server_gone_s + restart_s, 3)
    counts.notes["server_stopped_s"] = round(server_gone_s, 3)
    counts.notes["next_owner_started_s"] = round(restart_s, 3)
    counts.assert_exactly_once()
    assert child_survived
    assert server_gone_s < BOUND_S, f"server pid {owner.server} outlived its owner"
    assert watchdog_gone_s < BOUND_S, f"watchdog pid {owner.watchdog} did not exit"


def test_orphaned_server_is_stopped_by_the_next_owner(
    tmp_path: Path,
    owners: Callable[[Path], Owner],
    servers: Callable[[Path], EmbeddedServer],
    tally: TallyFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    counts = tally(
        "embedded server orphaned",
        "SIGKILL of the owner and of its watchdog: the server survives, holding the lock",
        "kill -9 of the watchdog, then of the owner",
    )
    data_dir = tmp_path / "data"
    owner = owners(data_dir)
    with redis.Redis.from_url(owner.url) as r:
        r.set("k", "acknowledged")
    os.kill(owner.watchdog, signal.SIGKILL)
    owner.process.kill()
    owner.process.wait()
    time.sleep(0.5)
    assert running(owner.server)  # an orphan now: nobody else stops it

    started = time.monotonic()
    server = servers(data_dir)
    with caplog.at_level(logging.WARNING, logger="streamstore.redis.embedded"):
        server.start()
    takeover_s = time.monotonic() - started
    with redis.Redis.from_url(server.url) as r:
        value = r.get("k")

    counts.acknowledged = 1
    counts.persisted = int(value == b"acknowledged")
    counts.lost = 1 - counts.persisted
    counts.recovery_s = round(takeover_s, 3)
    counts.notes["takeover_s"] = round(takeover_s, 3)
    record(counts)
    assert not running(owner.server)
    assert server.pid != owner.server
    assert value == b"acknowledged"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        f"pid={owner.server}" in message and f"pid={owner.process.pid}" in message
        for message in warnings
    ), warnings


def test_live_owner_is_named_with_its_server_and_left_alone(
    tmp_path: Path,
    owners: Callable[[Path], Owner],
    servers: Callable[[Path], EmbeddedServer],
) -> None:
    data_dir = tmp_path / "data"
    owner = owners(data_dir)
    with pytest.raises(EmbeddedServerError) as info:
        servers(data_dir).start()
    message = str(info.value)
    assert "\n" not in message
    assert (
        f"data directory {data_dir} is in use by streamstore process {owner.process.pid} "
        f"(its server: pid {owner.server}); stop that process, or run "
        f"`streamstore server --data-dir {data_dir}` once"
    ) in message
    assert "STREAMSTORE_REDIS_URL" in message
    assert running(owner.server)
    assert running(owner.watchdog)
    with redis.Redis.from_url(owner.url) as r:
        assert r.ping()
