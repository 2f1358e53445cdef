"""The ``streamstore`` command, run as users run it: ``python -m streamstore`` in a subprocess,
against the test's server, history file and key prefix; exit codes and output checked."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import orjson
import pytest
import redis.asyncio
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

import streamstore
from streamstore import Persister, PersisterSettings, Settings, StreamStore
from streamstore.cli import DISTRIBUTION, commands, main
from streamstore.cli.parser import build_parser
from streamstore.errors import ValidationError
from streamstore.redis.embedded import EmbeddedServer

ROOT = Path(streamstore.__file__).resolve().parent.parent
LINE = re.compile(r"^(\d+-\d+) (\S+) -> (\S+): (.*)$")


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


class Cli:
    """``python -m streamstore`` with the test's settings as global options."""

    def __init__(self, settings: Settings, cwd: Path) -> None:
        assert settings.redis_url is not None
        self.settings = settings
        self.cwd = cwd
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSTORE_")}
        self.env |= {
            "PYTHONPATH": str(ROOT),
            "STREAMSTORE_BLOCK": str(settings.block_s),
            "STREAMSTORE_SOCKET_TIMEOUT": str(settings.socket_timeout_s),
        }

    def argv(self, *args: str, redis_url: str | None = None, after: bool = False) -> list[str]:
        """The command line; ``after``: the global options after the command's arguments."""
        options = [
            "--redis-url",
            redis_url or str(self.settings.redis_url),
            "--history-url",
            self.settings.history_url,
            "--key-prefix",
            self.settings.key_prefix,
            "--partitions",
            str(self.settings.partitions),
        ]
        command = [*args, *options] if after else [*options, *args]
        return [sys.executable, "-m", "streamstore", *command]

    async def __call__(
        self,
        *args: str,
        stdin: bytes | None = None,
        env: dict[str, str] | None = None,
        redis_url: str | None = None,
        after: bool = False,
        terminal: int | None = None,
    ) -> Result:
        """Run to the end; stdin is ``stdin``, else the pseudo-terminal ``terminal``, else
        /dev/null (never the terminal pytest may run in)."""
        done = await anyio.run_process(
            self.argv(*args, redis_url=redis_url, after=after),
            input=stdin,
            stdin=None if stdin else subprocess.DEVNULL if terminal is None else terminal,
            check=False,
            cwd=self.cwd,
            env=self.env | (env or {}),
        )
        return Result(done.returncode, done.stdout.decode(), _without_logs(done.stderr.decode()))

    @contextlib.asynccontextmanager
    async def start(
        self, *args: str, log: Path, redis_url: str | None = None, after: bool = False
    ) -> AsyncIterator[Process]:
        """A long-running command: stdout piped, stderr to ``log``; killed if still running."""
        with log.open("wb") as stderr:
            process = await anyio.open_process(
                self.argv(*args, redis_url=redis_url, after=after),
                stdin=subprocess.DEVNULL,
                stderr=stderr,
                cwd=self.cwd,
                env=self.env,
            )
        try:
            yield process
        finally:
            if process.returncode is None:
                process.kill()
            await process.aclose()


LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ streamstore\.")


def _without_logs(stderr: str) -> str:
    """stderr without log lines (a server without AOF adds a warning, for one)."""
    return "".join(line for line in stderr.splitlines(True) if not LOG_LINE.match(line))


@pytest.fixture
def cli(settings: Settings, tmp_path: Path) -> Cli:
    return Cli(settings, tmp_path)


async def read_line(stdout: BufferedByteReceiveStream, timeout: float = 20.0) -> str:
    with anyio.fail_after(timeout):
        return (await stdout.receive_until(b"\n", 1 << 20)).decode()


async def wait_for_log(log: Path, pattern: str, process: Process, timeout: float = 30.0) -> str:
    """The first match of ``pattern`` in ``log``, waiting for the process to write it."""
    with anyio.fail_after(timeout):
        while not (found := re.search(pattern, text := await anyio.Path(log).read_text())):
            assert process.returncode is None, text
            await anyio.sleep(0.05)
    return found.group(1)


async def stop(
    process: Process, signum: signal.Signals = signal.SIGTERM, timeout: float = 30.0
) -> int:
    process.send_signal(signum)
    with anyio.fail_after(timeout):
        return await process.wait()


