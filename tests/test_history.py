"""History stores: one conformance suite for every implementation, then SQLite's own promises."""

from __future__ import annotations

import contextlib
import inspect
import os
import random
import sqlite3
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import pytest

from streamstore.errors import (
    ConfigurationError,
    HistoryCorruptError,
    HistoryError,
    HistoryUnavailableError,
    ValidationError,
)
from streamstore.history import HistoryStore, RetentionResult, history_from_url
from streamstore.history import sqlite as sqlite_module
from streamstore.history.memory import MemoryHistory
from streamstore.history.sqlite import SCHEMA_VERSION, SQLiteHistory
from streamstore.models import Message, Session, SessionState, StreamId, new_message_id
from tests.faults.test_storage import read_only_files

# -- helpers ----------------------------------------------------------------------------------


def message(
    session_id: str,
    ms: int,
    seq: int = 0,
    *,
    id: str | None = None,
    content: str = "hello",
    timestamp: float | None = None,
    **fields: Any,
) -> Message:
    return Message(
        id=id or new_message_id(),
        session_id=session_id,
        sender=fields.pop("sender", "agent-1"),
        content=content,
        timestamp=float(ms) / 1000 if timestamp is None else timestamp,
        stream_id=StreamId(ms, seq),
        **fields,
    )


def positions(messages: list[Message]) -> list[StreamId | None]:
    return [m.stream_id for m in messages]


def sqlite_url(path: Path, **options: str) -> str:
    query = "&".join(f"{name}={value}" for name, value in options.items())
    return f"sqlite:///{path}" + (f"?{query}" if query else "")


def conformance_tests() -> dict[str, Callable[..., Any]]:
    """Every test of this suite that takes the ``store`` fixture. Another backend's test
    module binds them (``globals().update(...)``) beside a ``store`` fixture of its own:
    pytest resolves a fixture where the test is collected."""
    return {
        name: function
        for name, function in globals().items()
        if name.startswith("test_")
        and callable(function)
        and "store" in inspect.signature(function).parameters
    }


def store_tests_collected(request: pytest.FixtureRequest, module: ModuleType) -> set[str]:
    """Names of this run's tests collected in ``module`` that take ``store`` (empty when the
    run selected only the caller: -k, a node id)."""
    return {
        getattr(item, "originalname", item.name)
        for item in request.session.items
        if getattr(item, "module", None) is module and "store" in getattr(item, "fixturenames", ())
    }


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[HistoryStore]:
    if request.param == "postgres":  # skipped unless STREAMSTORE_TEST_POSTGRES_URL is set
        from tests.test_history_postgres import opened_postgres_history  # noqa: PLC0415

        async with opened_postgres_history() as postgres:  # in a schema of its own, dropped after
            yield postgres
        return
    url = "memory://" if request.param == "memory" else sqlite_url(tmp_path / "h.db")
    history = history_from_url(url)
    await history.open()
    try:
        yield history
    finally:
        await history.close()


@contextlib.asynccontextmanager
async def opened(url: str) -> AsyncIterator[SQLiteHistory]:
    history = SQLiteHistory.from_url(url)
    await history.open()
    try:
        yield history
    finally:
        await history.close()


# -- conformance: every HistoryStore -----------------------------------------------------------


async def test_is_a_history_store(store: HistoryStore) -> None:
    assert isinstance(store, HistoryStore)


async def test_same_batch_twice_is_stored_once(store: HistoryStore) -> None:
    batch = [message("s1", 1000 + i) for i in range(10)] + [message("s2", 5, i) for i in range(3)]
    assert await store.write_batch(batch) == 13
    s1, s2 = await store.get_session("s1"), await store.get_session("s2")

    assert await store.write_batch(batch) == 0
    assert await store.write_batch(list(reversed(batch))) == 0
    assert await store.count_messages() == 13
    assert await store.get_session("s1") == s1
    assert await store.get_session("s2") == s2
    assert s1 is not None
    assert s1.message_count == 10
    assert s1.last_stream_id == StreamId(1009, 0)


async def test_partial_duplicates_are_counted_exactly(store: HistoryStore) -> None:
    first = [message("s", 100 + i, id=f"m{i}") for i in range(5)]
    assert await store.write_batch(first) == 5
    second = [
        *first[1:4],  # redelivered
        message("s", 200, id="m200"),
        message("s", 201, id="m201"),
        message("s", 201, id="m201"),  # twice in the same batch
        message("s", 300, id="m0"),  # an id already stored, at a new position: skipped
        message("s", 104, id="other"),  # a position already taken by another id: skipped
        message("t", 104, id="m1"),  # same id and position in another session: new
    ]
    assert await store.write_batch(second) == 3
    assert await store.count_messages("s") == 7
    assert await store.count_messages("t") == 1
    assert await store.count_messages() == 8
    session = await store.get_session("s")
    assert session is not None
    assert session.message_count == 7
    assert session.last_stream_id == StreamId(201, 0)  # not 300: that message was not stored
    assert session.last_active_at == pytest.approx(0.201)
    stored = await store.read("s", after=StreamId(103, 0))
    assert [(m.id, m.stream_id) for m in stored] == [
        ("m4", StreamId(104, 0)),
        ("m200", StreamId(200, 0)),
        ("m201", StreamId(201, 0)),
    ]


async def test_read_is_in_stream_order_whatever_the_insertion_order(store: HistoryStore) -> None:
    everything = [message("s", ms, seq) for ms in range(1, 21) for seq in range(3)]
    shuffled = everything[:]
    random.Random(7).shuffle(shuffled)
    for start in range(0, len(shuffled), 7):
        await store.write_batch(shuffled[start : start + 7])
    read = await store.read("s", limit=1000)
    assert read == everything
    assert positions(await store.read("s", limit=1000, newest_first=True)) == positions(
        everything[::-1]
    )
    session = await store.get_session("s")
    assert session is not None
    assert session.last_stream_id == StreamId(20, 2)
    assert session.message_count == 60


