"""The session-persistence façade: the seeds' scripts run unchanged on the real machinery, from
threads, inside an event loop, and across a process restart."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import anyio
import pytest

from streamstore import (
    AsyncSessionPersistence,
    ChatMessage,
    ConfigurationError,
    PersistenceConfig,
    SessionPersistence,
    Settings,
)

ROOT = Path(__file__).resolve().parent.parent


def readme_script() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Coming from a session-persistence script", 1)[1]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)[0]


def run_script(script: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSTORE_")}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    return done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("storage_type", ["sqlite", "json", "redis"])
def test_the_readme_script_runs_and_its_session_survives_a_restart(
    storage_type: str, tmp_path: Path
) -> None:
    """The seeds' own calls, as the README shows them (only the storage type swapped), each
    on the embedded server in ./sessions; then a second process finds the session and its
    message."""
    script = readme_script()
    assert 'storage_type="sqlite"' in script
    first = run_script(script.replace('"sqlite"', f'"{storage_type}"'), tmp_path)
    session_id = re.search(r"session_id='([0-9a-f-]+)'", first).group(1)  # type: ignore[union-attr]
    assert "Hello Agent-2!" in first
    again = run_script(
        "from streamstore import SessionPersistence\n"
        f"p = SessionPersistence(storage_type={storage_type!r}, storage_path='sessions')\n"
        f"s = p.get_session({session_id!r})\n"
        f"print(s.participants, [m.content for m in p.get_messages({session_id!r})])\n"
        "print(p.get_stats()['stored_messages'])\n",
        tmp_path,
    )
    assert again.splitlines() == ["['Agent-1', 'Agent-2', 'Agent-3'] ['Hello Agent-2!']", "1"]
    files = {
        "sqlite": tmp_path / "sessions" / "history.db",
        "json": tmp_path / "sessions" / "index.json",
        "redis": tmp_path / "sessions" / "redis" / "appendonlydir",
    }
    assert files[storage_type].exists()


def options(settings: Settings, tmp_path: Path) -> dict[str, object]:
    """The test server and prefix, a storage path of the test's own."""
    assert settings.redis_url is not None
    return {
        "storage_type": "sqlite",
        "storage_path": str(tmp_path / "sessions"),
        "redis_url": settings.redis_url,
        "key_prefix": settings.key_prefix,
        "partitions": settings.partitions,
    }


def chat(session_id: str, content: str, **fields: object) -> ChatMessage:
    return ChatMessage(
        id=str(uuid.uuid4()),
        session_id=session_id,
        sender=str(fields.pop("sender", "Agent-1")),
        recipient=str(fields.pop("recipient", "Agent-2")),
        content=content,
        timestamp=time.time(),
    )


