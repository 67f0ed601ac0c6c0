"""Executes requests: consumes execution-requests in Kafka batches, runs each against its program version in
the sandbox pool, and produces exactly one execution-result or dead letter per request."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition

from app.contract.records import utc_now
from app.contract.topics import Topics
from app.domain.resolution import calls_of
from app.domain.results import ResultAssembler
from app.domain.task_budget import TimeoutBudget
from app.kafka.clients import consumer_failure, make_consumer, make_producer, stop_clients
from app.kafka.delivery import describe_error
from app.kafka.lanes import Answers, Lanes
from app.kafka.outcomes import (
    Message,
    ResultWriter,
    UnsentStats,
    dead_letter_for,
    start_answering,
)
from app.kafka.pipeline import Pipeline
from app.kafka.progress import Mark
from app.kafka.suspensions import SuspensionNotices
from app.kafka.tables import TableReader
from app.kafka.triage import Pending, RequestTriage
from app.sandbox.calls import Outcome
from app.sandbox.pool import SandboxPool
from app.settings import Settings

log = logging.getLogger(__name__)

# A commit waits at most this many intervals for its stats partials to be worth sending (UnsentStats).
_COMMIT_HOLD_INTERVALS = 10


# Each task's results go out as soon as its own calls are done, whatever was fetched with them; offsets are
# committed per partition up to the first request whose outcome is not yet acknowledged (app/kafka/pipeline.py),
# so a crash re-runs only what may be undelivered (a redelivered request yields the same execution_id). Fetching
# pauses while too many requests, or too many bytes of outputs, are in flight.
class ExecuteRequests:
    """The executor service of a worker. start() joins the executor group; stop() finishes in-flight work.
    Its `pipeline` tells whether it has joined, its partitions and their lag, and (`failed`, `failure`) why it had
    to stop without committing."""

    def __init__(self, settings: Settings, topics: Topics, tables: TableReader, pool: SandboxPool,
                 budget: TimeoutBudget | None = None) -> None:
        self._settings = settings
        self._topics = topics
        self._tables = tables
        self._pool = pool
        # Results acknowledged since the last commit: their daily-stats partials go out before it.
        self._unsent: UnsentStats[dict[str, Any]] = UnsentStats(lambda results: self._writer.write_stats(results))
        self.assembler = ResultAssembler(settings.worker_id)
        self._producer: AIOKafkaProducer
        self._bulk_producer: AIOKafkaProducer
        self._writer: ResultWriter
        self._lanes: Lanes
        self.pipeline = Pipeline(
            "executor", "requests", batch_size=settings.executor_batch_size,
            max_in_flight=settings.executor_batch_size * settings.executor_max_inflight_batches,
            commit_interval_s=settings.executor_commit_interval_ms / 1000, before_commit=self._unsent.send,
            commit_due=self._unsent.worth_sending,
            max_commit_interval_s=_COMMIT_HOLD_INTERVALS * settings.executor_commit_interval_ms / 1000,
            blocked=lambda: self._lanes.full(), failure_of=consumer_failure(topics.execution_requests.name, settings))
        self.executed = 0
        self.dead_lettered = 0
        # Called with each acknowledged group of results' fields, and each with its request's message (for its
        # timestamp: app/web/metrics.py counts both).
        self.on_results: Callable[[list[dict[str, Any]], list[tuple[dict[str, Any], Message]]], None] | None = None
        # The tasks' timeout budget, charged on each timeout: a suspended task's requests get a rejected result
        # at once (the triage asks it).
        self.budget = budget
        self._triage = RequestTriage(settings, topics, tables, budget.refusal if budget is not None else None)
        self._notices = SuspensionNotices(settings, topics)

    async def start(self) -> None:
        settings = self._settings
        self.pipeline.consumer = make_consumer(settings, group_id=f"{settings.app_id}-executors",
                                               fetch_max_wait_ms=settings.executor_fetch_max_wait_ms,
                                               **settings.group_args())
        self._producer = make_producer(settings)
        self._bulk_producer = make_producer(settings)
        await self._bulk_producer.start()
        bulk = ResultWriter(settings, self._topics, self._bulk_producer)
        await bulk.start()
        self._writer = await start_answering(self.pipeline.consumer, self._producer, settings, self._topics,
                                             self._topics.execution_requests.name, self.pipeline.listener)
        self._lanes = Lanes(self._writer, bulk, max_deliveries=settings.executor_max_inflight_batches,
                            max_output_bytes=settings.executor_max_output_bytes, delivered=self._delivered_now,
                            failed=self._undelivered, spawn=self.pipeline.spawn)
        self.pipeline.start(self._take, self._tables.ready.wait())

    def fail(self, reason: str) -> None:
        """Stop fetching and committing: from now on nothing is committed."""
        self.pipeline.fail(reason)
        self._stop_lanes()

    async def stop(self) -> None:
        """Finish and commit the requests in flight (unless failed; for at most a while), then leave the group."""
        self._stop_lanes()
        await self.pipeline.stop()
        await stop_clients(getattr(self.pipeline, "consumer", None), getattr(self, "_producer", None),
                           getattr(self, "_bulk_producer", None))

    async def wait_for_output_room(self, task_id: str) -> None:
        """Return once the outputs held leave room for another chunk of this task (the sandbox pool awaits it)."""
        await self._lanes.wait_for_room(task_id)

    def _stop_lanes(self) -> None:
        lanes = getattr(self, "_lanes", None)
        if lanes is not None:
            lanes.stop()

    def _take(self, batches: dict[TopicPartition, list[Message]]) -> None:
        """A fetch's requests: refusals and dead letters go out at once, the rest to the sandbox pool, whose
        outcomes go out task by task as they come."""
        pending, marks = self._triage(batches, self.pipeline.track, self._lanes.main)
        self._lanes.flush_soon()
        if pending:
            self.pipeline.spread(sum(map(len, batches.values())), len({request.task_id for request, _, _ in pending}))
            self.pipeline.spawn(self._execute(pending, marks))

    async def _execute(self, pending: list[Pending], marks: list[Mark]) -> None:
        """Run a fetch's calls; each chunk's outcomes are answered as it ends. If the pool fails as a whole, the
        calls without an outcome are run again one at a time, and a call that fails alone is dead-lettered."""
        answered = bytearray(len(pending))

        def emit(indices: Sequence[int], outcomes: Sequence[Outcome | Exception]) -> None:
            for index in indices:
                answered[index] = 1
            self._answer([pending[i] for i in indices], outcomes, [marks[i] for i in indices])

        calls = calls_of(pending)
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
        """Assemble results for one task's outcomes just in from the sandbox and queue them to go out."""
        # An output is held three times until acknowledged: as the sandbox wrote it, encoded in its result, and
        # in the producer's record batch.
        size = 3 * sum(len(o.output_json) for o in outcomes if type(o) is Outcome and o.output_json is not None)
        out = self._lanes.add_chunk(pending[0][0].task_id, size)  # a chunk is one task's
        results, validations, failures = self.assembler.assemble(pending, outcomes, utc_now())
        out.results += results
        out.validations += validations
        for message, reason, error_type in failures:
            out.letters.append(dead_letter_for(message, reason, error_type, self._settings.worker_id))
        out.marks += marks
        self._lanes.flush_chunk(out)
        self.pipeline.update_room()

    async def _delivered_now(self, answers: Answers, sent_results: list[dict[str, Any]], sent_letters: int) -> None:
        self.executed += len(sent_results)
        self.dead_lettered += sent_letters
        self._unsent.add(sent_results)
        if self.on_results is not None:
            self.on_results(sent_results, answers.results)
        await self.pipeline.done(answers.marks)

    def _undelivered(self, reason: str, answers: Answers) -> None:
        self.fail(reason)
        self.pipeline.let_go(len(answers.marks))

    def charge_timeout(self, task_id: str) -> None:
        """A call of the task timed out (the sandbox pool tells): charge its budget, and when that suspends the
        task, say so on task-suspensions (every worker refuses it) and anomaly-signals."""
        suspension = self.budget.charge(task_id) if self.budget is not None else None
        if suspension is not None:
            log.warning("task %s suspended: %s", task_id, suspension.reason)
            self.pipeline.spawn(self._notices.announce(self._producer, suspension))
