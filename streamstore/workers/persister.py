"""Persister: partition feeds -> history, through one consumer group, acknowledging after commit.

Each consumer-group step is written once: create the group (idempotent, at ``0`` so no backlog
is skipped), re-read our own pending entries, read new ones, claim entries of dead consumers,
commit, acknowledge, advance watermarks and trim, dead-letter what cannot be decoded, recover
from NOGROUP. History writes are idempotent, so every redelivery is absorbed. New entries
go through two tasks: while one commits a batch (in history's thread) and then acknowledges
it, the other reads and decodes the next one.

On one server, new entries of all feeds come from one blocking XREADGROUP. A Redis Cluster
refuses a command on keys of several slots, and a blocking read of one feed would leave the
others waiting, so there each feed is read without blocking, all in one pipeline (one round
trip per node, the nodes in parallel), and when every feed is empty the persister pauses
:data:`~streamstore.redis.topology.CLUSTER_IDLE_POLL` before reading again (the
deployment's :class:`~streamstore.redis.topology.Topology` does either): that bounds the added
latency, and an idle worker costs each node a few cheap reads per pause.

While running, a persister keeps its entry in the deployment's workers hash
(:mod:`streamstore.health`): since when its history writes have been failing and why, rewritten
when that changes and every :data:`~streamstore.health.STATUS_INTERVAL`, removed on a graceful
stop, so ``streamstore check`` in another process sees a worker stuck on its history.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import redis.exceptions
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream

from streamstore.codec import decode_feed_entry
from streamstore.config import PersisterSettings
from streamstore.crashpoints import crash_if
from streamstore.dead_letters import dead_letter_fields
from streamstore.deployment import Deployment, HasDeployment, deployment_of
from streamstore.errors import (
    BackpressureError,
    ConnectionLostError,
    CorruptEntryError,
    GroupExistsError,
    GroupMissingError,
    HistoryCorruptError,
    HistoryError,
    HistoryUnavailableError,
    PermissionDeniedError,
    ServerError,
    StreamStoreError,
    first_error,
)
from streamstore.health import STATUS_INTERVAL, encode_status
from streamstore.history import HistoryStore
from streamstore.keys import GROUP
from streamstore.models import Message, Session, StreamId

__all__ = ["Persister", "PersisterStats"]

log = logging.getLogger(__name__)

COMMIT_DEADLINE = 30.0
"""How long a graceful stop waits for the batch in hand to commit and be acknowledged."""

CLUSTER_IDLE_POLL = 0.05
"""On a cluster, the pause after a read found every feed empty (capped by ``block``)."""

STATUS_TIMEOUT = 2.0
"""How long a graceful stop waits to remove this persister's entry from the workers hash."""

Raw = tuple[str, bytes, dict[bytes, bytes]]
"""A feed entry as read: (feed key, entry id, fields)."""
_Poison = tuple[str, bytes, dict[bytes, bytes], str]
"""An entry to dead-letter: (feed key, entry id, fields, reason)."""
_Decoded = tuple[str, bytes, Message | Session]
"""A decoded entry: (feed key, entry id, the message or session snapshot it carries)."""


@dataclass
class PersisterStats:
    """Counters since the persister started."""

    read: int = 0
    persisted: int = 0
    duplicates: int = 0
    sessions: int = 0
    dead_lettered: int = 0
    claimed: int = 0
    batches: int = 0
    errors: int = 0
    data_losses: int = 0
    last_batch: int = 0
    commit_seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        """The counters as a plain dict."""
        return dict(vars(self))