def test_eight_threads_at_once_lose_and_repeat_nothing(settings: Settings, tmp_path: Path) -> None:
    with SessionPersistence(**options(settings, tmp_path)) as persistence:
        session = persistence.create_session(participants=["Agent-1", "Agent-2"])
        sent: list[list[ChatMessage]] = [[] for _ in range(8)]

        def agent(n: int) -> None:
            for i in range(50):
                message = chat(session.session_id, f"{n}:{i}", sender=f"Agent-{n}")
                persistence.add_message(message)
                sent[n].append(message)

        threads = [threading.Thread(target=agent, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stored = persistence.get_messages(session.session_id, limit=1000)
        assert sorted(m.id for m in stored) == sorted(m.id for batch in sent for m in batch)
        for n in range(8):  # each agent's own messages in the order it sent them
            mine = [m.content for m in stored if m.sender == f"Agent-{n}"]
            assert mine == [f"{n}:{i}" for i in range(50)]
        assert persistence.get_session(session.session_id).message_count == 400  # type: ignore[union-attr]


def test_a_message_added_twice_is_stored_once(settings: Settings, tmp_path: Path) -> None:
    with SessionPersistence(**options(settings, tmp_path)) as persistence:
        session = persistence.create_session("s-1", ["Agent-1", "Agent-2"])
        message = chat(session.session_id, "once")
        first = persistence.add_message(message)
        second = persistence.add_message(message)  # a retry after a lost reply
        assert first.stream_id == second.stream_id is not None
        assert [m.id for m in persistence.get_messages("s-1")] == [message.id]
        assert persistence.get_session("nope") is None
        assert persistence.delete_session("s-1") is True
        assert persistence.delete_session("nope") is False
        assert persistence.get_session("s-1").state == "deleted"  # type: ignore[union-attr]


def test_sessions_are_listed_by_participant_and_state(settings: Settings, tmp_path: Path) -> None:
    with SessionPersistence(**options(settings, tmp_path)) as persistence:
        for n in range(5):
            persistence.create_session(f"s-{n}", ["Agent-1", f"Agent-{n + 2}"])
        persistence.delete_session("s-3")
        listed = persistence.list_sessions(participant="Agent-4")
        assert [s.session_id for s in listed] == ["s-2"]
        active = persistence.list_sessions(participant="Agent-1", state="active")
        assert [s.session_id for s in active] == ["s-0", "s-1", "s-2", "s-4"]
        assert persistence.get_stats()["live_sessions"] >= 4


def test_the_sync_api_works_inside_a_running_event_loop(settings: Settings, tmp_path: Path) -> None:
    """It blocks the caller's loop while its own loop does the work (documented), but works."""

    async def notebook_cell() -> int:
        with SessionPersistence(**options(settings, tmp_path)) as persistence:
            session = persistence.create_session(participants=["a", "b"])
            persistence.add_message(chat(session.session_id, "from inside a loop"))
            return len(persistence.get_messages(session.session_id))

    assert anyio.run(notebook_cell) == 1


async def test_the_async_twin(settings: Settings, tmp_path: Path) -> None:
    async with AsyncSessionPersistence(**options(settings, tmp_path)) as persistence:
        session = await persistence.create_session(participants=["a", "b"])
        stored = await persistence.add_message(chat(session.session_id, "awaited"))
        assert [m.stream_id for m in await persistence.get_messages(session.session_id)] == [
            stored.stream_id
        ]
        report = await persistence.cleanup()
        assert report["sessions_deleted"] == 0


def test_the_seeds_configuration_keys_and_no_others() -> None:
    production = {
        "storage_type": "sqlite",
        "storage_path": "/var/lib/agents/sessions",
        "cleanup_days": 30,
        "max_sessions": 10_000,
        "max_messages_per_session": 5_000,
        "backup_enabled": False,
        "backup_interval": "daily",
    }
    config = PersistenceConfig.from_mapping(production)
    assert config.sweeper_settings().retention_s == 30 * 86_400
    with pytest.raises(ConfigurationError, match="unknown session-persistence setting 'storag'"):
        PersistenceConfig.from_mapping({**production, "storag": "x"})
    with pytest.raises(ConfigurationError, match="storage_type must be one of"):
        PersistenceConfig.from_mapping({"storage_type": "mongo"})
    with pytest.raises(ConfigurationError, match="backup_interval"):
        PersistenceConfig.from_mapping({"backup_interval": "weekly"})


def test_memory_storage_needs_no_server_and_writes_nothing(tmp_path: Path) -> None:
    """The whole broker in this process (fakeredis + the memory history): no server process,
    no file, and the same calls."""
    servers_before = _servers()
    with SessionPersistence(storage_type="memory", storage_path=str(tmp_path / "s")) as p:
        session = p.create_session(participants=["a", "b"])
        p.add_message(chat(session.session_id, "in process"))
        assert [m.content for m in p.get_messages(session.session_id)] == ["in process"]
        assert p.config.store_settings().redis_url == "memory://"
        assert _servers() == servers_before  # no valkey-server started
    assert not (tmp_path / "s").exists()


def _servers() -> set[int]:
    """Pids of the valkey/redis servers running now."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                name = (entry / "comm").read_text().strip()
            except OSError:
                continue
            if name.startswith(("valkey-server", "redis-server")):
                found.add(int(entry.name))
    return found


def test_memory_storage_keeps_nothing_after_close(settings: Settings, tmp_path: Path) -> None:
    memory = {**options(settings, tmp_path), "storage_type": "memory"}
    with SessionPersistence(**memory) as persistence:
        session = persistence.create_session(participants=["a"])
        persistence.add_message(chat(session.session_id, "gone with the process"))
        assert persistence.get_stats()["storage_type"] == "memory"
    assert not (tmp_path / "sessions").exists()  # nothing written to the storage path
