"""Hostile and odd input: round-trips byte-exactly or is refused with a typed error, and never
shows up in a log."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from streamstore import (
    Message,
    Persister,
    PersisterSettings,
    Settings,
    StreamStore,
    StreamStoreError,
    Sweeper,
    SweeperSettings,
    ValidationError,
)

pytestmark = pytest.mark.faults

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)
any_char = st.characters(exclude_categories=())  # lone surrogates and control characters too
specs = st.fixed_dictionaries(
    {
        "sender": st.text(any_char, min_size=1, max_size=40),
        "content": st.text(any_char, max_size=300),
    },
    optional={
        "recipient": st.text(any_char, min_size=1, max_size=40),
        "metadata": st.dictionaries(st.text(max_size=10), json_values, max_size=4),
    },
)


@hypothesis_settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(specs, min_size=1, max_size=5))
def test_any_message_round_trips_exactly_or_is_refused_with_a_typed_error(
    settings: Settings, batch: list[dict[str, Any]]
) -> None:
    async def scenario() -> None:
        async with StreamStore.open(settings=settings.replace(history_url="memory://")) as store:
            session = await store.create_session(["a"])
            try:
                published = await store.publish_many(session.id, batch)
            except ValidationError:
                assert [m async for m in store.replay(session.id)] == []
                return
            await Persister(store, PersisterSettings(consumer="c1")).drain()
            stored = await store.history_store.read(session.id, limit=100)
            replayed = [m async for m in store.replay(session.id)]
            for got in (stored, replayed):
                assert [_fields(m) for m in got] == [_fields(m) for m in published]
            for spec, message in zip(batch, published, strict=True):
                assert message.content == spec["content"]
                assert message.metadata == spec.get("metadata")

    anyio.run(scenario)


def _fields(message: Message) -> tuple[Any, ...]:
    return (
        message.id,
        message.stream_id,
        message.sender,
        message.recipient,
        message.content,
        message.metadata,
        message.timestamp,
    )


INJECTIONS = [
    "'); DROP TABLE messages; --",
    '" OR 1=1 --',
    "Robert'); DELETE FROM sessions WHERE ('1'='1",
    "\x00hidden",
    "😀" * 10 + "\u202e" + "reversed",
]


async def test_sql_injection_strings_are_stored_verbatim(
    settings: Settings, raw: redis.asyncio.Redis, tmp_path: Path
) -> None:
    db = tmp_path / "history.db"
    async with StreamStore.open(settings=settings.replace(history_url=f"sqlite:///{db}")) as store:
        session = await store.create_session([INJECTIONS[0], "a"], metadata={"x": INJECTIONS[1]})
        before = _schema(db)
        published = await store.publish_many(
            session.id,
            [
                {"sender": "a", "content": text, "metadata": {text: text}, "recipient": "b"}
                for text in INJECTIONS
            ],
        )
        await Persister(store, PersisterSettings(consumer="c1")).drain()
        stored = await store.history_store.read(session.id, limit=100)
        assert [m.content for m in stored] == INJECTIONS
        assert [m.metadata for m in stored] == [m.metadata for m in published]
        assert (await store.get_session(session.id)).participants[0] == INJECTIONS[0]
    assert _schema(db) == before


def _schema(db: Path) -> list[tuple[str, ...]]:
    with sqlite3.connect(db) as connection:
        return connection.execute(
            "SELECT type, name, sql FROM sqlite_master ORDER BY name"
        ).fetchall()


CANARY = "canary-7f3a-do-not-log"


async def test_message_content_never_appears_in_logs_or_errors(
    settings: Settings, raw: redis.asyncio.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    errors: list[str] = []
    async with StreamStore.open(settings=settings) as store:
        session = await store.create_session(["a"], ttl=1)
        await store.publish(session.id, sender="a", content=CANARY, metadata={"k": CANARY})
        for bad in (
            {"sender": "a", "content": CANARY * 10_000},  # too large
            {"sender": "a", "content": CANARY, "metadata": {CANARY: object()}},
            {"sender": "a", "content": CANARY + "\ud800"},
            {"sender": "a", "content": CANARY, "id": "bad id"},  # ids and names may be echoed
        ):
            try:
                await store.publish_many(session.id, [bad])
            except StreamStoreError as exc:
                errors.append(str(exc))
        # a poison entry carrying the canary, dead-lettered by a persister logging at DEBUG
        feed = store.keys.session(session.id).feed
        await raw.xadd(feed, {b"k": b"m", b"s": session.id.encode(), b"d": CANARY.encode()})
        persister = Persister(store, PersisterSettings(consumer="c1"))
        async with anyio.create_task_group() as tg:
            await tg.start(persister.run)
            await anyio.sleep(0.5)
            persister.stop()
        await Sweeper(store, SweeperSettings()).sweep_once(now=10**10)
        try:
            await store.publish(session.id, sender="a", content=CANARY)
        except StreamStoreError as exc:
            errors.append(str(exc))
        assert [m.content async for m in store.replay(session.id)] == [CANARY]
    assert len(errors) == 5
    assert persister.stats.dead_lettered == 1
    assert all(CANARY not in text for text in errors)
    assert CANARY not in caplog.text