@dataclass
class _Batch:
    """Decoded entries on their way to one history transaction and their acknowledgement."""

    entries: list[_Decoded] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    sessions: list[Session] = field(default_factory=list)
    ids: dict[str, list[bytes]] = field(default_factory=dict)
    # per feed, per session: (highest stream id, feed id of that entry)
    marks: dict[str, dict[str, tuple[StreamId, bytes]]] = field(default_factory=dict)

    @classmethod
    def of(cls, entries: list[_Decoded]) -> _Batch:
        """A batch of these entries."""
        batch = cls()
        for feed, entry_id, item in entries:
            batch.add(feed, entry_id, item)
        return batch

    def add(self, feed: str, entry_id: bytes, item: Message | Session) -> None:
        """Take one decoded entry: its item to write, its id to acknowledge, its mark."""
        self.entries.append((feed, entry_id, item))
        ids = self.ids.get(feed)
        if ids is None:
            ids = self.ids[feed] = []
            self.marks[feed] = {}
        ids.append(entry_id)
        if isinstance(item, Session):
            self.sessions.append(item)
            return
        self.messages.append(item)
        stream_id = item.stream_id
        assert stream_id is not None
        marks = self.marks[feed]
        previous = marks.get(item.session_id)
        if previous is None or previous[0] < stream_id:
            marks[item.session_id] = (stream_id, entry_id)


