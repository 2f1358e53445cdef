"""A server started from deploy/ (redis.conf, users.acl, append-only file) is restarted with
acknowledged messages that no worker has persisted yet: they must all still be there.

The shipped layout keeps the ``default`` user off but with every permission, because servers
that re-check EXEC against it while reloading the append-only file would otherwise drop every
script's writes (DESIGN.md section 7). With the old layout (``default`` off and restricted)
streamstore refuses such a server, and when told only to warn, the loss that follows a
restart is detected and reported by ``streamstore check`` (exit 3).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from streamstore import (
    Message,
    Persister,
    PersisterSettings,
    ScriptReplayError,
    Settings,
    StreamStore,
)
from streamstore.redis.server_check import drops_script_writes
from tests.faults.tally import Tally, record
from tests.test_acl import (
    ADMIN,
    DEPLOY,
    ROLES,
    SERVER_PARAMS,
    AclServer,
    ServerProcess,
    render_acl,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow]

RESTRICTED_DEFAULT = "user default off resetpass resetkeys resetchannels -@all"
"""The line deploy/users.acl shipped before: the ``default`` user disabled and stripped."""
MESSAGES = 30


class Deployment:
    """A server from deploy/redis.conf with a rendering of deploy/users.acl, restartable."""

    def __init__(self, binary: str, tmp: Path, *, default_line: str | None = None) -> None:
        self.binary = binary
        self.prefix = f"sst{uuid.uuid4().hex[:10]}"
        self.passwords = {name: secrets.token_hex(12) for name in (*ROLES, "healthcheck", ADMIN)}
        text = render_acl((DEPLOY / "users.acl").read_text(), self.prefix, self.passwords)
        if default_line is not None:
            lines = text.splitlines()
            assert lines[0].startswith("user default ")
            text = "\n".join([default_line, *lines[1:]]) + "\n"
        acl_file = tmp / "users.acl"
        acl_file.write_text(text)
        self.server = ServerProcess(binary, tmp, acl_file)
        self.server.start()
        self.acl = AclServer(self.server.port, self.prefix, self.passwords, tmp)

    @property
    def server_kind(self) -> str:
        return "embedded" if "valkey" in Path(self.binary).name else "system"

    @property
    def version(self) -> tuple[str, tuple[int, ...]]:
        with self.acl.client(ADMIN) as admin:
            info = admin.info("server")
        name = "valkey" if "valkey_version" in info else "redis"
        raw = str(info.get("valkey_version") or info["redis_version"])
        return name, tuple(int(part) for part in raw.split("."))

    def settings(self, role: str, **changes: object) -> Settings:
        return self.acl.settings(role).replace(**changes)

    def restart(self, *, kill: bool) -> None:
        """SIGTERM (a clean shutdown writes the append-only file) or SIGKILL, then start."""
        process = self.server.process
        assert process is not None
        if kill:
            process.send_signal(signal.SIGKILL)
            process.wait()
            self.server.process = None
        else:
            self.server.stop()
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


async def publish_without_worker(settings: Settings) -> tuple[str, list[Message]]:
    async with StreamStore.open(settings=settings) as store:
        session = await store.create_session(["alice", "bot"])
        acked = [
            await store.publish(session.id, sender="alice", content=f"m{i}")
            for i in range(MESSAGES - 10)
        ]
        acked += await store.publish_many(
            session.id, [{"sender": "bot", "content": f"b{i}"} for i in range(10)]
        )
    return session.id, acked


async def persist_and_read(settings: Settings, session_id: str) -> list[Message]:
    async with StreamStore.open(settings=settings) as store:
        await Persister(store, PersisterSettings(consumer="after-restart")).drain()
        return await store.history_store.read(session_id, limit=10 * MESSAGES)


def check_exit(settings: Settings, *, env: dict[str, str] | None = None) -> tuple[int, str]:
    """`streamstore check` as a separate process, with the given settings' URLs."""
    assert settings.redis_url is not None
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "streamstore",
            *("--redis-url", settings.redis_url, "--history-url", settings.history_url),
            *("--key-prefix", settings.key_prefix, "--partitions", str(settings.partitions)),
            "check",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("STREAMSTORE_")},
            **(env or {}),
        },
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize("kill", [False, True], ids=["clean-restart", "kill-9"])
@pytest.mark.parametrize("binary", SERVER_PARAMS, ids=lambda b: Path(str(b)).name)
async def test_shipped_deployment_keeps_every_acknowledged_message(
    binary: str, kill: bool, tmp_path: Path
) -> None:
    deployment = Deployment(binary, tmp_path)
    try:
        session_id, acked = await publish_without_worker(deployment.settings("producer"))
        deployment.restart(kill=kill)
        stored = await persist_and_read(deployment.settings("worker"), session_id)
        code, output = check_exit(deployment.settings("worker"))
    finally:
        deployment.stop()
    how = "SIGKILL with appendfsync always" if kill else "SIGTERM (clean shutdown)"
    counts = Tally(
        "server restarted, shipped ACL",
        f"{how}, then start; no worker ran before",
        "signal to the server",
        server=deployment.server_kind,
    )
    counts.count(acked, stored)
    counts.notes["check exit code"] = code
    counts.assert_exactly_once()
    assert code == 0, output


