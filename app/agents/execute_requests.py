"""Executes requests: consumes execution-requests in Kafka batches, runs each against its program version in
the sandbox pool, produces exactly one execution-result or dead letter per request, and commits a batch's
offsets only once every one of them is acknowledged (at-least-once; a redelivered request yields the same
execution_id). What it cannot complete stops it, uncommitted (docs/delivery.md).

Batches are pipelined: while one runs in the sandbox, the next is fetched and decoded, and its results are sent
without waiting for the acknowledgements of the one before. Results go out, and offsets are committed, strictly
in the order batches were fetched; a commit waits for every acknowledgement of its batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    InvalidSessionTimeoutError,
    KafkaError,
)

from app.contract.codecs import DecodeError, codec_for
from app.contract.records import DeadLetter, ExecutionRequest, utc_now
from app.contract.topics import Topics
from app.domain.resolution import Refused, Resolver, Runnable, SchemaValidators
from app.domain.results import ResultAssembler, rejected_fields
from app.kafka.clients import make_consumer, make_producer, stop_clients
from app.kafka.delivery import describe_error
from app.kafka.outcomes import (
    Message,
    OutcomeWriter,
    Undeliverable,
    dead_letter_for,
    executed_results,
    start_answering,
)
from app.kafka.tables import TableReader
from app.sandbox.pool import Call, Outcome, SandboxPool
from app.settings import Settings

log = logging.getLogger(__name__)

@dataclass(slots=True)
class _Batch:
    """One Kafka batch on its way through: what to send, and the sandbox work still running."""

    offsets: dict[TopicPartition, tuple[int, int]]  # partition -> (first offset, next offset)
    fetched_at: datetime = field(default_factory=utc_now)
    ready: list[tuple[dict[str, Any], Message]] = field(default_factory=list)  # result fields known without running
    letters: list[DeadLetter] = field(default_factory=list)
    pending: list[tuple[ExecutionRequest, Runnable, Message]] = field(default_factory=list)
    outcomes: asyncio.Future[list[Outcome]] | None = None


class _DrainOnRevoke(ConsumerRebalanceListener):
    """Before partitions move to another worker, finish (and commit) every batch in flight."""

    def __init__(self, executor: ExecuteRequests) -> None:
        self._executor = executor

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._executor.drain()
        for tp in revoked:  # the next owner commits there now
            self._executor.committed.pop(tp, None)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("executor assigned %s", sorted(tp.partition for tp in assigned))
        self._executor.joined.set()


class ExecuteRequests:
    """The executor service of a worker. start() joins the executor group; stop() finishes in-flight work.
    `failed` is set, with `failure` saying why, when it had to stop without committing."""

    def __init__(self, settings: Settings, topics: Topics, tables: TableReader, pool: SandboxPool) -> None:
        self._settings = settings
        self._topics = topics
        self._tables = tables
        self._pool = pool
        self._requests = codec_for(ExecutionRequest, settings, topics.execution_requests)
        self._validators = SchemaValidators()
        self.assembler = ResultAssembler(settings.worker_id)
        self._producer: AIOKafkaProducer
        self._consumer: AIOKafkaConsumer
        self._writer: OutcomeWriter
        self._inflight: asyncio.Queue[_Batch] = asyncio.Queue(settings.executor_max_inflight_batches)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.failed = asyncio.Event()
        self.failure: str | None = None
        self.executed = 0
        self.dead_lettered = 0
        self.joined = asyncio.Event()  # the group has assigned this worker its partitions (maybe none)
        self.committed: dict[TopicPartition, int] = {}  # what this worker committed, for the lag it reports
        # Called once per completed batch with its delivered results' fields (app/web/metrics.py counts them).
        self.on_results: Callable[[list[dict[str, Any]]], None] | None = None

    async def start(self) -> None:
        settings = self._settings
        self._producer = make_producer(settings)
        self._consumer = make_consumer(settings, group_id=f"{settings.app_id}-executors",
                                       fetch_max_wait_ms=settings.executor_fetch_max_wait_ms, **settings.group_args())
        self._writer = await start_answering(self._consumer, self._producer, settings, self._topics,
                                             self._topics.execution_requests.name, _DrainOnRevoke(self))
        self._tasks = [asyncio.ensure_future(self._fetch()), asyncio.ensure_future(self._complete())]

    def fail(self, reason: str) -> None:
        """Stop fetching and completing batches: from now on nothing is committed."""
        if self.failure is None:
            self.failure = reason
            self._stopping = True
            self.failed.set()

    async def stop(self) -> None:
        """Complete and commit the batches in flight (unless failed), then leave the group."""
        self._stopping = True
        if self._tasks:
            if self.failure is None:
                await asyncio.wait(self._tasks[:1], timeout=10)  # it ends after at most one more getmany
                try:
                    await asyncio.wait_for(self.drain(), timeout=30)
                except TimeoutError:
                    log.warning("in-flight batches not finished in 30s; they will be redelivered")
            for task in self._tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await stop_clients(getattr(self, "_consumer", None), getattr(self, "_producer", None))

    async def drain(self) -> None:
        """Wait until every fetched batch is completed and committed (or, once failed, dropped)."""
        await self._inflight.join()

    async def _fetch(self) -> None:
        await self._tables.ready.wait()
        try:
            while not self._stopping:
                batches = await self._consumer.getmany(
                    timeout_ms=100, max_records=self._settings.executor_batch_size)
                if batches:
                    batch = self._prepare(batches)
                    if batch.pending:
                        batch.outcomes = asyncio.ensure_future(self._pool.run(_calls(batch.pending)))
                    await self._inflight.put(batch)  # waits while too many batches are in flight
        except KafkaError as exc:
            self.fail(self._consumer_failure(exc))
        except Exception as exc:
            log.exception("fetching requests failed")
            self.fail(f"fetching requests failed: {describe_error(exc)}")

    async def _complete(self) -> None:
        """Send batches' results in fetch order, each as soon as its sandbox work is done, without waiting for
        the acknowledgements of the batches before it (they are awaited by the commits). Every
        executor_commit_interval_ms (and whenever nothing else is queued once it is due) the sent ones are
        committed: once acknowledged, after their daily-stats partials."""
        loop = asyncio.get_running_loop()
        interval = self._settings.executor_commit_interval_ms / 1000
        committing: asyncio.Future[None] | None = None  # the commit before, maybe still in flight
        finished: list[_Batch] = []
        sending: list[asyncio.Future[list[dict[str, Any]]]] = []  # their deliveries: the results that went out
        unacknowledged: deque[asyncio.Future[list[dict[str, Any]]]] = deque()
        most = self._settings.executor_max_inflight_batches  # sent, unacknowledged batches: back-pressure
        due = 0.0
        while True:
            if finished and self._inflight.empty():
                try:
                    async with asyncio.timeout_at(due):
                        batch: _Batch | None = await self._inflight.get()
                except TimeoutError:
                    batch = None
            else:
                batch = await self._inflight.get()
            if batch is not None:
                try:
                    if self.failure is None:  # once failed, batches are dropped: they stay uncommitted
                        while len(unacknowledged) >= most:
                            await asyncio.wait([unacknowledged.popleft()])
                        delivery = await self._send(batch)
                        sending.append(delivery)
                        unacknowledged.append(delivery)
                except Exception as exc:  # a bug: stop rather than commit past requests without an outcome
                    log.exception("completing a batch failed")
                    self.fail(f"completing a batch failed ({describe_error(exc)}); it stays uncommitted")
                if not finished:
                    due = loop.time() + interval
                finished.append(batch)
                if loop.time() < due:
                    continue
            # The commit runs while the next batches are sent, after the commit before it (offsets only move
            # forward); the batches count as done once committed, so drain() waits for their commit too.
            committing = asyncio.ensure_future(self._commit(finished, sending, committing))
            committing.add_done_callback(functools.partial(self._committed, len(finished)))
            finished, sending = [], []
            while unacknowledged and unacknowledged[0].done():
                unacknowledged.popleft()

    def _committed(self, batches: int, commit: asyncio.Future[None]) -> None:
        for _ in range(batches):
            self._inflight.task_done()

    def _consumer_failure(self, exc: KafkaError) -> str:
        if isinstance(exc.__cause__, InvalidSessionTimeoutError):
            return (f"the group coordinator refused session_timeout_s={self._settings.session_timeout_s:g}: "
                    "it must lie within the broker's group.min.session.timeout.ms and "
                    "group.max.session.timeout.ms (Apache Kafka's defaults: 6 s and 30 min)")
        return f"consuming {self._topics.execution_requests.name} failed: {describe_error(exc)}"

    def _prepare(self, batches: dict[TopicPartition, list[Message]]) -> _Batch:
        batch = _Batch({tp: (messages[0].offset, messages[-1].offset + 1) for tp, messages in batches.items()})
        decode, pending = self._requests.decode, batch.pending
        resolve = Resolver(self._tables.tasks.get, self._tables.artifacts.version, self._validators,
                           self._settings.default_timeout_ms)
        for messages in batches.values():
            for message in messages:
                try:
                    value = message.value
                    if value is None:
                        batch.letters.append(self._dead_letter(message, "message has no value", "EmptyMessage"))
                        continue
                    try:
                        request = decode(value)
                    except DecodeError as exc:
                        self._undecodable(message, exc, batch)
                        continue
                    decision = resolve(request)
                    if type(decision) is Runnable:
                        pending.append((request, decision, message))
                    else:
                        assert isinstance(decision, Refused)
                        batch.ready.append((self._rejected(batch, request.task_id, request.request_id,
                                                           decision.message, decision.version), message))
                except Exception as exc:  # a bug must not cost the request: it goes to the dead letters
                    log.exception("request at %s:%d failed", message.topic, message.offset)
                    batch.letters.append(self._dead_letter(message, f"internal error: {exc}", type(exc).__name__))
        return batch

    def _undecodable(self, message: Message, error: DecodeError, batch: _Batch) -> None:
        """A request that names itself gets its one result, saying why it was refused; else a dead letter."""
        fields = self._requests.loose(message.value) or {}
        request_id, task_id = fields.get("request_id"), fields.get("task_id")
        if isinstance(request_id, str) and request_id and isinstance(task_id, str) and task_id:
            batch.ready.append((self._rejected(batch, task_id, request_id, str(error)), message))
        else:
            batch.letters.append(self._dead_letter(message, str(error), "DecodeError"))

    async def _send(self, batch: _Batch) -> asyncio.Future[list[dict[str, Any]]]:
        """Await a batch's sandbox work and hand its results to the producer; returns the delivery, which
        resolves to the results that went out once every one is acknowledged (or fell back to a dead letter).
        Deliveries start in the order of these calls, so each partition gets its records in fetch order."""
        results, letters = batch.ready, batch.letters
        validations: list[dict[str, Any]] = []
        if batch.pending:
            outcomes = await self._outcomes(batch)
            batch.fetched_at = utc_now()  # results carry when their batch finished executing
            executed_results(batch.pending, outcomes, batch.fetched_at, self.assembler, results, letters, validations)
        return asyncio.ensure_future(self._deliver(results, letters, validations))

    async def _deliver(self, results: list[tuple[dict[str, Any], Message]], letters: list[DeadLetter],
                       validations: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # Validation requests need not wait for the results' acks (partials, later, count delivered results).
        (sent_results, sent_letters), _ = await asyncio.gather(self._writer.write(results, letters),
                                                               self._writer.write_validations(validations))
        self.executed += len(sent_results)
        self.dead_lettered += sent_letters
        if self.on_results is not None:
            self.on_results(sent_results)
        return sent_results

    async def _outcomes(self, batch: _Batch) -> list[Outcome] | list[Outcome | Exception]:
        """The sandbox's answers; if the pool fails the batch as a whole, each call is run again on its own
        and a call that fails alone gets its exception instead of an outcome."""
        assert batch.outcomes is not None
        try:
            outcomes = await batch.outcomes
            if len(outcomes) == len(batch.pending):
                return outcomes
            raise RuntimeError(f"the sandbox pool answered {len(outcomes)} of {len(batch.pending)} calls")
        except Exception as exc:
            log.warning("the sandbox pool failed a batch (%s); running its %d calls one at a time",
                        describe_error(exc), len(batch.pending))
        alone: list[Outcome | Exception] = []
        for call in _calls(batch.pending):
            try:
                alone += await self._pool.run([call])
            except Exception as exc:
                alone.append(exc)
        return alone

    async def _commit(self, batches: list[_Batch], deliveries: list[asyncio.Future[list[dict[str, Any]]]],
                      after: asyncio.Future[None] | None) -> None:
        """Once the batches' deliveries are acknowledged: their daily-stats partials, then (after the commit
        before, whose outcome is its own) their offsets."""
        delivered: list[dict[str, Any]] = []
        for delivery in deliveries:
            try:
                delivered += await delivery
            except Undeliverable as exc:
                self.fail(str(exc))
            except Exception as exc:  # a bug: stop rather than commit past requests without an outcome
                log.error("delivering a batch failed: %s", describe_error(exc), exc_info=exc)
                self.fail(f"completing a batch failed ({describe_error(exc)}); it stays uncommitted")
        if after is not None:
            await asyncio.wait([after])
        if self.failure is not None:  # failed while these batches were completing (e.g. the broker is gone)
            return
        try:
            await self._writer.write_stats(delivered)
        except Exception as exc:  # a bug: partials are statistics, but say so loudly
            log.exception("sending daily-stats partials failed: %s", describe_error(exc))
        offsets = {tp: end for batch in batches for tp, (_, end) in batch.offsets.items()}
        try:
            await self._consumer.commit(offsets)
            self.committed.update(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            # The partitions moved to another worker, which redoes the batch: duplicates, never losses.
            log.warning("commit failed after a rebalance: %s", exc)
        except KafkaError as exc:  # retriable errors are retried inside commit(); this one will not heal
            self.fail(f"committing offsets failed: {describe_error(exc)}")

    def partitions(self) -> list[int]:
        """The requests partitions assigned to this worker now."""
        return sorted(tp.partition for tp in self._consumer.assignment())

    async def lag(self) -> dict[int, int]:
        """Requests not yet committed per assigned partition: the log end seen by the last fetch minus the
        offset this worker committed (Kafka's consumer lag), or minus its position before its first commit
        there. A partition not fetched from yet is left out."""
        lags = {}
        for tp in self._consumer.assignment():
            end = self._consumer.highwater(tp)
            if end is not None:
                done = self.committed.get(tp)
                if done is None:
                    done = await asyncio.wait_for(self._consumer.position(tp), 1.0)
                lags[tp.partition] = max(0, end - done)
        return lags

    def _rejected(self, batch: _Batch, task_id: str, request_id: str, why: str,
                  version: int | None = None) -> dict[str, Any]:
        return rejected_fields(task_id, request_id, why, batch.fetched_at, self._settings.worker_id, version)

    def _dead_letter(self, message: Message, reason: str, error_type: str) -> DeadLetter:
        return dead_letter_for(message, reason, error_type, self._settings.worker_id)


def _calls(pending: list[tuple[ExecutionRequest, Runnable, Message]]) -> list[Call]:
    """The sandbox calls of a batch. A batch's Runnables are mostly one shared object (app/domain/resolution's
    Resolver), so its program and timeout are read once per Runnable; each Call is made as the tuple it is (a
    NamedTuple's own constructor costs twice as much)."""
    calls: list[Call] = []
    runs: dict[int, tuple[str, str, float]] = {}
    made = tuple.__new__
    for q, r, _ in pending:
        run = runs.get(id(r))
        if run is None:
            run = runs[id(r)] = (r.artifact.program_id, r.artifact.source_code, r.timeout_ms / 1000)
        calls.append(made(Call, (q.task_id, *run, q.input)))
    return calls
