"""Executes requests: consumes execution-requests in Kafka batches, runs each against its program version in
the sandbox pool, and produces exactly one execution-result or dead letter per request.

Each task's results go out as soon as its own calls are done, whatever was fetched with them; offsets are
committed per partition up to the first request whose outcome is not yet acknowledged (app/kafka/progress.py),
so a crash re-runs only what may be undelivered (a redelivered request yields the same execution_id).
Fetching pauses while too many requests, or too many bytes of outputs, are in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
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
from app.contract.records import AnomalySignal, DeadLetter, ExecutionRequest, TaskSuspension, utc_now
from app.contract.topics import Topics
from app.domain.resolution import ExecutionPlan, Refused, Resolver, SchemaValidators
from app.domain.results import ResultAssembler, rejected_fields
from app.domain.task_budget import TimeoutBudget, signal_of
from app.kafka.clients import make_consumer, make_producer, stop_clients
from app.kafka.delivery import describe_error
from app.kafka.outcomes import (
    Message,
    ResultWriter,
    Undeliverable,
    dead_letter_for,
    executed_results,
    start_answering,
)
from app.kafka.progress import Mark, PartitionProgress
from app.kafka.tables import TableReader
from app.sandbox.pool import Call, Outcome, SandboxPool
from app.settings import Settings

log = logging.getLogger(__name__)

# How long a revocation waits for the revoked partitions' requests in flight before it lets them go: the group
# waits for this worker meanwhile. What is not done by then is redone by the next owner (duplicates, no loss).
_REVOKE_WAIT_S = 3.0
_STOP_WAIT_S = 30.0
_BULK_BYTES = 256 << 10  # a chunk's outputs (counted three times) past this go out through the bulk lane
Pending = tuple[ExecutionRequest, ExecutionPlan, Message]


class _Outgoing:
    """Records ready to send, gathered over one turn of the event loop so that they go out together."""

    __slots__ = ("by_task", "letters", "marks", "output_bytes", "results", "validations")

    def __init__(self) -> None:
        self.results: list[tuple[dict[str, Any], Message]] = []
        self.letters: list[DeadLetter] = []
        self.validations: list[dict[str, Any]] = []
        self.marks: list[Mark] = []
        self.output_bytes = 0
        self.by_task: dict[str, int] = {}


class _Lane:
    """One way out for results: a producer (its own broker connections) and the deliveries on it. Chunks of large
    outputs take the bulk lane, so a task's megabytes never queue ahead of another task's small results in the
    one produce request a connection has in flight."""

    __slots__ = ("delivering", "flush_due", "outgoing", "producer", "writer")

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer
        self.writer: ResultWriter
        self.outgoing = _Outgoing()
        self.delivering = 0  # deliveries on their way
        self.flush_due = False


class _CommitOnRevoke(ConsumerRebalanceListener):
    """Before partitions move to another worker, let their requests in flight finish (for a while) and commit."""

    def __init__(self, executor: ExecuteRequests) -> None:
        self._executor = executor

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._executor.hand_over(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("executor assigned %s", sorted(tp.partition for tp in assigned))
        self._executor.joined.set()


class ExecuteRequests:
    """The executor service of a worker. start() joins the executor group; stop() finishes in-flight work.
    `failed` is set, with `failure` saying why, when it had to stop without committing."""

    def __init__(self, settings: Settings, topics: Topics, tables: TableReader, pool: SandboxPool,
                 budget: TimeoutBudget | None = None) -> None:
        self._settings = settings
        self._topics = topics
        self._tables = tables
        self._pool = pool
        self._requests = codec_for(ExecutionRequest, settings, topics.execution_requests)
        self._validators = SchemaValidators()
        self.assembler = ResultAssembler(settings.worker_id)
        self._producer: AIOKafkaProducer
        self._consumer: AIOKafkaConsumer
        self._writer: ResultWriter
        self._progress = PartitionProgress()
        self._max_requests = settings.executor_batch_size * settings.executor_max_inflight_batches
        self._max_output_bytes = settings.executor_max_output_bytes
        self._in_flight = 0  # requests fetched and not yet answered (acknowledged)
        self._held_bytes = 0  # outputs received from the sandbox and not yet acknowledged
        self._room = asyncio.Event()  # set while fetching may go on
        self._room.set()
        self._held_by_task: dict[str, int] = {}
        self._output_waiters: list[asyncio.Future[None]] = []  # chunks waiting for outputs to be delivered
        self._changed = asyncio.Condition()  # notified whenever answers are acknowledged
        self._answered = asyncio.Event()  # set whenever answers are acknowledged, cleared by the committer
        self._lane: _Lane  # results, rejections, dead letters
        self._bulk: _Lane  # results of chunks whose outputs pass _BULK_BYTES
        self._max_deliveries = settings.executor_max_inflight_batches
        self._delivered: list[dict[str, Any]] = []  # results acknowledged since the last commit: its partials
        self._commit_lock = asyncio.Lock()
        self._work: set[asyncio.Future[Any]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.failed = asyncio.Event()
        self.failure: str | None = None
        self.executed = 0
        self.dead_lettered = 0
        self.joined = asyncio.Event()  # the group has assigned this worker its partitions (maybe none)
        self.committed: dict[TopicPartition, int] = {}  # what this worker committed, for the lag it reports
        # Called with each acknowledged group of results' fields (app/web/metrics.py counts them).
        self.on_results: Callable[[list[dict[str, Any]]], None] | None = None
        # The tasks' timeout budget: a suspended task's requests get a rejected result at once.
        self.budget = budget
        self.refusal: Callable[[str], str | None] | None = budget.refusal if budget is not None else None
        self._suspensions = codec_for(TaskSuspension, settings, topics.task_suspensions)
        self._signals = codec_for(AnomalySignal, settings, topics.anomaly_signals)

    async def start(self) -> None:
        settings = self._settings
        self._producer = make_producer(settings)
        self._consumer = make_consumer(settings, group_id=f"{settings.app_id}-executors",
                                       fetch_max_wait_ms=settings.executor_fetch_max_wait_ms, **settings.group_args())
        self._bulk = _Lane(make_producer(settings))
        await self._bulk.producer.start()
        self._bulk.writer = ResultWriter(settings, self._topics, self._bulk.producer)
        await self._bulk.writer.start()
        self._writer = await start_answering(self._consumer, self._producer, settings, self._topics,
                                             self._topics.execution_requests.name, _CommitOnRevoke(self))
        self._lane = _Lane(self._producer)
        self._lane.writer = self._writer
        self._tasks = [asyncio.ensure_future(self._fetch()), asyncio.ensure_future(self._commit_often())]

    def fail(self, reason: str) -> None:
        """Stop fetching and committing: from now on nothing is committed."""
        if self.failure is None:
            self.failure = reason
            self._stopping = True
            self._room.set()  # the fetch loop sees it is stopping
            self.failed.set()

    async def stop(self) -> None:
        """Finish and commit the requests in flight (unless failed; for at most a while), then leave the group."""
        self._stopping = True
        self._room.set()
        if self._tasks:
            if self.failure is None:
                await asyncio.wait(self._tasks[:1], timeout=10)  # it ends after at most one more getmany
                if not await self._settled(None, _STOP_WAIT_S):
                    log.warning("requests in flight not finished in %gs; they will be redelivered", _STOP_WAIT_S)
                await self._commit()
            for task in [*self._tasks, *self._work]:
                task.cancel()
            for task in [*self._tasks, *self._work]:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        bulk = getattr(self, "_bulk", None)
        await stop_clients(getattr(self, "_consumer", None), getattr(self, "_producer", None),
                           bulk.producer if bulk is not None else None)

    async def drain(self) -> None:
        """Wait until every request fetched so far is answered and committed."""
        await self._settled(None, None)
        await self._commit()

    async def hand_over(self, revoked: list[TopicPartition]) -> None:
        """Before the revoked partitions move: wait (a while) for their requests in flight, commit what is done,
        and stop tracking them; answers still arriving for them go out but are never committed here."""
        if not revoked:  # the first join, or a rebalance that takes nothing from this worker
            return
        if self.failure is None:
            await self._settled(revoked, _REVOKE_WAIT_S)
            await self._commit()
        self._progress.forget(revoked)
        for tp in revoked:  # the next owner commits there now
            self.committed.pop(tp, None)

    async def _settled(self, tps: list[TopicPartition] | None, timeout_s: float | None) -> bool:
        """Wait until no request of these partitions (all: None) is in flight; False if timeout_s passed first."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(
                    lambda: self.failure is not None or not self._progress.pending(tps)), timeout_s)
            except TimeoutError:
                return False
        return True

    async def _fetch(self) -> None:
        await self._tables.ready.wait()
        try:
            while not self._stopping:
                await self._room.wait()
                if self._stopping:
                    break
                batches = await self._consumer.getmany(
                    timeout_ms=100, max_records=self._settings.executor_batch_size)
                if batches and not self._stopping:
                    self._take(batches)
        except KafkaError as exc:
            self.fail(self._consumer_failure(exc))
        except Exception as exc:
            log.exception("fetching requests failed")
            self.fail(f"fetching requests failed: {describe_error(exc)}")

    def _take(self, batches: dict[TopicPartition, list[Message]]) -> None:
        """Decode and resolve a fetch's requests: refusals and dead letters go out at once, the rest to the
        sandbox pool, whose outcomes go out task by task as they come."""
        now = utc_now()
        out = self._lane.outgoing
        pending: list[Pending] = []
        marks: list[Mark] = []
        decode, worker_id = self._requests.decode, self._settings.worker_id
        resolve = Resolver(self._tables.tasks.get, self._tables.artifacts.version, self._validators,
                           self._settings.default_timeout_ms)
        refusal = self.refusal
        for tp, messages in batches.items():
            segment = self._progress.add(tp, [message.offset for message in messages])
            self._in_flight += len(messages)
            for index, message in enumerate(messages):
                mark = (segment, index)
                try:
                    value = message.value
                    if value is None:
                        out.letters.append(self._dead_letter(message, "message has no value", "EmptyMessage"))
                        out.marks.append(mark)
                        continue
                    try:
                        request = decode(value)
                    except DecodeError as exc:
                        self._undecodable(message, exc, now)
                        out.marks.append(mark)
                        continue
                    why = refusal(request.task_id) if refusal is not None else None
                    decision = resolve(request) if why is None else Refused(why, request.version)
                    if type(decision) is ExecutionPlan:
                        pending.append((request, decision, message))
                        marks.append(mark)
                    else:
                        assert isinstance(decision, Refused)
                        out.results.append((rejected_fields(request.task_id, request.request_id, decision.message,
                                                            now, worker_id, decision.version), message))
                        out.marks.append(mark)
                except Exception as exc:  # a bug must not cost the request: it goes to the dead letters
                    log.exception("request at %s:%d failed", message.topic, message.offset)
                    out.letters.append(self._dead_letter(message, f"internal error: {exc}", type(exc).__name__))
                    out.marks.append(mark)
        self._flush_soon(self._lane)
        if pending:
            self._spawn(self._execute(pending, marks))
        self._update_room()

    def _undecodable(self, message: Message, error: DecodeError, now: Any) -> None:
        """A request that names itself gets its one result, saying why it was refused; else a dead letter."""
        fields = self._requests.loose(message.value) or {}
        request_id, task_id = fields.get("request_id"), fields.get("task_id")
        if isinstance(request_id, str) and request_id and isinstance(task_id, str) and task_id:
            self._lane.outgoing.results.append((rejected_fields(task_id, request_id, str(error), now,
                                                           self._settings.worker_id), message))
        else:
            self._lane.outgoing.letters.append(self._dead_letter(message, str(error), "DecodeError"))

    async def _execute(self, pending: list[Pending], marks: list[Mark]) -> None:
        """Run a fetch's calls; each chunk's outcomes are answered as it ends. If the pool fails as a whole, the
        calls without an outcome are run again one at a time, and a call that fails alone is dead-lettered."""
        answered = bytearray(len(pending))

        def emit(indices: Sequence[int], outcomes: Sequence[Outcome | Exception]) -> None:
            for index in indices:
                answered[index] = 1
            self._answer([pending[i] for i in indices], outcomes, [marks[i] for i in indices])

        calls = _calls(pending)
        try:
            await self._pool.stream(calls, emit)
            return
        except Exception as exc:
            left = [i for i, done in enumerate(answered) if not done]
            log.warning("the sandbox pool failed (%s); running its %d calls left one at a time",
                        describe_error(exc), len(left))
        for index in left:
            try:
                outcome: Outcome | Exception = (await self._pool.run([calls[index]]))[0]
            except Exception as exc:
                outcome = exc
            emit([index], [outcome])

    def _answer(self, pending: Sequence[Pending], outcomes: Sequence[Outcome | Exception],
                marks: list[Mark]) -> None:
        """Assemble results for outcomes just in from the sandbox and queue them to go out."""
        # An output is held three times until acknowledged: as the sandbox wrote it, encoded in its result, and
        # in the producer's record batch.
        size = 3 * sum(len(o.output_json) for o in outcomes if type(o) is Outcome and o.output_json is not None)
        lane = self._bulk if size > _BULK_BYTES else self._lane
        out = lane.outgoing
        executed_results(pending, outcomes, utc_now(), self.assembler, out.results, out.letters, out.validations)
        out.marks += marks
        if size:
            task_id = pending[0][0].task_id  # a chunk is one task's
            out.output_bytes += size
            out.by_task[task_id] = out.by_task.get(task_id, 0) + size
            self._held_by_task[task_id] = self._held_by_task.get(task_id, 0) + size
            self._held_bytes += size
        self._flush_soon(lane)
        self._update_room()

    def _flush_soon(self, lane: _Lane) -> None:
        if not lane.flush_due and lane.outgoing.marks:
            lane.flush_due = True
            asyncio.get_running_loop().call_soon(self._flush, lane)

    def _flush(self, lane: _Lane) -> None:
        """Send what was gathered, as one delivery, unless executor_max_inflight_batches deliveries are on their
        way: then it goes with the next one that ends (aiokafka holds one batch per partition; hundreds of small
        deliveries would queue there one round trip each)."""
        lane.flush_due = False
        if lane.outgoing.marks and lane.delivering < self._max_deliveries:
            out, lane.outgoing = lane.outgoing, _Outgoing()
            lane.delivering += 1
            self._spawn(self._deliver(lane, out))

    async def _deliver(self, lane: _Lane, out: _Outgoing) -> None:
        """Deliver answers (validation requests need not wait for the results' acks), then count them done."""
        try:
            (sent_results, sent_letters), _ = await asyncio.gather(
                lane.writer.write(out.results, out.letters), lane.writer.write_validations(out.validations))
        except Undeliverable as exc:
            self.fail(str(exc))
            return
        except Exception as exc:  # a bug: stop rather than commit past requests without an outcome
            log.error("delivering results failed: %s", describe_error(exc), exc_info=exc)
            self.fail(f"delivering results failed ({describe_error(exc)}); they stay uncommitted")
            return
        finally:
            self._held_bytes -= out.output_bytes
            for task_id, size in out.by_task.items():
                left = self._held_by_task[task_id] - size
                if left:
                    self._held_by_task[task_id] = left
                else:
                    del self._held_by_task[task_id]
            self._in_flight -= len(out.marks)
            lane.delivering -= 1
            self._flush_soon(lane)
            self._update_room()
        for segment, index in out.marks:
            segment.complete(index)
        self.executed += len(sent_results)
        self.dead_lettered += sent_letters
        self._delivered += sent_results
        if self.on_results is not None:
            self.on_results(sent_results)
        self._answered.set()
        async with self._changed:
            self._changed.notify_all()

    def charge_timeout(self, task_id: str) -> None:
        """A call of the task timed out (the sandbox pool tells): charge its budget, and when that suspends the
        task, say so on task-suspensions (every worker refuses it) and anomaly-signals."""
        suspension = self.budget.charge(task_id) if self.budget is not None else None
        if suspension is not None:
            log.warning("task %s suspended: %s", task_id, suspension.reason)
            self._spawn(self._announce(suspension))

    async def _announce(self, suspension: TaskSuspension) -> None:
        key = suspension.task_id.encode()
        try:
            await asyncio.gather(
                self._producer.send_and_wait(self._topics.task_suspensions.name, self._suspensions.encode(suspension),
                                             key=key),
                self._producer.send_and_wait(self._topics.anomaly_signals.name,
                                             self._signals.encode(signal_of(suspension)), key=key))
        except Exception as exc:  # the suspension holds on this worker all the same
            log.error("could not announce the suspension of %s: %s", suspension.task_id, describe_error(exc))

    def _update_room(self) -> None:
        outputs_fit = self._stopping or self._held_bytes < self._max_output_bytes
        if outputs_fit and (self._stopping or self._in_flight < self._max_requests):
            self._room.set()
        else:
            self._room.clear()
        waiters, self._output_waiters = self._output_waiters, []
        for waiter in waiters:  # each checks its own bound again
            if not waiter.done():
                waiter.set_result(None)

    def _outputs_fit(self, task_id: str) -> bool:
        return self._stopping or (self._held_bytes < self._max_output_bytes
                                  and self._held_by_task.get(task_id, 0) < self._max_output_bytes // 4)

    async def wait_for_output_room(self, task_id: str) -> None:
        """Return once the outputs held are within executor_max_output_bytes, and the task's own within a quarter
        of it (the sandbox pool awaits this before each chunk): a task of huge outputs waits for their delivery
        without filling the bound that would pause fetching for every task."""
        while not self._outputs_fit(task_id):
            waiter = asyncio.get_running_loop().create_future()
            self._output_waiters.append(waiter)
            await waiter

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._work.add(task)
        task.add_done_callback(self._work.discard)

    async def _commit_often(self) -> None:
        """Every executor_commit_interval_ms, when answers were acknowledged: their daily-stats partials, then
        the offsets up to each partition's first request not yet answered."""
        interval = self._settings.executor_commit_interval_ms / 1000
        while not self.failed.is_set():
            await self._answered.wait()
            self._answered.clear()
            await self._commit()
            await asyncio.sleep(interval)

    async def _commit(self) -> None:
        async with self._commit_lock:
            if self.failure is not None:
                return
            delivered, self._delivered = self._delivered, []
            try:
                await self._writer.write_stats(delivered)
            except Exception as exc:  # a bug: partials are statistics, but say so loudly
                log.exception("sending daily-stats partials failed: %s", describe_error(exc))
            assigned = self._consumer.assignment()
            offsets = {tp: offset for tp, offset in self._progress.committable().items() if tp in assigned}
            if not offsets:
                return
            try:
                await self._consumer.commit(offsets)
                self.committed.update(offsets)
            except (CommitFailedError, IllegalStateError) as exc:
                # The partitions moved to another worker, which redoes what is not committed: duplicates, never
                # losses.
                log.warning("commit failed after a rebalance: %s", exc)
            except KafkaError as exc:  # retriable errors are retried inside commit(); this one will not heal
                self.fail(f"committing offsets failed: {describe_error(exc)}")

    def _consumer_failure(self, exc: KafkaError) -> str:
        if isinstance(exc.__cause__, InvalidSessionTimeoutError):
            return (f"the group coordinator refused session_timeout_s={self._settings.session_timeout_s:g}: "
                    "it must lie within the broker's group.min.session.timeout.ms and "
                    "group.max.session.timeout.ms (Apache Kafka's defaults: 6 s and 30 min)")
        return f"consuming {self._topics.execution_requests.name} failed: {describe_error(exc)}"

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

    def _dead_letter(self, message: Message, reason: str, error_type: str) -> DeadLetter:
        return dead_letter_for(message, reason, error_type, self._settings.worker_id)


def _calls(pending: list[Pending]) -> list[Call]:
    """The sandbox calls of a batch. A batch's plans are mostly one shared object (app/domain/resolution's
    Resolver), so its program and timeout are read once per plan; each Call is made as the tuple it is (a
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
