"""The demo: agents chatting in a few sessions while a persister writes history, then a replay.

It is what ``make demo`` runs (``streamstore demo``), on the embedded server by default.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio

from streamstore.models import Message
from streamstore.store import StreamStore
from streamstore.workers.persister import Persister

__all__ = ["DemoReport", "run_demo"]

QUESTIONS = [
    "Which flights leave for Lisbon tomorrow morning?",
    "Book the cheapest one with a window seat.",
    "Add a hotel near the old town for two nights.",
    "Summarise the plan for the traveller.",
]


@dataclass(frozen=True)
class DemoReport:
    """What the demo did, for the summary and for tests."""

    sessions: int
    published: int
    persisted: int
    lag: int
    replayed: int
    replay_matches: bool
    seconds: float


async def _planner(store: StreamStore, session_id: str, rounds: int) -> None:
    """Waits for each question addressed to it and answers the user, asking the critic first."""
    cursor = "0"
    for n in range(rounds):
        question = await store.wait_for(session_id, recipient="planner", after=cursor, timeout=10)
        check = await store.publish(
            session_id,
            sender="planner",
            recipient="critic",
            content=f"draft answer {n + 1}: checking options for {question.content!r}",
        )
        review = await store.wait_for(
            session_id, recipient="planner", after=str(check.stream_id), timeout=10
        )
        answer = await store.publish(
            session_id,
            sender="planner",
            recipient="user",
            content=f"answer {n + 1} (reviewed: {review.content})",
            metadata={"round": n + 1},
        )
        cursor = str(answer.stream_id)


async def _critic(store: StreamStore, session_id: str, rounds: int) -> None:
    cursor = "0"
    for _ in range(rounds):
        draft = await store.wait_for(session_id, recipient="critic", after=cursor, timeout=10)
        reply = await store.publish(
            session_id, sender="critic", recipient="planner", content="looks right, ship it"
        )
        cursor = str(reply.stream_id)
        del draft


async def _user(
    store: StreamStore, session_id: str, label: str, say: Callable[[str], None]
) -> None:
    for question in QUESTIONS:
        asked = await store.publish(
            session_id, sender="user", recipient="planner", content=question
        )
        answer = await store.wait_for(
            session_id, recipient="user", after=str(asked.stream_id), timeout=10
        )
        say(f"  [{label}] user <- planner: {answer.content[:60]}")


async def _wait_persisted(store: StreamStore, ids: list[str], expected: int) -> int:
    """Wait (up to 10 s) until history holds ``expected`` messages of these sessions."""
    persisted = 0
    with anyio.move_on_after(10):
        while True:
            persisted = sum([await store.history_store.count_messages(s) for s in ids])
            if persisted >= expected:
                break
            await anyio.sleep(0.05)
    return persisted


async def run_demo(
    store: StreamStore, *, sessions: int = 3, say: Callable[[str], None] = print
) -> DemoReport:
    """Run the conversation, persist it, replay one session and return the figures."""
    started = time.monotonic()
    persister = Persister(store)
    rounds = len(QUESTIONS)
    say(f"streamstore demo: {sessions} sessions, agents user / planner / critic")
    say(f"  redis: {store.server.name} {'.'.join(map(str, store.server.version))} at {store.url}")
    say(f"  history: {store.settings.history_url}")
    async with anyio.create_task_group() as tg:
        await tg.start(persister.run)
        ids = []
        async with anyio.create_task_group() as chats:
            for n in range(sessions):
                session = await store.create_session(["user", "planner", "critic"], ttl=600)
                ids.append(session.id)
                chats.start_soon(_planner, store, session.id, rounds)
                chats.start_soon(_critic, store, session.id, rounds)
                chats.start_soon(_user, store, session.id, f"session {n + 1}", say)
        published = sum([len(await store.history(sid, limit=1000)) for sid in ids])
        say(f"conversations done: {published} messages published; waiting for the persister")
        persisted = await _wait_persisted(store, ids, published)
        say(f"persisted to history: {persisted}/{published}")

        say(f"replaying session {ids[0]} from history, then live:")
        live = [m async for m in store.replay(ids[0])]
        replayed: list[Message] = []
        async with anyio.create_task_group() as replay_tg:

            async def follow() -> None:
                async for message in store.replay(ids[0], follow=True):
                    replayed.append(message)
                    if len(replayed) == len(live) + 1:
                        return

            replay_tg.start_soon(follow)
            await anyio.sleep(0.2)
            await store.publish(ids[0], sender="user", content="thanks, that is all")
        for message in replayed[-3:]:
            say(
                f"  {message.stream_id} {message.sender} -> {message.recipient or '*'}: "
                f"{message.content[:50]}"
            )
        published += 1
        persisted_total = await _wait_persisted(store, ids, published)
        persister.stop()
    matches = [m.id for m in replayed[: len(live)]] == [m.id for m in live]
    report = DemoReport(
        sessions=sessions,
        published=published,
        persisted=persisted_total,
        lag=published - persisted_total,
        replayed=len(replayed),
        replay_matches=matches,
        seconds=time.monotonic() - started,
    )
    say(
        f"summary: published={report.published} persisted={report.persisted} "
        f"lag={report.lag} sessions={report.sessions} replayed={report.replayed} "
        f"replay matches live={report.replay_matches} ({report.seconds:.1f} s)"
    )
    say(
        "next: `streamstore --help`, or run a worker against your Redis with "
        "`streamstore worker --redis-url redis://...`"
    )
    return report
