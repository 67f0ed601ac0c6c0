"""A consumer group member whose records are answered later, in any order: takes fetches for a handler (`take`),
hears of each record done (`done`), and commits per partition up to the first record not yet done, often and
before its partitions move to another member (app/kafka/progress.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from app.kafka.clients import widen_fetch_wait_if_starved
from app.kafka.delivery import describe_error
from app.kafka.outcomes import Message
from app.kafka.progress import Mark, PartitionProgress, Segment

log = logging.getLogger(__name__)
# Fetch sizes that follow how a fetch spreads over keys (spread()): a key's records are handled in groups, and a
# group costs the worker as much as several records (a sandbox round trip per task version), so with many keys a
# larger fetch costs less per record (docs/performance.md has the figures).
_MAX_GROWTH = 4
_FEW_PER_KEY = 16
_MANY_PER_KEY = 64

# How long a revocation waits for the revoked partitions' records in flight before it lets them go: the group
# waits for this member meanwhile. What is not done by then is redone by the next owner (duplicates, no loss).
REVOKE_WAIT_S = 3.0
STOP_WAIT_S = 30.0
Take = Callable[[dict[TopicPartition, list[Message]]], None]


class _HandOverOnRevoke(ConsumerRebalanceListener):
    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._pipeline.hand_over(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("%s assigned %s", self._pipeline.name, sorted(tp.partition for tp in assigned))
        self._pipeline.joined.set()


class Pipeline:
    """One member's consumer (set `consumer` before start). start(take) fetches until stop(); `take` gets each
    fetch's records, tracked (track) and later counted done (done). Fetching pauses while `max_in_flight` records
    are not done or `blocked()` says so. `before_commit` runs before each commit (e.g. to send statistics of
    what is done); `commit_due(seconds since the last commit)` may hold a commit back while records are in flight,
    for at most `max_commit_interval_s`. `failed` is set, with `failure` saying why, when it had to stop without
    committing."""

    def __init__(self, name: str, records: str, *, max_in_flight: int, batch_size: int,
                 commit_interval_s: float, before_commit: Callable[[], Awaitable[None]],
                 commit_due: Callable[[], bool] = lambda: True, max_commit_interval_s: float = 0.0,
                 blocked: Callable[[], bool] = lambda: False,
                 failure_of: Callable[[KafkaError], str] = describe_error) -> None:
        self.name = name  # of the member, in log lines
        self._records = records  # what it consumes, in failures
        self.consumer: AIOKafkaConsumer
        self._max_in_flight = self._base_max_in_flight = max_in_flight
        self._batch_size = self._base_batch_size = batch_size
        self._commit_interval_s = commit_interval_s
        self._before_commit = before_commit
        self._commit_due = commit_due
        self._max_commit_interval_s = max_commit_interval_s
        self._blocked = blocked
        self._failure_of = failure_of
        self._progress = PartitionProgress()
        self._in_flight = 0  # records taken and not yet done
        self._room = asyncio.Event()  # set while fetching may go on
        self._room.set()
        self._changed = asyncio.Condition()  # notified whenever records are done
        self._done_since_commit = asyncio.Event()
        self._idle = asyncio.Event()  # set when the last record in flight is done
        self._commit_lock = asyncio.Lock()
        self._work: set[asyncio.Future[Any]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self.stopping = False
        self.failed = asyncio.Event()
        self.failure: str | None = None
        self.joined = asyncio.Event()  # the group has assigned this member its partitions (maybe none)
        self.committed: dict[TopicPartition, int] = {}  # what this member committed, for the lag it reports
        self.listener: ConsumerRebalanceListener = _HandOverOnRevoke(self)

    def start(self, take: Take, ready: Awaitable[Any]) -> None:
        """Fetch once `ready` is done (the consumer started and subscribed with `listener`), commit meanwhile."""
        self._tasks = [asyncio.ensure_future(self._fetch(take, ready)), asyncio.ensure_future(self._commit_often())]

    def track(self, tp: TopicPartition, messages: Sequence[Message]) -> Segment:
        """Count a fetch's records of one partition in flight; each is done through done((segment, index))."""
        self._in_flight += len(messages)
        return self._progress.add(tp, [message.offset for message in messages])

    async def done(self, marks: Sequence[Mark]) -> None:
        """These records are answered (their answers acknowledged): they may be committed."""
        for segment, index in marks:
            segment.complete(index)
        self._in_flight -= len(marks)
        self.update_room()
        self._done_since_commit.set()
        if not self._in_flight:
            self._idle.set()
        async with self._changed:
            self._changed.notify_all()

    def let_go(self, count: int) -> None:
        """These records will not be done here (their answers failed): fetching need not wait for them."""
        self._in_flight -= count
        self.update_room()

    def update_room(self) -> None:
        if self.stopping or (self._in_flight < self._max_in_flight and not self._blocked()):
            self._room.set()
        else:
            self._room.clear()

    def spread(self, records: int, keys: int) -> None:
        """A fetch of `records` over `keys` keys (tasks): while fetches come full and hold few records of each key,
        fetch up to _MAX_GROWTH times more at once (and as many more in flight), so that each key's records come
        in larger groups; back to the batch size given when keys have many records each."""
        per_key = records / max(1, keys)
        if records >= self._batch_size and per_key < _FEW_PER_KEY:
            size = min(self._base_batch_size * _MAX_GROWTH, self._batch_size * 2)
        elif per_key >= _MANY_PER_KEY:
            size = max(self._base_batch_size, self._batch_size // 2)
        else:
            return
        if size != self._batch_size:
            self._batch_size = size
            self._max_in_flight = self._base_max_in_flight * size // self._base_batch_size
            self.update_room()

    def spawn(self, work: Awaitable[Any]) -> None:
        """Run work alongside; stop() cancels what is left of it."""
        task = asyncio.ensure_future(work)
        self._work.add(task)
        task.add_done_callback(self._work.discard)

    def fail(self, reason: str) -> None:
        """Stop fetching and committing: from now on nothing is committed."""
        if self.failure is None:
            self.failure = reason
            self.stopping = True
            self._room.set()  # the fetch loop sees it is stopping
            self.failed.set()

    async def stop(self) -> None:
        """Finish and commit the records in flight (unless failed; for at most a while); the caller then stops
        the consumer, which leaves the group."""
        self.stopping = True
        self._room.set()
        if self._tasks:
            if self.failure is None:
                await asyncio.wait(self._tasks[:1], timeout=10)  # it ends after at most one more getmany
                if not await self._settled(None, STOP_WAIT_S):
                    log.warning("%s: records in flight not finished in %gs; they will be redelivered", self.name,
                                STOP_WAIT_S)
                await self.commit()
            for task in [*self._tasks, *self._work]:
                task.cancel()
            for task in [*self._tasks, *self._work]:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def hand_over(self, revoked: list[TopicPartition]) -> None:
        """Before the revoked partitions move: wait (a while) for their records in flight, commit what is done,
        and stop tracking them; answers still arriving for them go out but are never committed here."""
        if not revoked:  # the first join, or a rebalance that takes nothing from this member
            return
        if self.failure is None:
            await self._settled(revoked, REVOKE_WAIT_S)
            await self.commit()
        self._progress.forget(revoked)
        for tp in revoked:  # the next owner commits there now
            self.committed.pop(tp, None)

    async def _settled(self, tps: list[TopicPartition] | None, timeout_s: float | None) -> bool:
        """Wait until no record of these partitions (all: None) is in flight; False if timeout_s passed first."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(
                    lambda: self.failure is not None or not self._progress.pending(tps)), timeout_s)
            except TimeoutError:
                return False
        return True

    async def _fetch(self, take: Take, ready: Awaitable[Any]) -> None:
        await ready
        try:
            while not self.stopping:
                await self._room.wait()
                if self.stopping:
                    break
                batches = await self.consumer.getmany(timeout_ms=100, max_records=self._batch_size)
                if batches and not self.stopping:
                    take(batches)
                    self.update_room()
                elif not batches:
                    await widen_fetch_wait_if_starved(self.consumer)
        except KafkaError as exc:
            self.fail(self._failure_of(exc))
        except Exception as exc:
            log.exception("%s: fetching %s failed", self.name, self._records)
            self.fail(f"fetching {self._records} failed: {describe_error(exc)}")

    async def _commit_often(self) -> None:
        """Every commit interval, when records were done since: commit up to each partition's first record not
        yet done, unless commit_due() holds it back (while records are in flight, up to the longest interval)."""
        loop = asyncio.get_running_loop()
        last = loop.time()
        while not self.failed.is_set():
            await self._done_since_commit.wait()
            if self._in_flight and loop.time() - last < self._max_commit_interval_s and not self._commit_due():
                self._idle.clear()
                with contextlib.suppress(TimeoutError):  # nothing left in flight: commit at once
                    await asyncio.wait_for(self._idle.wait(), self._commit_interval_s)
                continue
            self._done_since_commit.clear()
            await self.commit()
            last = loop.time()
            await asyncio.sleep(self._commit_interval_s)

    async def commit(self) -> None:
        async with self._commit_lock:
            if self.failure is not None:
                return
            try:
                await self._before_commit()
            except Exception as exc:  # a bug, in what only serves statistics: say so loudly, commit all the same
                log.exception("%s: before committing: %s", self.name, describe_error(exc))
            assigned = self.consumer.assignment()
            offsets = {tp: offset for tp, offset in self._progress.committable().items() if tp in assigned}
            if not offsets:
                return
            try:
                await self.consumer.commit(offsets)
                self.committed.update(offsets)
            except (CommitFailedError, IllegalStateError) as exc:
                # The partitions moved to another member, which redoes what is not committed: duplicates, never
                # losses.
                log.warning("%s: commit failed after a rebalance: %s", self.name, exc)
            except KafkaError as exc:  # retriable errors are retried inside commit(); this one will not heal
                self.fail(f"committing offsets failed: {describe_error(exc)}")

    def partitions(self) -> list[int]:
        """The partitions assigned to this member now."""
        return sorted(tp.partition for tp in self.consumer.assignment())

    async def lag(self) -> dict[int, int]:
        """Records not yet committed per assigned partition: the log end seen by the last fetch minus the offset
        this member committed (Kafka's consumer lag), or minus its position before its first commit there. A
        partition not fetched from yet is left out."""
        lags = {}
        for tp in self.consumer.assignment():
            end = self.consumer.highwater(tp)
            if end is not None:
                done = self.committed.get(tp)
                if done is None:
                    done = await asyncio.wait_for(self.consumer.position(tp), 1.0)
                lags[tp.partition] = max(0, end - done)
        return lags
