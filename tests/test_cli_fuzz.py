"""The command line never shows a traceback: hypothesis drives ``main(argv)`` in-process over
commands, option values, settings in the environment and malformed URLs, and every run must
end in a documented exit status with no ``Traceback`` in its output.

Nothing here may reach a server it does not own: a URL names a closed local port, a unix
socket that does not exist, or the test run's embedded server under this test's key prefix;
none omits its port (redis-py would then try 6379, where the machine's Redis may listen), and
none names a host that needs DNS. No command starts an embedded server (every run passes
``--redis-url``) and ``server`` is never run.
"""

from __future__ import annotations

import os
import socket
import string
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from streamstore.cli import main
from streamstore.cli.output import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_SOFTWARE,
    EXIT_UNHEALTHY,
    EXIT_USAGE,
)

DOCUMENTED = {EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNHEALTHY, EXIT_SOFTWARE}
"""130 and 141 (Ctrl-C, a closed pipe) are documented too, but cannot happen here."""

FAST = {
    "STREAMSTORE_SOCKET_TIMEOUT": "1",
    "STREAMSTORE_BLOCK": "0.2",
    "STREAMSTORE_RECONNECT_TIMEOUT": "0.5",
    "STREAMSTORE_MAX_BLOCK": "0.2",
}
"""Settings that keep a run short when something does not answer."""


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


CLOSED = _closed_port()

# -- strategies -------------------------------------------------------------------------------

words = st.text(string.ascii_letters + string.digits + "_.-", min_size=1, max_size=12)
"""Mostly valid ids (a leading "-" reads as an option)."""
texts = st.text(max_size=20).filter(lambda text: "\x00" not in text)
"""Any text but NUL (which no argv can carry)."""
good_numbers = st.integers(1, 1000).map(str)
numbers = st.one_of(
    good_numbers,
    good_numbers,
    st.integers(-5, 100_000).map(str),
    st.sampled_from(["0", "1", "-1", "abc", "1.5", "nan", "inf", "-inf", "1e9", "", " "]),
)
"""Values for options that take a number: half of them good."""

ports = st.sampled_from(
    [str(CLOSED), "abc", "99999", "65536", "-1", "0", "1e3", "\uff16\uff13\uff17\uff19", " 1"]
)
hosts = st.sampled_from(
    ["127.0.0.1", "localhost", "[::1]", "::1", "[::1", "user:pw@127.0.0.1", ":pw@127.0.0.1", ""]
)
paths = st.sampled_from(
    [
        "",
        "/",
        "/0",
        "/x",
        "/99999",
        "/-1",
        "/0/1",
        "/0?db=x",
        "?socket_timeout=abc",
        "/0?protocol=9",
        "/0?ssl_cert_reqs=bogus",
        "/0?foo=bar",
        "/0?decode_responses=yes",
        "#frag",
    ]
)
tcp_urls = st.builds(
    "{}://{}:{}{}".format,
    st.sampled_from(["redis", "rediss", "redis+cluster", "rediss+cluster", "http", "valkey"]),
    hosts,
    ports,
    paths,
)
unix_urls = st.builds(
    "unix://{}{}".format,
    st.sampled_from(["", "/nonexistent/redis.sock", "relative.sock", "/tmp"]),
    st.sampled_from(["", "?db=x", "?db=3", "?password=p"]),
)
cluster_urls = st.builds(
    "redis+cluster://127.0.0.1:{},{}:{}/0".format,
    ports,
    st.sampled_from(["127.0.0.1", "[::1]", "", "[::1"]),
    ports,
)
odd_urls = st.sampled_from(
    ["redis:", "redis://", "://127.0.0.1:1", "127.0.0.1:1", "redis://[::1]]:1/0", "memory"]
)
redis_urls = st.one_of(tcp_urls, unix_urls, cluster_urls, odd_urls)
"""URLs no server answers (a closed port) or that do not parse; never a default port."""