async def fetch(url: str) -> tuple[int, bytes]:
    def get() -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    return await anyio.to_thread.run_sync(get)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- usage --------------------------------------------------------------------------------


def test_help_has_examples_and_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    assert "streamstore publish" in out
    assert "exit status" in out
    assert "70 an unexpected error" in out
    assert "--metrics-port 9108" in out
    assert "9464" not in out
    assert main([]) == 2
    assert main(["publish", "s1", "--sender", "a", "--metadata", "[1]", "x"]) == 2
    assert main(["history", "s1", "--before", "1-0", "--after", "2-0"]) == 2
    assert main(["--partitions", "0", "stats"]) == 2
    assert main(["worker", "--metrics-port", "70000"]) == 2
    assert main(["sessions", "create", "--ttl", "-1"]) == 2
    err = capsys.readouterr().err
    assert "expected a JSON object" in err
    assert "not allowed with argument" in err


def test_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["name"] == DISTRIBUTION
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"streamstore {importlib.metadata.version(DISTRIBUTION)}\n"


def test_every_option_and_positional_has_help() -> None:
    def walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action]]:
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            yield path, action
            if isinstance(action, argparse._SubParsersAction):
                yield from ((path, choice) for choice in action._choices_actions)
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{path} {name}")

    actions = list(walk(build_parser(), "streamstore"))
    assert len(actions) > 150  # every command and action, each with the global options
    for path, action in actions:
        assert action.help, (path, action.option_strings or action.dest)
        assert action.help != argparse.SUPPRESS, (path, action.option_strings or action.dest)


GLOBAL_OPTIONS = [
    "--redis-url",
    "redis://example:1/0",
    "--history-url",
    "memory://",
    "--key-prefix",
    "p",
    "--partitions",
    "7",
    "--json",
    "-v",
]
GIVEN = ("redis://example:1/0", "memory://", "p", 7, True, True)


def _globals(args: argparse.Namespace) -> tuple[object, ...]:
    return (
        args.redis_url,
        args.history_url,
        args.key_prefix,
        args.partitions,
        args.as_json,
        args.verbose,
    )


@pytest.mark.parametrize(
    "command",
    [
        ["worker"],
        ["stats"],
        ["sessions", "list"],
        ["sessions", "delete", "s1"],
        ["dead-letters", "requeue", "1-0"],
        ["bench", "--quick"],
        ["publish", "s1", "--sender", "a", "hi"],
    ],
    ids=" ".join,
)
def test_global_options_go_before_or_after_the_command(command: list[str]) -> None:
    parse = build_parser().parse_args
    assert _globals(parse(command)) == (None, None, None, None, False, False)
    assert _globals(parse([*GLOBAL_OPTIONS, *command])) == GIVEN
    assert _globals(parse([*command, *GLOBAL_OPTIONS])) == GIVEN
    # Given twice, the later one counts; given before only, it is kept.
    overridden = parse(
        ["--key-prefix", "before", "--partitions", "3", *command, "--key-prefix", "x"]
    )
    assert (overridden.key_prefix, overridden.partitions) == ("x", 3)
    if len(command) > 1 and command[0] in ("sessions", "dead-letters"):
        between = parse([command[0], *GLOBAL_OPTIONS, *command[1:]])
        assert _globals(between) == GIVEN
    assert main([*command, "--partitions", "0"]) == 2


