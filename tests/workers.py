"""Persister worker processes for fault tests: started as real subprocesses, killed for real."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from streamstore import Settings
from streamstore.crashpoints import CRASH_POINT_ENV


class Worker:
    """``python -m streamstore worker`` against the test's server, history and key prefix."""

    def __init__(
        self,
        settings: Settings,
        log_dir: Path,
        consumer: str,
        *,
        crash_point: str | None = None,
        claim_idle: float = 30.0,
        batch_size: int = 200,
        metrics: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """``metrics``: serve /healthz and /metrics on a free port (see :meth:`metrics_url`);
        ``env``: more ``STREAMSTORE_*`` variables for the worker."""
        self.log_path = log_dir / f"worker-{consumer}-{time.monotonic_ns()}.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSTORE_")}
        if crash_point:
            environ[CRASH_POINT_ENV] = crash_point
        environ["STREAMSTORE_BLOCK"] = "0.2"
        environ["STREAMSTORE_PERSISTER_CLAIM_INTERVAL"] = "0.2"
        environ.update(env or {})
        assert settings.redis_url is not None
        args = [
            sys.executable,
            "-m",
            "streamstore",
            "--redis-url",
            settings.redis_url,
            "--history-url",
            settings.history_url,
            "--key-prefix",
            settings.key_prefix,
            "--partitions",
            str(settings.partitions),
            "worker",
            "--consumer",
            consumer,
            "--claim-idle",
            str(claim_idle),
            "--batch-size",
            str(batch_size),
            *(("--metrics-port", "0") if metrics else ()),
        ]
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(args, env=environ, stdout=self._log, stderr=self._log)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while "worker ready" not in self.log():
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited early:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker not ready in {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def metrics_url(self) -> str:
        """The worker's /healthz and /metrics endpoint (started with ``metrics=True``, ready)."""
        found = re.search(r"worker ready .*metrics=(http\S+)", self.log())
        assert found is not None, f"no metrics endpoint in the log:\n{self.log()}"
        return found.group(1)

    def wait_exit(self, timeout: float = 30.0) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM: a graceful stop; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.wait_exit()