def history_urls(tmp: Path) -> st.SearchStrategy[str]:
    """Good and bad history URLs; files only under ``tmp``."""
    good = st.sampled_from(["memory://", f"sqlite:///{tmp}/history.db"])
    return (
        good
        | good
        | st.sampled_from(
            [
                "memory://",
                f"sqlite:///{tmp}/history.db",
                f"sqlite:///{tmp}/missing/dir/history.db",
                f"sqlite:///{tmp}",
                "sqlite://",
                "sqlite:///",
                "sqlite:relative.db",
                "sqlite:///relative.db?mode=bogus",
                f"postgresql://user@127.0.0.1:{CLOSED}/db",
                "postgresql://user@127.0.0.1:abc/db",
                "postgres://[::1/db",
                "postgresql://",
                "mysql://127.0.0.1/db",
                "json:///nowhere",
                "",
                "memory",
            ]
        )
    )


def commands(*, live: bool) -> st.SearchStrategy[list[str]]:
    """A command with random arguments; ``live``: only those that end on their own against a
    server that answers (no ``tail``, ``replay --follow``, ``worker``, ``demo``, ``bench``)."""
    session = st.one_of(words, words, words, texts)
    stream_id = st.one_of(st.sampled_from(["0-0", "1-0", "99999999999999-1", "x"]), texts)
    options = {
        "publish": st.builds(
            lambda s, c, sender, extra: ["publish", s, c, "--sender", sender, *extra],
            session,
            texts.filter(lambda text: text != "-"),  # "-" reads pytest's stdin
            st.one_of(words, texts),
            st.lists(
                st.sampled_from(
                    [["--recipient", "bot"], ["--id", "m1"], ["--metadata", '{"a": 1}']]
                ),
                max_size=2,
            ).map(lambda pairs: [word for pair in pairs for word in pair]),
        ),
        "history": st.builds(
            lambda s, n, where: ["history", s, "--limit", n, *where],
            session,
            numbers,
            st.sampled_from([[], ["--before"], ["--after"]]).flatmap(
                lambda flag: st.builds(lambda i: [*flag, i] if flag else [], stream_id)
            ),
        ),
        "replay": st.builds(lambda s, i: ["replay", s, "--after", i], session, stream_id),
        "sessions list": st.builds(
            lambda n, after: ["sessions", "list", "--limit", n, "--after", after],
            numbers,
            session,
        ),
        "sessions show": st.builds(lambda s: ["sessions", "show", s], session),
        "sessions create": st.builds(
            lambda s, ttl, meta: [
                "sessions",
                "create",
                "--id",
                s,
                "--ttl",
                ttl,
                "--metadata",
                meta,
            ],
            session,
            st.one_of(numbers, st.just("none")),
            st.sampled_from(['{"k": "v"}', "{}", "[]", "x", '{"k": NaN}']),
        ),
        "sessions close": st.builds(lambda s: ["sessions", "close", s], session),
        "sessions delete": st.builds(
            lambda s, yes: ["sessions", "delete", s, *yes],
            session,
            st.sampled_from([["--yes"], ["-y"], []]),
        ),
        "stats": st.just(["stats"]),
        "check": st.sampled_from([["check"], ["check", "--acknowledge-data-loss"]]),
        "dead-letters list": st.builds(lambda n: ["dead-letters", "list", "--limit", n], numbers),
        "dead-letters requeue": st.builds(lambda i: ["dead-letters", "requeue", i], stream_id),
    }
    if not live:
        options |= {
            "tail": st.builds(lambda s: ["tail", s, "--recipient", "bot"], session),
            "replay --follow": st.builds(lambda s: ["replay", s, "--follow"], session),
            "worker": st.builds(
                lambda n, idle, port: [
                    "worker",
                    "--batch-size",
                    n,
                    "--claim-idle",
                    idle,
                    "--metrics-port",
                    port,
                ],
                numbers,
                numbers,
                numbers,
            ),
            "demo": st.builds(lambda n: ["demo", "--sessions", n], numbers),
            "bench": st.builds(
                lambda n, r: ["bench", "--quick", "--messages", n, "--rate", r], numbers, numbers
            ),
        }
    return st.sampled_from(sorted(options)).flatmap(lambda name: options[name])