def test_an_unexpected_error_is_one_line_and_exit_70(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def broken(args: argparse.Namespace) -> int:
        raise RuntimeError("boom\nand the rest")

    monkeypatch.setattr(commands, "stats_command", broken)
    assert main(["stats"]) == 70
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "streamstore: unexpected RuntimeError: boom (run with -v for details)\n"


@pytest.mark.parametrize(
    ("raised", "code", "err"),
    [
        (ExceptionGroup("tasks", [ValidationError("bad id")]), 1, "bad id"),
        (
            ExceptionGroup("tasks", [ExceptionGroup("inner", [TypeError("bad")])]),
            70,
            "unexpected TypeError: bad (run with -v for details)",
        ),
        (
            ExceptionGroup("tasks", [ValueError("a"), ValueError("b")]),
            70,
            "unexpected ExceptionGroup: tasks (2 sub-exceptions) (run with -v for details)",
        ),
        (KeyboardInterrupt(), 130, None),
        (BaseExceptionGroup("tasks", [KeyboardInterrupt()]), 130, None),
    ],
    ids=["group of ours", "nested group", "two errors", "Ctrl-C", "Ctrl-C in a group"],
)
def test_what_a_command_raises_maps_to_one_exit_status(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    raised: BaseException,
    code: int,
    err: str | None,
) -> None:
    async def failing(args: argparse.Namespace) -> int:
        raise raised

    monkeypatch.setattr(commands, "stats_command", failing)
    assert main(["stats"]) == code
    assert capsys.readouterr().err == ("" if err is None else f"streamstore: {err}\n")


@pytest.mark.parametrize(
    ("variable", "value", "command", "err"),
    [
        ("STREAMSTORE_PARTITIONS", "abc", "stats", "partitions: expected an integer, got 'abc'"),
        ("STREAMSTORE_BLOCK", "x", "history", "block: expected seconds, got 'x'"),
        (
            "STREAMSTORE_PERSISTER_BATCH_SIZE",
            "many",
            "worker",
            "batch_size: expected an integer, got 'many'",
        ),
    ],
)
def test_a_bad_setting_in_the_environment_is_one_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    variable: str,
    value: str,
    command: str,
    err: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(variable, value)
    argv = ["--redis-url", f"redis://127.0.0.1:{closed_port()}/0", command]
    assert main([*argv, "s1"] if command == "history" else argv) == 1
    captured = capsys.readouterr()
    assert captured.err == f"streamstore: {err}\n"
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing written


async def test_a_malformed_redis_url_is_one_line_and_v_shows_the_traceback(cli: Cli) -> None:
    bad = await cli("stats", redis_url="redis://127.0.0.1:abc/0")
    assert bad.code in (1, 70), bad  # 70 (a ValueError) until connect() names it a bad setting
    assert bad.out == ""
    assert bad.err.startswith("streamstore: ")
    assert bad.err.count("\n") == 1
    assert "abc" in bad.err
    verbose = await cli("stats", "-v", redis_url="redis://127.0.0.1:abc/0")
    assert verbose.code == bad.code
    assert "Traceback (most recent call last)" in verbose.err
    assert verbose.err.endswith(bad.err)


# -- sessions, publish and reads ----------------------------------------------------------


async def test_sessions_publish_history_and_replay(cli: Cli, raw: redis.asyncio.Redis) -> None:
    created = await cli(
        "sessions",
        "create",
        "--id",
        "chat-1",
        "--participant",
        "alice",
        "--participant",
        "bot",
        "--ttl",
        "none",
        "--metadata",
        '{"topic": "parcels"}',
    )
    assert created == Result(0, "chat-1\n", "")

    first = await cli("publish", "chat-1", "--sender", "alice", "--recipient", "bot", "hi\nthere")
    assert first.code == 0, first.err
    first_id = first.out.strip()
    assert re.fullmatch(r"\d+-\d+", first_id)

    piped = await cli(
        "publish",
        "chat-1",
        "--sender",
        "bot",
        "--id",
        "reply-1",
        "--metadata",
        '{"n": 1}',
        "--json",
        "-",
        stdin=b"from stdin\n",
    )
    assert piped.code == 0, piped.err
    reply = orjson.loads(piped.out)
    assert reply["content"] == "from stdin"
    assert reply["metadata"] == {"n": 1}
    assert reply["recipient"] is None
    again = await cli("publish", "chat-1", "--sender", "bot", "--id", "reply-1", "from stdin")
    assert again.out.strip() == reply["stream_id"]  # idempotent: the first stream id

    history = await cli("history", "chat-1")
    assert history.code == 0, history.err
    assert history.out.splitlines() == [
        f"{first_id} alice -> bot: hi\\nthere",
        f"{reply['stream_id']} bot -> *: from stdin",
    ]
    newest = await cli("history", "chat-1", "--limit", "1")
    assert newest.out.splitlines() == [f"{reply['stream_id']} bot -> *: from stdin"]
    after = await cli("--json", "history", "chat-1", "--after", first_id)
    assert [orjson.loads(line)["id"] for line in after.out.splitlines()] == ["reply-1"]

    replay = await cli("replay", "chat-1", "--json")
    assert replay.code == 0, replay.err
    messages = [orjson.loads(line) for line in replay.out.splitlines()]
    assert [m["content"] for m in messages] == ["hi\nthere", "from stdin"]
    assert [m["stream_id"] for m in messages] == [first_id, reply["stream_id"]]
    for_alice = await cli("replay", "chat-1", "--recipient", "alice")
    assert for_alice.out.splitlines() == [f"{reply['stream_id']} bot -> *: from stdin"]

    shown = await cli("sessions", "show", "chat-1", "--json")
    session = orjson.loads(shown.out)
    assert session["participants"] == ["alice", "bot"]
    assert session["ttl"] is None
    assert session["metadata"] == {"topic": "parcels"}
    assert session["state"] == "active"
    assert "participants: alice, bot" in (await cli("sessions", "show", "chat-1")).out

    assert (await cli("sessions", "create", "--id", "chat-2")).code == 0
    listed = await cli("sessions", "list")
    assert [line.split()[0] for line in listed.out.splitlines()] == ["chat-1", "chat-2"]
    paged = await cli("sessions", "list", "--after", "chat-1", "--limit", "1", "--json")
    assert [orjson.loads(line)["id"] for line in paged.out.splitlines()] == ["chat-2"]

    closed = await cli("sessions", "close", "chat-1")
    assert closed.code == 0, closed.err
    assert closed.out.startswith("chat-1 closed ")
    refused = await cli("publish", "chat-1", "--sender", "alice", "late")
    assert refused == Result(1, "", "streamstore: session 'chat-1' is closed\n")
    deleted = await cli("sessions", "delete", "chat-2", "--json", "--yes")
    assert orjson.loads(deleted.out) == {"id": "chat-2", "state": "deleted"}


async def test_global_options_work_after_the_command(cli: Cli, raw: redis.asyncio.Redis) -> None:
    created = await cli("sessions", "create", "--id", "late-1", "--participant", "a", after=True)
    assert created == Result(0, "late-1\n", "")
    published = await cli("publish", "late-1", "--sender", "a", "hello", "--json", after=True)
    assert published.code == 0, published
    assert orjson.loads(published.out)["content"] == "hello"
    listed = await cli("sessions", "list", "--json", after=True)
    assert [orjson.loads(line)["id"] for line in listed.out.splitlines()] == ["late-1"]
    history = await cli("history", "late-1", after=True)
    assert history.out.endswith(" a -> *: hello\n")
    missing = await cli("dead-letters", "requeue", "1-0", after=True)
    assert missing == Result(1, "", "streamstore: no dead letter 1-0\n")
    stats = await cli("stats", "--json", after=True)
    assert len(orjson.loads(stats.out)["partitions"]) == cli.settings.partitions


async def test_sessions_delete_asks_first_on_a_terminal(cli: Cli, store: StreamStore) -> None:
    session = await store.create_session(["a"])
    refused = await cli("sessions", "delete", session.id)  # stdin is /dev/null
    assert refused == Result(
        1, "", f"streamstore: not deleting session {session.id} without confirmation: pass --yes\n"
    )
    for answer in ("n", "", "whatever"):
        kept = await on_terminal(cli, answer, "sessions", "delete", session.id)
        assert kept == Result(
            1,
            "",
            f"delete session {session.id} and its history? [y/N] "
            f"streamstore: session {session.id} not deleted\n",
        )
    assert (await store.get_session(session.id)).state == "active"

    deleted = await on_terminal(cli, "Yes", "sessions", "delete", session.id)
    assert (deleted.code, deleted.out) == (0, f"{session.id} deleted\n")
    # The prompt ends without a newline: a log line (a server without AOF) may follow it.
    assert deleted.err.startswith(f"delete session {session.id} and its history? [y/N] ")
    other = await store.create_session(["a"])
    assert await cli("sessions", "delete", "-y", other.id) == Result(0, f"{other.id} deleted\n", "")
    assert (await store.get_session(session.id)).state == "deleted"
    assert (await store.get_session(other.id)).state == "deleted"


async def on_terminal(cli: Cli, answer: str, *args: str) -> Result:
    """Run with stdin a pseudo-terminal on which ``answer`` was typed."""
    main_fd, terminal = pty.openpty()
    try:
        os.write(main_fd, f"{answer}\n".encode())
        return await cli(*args, terminal=terminal)
    finally:
        os.close(terminal)
        os.close(main_fd)


async def test_streamstore_errors_are_one_line_and_exit_1(
    cli: Cli, raw: redis.asyncio.Redis
) -> None:
    assert await cli("history", "nope") == Result(1, "", "streamstore: session 'nope' not found\n")
    bad = await cli("publish", "bad id!", "--sender", "a", "x")
    assert bad.code == 1
    assert bad.err.startswith("streamstore: invalid session id")
    assert bad.err.count("\n") == 1


async def test_tail_prints_live_messages_for_recipient_until_ctrl_c(
    cli: Cli, store: StreamStore, tmp_path: Path
) -> None:
    session = await store.create_session(["alice", "bot", "carol"])
    async with cli.start(
        "tail", session.id, "--recipient", "bot", log=tmp_path / "tail.log"
    ) as tail:
        assert tail.stdout is not None
        stdout = BufferedByteReceiveStream(tail.stdout)
        line = None
        for n in range(100):  # tail starts from "now": publish until it has subscribed
            await store.publish(session.id, sender="alice", recipient="carol", content="not bot")
            await store.publish(session.id, sender="alice", recipient="bot", content=f"bot {n}")
            with anyio.move_on_after(0.2):
                line = await read_line(stdout)
                break
        assert line is not None, (tmp_path / "tail.log").read_text()
        match = LINE.match(line.rstrip("\n"))
        assert match is not None, line
        assert match.group(2, 3) == ("alice", "bot")
        assert match.group(4).startswith("bot ")
        assert await stop(tail, signal.SIGINT) == 130


async def test_replay_follow_goes_live_and_ends_when_the_session_closes(
    cli: Cli, store: StreamStore, tmp_path: Path
) -> None:
    session = await store.create_session(["a"])
    old = await store.publish(session.id, sender="a", content="before")
    log = tmp_path / "replay.log"
    async with cli.start("replay", session.id, "--follow", "--json", log=log) as replay:
        assert replay.stdout is not None
        stdout = BufferedByteReceiveStream(replay.stdout)
        assert orjson.loads(await read_line(stdout))["id"] == old.id
        new = await store.publish(session.id, sender="a", content="after")
        assert orjson.loads(await read_line(stdout))["id"] == new.id
        await store.close_session(session.id)
        with anyio.fail_after(20):
            assert await replay.wait() == 0, log.read_text()


# -- stats, check, dead letters ----------------------------------------------------------


async def test_stats_reports_partitions_and_history(cli: Cli, store: StreamStore) -> None:
    session = await store.create_session(["a"])
    for n in range(3):
        await store.publish(session.id, sender="a", content=f"m{n}")
    await Persister(store, PersisterSettings(consumer="test")).drain()

    result = await cli("stats", "--json")
    assert result.code == 0, result.err
    stats = orjson.loads(result.out)
    assert stats["history_messages"] == 3
    assert stats["live_sessions"] == 1
    assert stats["dead_letters"] == 0
    assert stats["maxmemory_policy"] == "noeviction"
    assert len(stats["partitions"]) == 4
    assert sum(p["published"] for p in stats["partitions"]) == 4  # session event + 3 messages
    assert {p["pending"] for p in stats["partitions"]} == {0}
    assert stats["lagging"] == []

    text = await cli("stats")
    assert "history messages: 3" in text.out
    assert re.search(
        r"^partition\s+published\s+backlog\s+lag\s+pending\s+consumers$", text.out, re.M
    )


async def test_check_healthy_and_dead_letters_warn_list_and_requeue(
    cli: Cli, store: StreamStore, raw: redis.asyncio.Redis
) -> None:
    healthy = await cli("check")
    assert healthy.code == 0, healthy.out
    assert healthy.out.startswith("healthy: ")

    session = await store.create_session(["a"])
    await raw.xadd(store.keys.session(session.id).feed, {b"garbage": b"entirely"})
    await Persister(store, PersisterSettings(consumer="test")).drain()

    warned = await cli("check", "--json")
    assert warned.code == 0, warned.out
    report = orjson.loads(warned.out)
    assert report["healthy"] is True
    warnings = [w for w in report["warnings"] if not w.startswith("append-only persistence")]
    assert warnings == ["1 dead letters (see `streamstore dead-letters list`)"]

    listed = await cli("dead-letters", "list", "--json")
    (dead,) = [orjson.loads(line) for line in listed.out.splitlines()]
    assert dead["feed"] == store.keys.session(session.id).feed
    assert "undecodable" in dead["reason"]
    assert (await cli("dead-letters", "list")).out.startswith(f"{dead['id']} ")

    assert await cli("dead-letters", "requeue", dead["id"]) == Result(
        0, f"requeued {dead['id']}\n", ""
    )
    assert (await cli("dead-letters", "list")).out == "no dead letters\n"
    assert (await cli("dead-letters", "list", "--json")).out == ""
    missing = await cli("dead-letters", "requeue", dead["id"])
    assert missing == Result(1, "", f"streamstore: no dead letter {dead['id']}\n")


async def test_check_exits_3_when_the_server_is_down(cli: Cli) -> None:
    port = closed_port()
    down = await cli("check", redis_url=f"redis://127.0.0.1:{port}/0")
    assert down.code == 3, down
    assert down.out.startswith("unhealthy: ")
    assert str(port) in down.out
    assert "Traceback" not in down.err
    as_json = await cli("check", "--json", redis_url=f"redis://127.0.0.1:{closed_port()}/0")
    assert as_json.code == 3
    assert orjson.loads(as_json.out)["healthy"] is False


async def test_check_exits_3_when_the_server_may_evict(cli: Cli, tmp_path: Path) -> None:
    server = EmbeddedServer(data_dir=tmp_path / "evicting")
    await anyio.to_thread.run_sync(server.start)
    try:
        client = redis.asyncio.Redis.from_url(server.url)
        await client.config_set("maxmemory-policy", "allkeys-lru")
        await client.aclose()
        evicting = await cli("check", redis_url=server.url)
    finally:
        await anyio.to_thread.run_sync(server.stop)
    assert evicting.code == 3, evicting
    assert "maxmemory-policy is 'allkeys-lru'" in evicting.out
    assert "Traceback" not in evicting.err


async def test_check_exits_3_when_a_partition_is_over_the_high_water_mark(
    cli: Cli, store: StreamStore
) -> None:
    session = await store.create_session(["a"])
    await store.publish_many(session.id, [{"sender": "a", "content": "x"}] * 10)
    partition = store.keys.session(session.id).partition

    lagging = await cli("check", env={"STREAMSTORE_MAX_LAG": "5"})
    assert lagging.code == 3, lagging
    assert f"unhealthy: partition {partition} holds 11 entries" in lagging.out
    assert "high-water mark 5" in lagging.out
    assert (await cli("check")).code == 0  # the default mark is far above


# -- long-running commands ----------------------------------------------------------------


async def test_worker_serves_health_and_metrics_and_stops_on_sigterm(
    cli: Cli, store: StreamStore, tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"
    args = ("worker", "--consumer", "w1", "--metrics-port", "0")
    async with cli.start(*args, log=log) as worker:
        url = await wait_for_log(log, r"worker ready consumer=w1 .*metrics=(\S+)", worker)
        status, body = await fetch(f"{url}/healthz")
        assert status == 200
        health = orjson.loads(body)
        assert health["status"] == "ok"
        assert health["persister_running"] is True
        assert health["redis"] is True

        session = await store.create_session(["a"])
        await store.publish_many(session.id, [{"sender": "a", "content": "secret-text"}] * 5)
        with anyio.fail_after(30):
            while "streamstore_persister_persisted_total 5.0" not in (
                metrics := (await fetch(f"{url}/metrics"))[1].decode()
            ):
                await anyio.sleep(0.1)
        partition = store.keys.session(session.id).partition
        for sample in (
            'streamstore_worker_info{consumer="w1",partitions="4"} 1.0',
            f'streamstore_feed_published_total{{partition="{partition}"}} 6.0',
            f'streamstore_feed_backlog{{partition="{partition}"}}',
            f'streamstore_feed_lag{{partition="{partition}"}} 0.0',
            f'streamstore_feed_pending{{partition="{partition}"}} 0.0',
            "streamstore_persister_duplicates_total 0.0",
            "streamstore_persister_dead_lettered_total 0.0",
            "streamstore_persister_claimed_total 0.0",
            "streamstore_dead_letters 0.0",
            "streamstore_redis_up 1.0",
            "streamstore_persister_running 1.0",
            'streamstore_persister_batch_size_bucket{le="+Inf"}',
            "streamstore_persister_commit_seconds_count",
            "streamstore_sweeps_total",
            'streamstore_swept_total{kind="closed"}',
        ):
            assert sample in metrics, sample
        assert (await fetch(f"{url}/nowhere"))[0] == 404

        assert await stop(worker) == 0
    text = log.read_text()
    assert "worker stopped consumer=w1 " in text
    assert "persisted=5" in text
    assert "secret-text" not in text


async def test_worker_exits_1_when_the_metrics_port_is_taken(
    cli: Cli, raw: redis.asyncio.Redis
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = await cli("worker", "--metrics-port", str(port), after=True)
    assert result.code == 1, result
    assert f"streamstore: cannot serve metrics on 127.0.0.1:{port}: " in result.err
    assert "Traceback" not in result.err


async def test_worker_health_is_503_while_redis_does_not_answer(cli: Cli, tmp_path: Path) -> None:
    server = EmbeddedServer(data_dir=tmp_path / "paused")
    await anyio.to_thread.run_sync(server.start)
    log = tmp_path / "worker.log"
    args = ("worker", "--consumer", "w1", "--metrics-port", "0")
    try:
        async with cli.start(*args, log=log, redis_url=server.url) as worker:
            url = await wait_for_log(log, r"worker ready .*metrics=(\S+)", worker)
            assert (await fetch(f"{url}/healthz"))[0] == 200
            server.pause()
            try:
                status, body = await fetch(f"{url}/healthz")
            finally:
                server.resume()
            assert status == 503
            health = orjson.loads(body)
            assert health["status"] == "unhealthy"
            assert health["redis"] is False
            assert any("Redis does not answer" in reason for reason in health["reasons"])
            assert await stop(worker) == 0
    finally:
        await anyio.to_thread.run_sync(server.stop)


async def test_server_prints_its_url_serves_and_stops_on_sigterm(
    cli: Cli, raw: redis.asyncio.Redis, tmp_path: Path
) -> None:
    log = tmp_path / "server.log"
    async with cli.start("server", "--data-dir", str(tmp_path / "data"), log=log) as server:
        assert server.stdout is not None
        url = (await read_line(BufferedByteReceiveStream(server.stdout))).strip()
        assert url.startswith("redis://127.0.0.1:")
        checked = await cli("check", redis_url=url)
        assert checked.code == 0, checked
        assert await stop(server) == 0


async def test_demo_runs_and_exits_0(cli: Cli, raw: redis.asyncio.Redis) -> None:
    demo = await cli("demo", "--sessions", "1")
    assert demo.code == 0, demo
    assert "replay matches live=True" in demo.out


async def test_bench_quick_run_prints_the_table(
    cli: Cli, raw: redis.asyncio.Redis, tmp_path: Path
) -> None:
    bench = await cli(
        "bench",
        "--quick",
        "--messages",
        "200",
        "--rate",
        "400",
        "--duration",
        "0.25",
        env={"TMPDIR": str(tmp_path)},
    )
    assert bench.code == 0, bench
    assert re.search(r"^figure\s+\|\s+streamstore\s+\|\s+baseline\s+\|\s+ratio$", bench.out, re.M)


def test_a_database_the_server_lacks_is_named(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not a permission problem (which is what it used to be reported as)."""
    missing = redis_url.rsplit("/", 1)[0] + "/99"
    assert main(["--redis-url", missing, "--history-url", "memory://", "stats"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "streamstore: the Redis URL names database 99, which this server does not have "
        "(it has fewer databases): use /0\n"
    )
