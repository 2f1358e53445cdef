"""The measured steps: each runs the same work through streamstore and through its hand-written
baseline, back to back, on a store of its own whose keys and history are removed afterwards."""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import anyio

from streamstore.bench.baselines import (
    GROUP,
    HistoryBaseline,
    raw_fields,
    raw_key,
    read_and_ack,
    xadd_pipelined,
    xread_latencies,
)
from streamstore.bench.hold import hold_step
from streamstore.bench.report import Figure
from streamstore.bench.workload import BATCH, CONTENT, RECIPIENT, SENDER, Options
from streamstore.config import PersisterSettings, Settings
from streamstore.keys import Keyspace
from streamstore.redis.connection import Client
from streamstore.store import StreamStore
from streamstore.workers.persister import Persister

_HEAD_START: Final = 0.1
"""Seconds a latency reader gets to issue its first blocking read before publishing starts,
so that the first messages do not measure the reader's start-up."""
_STEPS: Final = 7
"""Steps without ``--hold``, which adds one."""


class Bench:
    """The steps, each measuring streamstore and its baseline back to back on one server."""

    def __init__(
        self,
        settings: Settings,
        raw: Client,
        history: HistoryBaseline,
        options: Options,
        say: Callable[[str], None],
        *,
        scratch: Path,
    ) -> None:
        self._settings = settings
        self._raw = raw
        self._history = history
        self._scratch = scratch
        self._options = options
        self._say = say
        self.figures: list[Figure] = []
        self.steps = _STEPS if options.hold is None else _STEPS + 1
        """How many steps the progress lines count."""

    def add(self, figure: Figure) -> None:
        """Record a figure for the report."""
        self.figures.append(figure)

    @contextlib.asynccontextmanager
    async def _store(self, **changes: Any) -> AsyncIterator[StreamStore]:
        """A store under a new key prefix, with a history of its own named after it; its keys
        (and those of the baseline, under the same prefix) and its history (the baseline's
        table with it) are deleted afterwards."""
        prefix = new_prefix()
        settings = self._settings.replace(
            key_prefix=prefix, history_url=self._history.url(prefix), **changes
        )
        try:
            async with StreamStore.open(settings=settings) as store:
                yield store
        finally:
            try:
                await delete_keys(self._raw, prefix)
            finally:
                await self._history.drop(prefix)

    async def publish(self, *, producers: int, step: int) -> None:
        """``store.publish`` vs unpipelined XADD, each producer awaiting every call."""
        each = max(1, self._options.messages // producers)
        async with self._store() as store:
            keys = [raw_key(store.keys.prefix, f"s{p}") for p in range(producers)]
            sessions = [(await store.create_session([SENDER, RECIPIENT])).id for _ in keys]

            async def by_hand(p: int) -> None:
                await self._raw.xadd(keys[p], raw_fields())

            async def streamstore(p: int) -> None:
                await store.publish(
                    sessions[p], sender=SENDER, recipient=RECIPIENT, content=CONTENT
                )

            raw_s = await _producers(producers, each, by_hand)
            store_s = await _producers(producers, each, streamstore)
        total = producers * each
        plural = "s" if producers > 1 else ""
        self._throughput(
            step,
            f"publish, {producers} producer{plural} / XADD",
            total,
            store_s,
            raw_s,
        )

    async def publish_batched(self, *, step: int) -> None:
        """``store.publish_many`` vs pipelined XADD, batches of ``BATCH``."""
        calls = max(1, self._options.messages // BATCH)
        async with self._store() as store:
            key = raw_key(store.keys.prefix, "batched")
            session = (await store.create_session([SENDER, RECIPIENT])).id
            raw_s = await _producers(1, calls, lambda _: xadd_pipelined(self._raw, key, BATCH))
            store_s = await _producers(1, calls, lambda _: _publish_many(store, session, BATCH))
        self._throughput(
            step,
            f"publish_many x{BATCH} / pipelined XADD x{BATCH}",
            calls * BATCH,
            store_s,
            raw_s,
        )

    async def persist_and_replay(self, *, step: int) -> None:
        """Persister.drain() vs XREADGROUP + XACK and a hand-written history write (sqlite3
        executemany or asyncpg COPY); then replay from history (the stream trimmed to its
        watermark: ``hot_tail=0``) vs one SELECT."""
        count = self._options.messages
        async with self._store(hot_tail=0) as store:
            key = raw_key(store.keys.prefix, "persist")
            session = (await store.create_session([SENDER, RECIPIENT])).id
            for start in range(0, count, BATCH):
                size = min(BATCH, count - start)
                await xadd_pipelined(self._raw, key, size)
                await _publish_many(store, session, size)

            await self._raw.xgroup_create(key, GROUP, id="0")
            started = time.perf_counter()
            batches = await read_and_ack(self._raw, key, session)
            read_s = time.perf_counter() - started
            write_s = await self._history.write(store.keys.prefix, batches)

            persister = Persister(store, PersisterSettings(consumer=GROUP))
            started = time.perf_counter()
            stats = await persister.drain()
            drain_s = time.perf_counter() - started
            stored = await store.history_store.count_messages(session)
            if stored != count:
                raise RuntimeError(f"published {count} messages but history holds {stored}")
            tail = await store.client.xlen(store.keys.session(session).stream)

            select_s, selected = await self._history.select(store.keys.prefix, session)
            started = time.perf_counter()
            replayed = 0
            async for _ in store.replay(session):
                replayed += 1
            replay_s = time.perf_counter() - started
        if replayed != count or selected != count:
            raise RuntimeError(
                f"replay yielded {replayed} and SELECT {selected} of {count} messages"
            )
        persist = count / drain_s
        writes = self._history.writes
        figures = [
            Figure("persist / XREADGROUP+XACK", "msg/s", persist, count / read_s),
            Figure(f"persist / {writes}", "msg/s", persist, count / write_s),
            Figure("persist / read+ack+write", "msg/s", persist, count / (read_s + write_s)),
        ]
        self.figures.extend(figures)
        self._say(
            f"[{step}/{self.steps}] persist, {count:,} messages: streamstore {persist:,.0f} msg/s; "
            f"XREADGROUP+XACK {count / read_s:,.0f} msg/s, {writes} {count / write_s:,.0f} "
            f"msg/s, both {figures[-1].baseline:,.0f} msg/s ({figures[-1].ratio:.2f}x); history "
            f"commits took {stats.commit_seconds:.2f} of {drain_s:.2f} s; {tail} entries left in "
            "the trimmed stream"
        )
        name = f"replay from history / {self._history.reads}"
        self._throughput(step, name, count, replay_s, select_s)

    async def latency(self, *, step: int) -> None:
        """Publish -> subscriber latency at a fixed rate: ``store.publish`` and
        ``store.subscribe`` vs XADD and XREAD BLOCK."""
        total = max(1, round(self._options.rate * self._options.duration))
        async with self._store() as store:
            key = raw_key(store.keys.prefix, "latency")
            session = (await store.create_session([SENDER, RECIPIENT])).id

            async def by_hand(i: int) -> None:
                await self._raw.xadd(key, {"i": i, **raw_fields()})

            raw_lat, raw_rate = await self._paced(
                by_hand, lambda sent: xread_latencies(self._raw, key, sent), total
            )
            store_lat, store_rate = await self._store_latencies(store, session, total)
        self._latency_figures("{} / XADD -> XREAD BLOCK", store_lat, raw_lat, ("p50", "p99", "max"))
        p50, p99 = self.figures[-3], self.figures[-2]
        self._say(
            f"[{step}/{self.steps}] latency, {total:,} messages at {store_rate:,.0f} msg/s "
            f"(baseline {raw_rate:,.0f}): p50 {p50.value:.2f} ms vs {p50.baseline:.2f}, "
            f"p99 {p99.value:.2f} ms vs {p99.baseline:.2f}"
        )
        await self._latency_in_process(store_lat, total, step=step)

    async def _latency_in_process(self, on_server: list[float], total: int, *, step: int) -> None:
        """The same publish -> subscribe latency with the whole broker in this process
        (``memory://``: fakeredis), against streamstore on the server just measured."""
        settings = self._settings.replace(
            redis_url=f"memory://bench-{new_prefix()}",
            history_url="memory://",
            key_prefix=new_prefix(),
        )
        async with StreamStore.open(settings=settings) as store:
            session = (await store.create_session([SENDER, RECIPIENT])).id
            latencies, _ = await self._store_latencies(store, session, total)
        name = "{} in process (memory://) / on the server"
        self._latency_figures(name, latencies, on_server, ("p50", "p99"))
        p50, p99 = self.figures[-2], self.figures[-1]
        self._say(
            f"[{step}/{self.steps}] latency in process (memory://): p50 {p50.value:.2f} ms, "
            f"p99 {p99.value:.2f} ms (on the server: {p50.baseline:.2f}, {p99.baseline:.2f})"
        )

    async def _store_latencies(
        self, store: StreamStore, session: str, total: int
    ) -> tuple[list[float], float]:
        """``store.publish`` at the configured rate, ``store.subscribe`` receiving: each
        message's latency, and the rate achieved."""

        async def publish(i: int) -> None:
            await store.publish(
                session, sender=SENDER, recipient=RECIPIENT, content=CONTENT, id=f"m{i}"
            )

        return await self._paced(
            publish, lambda sent: _subscribe_latencies(store, session, sent), total
        )

    def _latency_figures(
        self, name: str, latencies: list[float], baseline: list[float], labels: tuple[str, ...]
    ) -> None:
        """One figure (ms) per percentile label (``p50``, ``p99``, ``max``), named by
        ``name.format(label)``."""
        for label in labels:
            q = 1.0 if label == "max" else int(label[1:]) / 100
            self.add(
                Figure(
                    name.format(f"latency {label}"),
                    "ms",
                    _percentile(latencies, q) * 1000,
                    _percentile(baseline, q) * 1000,
                    False,
                )
            )

    async def hold(self, seconds: float, *, step: int) -> None:
        """The ``--hold`` step (:func:`~streamstore.bench.hold.hold_step`): a real ``streamstore
        worker`` under a load held at ``--hold-rate`` for ``seconds``, on a store of the step's
        own.

        Raises:
            BackpressureError: the worker fell so far behind that a publish was refused.
            RuntimeError: the worker did not start, died, lost or repeated a message, did not
                catch up in time, or exited with an error.
            OSError: the worker could not be started.
        """

        def say(line: str) -> None:
            self._say(f"[{step}/{self.steps}] {line}")

        rate = self._options.hold_rate
        figures = await hold_step(self._store, seconds, rate=rate, scratch=self._scratch, say=say)
        self.figures.extend(figures)

    async def _paced(
        self,
        publish: Callable[[int], Awaitable[None]],
        receive: Callable[[list[float]], Awaitable[list[float]]],
        total: int,
    ) -> tuple[list[float], float]:
        """Publish ``total`` messages at the configured rate while ``receive`` collects each
        one's latency; returns the latencies and the rate achieved."""
        rate = self._options.rate
        sent = [0.0] * total
        latencies: list[float] = []

        async def collect() -> None:
            latencies.extend(await receive(sent))

        with anyio.fail_after(total / rate + 30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(collect)
                await anyio.sleep(_HEAD_START)
                started = time.perf_counter()
                for i in range(total):
                    delay = started + i / rate - time.perf_counter()
                    if delay > 0:
                        await anyio.sleep(delay)
                    sent[i] = time.perf_counter()
                    await publish(i)
                achieved = total / max(time.perf_counter() - started, 1e-9)
        return latencies, achieved

    def _throughput(self, step: int, name: str, count: int, store_s: float, raw_s: float) -> None:
        figure = Figure(name, "msg/s", count / store_s, count / raw_s)
        self.add(figure)
        self._say(
            f"[{step}/{self.steps}] {name}, {count:,} messages: streamstore {figure.value:,.0f} "
            f"msg/s, baseline {figure.baseline:,.0f} msg/s ({figure.ratio:.2f}x)"
        )


async def _producers(producers: int, each: int, send: Callable[[int], Awaitable[None]]) -> float:
    """Seconds for ``producers`` concurrent tasks to await ``send(p)`` ``each`` times, after one
    untimed call per producer (connections opened, scripts loaded)."""

    async def produce(p: int, calls: int) -> None:
        for _ in range(calls):
            await send(p)

    async def run(calls: int) -> float:
        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for p in range(producers):
                tg.start_soon(produce, p, calls)
        return time.perf_counter() - started

    await run(1)
    return await run(each)


async def _publish_many(store: StreamStore, session_id: str, count: int) -> None:
    spec = {"sender": SENDER, "recipient": RECIPIENT, "content": CONTENT}
    await store.publish_many(session_id, [spec] * count)


async def _subscribe_latencies(
    store: StreamStore, session_id: str, sent: list[float]
) -> list[float]:
    """``store.subscribe`` from the start of a new session (message ids are ``m<index>``)."""
    latencies: list[float] = []
    # subscribe() is an async generator: close it at once when leaving early, not at GC.
    subscription = store.subscribe(session_id, after="0")
    async with contextlib.aclosing(subscription) as messages:
        async for message in messages:
            latencies.append(time.perf_counter() - sent[int(message.id[1:])])
            if len(latencies) == len(sent):
                break
    return latencies


def _percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (``q`` from 0 to 1) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def delete_keys(client: Client, prefix: str) -> None:
    """Delete every key under ``prefix`` (SCAN + UNLINK; the server may be shared), even when
    the step was cancelled. A cluster client SCANs every primary and sends one UNLINK per
    slot."""
    with anyio.move_on_after(30, shield=True):
        pattern = Keyspace(prefix, 1).pattern
        keys = [key async for key in client.scan_iter(match=pattern, count=1000)]
        for start in range(0, len(keys), 1000):
            await client.unlink(*keys[start : start + 1000])


def new_prefix() -> str:
    return f"bench{uuid.uuid4().hex[:10]}"