bad_settings = st.dictionaries(
    st.sampled_from(
        [
            "STREAMSTORE_PARTITIONS",
            "STREAMSTORE_SESSION_TTL",
            "STREAMSTORE_MAX_LAG",
            "STREAMSTORE_BLOCK",
            "STREAMSTORE_EVICTION_CHECK",
            "STREAMSTORE_MAX_MESSAGE_BYTES",
            "STREAMSTORE_PERSISTER_BATCH_SIZE",
            "STREAMSTORE_SWEEPER_INTERVAL",
            "STREAMSTORE_TLS_CA_FILE",
        ]
    ),
    numbers,
    max_size=2,
)
environments: st.SearchStrategy[dict[str, str]] = st.just({}) | bad_settings
"""No settings from the environment, or a few, most of them bad."""


# -- running ----------------------------------------------------------------------------------


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Exactly these ``STREAMSTORE_*`` variables (and FAST's) for the duration."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("STREAMSTORE_")}
    for name in saved:
        del os.environ[name]
    os.environ.update(FAST | values)
    try:
        yield
    finally:
        for name in [k for k in os.environ if k.startswith("STREAMSTORE_")]:
            del os.environ[name]
        os.environ.update(saved)


def run(argv: list[str], env: dict[str, str], capfd: pytest.CaptureFixture[str]) -> None:
    """Run ``argv`` and check what a user would see."""
    capfd.readouterr()
    with environment(env):
        code = main(argv)
    out, err = capfd.readouterr()
    shown = f"argv={argv!r} env={env!r} exit={code}\nstdout: {out}\nstderr: {err}"
    event(f"exit {code}")  # --hypothesis-show-statistics: how the runs ended
    assert code in DOCUMENTED, shown
    assert "Traceback" not in out, shown
    assert "Traceback" not in err, shown
    if code in (EXIT_ERROR, EXIT_SOFTWARE):
        assert err.startswith("streamstore: "), shown
        assert err.count("\n") == 1, shown
    if code == EXIT_USAGE:
        assert "usage: streamstore" in err, shown


def placed(options: list[str], command: list[str], after: bool) -> list[str]:
    """The global options before or after the command: both must work."""
    return [*command, *options] if after else [*options, *command]


FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@example(  # the ValueError of redis-py's URL parser that once reached users as a traceback
    url="redis://127.0.0.1:abc/0",
    command=["stats"],
    partitions=None,
    env={},
    after=False,
    as_json=False,
)
@given(
    url=redis_urls,
    command=commands(live=False),
    partitions=st.one_of(st.none(), numbers),
    env=environments,
    after=st.booleans(),
    as_json=st.booleans(),
)
def test_no_traceback_whatever_the_redis_url(
    capfd: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    url: str,
    command: list[str],
    partitions: str | None,
    env: dict[str, str],
    after: bool,
    as_json: bool,
) -> None:
    monkeypatch.chdir(tmp_path)  # the default sqlite:///streamstore.db lands here
    options = ["--redis-url", url, "--history-url", f"sqlite:///{tmp_path}/history.db"]
    options += ["--partitions", partitions] if partitions is not None else []
    options += ["--json"] if as_json else []
    run(placed(options, command, after), env, capfd)


@pytest.fixture
def written(redis_url: str, key_prefix: str) -> Iterator[str]:
    """The test's key prefix; what the runs wrote under it is deleted afterwards."""
    yield key_prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{key_prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@FUZZ
@given(data=st.data(), command=commands(live=True), after=st.booleans())
def test_no_traceback_against_a_real_server(
    capfd: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    redis_url: str,
    written: str,
    data: st.DataObject,
    command: list[str],
    after: bool,
) -> None:
    monkeypatch.chdir(tmp_path)
    history_url = data.draw(history_urls(tmp_path), label="history_url")
    partitions = data.draw(st.sampled_from(["4"] * 6 + ["5", "0", "x"]), label="partitions")
    prefix = data.draw(st.sampled_from([written] * 6 + [f"{written}:{{x}}"]), label="prefix")
    env = data.draw(environments, label="env")
    options = ["--redis-url", redis_url, "--history-url", history_url, "--key-prefix", prefix]
    options += ["--partitions", partitions]
    run(placed(options, command, after), env, capfd)