class Persister:
    """Moves every message from the partition feeds into history exactly once.

    ``run()`` works until cancelled or :meth:`stop` (call it from a SIGTERM handler for a
    graceful stop); ``drain()`` processes what is in the feeds now and returns.
    """

    def __init__(
        self,
        deployment: Deployment | HasDeployment,
        settings: PersisterSettings | None = None,
        *,
        history: HistoryStore | None = None,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        """
        Args:
            deployment: the deployment to persist (or a StreamStore, for its deployment).
            settings: consumer name, batch size, claim timing (default: from the environment).
            history: write here instead of the deployment's history (tests, migrations).
            on_batch: called after each commit with the batch's entry count and its commit
                seconds (metrics).
        """
        self._deployment = deployment_of(deployment)
        self._client = self._deployment.client
        self._topology = self._deployment.topology
        self._history = history if history is not None else self._deployment.history
        self._on_batch = on_batch
        self._keys = self._deployment.keys
        self._scripts = self._deployment.scripts
        self._partition_of = {feed: p for p, feed in enumerate(self._keys.feeds())}
        self._settings = settings if settings is not None else PersisterSettings.from_env()
        self._consumer = self._settings.consumer
        self._stopping = False
        self._failures: dict[bytes, tuple[float, int]] = {}  # entry id -> (first, count)
        self._last_success = 0.0
        self._epoch: str | None = None
        # History health: since when writes have been failing (wall clock for reports,
        # monotonic for the threshold) and the last error; None while they succeed.
        self._failing_since: float | None = None
        self._failing_since_monotonic = 0.0
        self._failure_reason: str | None = None
        self._reporting = False  # run() keeps the workers hash entry up to date
        self._status_changed = False
        self._status_due = 0.0  # time.monotonic() of the next periodic rewrite
        self.stats = PersisterStats()

    @property
    def consumer(self) -> str:
        """This persister's consumer name in the group."""
        return self._consumer

    @property
    def failing_since(self) -> float | None:
        """Since when (wall clock) history writes have been failing; None while they succeed."""
        return self._failing_since

    @property
    def failure_reason(self) -> str | None:
        """The last history error while writes are failing; None while they succeed."""
        return self._failure_reason

    def history_problem(self) -> str | None:
        """Why this persister is unhealthy: its history writes have been failing for longer
        than ``unhealthy_after``; None otherwise (including shorter failures)."""
        if self._failing_since is None:
            return None
        failing_for = time.monotonic() - self._failing_since_monotonic
        if failing_for <= self._settings.unhealthy_after_s:
            return None
        return f"history writes have been failing for {failing_for:.0f} s: {self._failure_reason}"

    def stop(self) -> None:
        """Ask :meth:`run` to stop after the batch in hand is committed and acknowledged."""
        self._stopping = True

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Persist until cancelled or :meth:`stop`; readiness is announced once groups exist.

        A stop finishes the batch in hand (commit and acknowledgement), removes this
        persister's entry from the workers hash and returns; errors from Redis or history are
        logged and retried with backoff; nothing is acknowledged until it is committed.
        """
        await self._retrying(self._ensure_groups)
        task_status.started()
        self._reporting = True
        try:
            await self._loop()
        finally:
            self._reporting = False
        with anyio.move_on_after(STATUS_TIMEOUT):
            await self._remove_status()

    async def drain(self) -> PersisterStats:
        """Process everything in the feeds now (own pending, idle entries of dead consumers,
        then new entries) and return the counters.

        Raises:
            ConnectionLostError, ServerError, HistoryError: as they happen (no retry).
        """
        await self._ensure_groups()
        await self._reprocess_own_pending()
        await self._claim_idle()
        await self._persist_new(block_ms=None, until=None)
        return self.stats

    # -- the loop -----------------------------------------------------------------------------

    async def _loop(self) -> None:
        block_ms = max(1, int(self._deployment.settings.block_s * 1000))
        backoff = self._settings.retry_backoff_s
        recover = True
        next_claim = 0.0
        while not self._stopping:
            await self._report_status_if_due()
            try:
                if recover:
                    await self._reprocess_own_pending()
                    recover = False
                if time.monotonic() >= next_claim:
                    # Between batches nothing is in hand, so any entry pending for this
                    # consumer is one whose delivery was lost: a read that the client resent
                    # after its reply was cut off (a timeout, a killed connection) leaves the
                    # first delivery pending here. Take those back now rather than after
                    # claim_idle.
                    await self._reprocess_own_pending()
                    await self._claim_idle()
                    next_claim = time.monotonic() + self._settings.claim_interval_s
                await self._persist_new(block_ms=block_ms, until=next_claim)
                backoff = self._settings.retry_backoff_s
            except (ConnectionLostError, ServerError, HistoryError) as exc:
                self.stats.errors += 1
                log.warning("persister %s: %s; retrying in %.1f s", self._consumer, exc, backoff)
                await self._report_status_if_due()
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                recover = True

    async def _retrying(self, step: Any) -> None:
        backoff = self._settings.retry_backoff_s
        while True:
            try:
                await step()
                return
            except (ConnectionLostError, ServerError) as exc:
                log.warning("persister %s: %s; retrying", self._consumer, exc)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    # -- consumer-group steps ---------------------------------------------------------------

    async def _ensure_groups(self) -> None:
        """Create the group on every feed at ``0`` (never ``$``: that would skip the backlog),
        after checking that the server still holds the dataset this persister started on."""
        await self._check_epoch()
        for feed in self._keys.feeds():
            try:
                with self._deployment.redis_errors():
                    await self._client.xgroup_create(feed, GROUP, id="0", mkstream=True)
            except GroupExistsError:
                pass
            except BackpressureError:  # out of memory: fine if the group is already there
                with self._deployment.redis_errors():
                    groups = await self._client.xinfo_groups(feed)
                if not any(g["name"] == GROUP.encode() for g in groups):
                    raise

    async def _check_epoch(self) -> None:
        """Detect a server that lost its data (restarted without persistence, flushed, or
        dropping the scripts' writes when it reloads its append-only file).

        The deployment's epoch, a random id set once, is written through a script like every
        message (deployment.lua), so whatever drops messages drops it too. A persister
        remembers the epoch it started with; finding another one later, or a partition count
        without an epoch, means every message the server had acknowledged and nobody had
        persisted yet is gone. That cannot be undone, but it must not pass silently: it is
        logged, counted, and recorded in the deployment hash (``data_lost_at``, a plain write)
        where ``stats()`` and ``streamstore check`` report it.
        """
        try:
            with self._deployment.redis_errors():
                epoch, state = await self._scripts.deployment_epoch(
                    self._keys, os.urandom(8).hex(), now=time.time()
                )
        except BackpressureError:
            return  # out of memory: check again at the next recovery
        lost = state == "lost" or (self._epoch is not None and epoch != self._epoch)
        self._epoch = epoch
        if not lost:
            return
        self.stats.data_losses += 1
        log.error(
            "persister %s: the Redis server lost its data (restarted without persistence, "
            "flushed, or dropping the scripts' writes on reload): messages it acknowledged "
            "that were not yet persisted are lost",
            self._consumer,
        )
        with self._deployment.redis_errors():
            await self._client.hset(
                self._keys.deployment,
                mapping={"data_lost_at": repr(time.time()), "partitions": self._keys.partitions},
            )

    async def _read(self, start: str, *, block_ms: int | None) -> list[Raw]:
        """XREADGROUP on every feed: ``>`` for new entries, ``0`` for our own pending ones
        (see :meth:`~streamstore.redis.topology.Topology.read_group`)."""
        reply = await self._group_call(
            self._topology.read_group,
            GROUP,
            self._consumer,
            self._keys.feeds(),
            start,
            count=self._settings.batch_size,
            block_ms=block_ms,
        )
        out: list[Raw] = []
        for feed, entries in reply:
            name = feed.decode()
            out.extend((name, entry_id, fields) for entry_id, fields in entries if fields)
        return out

    async def _persist_new(self, *, block_ms: int | None, until: float | None) -> None:
        """Read new entries and persist them until a read finds none (without ``block_ms``),
        ``until`` (a ``time.monotonic()`` value) passes, or :meth:`stop` is called.

        One task commits a batch (in history's thread) and then acknowledges it while another
        reads and decodes the next one, so each batch is acknowledged after its own commit and
        at most two batches are in hand. Entries read after a stop was asked for stay pending
        for our next start.

        Raises:
            ConnectionLostError, ServerError, HistoryError: as they happen; what was read and
                not committed stays pending (re-read at recovery).
        """
        send, receive = anyio.create_memory_object_stream[_Batch]()
        # The receiving end stays open until both tasks are done: a failed commit must not
        # turn the reader's pending send into a second error (it is cancelled instead).
        with receive, first_error():
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._commit_each, receive)
                with send:
                    while not self._stopping and (until is None or time.monotonic() < until):
                        raw = await self._read(">", block_ms=block_ms)
                        if self._stopping or (not raw and block_ms is None):
                            break
                        if raw:
                            await send.send(await self._decode(raw))

    async def _commit_each(self, batches: MemoryObjectReceiveStream[_Batch]) -> None:
        """Commit and acknowledge batches one at a time, in the order they were read, until
        the sending end is closed."""
        async for batch in batches:
            await self._commit(batch)

    async def _reprocess_own_pending(self) -> None:
        """Entries delivered to this consumer but never acknowledged (we crashed or failed)."""
        while raw := await self._read("0", block_ms=None):
            await self._commit(await self._decode(raw))
            if len(raw) < self._settings.batch_size:
                return

    async def _claim_idle(self) -> None:
        """Take over entries that other consumers left pending longer than ``claim_idle``."""
        idle_ms = int(self._settings.claim_idle_s * 1000)
        for feed in self._keys.feeds():
            start = "0-0"
            while True:
                reply = await self._group_call(
                    self._client.xautoclaim,
                    feed,
                    GROUP,
                    self._consumer,
                    idle_ms,
                    start_id=start,
                    count=self._settings.batch_size,
                )
                next_start, entries = reply[0], reply[1]
                raw = [(feed, entry_id, fields) for entry_id, fields in entries if fields]
                if raw:
                    self.stats.claimed += len(raw)
                    crash_if("during_claim")
                    await self._commit(await self._decode(raw))
                if next_start in (b"0-0", "0-0"):
                    break
                start = next_start.decode() if isinstance(next_start, bytes) else next_start

    async def _group_call(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        """Call a group command; on NOGROUP (server restarted empty, group deleted) recreate the
        groups at ``0`` and call again: redelivered entries are absorbed by idempotent writes."""
        for attempt in range(2):
            try:
                with self._deployment.redis_errors():
                    return await method(*args, **kwargs)
            except GroupMissingError:
                if attempt:
                    raise
                log.warning("persister %s: consumer group missing; recreating", self._consumer)
                await self._ensure_groups()
        raise AssertionError("unreachable")

    # -- one batch --------------------------------------------------------------------------

    async def _decode(self, raw: list[Raw]) -> _Batch:
        """Decode a batch as read; dead-letter (and acknowledge) what does not decode."""
        self.stats.read += len(raw)
        crash_if("after_read")
        batch = _Batch()
        poison: list[_Poison] = []
        for feed, entry_id, fields in raw:
            try:
                item = decode_feed_entry(fields)
            except CorruptEntryError as exc:
                poison.append((feed, entry_id, fields, f"undecodable: {exc}"))
            else:
                batch.add(feed, entry_id, item)
        if poison:
            await self._dead_letter(poison)
        self.stats.batches += 1
        self.stats.last_batch = len(raw)
        return batch

    async def _commit(self, batch: _Batch) -> None:
        """Write a batch in one transaction, then acknowledge it.

        When history refuses the batch, it is split in halves to isolate the entry at fault, so
        the rest is not held back. An entry refused alone ``max_deliveries`` times while history
        accepted other writes meanwhile is dead-lettered. When history is unavailable (locked,
        disk full) the error propagates at once: nothing is acknowledged, nothing dead-lettered.

        Raises:
            HistoryError: some entries stay unacknowledged (they are retried).
            ConnectionLostError, ServerError: the acknowledgement failed after the commit (the
                entries stay pending and are written again, absorbed as duplicates).
        """
        entries = batch.entries
        if not entries:
            return
        try:
            with anyio.move_on_after(COMMIT_DEADLINE, shield=True):
                started = time.perf_counter()
                try:
                    new = await self._history.write_batch(batch.messages, batch.sessions)
                except HistoryError as exc:
                    self._history_failed(exc)
                    raise
                self._history_succeeded()
                self._last_success = time.monotonic()
                seconds = time.perf_counter() - started
                self.stats.commit_seconds += seconds
                if self._on_batch is not None:
                    self._on_batch(len(entries), seconds)
                crash_if("after_commit")
                await self._acknowledge(batch)
        except (HistoryUnavailableError, HistoryCorruptError):
            raise  # says nothing about these entries: retry them all later
        except HistoryError as exc:
            if len(entries) == 1:
                await self._count_failure(entries[0], exc)
                return
            half = len(entries) // 2
            errors = []
            for part in (entries[:half], entries[half:]):
                try:
                    await self._commit(_Batch.of(part))
                except HistoryError as part_error:
                    errors.append(part_error)
            if errors:
                raise errors[0] from None
            return
        self.stats.persisted += new
        self.stats.duplicates += len(batch.messages) - new
        self.stats.sessions += len(batch.sessions)
        log.debug("persister %s: committed %d entries, %d new", self._consumer, len(entries), new)
        await self._report_status_if_due()

    # -- health -------------------------------------------------------------------------------

    def _history_failed(self, error: HistoryError) -> None:
        """Note a failed history write: the first since the last success starts the clock."""
        if self._failing_since is None:
            self._failing_since = time.time()
            self._failing_since_monotonic = time.monotonic()
            self._status_changed = True
        reason = str(error)[:500]
        if reason != self._failure_reason:
            self._failure_reason = reason
            self._status_changed = True

    def _history_succeeded(self) -> None:
        """Note a committed history write: healthy again (a None check on the hot path)."""
        if self._failing_since is not None:
            log.info(
                "persister %s: history writes succeed again after %.1f s",
                self._consumer,
                time.monotonic() - self._failing_since_monotonic,
            )
            self._failing_since = self._failure_reason = None
            self._status_changed = True

    async def _report_status_if_due(self) -> None:
        """Rewrite this persister's entry in the workers hash when its state changed or
        :data:`STATUS_INTERVAL` passed (under :meth:`run` only; one time check otherwise)."""
        if not self._reporting:
            return
        if not self._status_changed and time.monotonic() < self._status_due:
            return
        self._status_changed = False
        value = encode_status(
            updated_at=time.time(),
            failing_since=self._failing_since,
            reason=self._failure_reason,
            unhealthy_after=self._settings.unhealthy_after_s,
        )
        try:
            with self._deployment.redis_errors():
                await self._client.hset(self._keys.workers, self._consumer, value)
        except StreamStoreError as exc:  # Redis down, out of memory, refused: try next turn
            log.debug("persister %s: status not written: %s", self._consumer, exc)
            self._status_changed = True
            return
        self._status_due = time.monotonic() + STATUS_INTERVAL

    async def _remove_status(self) -> None:
        """HDEL this persister's entry (graceful stop); a refusal leaves it to go stale."""
        try:
            with self._deployment.redis_errors():
                await self._client.hdel(self._keys.workers, self._consumer)
        except PermissionDeniedError:
            log.info(
                "persister %s: may not remove its entry from %s (the Redis user lacks HDEL "
                "there); it will be reported stale",
                self._consumer,
                self._keys.workers,
            )
        except StreamStoreError as exc:
            log.warning(
                "persister %s: could not remove its entry from %s: %s",
                self._consumer,
                self._keys.workers,
                exc,
            )

    async def _count_failure(self, failed: _Decoded, error: HistoryError) -> None:
        feed, entry_id, _ = failed
        first, count = self._failures.get(entry_id, (time.monotonic(), 0))
        count += 1
        self._failures[entry_id] = (first, count)
        if count >= self._settings.max_deliveries and self._last_success > first:
            del self._failures[entry_id]
            fields = {b"entry": entry_id}
            reason = f"history refused it {count} times: {type(error).__name__}"
            await self._dead_letter([(feed, entry_id, fields, reason)])
            return
        raise error

    async def _dead_letter(self, poison: list[_Poison]) -> None:
        """Copy entries with their reason to the dead-letter stream, then acknowledge them
        (together: in one MULTI on one server; on a cluster, whose dead-letter stream lives in
        another slot than the feeds, the copies first and the acknowledgements after: a
        failure in between dead-letters an entry twice, never not at all)."""
        with self._deployment.redis_errors():
            await self._topology.together(
                [
                    ("XADD", self._keys.dead_letters, "*", *dead_letter_fields(*entry))
                    for entry in poison
                ],
                [("XACK", feed, GROUP, entry_id) for feed, entry_id, _, _ in poison],
            )
        self.stats.dead_lettered += len(poison)
        for feed, entry_id, _, reason in poison:
            log.warning(
                "persister %s: dead-lettered %s %s (%s)",
                self._consumer,
                feed,
                entry_id.decode(),
                reason,
            )

    async def _acknowledge(self, batch: _Batch) -> None:
        """XACK the committed entries, raise watermarks and trim (one round trip, per node on
        a cluster). A server that lost the scripts (restarted) gets them and the whole
        pipeline again: both steps are idempotent."""
        now_ms = int(time.time() * 1000)
        hot_ms = int(self._deployment.settings.hot_tail_s * 1000)
        with self._deployment.redis_errors():
            for attempt in range(2):
                try:
                    async with self._client.pipeline(transaction=False) as pipe:
                        for feed, ids in batch.ids.items():
                            pipe.xack(feed, GROUP, *ids)
                            marks = batch.marks.get(feed, {})
                            self._scripts.queue_advance(
                                pipe,
                                self._keys,
                                self._partition_of[feed],
                                now_ms=now_ms,
                                hot_ms=hot_ms,
                                marks=[
                                    (sid, mark, feed_id) for sid, (mark, feed_id) in marks.items()
                                ],
                            )
                        await pipe.execute()
                    return
                except redis.exceptions.NoScriptError:
                    if attempt:
                        raise
                    await self._scripts.load(self._client)