@pytest.mark.parametrize("binary", SERVER_PARAMS, ids=lambda b: Path(str(b)).name)
async def test_a_server_that_would_drop_script_writes_is_refused(
    binary: str, tmp_path: Path
) -> None:
    deployment = Deployment(binary, tmp_path, default_line=RESTRICTED_DEFAULT)
    try:
        affected = drops_script_writes(*deployment.version)
        if not affected:  # this version keeps them: nothing to refuse
            async with StreamStore.open(settings=deployment.settings("worker")) as store:
                assert store.server.replays_scripts is True
            return
        with pytest.raises(ScriptReplayError, match="user default off resetpass ~"):
            async with StreamStore.open(settings=deployment.settings("worker")):
                pass
        code, output = check_exit(deployment.settings("worker"))
    finally:
        deployment.stop()
    assert code == 3, output
    assert "unhealthy" in output
    assert "Traceback" not in output
    record(
        Tally(
            "restricted default user",
            "`user default off` with no permissions, append-only file on",
            "ACL file",
            server=deployment.server_kind,
            notes={"refused at start": True, "check exit code": code},
        )
    )


@pytest.mark.parametrize("binary", SERVER_PARAMS, ids=lambda b: Path(str(b)).name)
async def test_a_loss_after_the_check_was_bypassed_is_detected(binary: str, tmp_path: Path) -> None:
    deployment = Deployment(binary, tmp_path, default_line=RESTRICTED_DEFAULT)
    try:
        affected = drops_script_writes(*deployment.version)
        warn = {"eviction_check": "warn"}
        session_id, acked = await publish_without_worker(deployment.settings("producer", **warn))
        deployment.restart(kill=False)
        async with StreamStore.open(settings=deployment.settings("worker", **warn)) as store:
            lost_at = (await store.stats()).data_lost_at
        stored = await persist_and_read(deployment.settings("worker", **warn), session_id)
        code, output = check_exit(
            deployment.settings("worker"), env={"STREAMSTORE_EVICTION_CHECK": "warn"}
        )
    finally:
        deployment.stop()
    counts = Tally(
        "restricted default user, check bypassed",
        "`user default off` with no permissions; clean restart; no worker ran before",
        "ACL file + SIGTERM",
        server=deployment.server_kind,
    ).count(acked, stored)
    counts.notes["check exit code"] = code
    counts.notes["loss recorded"] = lost_at is not None
    record(counts)
    if not affected:  # the server keeps the scripts' writes: nothing lost, nothing to report
        assert (counts.lost, lost_at, code) == (0, None, 0), output
        return
    assert counts.lost == len(acked)  # every acknowledged message is gone ...
    assert lost_at is not None  # ... and the loss is recorded ...
    assert code == 3, output  # ... and reported
    assert "lost its data" in output