@pytest.mark.parametrize("size", [99, 100, 101, 250])
async def test_batches_longer_than_one_insert_statement_count_exactly(
    store: HistoryStore, size: int
) -> None:
    # SQLite inserts 100 rows per statement: redeliveries fall anywhere in those chunks.
    batch = [message("abc"[i % 3], 1000 + i, id=f"m{i}") for i in range(size)]
    assert await store.write_batch(batch[::2]) == len(batch[::2])
    assert await store.write_batch(batch) == size - len(batch[::2])
    assert await store.write_batch(batch) == 0
    assert await store.count_messages() == size
    for session_id in "abc":
        expected = [m for m in batch if m.session_id == session_id]
        assert await store.read(session_id, limit=1000) == expected
        session = await store.get_session(session_id)
        assert session is not None
        assert (session.message_count, session.last_stream_id) == (
            len(expected),
            expected[-1].stream_id,
        )
    cut = batch[size // 2].timestamp  # the older half, whichever statement stored it
    assert await store.enforce_retention(older_than=cut) == RetentionResult(messages=size // 2)
    assert [m.id for m in await store.read("abc"[size // 2 % 3], limit=1)] == [f"m{size // 2}"]
    await assert_counts_exact(store)


async def test_read_windows(store: HistoryStore) -> None:
    await store.write_batch([message("s", ms, seq) for ms in (10, 20, 30) for seq in (0, 1)])
    await store.write_batch([message("other", 15)])

    def at(*pairs: tuple[int, int]) -> list[StreamId]:
        return [StreamId(ms, seq) for ms, seq in pairs]

    async def window(**kwargs: Any) -> list[StreamId | None]:
        return positions(await store.read("s", **kwargs))

    assert await window() == at((10, 0), (10, 1), (20, 0), (20, 1), (30, 0), (30, 1))
    assert await window(after=StreamId(10, 1)) == at((20, 0), (20, 1), (30, 0), (30, 1))
    assert await window(after=StreamId(10, 0), before=StreamId(20, 1)) == at((10, 1), (20, 0))
    assert await window(after=StreamId(15, 0), limit=2) == at((20, 0), (20, 1))
    assert await window(before=StreamId(30, 0), limit=3) == at((10, 0), (10, 1), (20, 0))
    assert await window(before=StreamId(30, 0), limit=3, newest_first=True) == at(
        (20, 1), (20, 0), (10, 1)
    )
    assert await window(newest_first=True, limit=2) == at((30, 1), (30, 0))
    assert await window(after=StreamId(20, 0), newest_first=True) == at((30, 1), (30, 0), (20, 1))
    assert await window(after=StreamId(30, 1)) == []
    assert await window(after=StreamId(20, 0), before=StreamId(20, 0)) == []
    assert await window(after=StreamId(30, 0), before=StreamId(10, 0)) == []
    assert await window(limit=0) == []
    assert await store.read("nobody") == []
    assert positions(await store.read("other")) == at((15, 0))


async def test_snapshots_never_move_state_backwards(store: HistoryStore) -> None:
    created = Session(
        id="s",
        participants=("a", "b"),
        created_at=1.0,
        last_active_at=5.0,
        ttl=60,
        metadata={"topic": "x"},
        message_count=99,  # the publisher's count is not history's: ignored
    )
    await store.write_batch([], [created])
    session = await store.get_session("s")
    assert session == Session(
        id="s",
        participants=("a", "b"),
        created_at=1.0,
        last_active_at=5.0,
        ttl=60.0,
        metadata={"topic": "x"},
        state=SessionState.ACTIVE,
        message_count=0,
        last_stream_id=None,
    )
    await store.write_batch([message("s", 10, timestamp=7.0)])

    closed = Session(
        id="s",
        participants=("a", "b", "c"),
        created_at=1.0,
        last_active_at=3.0,  # older than what history saw: activity does not go back
        ttl=None,
        metadata={"topic": "y"},
        state=SessionState.CLOSED,
    )
    await store.write_batch([], [closed])
    session = await store.get_session("s")
    assert session is not None
    assert (session.state, session.participants, session.metadata, session.ttl) == (
        SessionState.CLOSED,
        ("a", "b", "c"),
        {"topic": "y"},
        None,
    )
    assert (session.last_active_at, session.message_count) == (7.0, 1)

    await store.write_batch([], [created])  # a stale "active" snapshot redelivered
    session = await store.get_session("s")
    assert session is not None
    assert session.state == SessionState.CLOSED

    await store.write_batch([], [Session(id="s", state=SessionState.DELETED)])
    for stale in (created, closed):
        assert await store.write_batch([message("s", 20, timestamp=8.0)], [stale]) == 0
        session = await store.get_session("s")
        assert session is not None
        assert session.state == SessionState.DELETED
    assert session.message_count == 0
    assert session.last_stream_id == StreamId(10, 0)  # the furthest it got, kept
    assert session.last_active_at == 7.0  # skipped messages are no activity


async def test_messages_before_their_snapshot(store: HistoryStore) -> None:
    await store.write_batch(
        [message("late", 30, timestamp=3.0), message("late", 20, timestamp=2.0)]
    )
    session = await store.get_session("late")
    assert session == Session(
        id="late",
        created_at=2.0,
        last_active_at=3.0,
        state=SessionState.ACTIVE,
        message_count=2,
        last_stream_id=StreamId(30, 0),
    )
    snapshot = Session(id="late", participants=("p",), created_at=1.5, last_active_at=1.5)
    assert await store.write_batch([message("late", 40, timestamp=4.0)], [snapshot]) == 1
    session = await store.get_session("late")
    assert session is not None
    assert (session.participants, session.created_at, session.last_active_at) == (("p",), 1.5, 4.0)
    assert (session.message_count, session.last_stream_id) == (3, StreamId(40, 0))
    assert await store.get_session("never") is None


async def test_list_sessions_pages_by_id(store: HistoryStore) -> None:
    ids = [f"session-{i:03d}" for i in range(25)]
    shuffled = ids[:]
    random.Random(3).shuffle(shuffled)
    await store.write_batch([], [Session(id=i) for i in shuffled[:10]])
    await store.write_batch([message(i, 1) for i in shuffled[10:]])
    seen: list[str] = []
    after: str | None = None
    while page := await store.list_sessions(after=after, limit=10):
        assert len(page) <= 10
        seen += [s.id for s in page]
        after = page[-1].id
    assert seen == ids
    assert [s.id for s in await store.list_sessions(after="session-0105", limit=3)] == ids[11:14]
    assert await store.list_sessions(after="session-024") == []
    assert await store.list_sessions(limit=0) == []


async def test_content_is_stored_verbatim(store: HistoryStore) -> None:
    tricky = [
        "",
        "héllo wörld — 日本語 العربية \U0001d522\u210c 🙂👩‍👩‍👧‍👦🏳️‍🌈",
        "nul \x00 in \x00 the middle\x00",
        "'); DROP TABLE messages; --",
        "\" OR 1=1; DELETE FROM sessions WHERE '' = '",
        "Robert'); DROP TABLE sessions;--\n\r\t\\ %s %(x)s ? :name $1",
        "x" * 100_000,
    ]
    batch = [
        message(
            "s",
            i + 1,
            content=text,
            sender="'; DROP TABLE messages; --",
            recipient=None if i % 2 else "bob'); --",
            metadata={"k": text, "nested": [1, 2.5, None, True, {"🙂": "'"}]},
        )
        for i, text in enumerate(tricky)
    ]
    assert await store.write_batch(batch) == len(tricky)
    assert await store.read("s", limit=100) == batch
    assert await store.count_messages() == len(tricky)
    assert [s.id for s in await store.list_sessions()] == ["s"]


async def test_metadata_read_back_is_a_copy(store: HistoryStore) -> None:
    await store.write_batch([], [Session(id="s", metadata={"a": [1]})])
    await store.write_batch([message("s", 1, metadata={"b": {"c": 1}})])
    session = await store.get_session("s")
    assert session is not None
    session.metadata["a"].append(2)
    (stored,) = await store.read("s")
    assert stored.metadata is not None
    stored.metadata["b"]["c"] = 2
    assert (await store.get_session("s")).metadata == {"a": [1]}  # type: ignore[union-attr]
    assert (await store.read("s"))[0].metadata == {"b": {"c": 1}}


async def test_count_messages(store: HistoryStore) -> None:
    assert await store.count_messages() == 0
    assert await store.count_messages("a") == 0
    await store.write_batch([message("a", i) for i in range(1, 4)] + [message("b", 1)])
    assert await store.count_messages() == 4
    assert await store.count_messages("a") == 3
    assert await store.count_messages("b") == 1
    assert await store.count_messages("c") == 0


async def assert_counts_exact(store: HistoryStore) -> None:
    """Every catalog count is what the session holds, and they add up to the total."""
    total = 0
    after: str | None = None
    while page := await store.list_sessions(after=after, limit=1000):
        for session in page:
            held = len(await store.read(session.id, limit=100_000))
            assert session.message_count == held == await store.count_messages(session.id)
            total += held
        after = page[-1].id
    assert await store.count_messages() == total


async def test_a_deleted_session_loses_its_messages_and_takes_no_more(store: HistoryStore) -> None:
    s = [message("s", 100 + i, id=f"s{i}") for i in range(5)]
    t = [message("t", 100 + i, id=f"t{i}") for i in range(3)]
    assert await store.write_batch(s + t) == 8
    deleted = Session(id="s", participants=("a",), state=SessionState.DELETED)
    # The snapshot goes first: messages of its session in the same batch are skipped too.
    same_batch = [message("s", 200, id="s200"), s[0], message("t", 200, id="t200"), t[0]]
    assert await store.write_batch(same_batch, [deleted]) == 1  # t200 only

    session = await store.get_session("s")
    assert session is not None
    assert (session.state, session.message_count) == (SessionState.DELETED, 0)
    assert session.last_stream_id == StreamId(104, 0)  # the furthest it got is kept; not 200
    assert await store.read("s") == []
    assert await store.count_messages("s") == 0
    assert positions(await store.read("t")) == [(100, 0), (101, 0), (102, 0), (200, 0)]

    redeliveries: list[tuple[list[Message], list[Session]]] = [
        (s, []),  # the originals, redelivered
        (same_batch, [deleted]),  # the whole batch again
        ([message("s", 300)], [Session(id="s", last_active_at=99.0)]),  # a stale snapshot
    ]
    for batch, snapshots in redeliveries:
        assert await store.write_batch(batch, snapshots) == 0
    # A partly new batch takes the exact-count path; the deleted session is skipped there too.
    assert await store.write_batch([t[1], message("t", 300), message("s", 400)]) == 1
    # A session first seen deleted keeps none of the messages that came with the news.
    gone = Session(id="fresh", state=SessionState.DELETED)
    assert await store.write_batch([message("fresh", 1), message("fresh", 2)], [gone]) == 0

    session = await store.get_session("s")
    assert session is not None
    assert (session.state, session.message_count) == (SessionState.DELETED, 0)
    assert session.last_stream_id == StreamId(104, 0)
    fresh = await store.get_session("fresh")
    assert fresh is not None
    assert (fresh.state, fresh.message_count, fresh.last_stream_id) == (
        SessionState.DELETED,
        0,
        None,
    )
    assert await store.count_messages() == await store.count_messages("t") == 5
    await assert_counts_exact(store)


async def test_retention_by_age(store: HistoryStore) -> None:
    a = [message("a", ms, timestamp=float(ms)) for ms in range(1, 11)]
    late = message("a", 11, timestamp=2.5)  # timestamps need not follow stream ids
    b = [message("b", ms, timestamp=ms + 0.5) for ms in range(1, 4)]
    await store.write_batch([*a, late, *b], [Session(id="b", state=SessionState.CLOSED)])

    result = await store.enforce_retention(older_than=4.0)
    assert result == RetentionResult(messages=7, sessions=0)  # a: 1, 2, 3 and late; b: all
    assert await store.enforce_retention(older_than=4.0) == RetentionResult()
    assert await store.enforce_retention() == RetentionResult()

    assert positions(await store.read("a")) == [(ms, 0) for ms in range(4, 11)]  # 4.0 stays
    assert await store.read("b") == []
    for session_id, count, last in (("a", 7, StreamId(11, 0)), ("b", 0, StreamId(3, 0))):
        session = await store.get_session(session_id)
        assert session is not None  # age never removes a session
        assert (session.message_count, session.last_stream_id) == (count, last)
    assert positions(await store.read("a", after=StreamId(2, 0), limit=3)) == [
        (4, 0),
        (5, 0),
        (6, 0),
    ]
    assert positions(await store.read("a", before=StreamId(5, 0))) == [(4, 0)]
    assert positions(await store.read("a", newest_first=True, limit=2)) == [(10, 0), (9, 0)]
    await assert_counts_exact(store)


async def test_retention_caps_each_session_by_stream_id(store: HistoryStore) -> None:
    # Newer positions carry older timestamps: the cap goes by stream id alone.
    a = [message("a", ms, seq, timestamp=100.0 - ms) for ms in range(1, 5) for seq in range(3)]
    shuffled = a[:]
    random.Random(3).shuffle(shuffled)
    for start in range(0, len(shuffled), 5):
        await store.write_batch(shuffled[start : start + 5])
    b = [message("b", ms) for ms in range(1, 6)]
    await store.write_batch([*b, message("c", 1), message("c", 2)])

    result = await store.enforce_retention(max_messages_per_session=5)
    assert result == RetentionResult(messages=7, sessions=0)
    assert await store.enforce_retention(max_messages_per_session=5) == RetentionResult()
    assert await store.read("a", limit=100) == a[-5:]  # (3, 1) onwards
    assert await store.read("b") == b  # exactly at the cap
    assert len(await store.read("c")) == 2
    assert positions(await store.read("a", limit=2)) == [(3, 1), (3, 2)]
    assert positions(await store.read("a", before=StreamId(4, 0), newest_first=True)) == [
        (3, 2),
        (3, 1),
    ]
    assert positions(await store.read("a", after=StreamId(1, 0), limit=1)) == [(3, 1)]
    await assert_counts_exact(store)

    assert await store.enforce_retention(max_messages_per_session=0) == RetentionResult(12, 0)
    assert await store.count_messages() == 0
    assert [s.message_count for s in await store.list_sessions()] == [0, 0, 0]


async def test_retention_caps_the_catalog_with_ended_sessions_only(store: HistoryStore) -> None:
    # (id, state, last activity, messages); message timestamps stay below the activity.
    catalog = [
        ("a1", SessionState.ACTIVE, 1.0, 2),  # the least recently active, but active: kept
        ("a2", SessionState.ACTIVE, 2.0, 1),
        ("cb", SessionState.CLOSED, 3.0, 3),
        ("ca", SessionState.CLOSED, 3.0, 2),  # same activity: the id decides
        ("d1", SessionState.DELETED, 4.0, 4),  # its messages went with the snapshot
        ("c2", SessionState.CLOSED, 5.0, 1),
        ("c3", SessionState.CLOSED, 7.0, 2),
    ]
    for session_id, state, active_at, count in catalog:
        await store.write_batch([message(session_id, ms) for ms in range(1, count + 1)])
        await store.write_batch([], [Session(id=session_id, last_active_at=active_at, state=state)])

    assert await store.enforce_retention(max_sessions=6) == RetentionResult(2, 1)  # ca
    assert await store.enforce_retention(max_sessions=4) == RetentionResult(3, 2)  # cb, d1
    assert await store.enforce_retention(max_sessions=4) == RetentionResult()
    assert [s.id for s in await store.list_sessions()] == ["a1", "a2", "c2", "c3"]
    assert await store.get_session("ca") is None
    assert await store.read("cb") == []
    assert await store.count_messages("cb") == 0
    await assert_counts_exact(store)

    # More active sessions than the cap: every ended one goes, the active ones stay.
    assert await store.enforce_retention(max_sessions=1) == RetentionResult(3, 2)
    assert await store.enforce_retention(max_sessions=1) == RetentionResult()
    assert await store.enforce_retention(max_sessions=0) == RetentionResult()
    assert [s.id for s in await store.list_sessions()] == ["a1", "a2"]
    assert await store.count_messages() == 3
    await assert_counts_exact(store)


async def test_retention_all_at_once(store: HistoryStore) -> None:
    await store.write_batch(
        [message("live", ms, timestamp=float(ms)) for ms in range(1, 21)]
        + [message("ended", ms, timestamp=float(ms)) for ms in range(1, 6)]
        + [message("old", ms, timestamp=float(ms)) for ms in range(1, 4)],
        [
            Session(id="ended", state=SessionState.CLOSED, last_active_at=1.0),
            Session(id="old", state=SessionState.CLOSED, last_active_at=50.0),
        ],
    )
    limits: dict[str, Any] = {"older_than": 5.0, "max_messages_per_session": 10, "max_sessions": 2}
    # ended goes whole (5); live loses 1-4 by age, then 5-10 to the cap; old loses all by age.
    assert await store.enforce_retention(**limits) == RetentionResult(messages=18, sessions=1)
    assert await store.enforce_retention(**limits) == RetentionResult()
    assert positions(await store.read("live", limit=100)) == [(ms, 0) for ms in range(11, 21)]
    assert positions(await store.read("live", after=StreamId(15, 0), limit=2)) == [
        (16, 0),
        (17, 0),
    ]
    assert [s.id for s in await store.list_sessions()] == ["live", "old"]
    await assert_counts_exact(store)


@pytest.mark.parametrize(
    "limits",
    [
        {"older_than": True},
        {"older_than": "10"},
        {"older_than": float("nan")},
        {"max_messages_per_session": -1},
        {"max_messages_per_session": 2.5},
        {"max_sessions": -1},
        {"max_sessions": False},
    ],
    ids=repr,
)
async def test_retention_refuses_bad_limits(store: HistoryStore, limits: dict[str, Any]) -> None:
    await store.write_batch([message("s", 1)], [Session(id="s", state=SessionState.CLOSED)])
    with pytest.raises(ValidationError):
        await store.enforce_retention(**limits)
    assert await store.count_messages() == 1


@pytest.mark.parametrize(
    "bad",
    [
        Message(id="no-position", session_id="s", sender="a", content="secret-content"),
        message("s", 9, metadata={"not json": object()}, content="secret-content"),
        message("s", 9, content="secret-content \ud800"),
        message("s", 2**64, content="secret-content"),
    ],
    ids=["no-stream-id", "metadata", "lone-surrogate", "overflow"],
)
async def test_a_bad_message_fails_the_whole_batch(store: HistoryStore, bad: Message) -> None:
    good = [message("s", 1), message("good", 1)]
    with pytest.raises(HistoryError) as caught:
        await store.write_batch([*good, bad], [Session(id="fresh")])
    assert "secret-content" not in str(caught.value)
    assert await store.count_messages() == 0
    assert await store.list_sessions() == []
    assert await store.write_batch(good) == 2  # and the store still works


async def test_concurrent_writes_and_reads(store: HistoryStore) -> None:
    counts: list[int] = []

    async def write(session_id: str) -> None:
        for start in range(0, 40, 10):
            batch = [message(session_id, ms) for ms in range(start + 1, start + 11)]
            counts.append(await store.write_batch(batch))
            await store.read(session_id, newest_first=True, limit=5)

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(write, f"s{i}")
    assert sum(counts) == 320
    assert await store.count_messages() == 320
    assert [s.message_count for s in await store.list_sessions()] == [40] * 8


async def test_closed_store_refuses_calls(store: HistoryStore) -> None:
    await store.write_batch([message("s", 1)])
    await store.close()
    await store.close()  # idempotent
    calls: list[Callable[[], Any]] = [
        lambda: store.write_batch([message("s", 2)]),
        lambda: store.write_batch([]),
        lambda: store.read("s"),
        lambda: store.read("s", limit=0),
        lambda: store.get_session("s"),
        store.list_sessions,
        store.count_messages,
        store.enforce_retention,
        lambda: store.enforce_retention(older_than=1.0, max_sessions=0),
    ]
    for call in calls:
        with pytest.raises(HistoryError, match="not open"):
            await call()


@pytest.mark.parametrize("url", ["memory://", "sqlite:///{tmp}/never-opened.db"])
async def test_calls_before_open_raise(url: str, tmp_path: Path) -> None:
    store = history_from_url(url.format(tmp=tmp_path))
    with pytest.raises(HistoryError, match="not open"):
        await store.read("s")
    with pytest.raises(HistoryError, match="not open"):
        await store.write_batch([message("s", 1)])
    await store.close()
    assert not (tmp_path / "never-opened.db").exists()


# -- SQLite only ------------------------------------------------------------------------------


def schema_of(path: Path) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        return connection.execute(
            "SELECT type, name, sql FROM sqlite_master ORDER BY name"
        ).fetchall()


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o000, 0o277], ids=["022", "000", "277"])
async def test_files_are_created_private(tmp_path: Path, umask: int) -> None:
    db = tmp_path / "h.db"
    previous = os.umask(umask)
    try:
        async with opened(sqlite_url(db)) as store:
            await store.write_batch([message("s", 1)])
            for path in (db, db.with_name("h.db-wal"), db.with_name("h.db-shm")):
                assert path.exists(), path
                assert file_mode(path) == 0o600, path
    finally:
        os.umask(previous)


async def test_injection_leaves_the_schema_alone(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    async with opened(sqlite_url(db)) as store:
        before = schema_of(db)
        evil = "x'); DROP TABLE messages; DROP TABLE sessions; --"
        await store.write_batch([message(evil, 1, content=evil, sender=evil)], [Session(id=evil)])
        assert (await store.read(evil))[0].content == evil
        assert await store.list_sessions(after=evil) == []
        assert schema_of(db) == before
    assert {name for _, name, _ in before} >= {"messages", "sessions"}


async def test_random_bytes_are_not_a_database(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    garbage = random.Random(1).randbytes(8192)
    db.write_bytes(garbage)
    store = SQLiteHistory(db)
    with pytest.raises(HistoryCorruptError, match="not a SQLite database"):
        await store.open()
    with pytest.raises(HistoryError, match="not open"):
        await store.count_messages()
    await store.close()
    assert db.read_bytes() == garbage  # untouched


async def test_damaged_pages_raise_corrupt(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    async with opened(sqlite_url(db)) as store:
        await store.write_batch([message("s", i, content="x" * 500) for i in range(1, 200)])
    data = bytearray(db.read_bytes())
    page = 4096
    assert len(data) > 3 * page
    data[page:] = random.Random(2).randbytes(len(data) - page)
    db.write_bytes(bytes(data))
    store = SQLiteHistory(db)

    async def open_and_read() -> None:
        await store.open()  # page 1 (the schema) is intact: this may succeed
        await store.count_messages()
        await store.read("s")

    try:
        with pytest.raises(HistoryCorruptError, match="damaged"):
            await open_and_read()
    finally:
        await store.close()


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    async with opened(sqlite_url(db)) as store:
        await store.write_batch([message("s", 1)])
    with contextlib.closing(sqlite3.connect(db)) as connection:
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        connection.commit()
    with pytest.raises(HistoryCorruptError, match="newer"):
        await SQLiteHistory(db).open()


async def test_another_applications_database_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(db)) as connection:
        connection.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance REAL)")
        connection.commit()
    before = schema_of(db)
    with pytest.raises(HistoryCorruptError, match="another application"):
        await SQLiteHistory(db).open()
    assert schema_of(db) == before


async def test_an_empty_file_is_initialised(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    db.touch()
    async with opened(sqlite_url(db)) as store:
        assert await store.write_batch([message("s", 1)]) == 1
        assert store._pragma("user_version") == SCHEMA_VERSION == 2
        assert store._pragma("journal_mode") == "wal"


# Version 1's schema, frozen as streamstore wrote it: the starting point of the migration tests.
_SCHEMA_V1 = (
    """
    CREATE TABLE sessions (
        id              TEXT PRIMARY KEY NOT NULL,
        participants    TEXT NOT NULL,
        created_at      REAL NOT NULL,
        last_active_at  REAL NOT NULL,
        ttl             REAL,
        metadata        TEXT NOT NULL,
        state           TEXT NOT NULL CHECK (state IN ('active', 'closed', 'deleted')),
        message_count   INTEGER NOT NULL DEFAULT 0,
        last_stream_ms  INTEGER,
        last_stream_seq INTEGER
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE messages (
        pk          INTEGER PRIMARY KEY,
        session_id  TEXT NOT NULL,
        stream_ms   INTEGER NOT NULL,
        stream_seq  INTEGER NOT NULL,
        message_id  TEXT NOT NULL,
        sender      TEXT NOT NULL,
        recipient   TEXT,
        content     TEXT NOT NULL,
        metadata    TEXT,
        timestamp   REAL NOT NULL
    )
    """,
    "CREATE UNIQUE INDEX messages_by_position ON messages (session_id, stream_ms, stream_seq)",
    "CREATE UNIQUE INDEX messages_by_id ON messages (message_id, session_id)",
)


def write_version_1_file(db: Path, *, extra: str | None = None) -> None:
    """What version 1 left behind: ``kept`` (active, 3 messages) and ``gone``, deleted after
    its 2 messages were stored (version 1 kept them)."""
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as connection:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("BEGIN IMMEDIATE")
        for statement in (*_SCHEMA_V1, *([extra] if extra else [])):
            connection.execute(statement)
        connection.execute("PRAGMA application_id = 1936943153")  # 0x73736831
        connection.execute("PRAGMA user_version = 1")
        connection.executemany(
            "INSERT INTO sessions VALUES (?, '[]', 1.0, ?, NULL, '{}', ?, ?, ?, 0)",
            [("kept", 3.0, "active", 3, 3), ("gone", 2.0, "deleted", 2, 2)],
        )
        connection.executemany(
            "INSERT INTO messages (session_id, stream_ms, stream_seq, message_id, sender,"
            " recipient, content, metadata, timestamp)"
            " VALUES (?, ?, 0, ?, 'a', NULL, 'x', NULL, ?)",
            [("kept", ms, f"k{ms}", float(ms)) for ms in (1, 2, 3)]
            + [("gone", ms, f"g{ms}", float(ms)) for ms in (1, 2)],
        )
        connection.execute("COMMIT")


def normalized_schema(db: Path) -> list[tuple[str, str, str]]:
    return [(kind, name, " ".join(str(sql).split())) for kind, name, sql in schema_of(db)]


def test_the_frozen_version_1_schema_is_the_one_migrated_from() -> None:
    def words(statements: tuple[str, ...]) -> list[str]:
        return [" ".join(statement.split()) for statement in statements]

    assert words(_SCHEMA_V1) == words(sqlite_module._SCHEMA_V1)


async def test_a_version_1_file_is_migrated(tmp_path: Path) -> None:
    old, new = tmp_path / "v1.db", tmp_path / "new.db"
    write_version_1_file(old)
    async with opened(sqlite_url(new)):
        pass
    async with opened(sqlite_url(old)) as store:
        assert store._pragma("user_version") == SCHEMA_VERSION == 2
        assert normalized_schema(old) == normalized_schema(new)
        assert [m.id for m in await store.read("kept")] == ["k1", "k2", "k3"]
        gone = await store.get_session("gone")
        assert gone is not None
        # Deleted stays deleted, for what version 1 kept too.
        assert (gone.state, gone.message_count, gone.last_stream_id) == (
            SessionState.DELETED,
            0,
            StreamId(2, 0),
        )
        assert await store.count_messages() == 3
        assert await store.write_batch([message("gone", 5), message("kept", 5, timestamp=5.0)]) == 1
        assert uncovered_messages(old) == 0
        assert await store.enforce_retention(older_than=2.5) == RetentionResult(2, 0)
        assert await store.enforce_retention(max_sessions=1) == RetentionResult(0, 1)
        assert [s.id for s in await store.list_sessions()] == ["kept"]
    async with opened(sqlite_url(old)) as store:  # opened again: nothing left to migrate
        assert positions(await store.read("kept")) == [(3, 0), (5, 0)]
        assert await store.count_messages() == 2


async def test_a_failed_migration_leaves_version_1_behind(tmp_path: Path) -> None:
    db = tmp_path / "v1.db"
    # A table where the migration's third object goes: it fails half way through.
    write_version_1_file(db, extra="CREATE TABLE sessions_by_activity (x)")
    before = schema_of(db)
    store = SQLiteHistory(db)
    with pytest.raises(HistoryError, match="already"):
        await store.open()
    with pytest.raises(HistoryError, match="not open"):
        await store.count_messages()
    assert schema_of(db) == before
    with contextlib.closing(sqlite3.connect(db)) as connection:
        assert connection.execute("PRAGMA user_version").fetchone() == (1,)
        assert connection.execute("SELECT COUNT(*) FROM messages").fetchone() == (5,)
        connection.execute("DROP TABLE sessions_by_activity")
        connection.commit()
    async with opened(sqlite_url(db)) as store:
        assert store._pragma("user_version") == 2
        assert await store.count_messages() == 3


def test_retention_queries_use_indexes(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    with contextlib.closing(sqlite3.connect(db)) as connection:
        for statement in sqlite_module._SCHEMA:
            connection.execute(statement)
        expected = {
            sqlite_module._AGED_RANGES: "INDEX message_ages_by_oldest",
            sqlite_module._OLDER_IN_RANGE: "INTEGER PRIMARY KEY (rowid>? AND rowid<?)",
            sqlite_module._OLDEST_IN_RANGE: "INTEGER PRIMARY KEY (rowid>? AND rowid<?)",
            sqlite_module._DELETE_OLDEST: "COVERING INDEX messages_by_position",
            sqlite_module._LEAST_RECENTLY_ENDED: "INDEX sessions_by_activity",
            sqlite_module._DELETED_AMONG.format("?, ?"): "PRIMARY KEY",
        }
        for sql, index in expected.items():
            plan = connection.execute(f"EXPLAIN QUERY PLAN {sql}", [1] * sql.count("?"))
            details = " | ".join(row[3] for row in plan)
            assert index in details, (sql, details)
            assert "SCAN messages" not in details


def test_message_inserts_use_a_few_statement_shapes(tmp_path: Path) -> None:
    """Batches of any size go in through a handful of INSERT shapes, each row once and in
    order: sqlite3 caches a prepared statement per shape (tens of KiB each for this one), so
    a shape per batch size would grow a worker's memory as new sizes come."""
    rows_per_insert: set[int] = set()
    with contextlib.closing(sqlite3.connect(tmp_path / "h.db", isolation_level=None)) as connection:
        for statement in sqlite_module._SCHEMA:
            connection.execute(statement)

        def traced(sql: str) -> None:
            if sql.lstrip().startswith("INSERT OR IGNORE INTO messages"):
                rows_per_insert.add(sql.count("), (") + 1)

        connection.set_trace_callback(traced)
        seq = 0
        for size in range(1, 260):
            rows = []
            for _ in range(size):
                seq += 1
                rows.append(("s", 1, seq, f"m{seq}", "a", None, "hi", None, 1.0))
            assert sqlite_module._insert_rows(connection, rows) == size
        connection.set_trace_callback(None)
        stored = [
            seq for (seq,) in connection.execute("SELECT stream_seq FROM messages ORDER BY pk")
        ]
    assert stored == list(range(1, seq + 1))
    assert len(rows_per_insert) <= 8, sorted(rows_per_insert)


def uncovered_messages(db: Path) -> int:
    """Messages outside every message_ages range whose oldest is at most their timestamp."""
    with contextlib.closing(sqlite3.connect(db)) as connection:
        (count,) = connection.execute(
            """SELECT COUNT(*) FROM messages WHERE NOT EXISTS (
                SELECT 1 FROM message_ages WHERE pk BETWEEN first_pk AND last_pk
                AND oldest <= timestamp)"""
        ).fetchone()
    return int(count)


async def test_age_retention_is_exact_whatever_order_messages_came_in(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    async with opened(sqlite_url(db)) as store:
        store._retention_chunk = 4
        await store.write_batch([message("a", ms, timestamp=100.0 + ms) for ms in range(10)])
        await store.write_batch([message("b", ms, timestamp=200.0) for ms in range(5)])
        # Deleting b frees the highest pks: c's messages get them again (ranges overlap).
        await store.write_batch([], [Session(id="b", state=SessionState.DELETED)])
        await store.write_batch([message("c", ms, timestamp=50.0) for ms in range(5)])
        late = [message("d", 1, timestamp=300.0), message("d", 2, timestamp=5.0)]
        await store.write_batch([*late, message("d", 3, timestamp=301.0)])
        # Partly redelivered: the exact-count path notes its range too.
        await store.write_batch([late[1], message("d", 4, timestamp=6.0)])
        assert uncovered_messages(db) == 0

        result = await store.enforce_retention(older_than=105.0)
        assert result == RetentionResult(messages=5 + 5 + 2, sessions=0)
        assert await store.enforce_retention(older_than=105.0) == RetentionResult()
        assert positions(await store.read("a")) == [(ms, 0) for ms in range(5, 10)]
        assert await store.read("c") == []
        assert positions(await store.read("d")) == [(1, 0), (3, 0)]
        assert uncovered_messages(db) == 0
        await assert_counts_exact(store)

        assert await store.enforce_retention(older_than=1e9) == RetentionResult(7, 0)
        with contextlib.closing(sqlite3.connect(db)) as connection:
            assert connection.execute("SELECT COUNT(*) FROM message_ages").fetchone() == (0,)


async def test_retention_runs_in_short_transactions_between_writes(tmp_path: Path) -> None:
    async with opened(sqlite_url(tmp_path / "h.db")) as store:
        store._retention_chunk = 3
        await store.write_batch(
            [message("aged", ms, timestamp=float(ms)) for ms in range(1, 21)]
            + [message("long", ms, timestamp=100.0 + ms) for ms in range(1, 31)]
            + [message("ended", ms, timestamp=100.0 + ms) for ms in range(1, 11)],
            [Session(id="ended", state=SessionState.CLOSED, last_active_at=1.0)],
        )
        transactions: list[list[str]] = []

        def trace(sql: str) -> None:
            if sql.startswith("BEGIN"):
                transactions.append([])
            elif transactions:
                transactions[-1].append(sql)

        assert store._writer is not None
        store._writer.set_trace_callback(trace)
        done = anyio.Event()
        written: list[int] = []

        async def keep_writing() -> None:  # new sessions, so that no limit applies to them
            while not done.is_set():
                busy = f"busy-{len(written)}"
                batch = [message(busy, 1, timestamp=1e9), message(busy, 2, timestamp=1e9)]
                written.append(await store.write_batch(batch))

        async with anyio.create_task_group() as tg:
            tg.start_soon(keep_writing)
            result = await store.enforce_retention(
                older_than=21.0, max_messages_per_session=10, max_sessions=2
            )
            done.set()
        store._writer.set_trace_callback(None)

        # ended (10) whole, aged (20) by age, long (30) down to 10.
        assert result == RetentionResult(messages=50, sessions=1)
        kinds = [
            "write" if any("INSERT OR IGNORE INTO messages" in s for s in statements) else "trim"
            for statements in transactions
            if any("INSERT" in s or "DELETE FROM messages" in s for s in statements)
        ]
        trims = [i for i, kind in enumerate(kinds) if kind == "trim"]
        assert len(trims) >= 50 // 3  # at most 3 messages per transaction
        assert "write" in kinds[trims[0] : trims[-1]]  # the writer got in between
        assert sum(written) == 2 * len(written)
        assert await store.count_messages() == 10 + sum(written)
        await assert_counts_exact(store)


async def test_concurrent_catalog_caps_stop_exactly_at_the_cap(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "h.db")
    async with opened(url) as one, opened(url) as two:  # two writers: SQLite's lock decides
        ended = [f"e{i:02d}" for i in range(30)]
        await one.write_batch(
            [message(session_id, ms) for session_id in ended for ms in (1, 2, 3)],
            [
                Session(id=session_id, state=SessionState.CLOSED, last_active_at=float(i))
                for i, session_id in enumerate(ended)
            ],
        )
        results: list[RetentionResult] = []

        async def cap(store: SQLiteHistory) -> None:
            store._retention_chunk = 2  # sessions of 3 messages take two transactions
            results.append(await store.enforce_retention(max_sessions=10))

        async with anyio.create_task_group() as tg:
            tg.start_soon(cap, one)
            tg.start_soon(cap, two)
        assert sum(result.sessions for result in results) == 20
        assert sum(result.messages for result in results) == 60
        assert [s.id for s in await two.list_sessions()] == ended[20:]
        await assert_counts_exact(one)


async def test_data_survives_close_and_reopen(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "h.db")
    batch = [message("s", i, metadata={"i": i}) for i in range(1, 51)]
    async with opened(url) as store:
        await store.write_batch(batch[:30], [Session(id="s", participants=("a",), ttl=5)])
        session = await store.get_session("s")
    async with opened(url) as store:
        assert await store.get_session("s") == session
        assert await store.write_batch(batch) == 20
        assert await store.read("s", limit=100) == batch
    store = SQLiteHistory.from_url(url)
    for _ in range(2):  # the same object can be opened again after close()
        await store.open()
        assert await store.count_messages() == 50
        await store.close()


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, (2, 30_000)),
        ({"synchronous": "normal"}, (1, 30_000)),
        ({"busy_timeout": "200"}, (2, 200)),
    ],
)
async def test_pragmas(tmp_path: Path, options: dict[str, str], expected: tuple[int, int]) -> None:
    async with opened(sqlite_url(tmp_path / "h.db", **options)) as store:
        assert (store._pragma("synchronous"), store._pragma("busy_timeout")) == expected
        assert store._pragma("journal_mode") == "wal"


_LOCKER = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN IMMEDIATE")
connection.execute("CREATE TABLE IF NOT EXISTS lock_holder (x)")
print("locked", flush=True)
sys.stdin.readline()
connection.execute("ROLLBACK")
connection.close()
"""


@contextlib.contextmanager
def locked_by_another_process(db: Path) -> Iterator[Callable[[], None]]:
    """Hold SQLite's write lock on ``db`` from a separate process until release() is called."""
    with subprocess.Popen(
        [sys.executable, "-c", _LOCKER, str(db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdin is not None
        assert process.stdout is not None
        stdin = process.stdin

        def release() -> None:
            if process.poll() is None:
                stdin.write("\n")
                stdin.flush()
                assert process.wait(timeout=30) == 0

        try:
            assert process.stdout.readline().strip() == "locked"
            yield release
        finally:
            with contextlib.suppress(Exception):
                release()
            if process.poll() is None:
                process.kill()


async def test_a_lock_held_elsewhere_raises_then_clears(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    async with opened(sqlite_url(db, busy_timeout="200")) as store:
        await store.write_batch([message("s", 1)])
        batch = [message("s", 2, content="secret-content"), message("s", 3)]
        with locked_by_another_process(db) as release:
            started = anyio.current_time()
            with pytest.raises(HistoryError, match="locked") as caught:
                await store.write_batch(batch)
            assert anyio.current_time() - started >= 0.15
            assert not isinstance(caught.value, HistoryCorruptError)
            assert "secret-content" not in str(caught.value)
            assert await store.count_messages() == 1  # readers are not blocked in WAL mode
            release()
        assert await store.write_batch(batch) == 2
        assert await store.count_messages() == 3
        session = await store.get_session("s")
        assert session is not None
        assert session.message_count == 3


async def test_a_write_waits_out_a_short_lock(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    async with opened(sqlite_url(db, busy_timeout="20000")) as store:
        with locked_by_another_process(db) as release:
            async with anyio.create_task_group() as tg:
                results: list[int] = []

                async def write() -> None:
                    results.append(await store.write_batch([message("s", 1)]))

                tg.start_soon(write)
                await anyio.sleep(0.5)
                assert results == []  # still waiting for the lock
                release()
        assert results == [1]


async def test_a_commit_in_flight_is_not_cancelled(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    async with opened(sqlite_url(db, busy_timeout="20000")) as store:
        results: list[object] = []
        scope = anyio.CancelScope()

        async def write() -> None:
            with scope:
                results.append(await store.write_batch([message("s", 1), message("s", 2)]))
                await anyio.sleep(1)  # the cancellation lands here, after the commit
                results.append("not cancelled")

        with locked_by_another_process(db) as release:
            async with anyio.create_task_group() as tg:
                tg.start_soon(write)
                await anyio.sleep(0.3)  # the write is in its worker thread, waiting for the lock
                scope.cancel()
                await anyio.sleep(0.3)
                assert results == []
                release()
        assert results == [2]
        assert scope.cancelled_caught
        assert await store.count_messages() == 2


@pytest.mark.parametrize(
    ("url", "path", "synchronous", "busy_timeout_ms"),
    [
        ("sqlite:///relative/h.db", "relative/h.db", "full", 30_000),
        ("sqlite:////abs/h.db", "/abs/h.db", "full", 30_000),
        ("sqlite:///h%20x.db?synchronous=NORMAL", "h x.db", "normal", 30_000),
        ("sqlite:///h.db?busy_timeout=0&synchronous=full", "h.db", "full", 0),
    ],
)
def test_from_url(url: str, path: str, synchronous: str, busy_timeout_ms: int) -> None:
    store = history_from_url(url)
    assert isinstance(store, SQLiteHistory)
    assert store.path == path
    assert (store._synchronous, store._busy_timeout_ms) == (synchronous, busy_timeout_ms)


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://host/h.db",
        "sqlite://",
        "sqlite:///",
        "sqlite:h.db",
        "sqlite:///:memory:",
        "sqlite:///h.db#fragment",
        "sqlite:///h.db?synchronous=off",
        "sqlite:///h.db?synchronous=",
        "sqlite:///h.db?busy_timeout=abc",
        "sqlite:///h.db?busy_timeout=-1",
        "sqlite:///h.db?busy_timeout=1.5",
        "sqlite:///h.db?journal_mode=delete",
        "sqlite:///h.db?synchronous=full&synchronous=normal",
        "sqlite:///h.db?busy_timeout",
        "sqlite:///h.db?&&",
    ],
)
def test_from_url_refuses(url: str) -> None:
    with pytest.raises(ConfigurationError):
        SQLiteHistory.from_url(url)


def test_memory_url() -> None:
    assert isinstance(history_from_url("memory://"), MemoryHistory)


# -- connections reopened after errors that may leave them unusable ---------------------------


async def test_a_store_opened_on_a_read_only_file_recovers_once_it_is_writable(
    tmp_path: Path,
) -> None:
    """SQLite opens a file it may not write read-only, silently, and such a connection stays
    read-only after the file is writable again: the store reopens its connections after an
    error saying so, with the same file mode and PRAGMAs."""
    db = tmp_path / "h.db"
    url = sqlite_url(db, busy_timeout="1500", synchronous="normal")
    async with opened(url) as store:
        assert await store.write_batch([message("s", 1)]) == 1
    with read_only_files(db) as writable:
        async with opened(url) as store:
            batch = [message("s", 2), message("s", 3)]
            for _ in range(3):  # each failure reopens, read-only again while it lasts
                with pytest.raises(HistoryUnavailableError, match="READONLY"):
                    await store.write_batch(batch)
            assert await store.count_messages() == 1  # reads go on meanwhile
            writable()
            assert await store.write_batch(batch) == 2  # on new connections: no restart
            assert store.reopened >= 1
            assert await store.count_messages() == 3
            assert (store._pragma("synchronous"), store._pragma("busy_timeout")) == (1, 1500)
            assert store._pragma("journal_mode") == "wal"
            assert store._reader is not None
            assert store._reader.execute("PRAGMA query_only").fetchone()[0] == 1
            assert file_mode(db) == 0o600
            assert await store.write_batch([*batch, message("s", 4)]) == 1  # no duplicates


async def test_reads_and_writes_racing_a_reopen_all_land(tmp_path: Path) -> None:
    """Concurrent callers while the connections are replaced: none fails for it, none sees a
    closed connection, and every write lands once."""
    db = tmp_path / "h.db"
    async with opened(sqlite_url(db)) as store:
        assert await store.write_batch([message("s", 1)]) == 1
    with read_only_files(db) as writable:
        async with opened(sqlite_url(db)) as store:
            with pytest.raises(HistoryUnavailableError, match="READONLY"):
                await store.write_batch([message("s", 2)])
            writable()
            written: list[int] = []
            counted: list[int] = []

            async def write(ms: int) -> None:
                written.append(await store.write_batch([message("s", ms)]))

            async def count() -> None:
                counted.append(await store.count_messages())

            async with anyio.create_task_group() as tg:
                for ms in range(2, 22):
                    tg.start_soon(write, ms)
                    tg.start_soon(count)
            assert store.reopened == 1
            assert written == [1] * 20
            assert len(counted) == 20
            assert await store.count_messages() == 21
