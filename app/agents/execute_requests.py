"""Executes requests: consumes execution-requests in Kafka batches, runs each against its program version in
the sandbox pool, produces exactly one execution-result per request (or a dead letter for undecodable
bytes), and commits a batch's offsets only once everything it produced is acknowledged (at-least-once;
a redelivered request yields the same execution_id).

Batches are pipelined: while one runs in the sandbox, the next is fetched and decoded. Batches complete
(results sent, acks awaited, offsets committed) strictly in the order they were fetched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeAlias

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from app.codecs import DecodeError, codec_for
from app.domain.resolution import InputValidators, Refused, Runnable, resolve
from app.domain.sampling import is_sampled
from app.kafka import BatchSender, make_consumer, make_producer, partition_for
from app.records import DeadLetter, ExecutionRequest, ExecutionResult, ExecutionStatus, execution_id_for, utc_now
from app.sandbox.pool import Call, Outcome, SandboxPool
from app.settings import Settings
from app.tables import TableReader
from app.topics import Topics

log = logging.getLogger(__name__)

Message: TypeAlias = ConsumerRecord[Any, Any]
_RESULT_DEFAULTS: dict[str, Any] = {
    name: info.default for name, info in ExecutionResult.model_fields.items() if not info.is_required()
}


@dataclass(slots=True)
class _Batch:
    """One Kafka batch on its way through: what to send, and the sandbox work still running."""

    offsets: dict[TopicPartition, tuple[int, int]]  # partition -> (first offset, next offset)
    fetched_at: datetime = field(default_factory=utc_now)
    ready: list[dict[str, Any]] = field(default_factory=list)  # result fields known without running
    letters: list[DeadLetter] = field(default_factory=list)
    pending: list[tuple[ExecutionRequest, Runnable]] = field(default_factory=list)
    outcomes: asyncio.Future[list[Outcome]] | None = None


class _DrainOnRevoke(ConsumerRebalanceListener):
    """Before partitions move to another worker, finish (and commit) every batch in flight."""

    def __init__(self, executor: ExecuteRequests) -> None:
        self._executor = executor

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._executor.drain()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("executor assigned %s", sorted(tp.partition for tp in assigned))


class ExecuteRequests:
    """The executor service of a worker. start() joins the executor group; stop() finishes in-flight work."""

    def __init__(self, settings: Settings, topics: Topics, tables: TableReader, pool: SandboxPool) -> None:
        self._settings = settings
        self._topics = topics
        self._tables = tables
        self._pool = pool
        self._requests = codec_for(ExecutionRequest, settings.wire_format)
        self._results = codec_for(ExecutionResult, settings.wire_format)
        self._dead_letters = codec_for(DeadLetter, settings.wire_format)
        self._validators = InputValidators()
        self._producer: AIOKafkaProducer
        self._consumer: AIOKafkaConsumer
        self._partitions: dict[str, int] = {}
        self._inflight: asyncio.Queue[_Batch] = asyncio.Queue(settings.executor_max_inflight_batches)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.executed = 0
        self.dead_lettered = 0

    async def start(self) -> None:
        settings = self._settings
        self._producer = make_producer(settings)
        self._consumer = make_consumer(
            settings, group_id=f"{settings.app_id}-executors", fetch_max_wait_ms=20, **settings.group_args()
        )
        await self._producer.start()
        for spec in (self._topics.execution_results, self._topics.dead_letters):
            self._partitions[spec.name] = len(await self._producer.partitions_for(spec.name))
        self._consumer.subscribe([self._topics.execution_requests.name], listener=_DrainOnRevoke(self))
        await self._consumer.start()
        self._tasks = [asyncio.ensure_future(self._fetch()), asyncio.ensure_future(self._complete())]

    async def stop(self) -> None:
        self._stopping = True
        if self._tasks:
            fetch, complete = self._tasks
            with contextlib.suppress(asyncio.CancelledError):
                await fetch
            try:
                await asyncio.wait_for(self.drain(), timeout=30)
            except TimeoutError:
                log.warning("in-flight batches not finished in 30s; they will be redelivered")
            complete.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await complete
        if hasattr(self, "_consumer"):
            await self._consumer.stop()
        if hasattr(self, "_producer"):
            await self._producer.stop()

    async def drain(self) -> None:
        """Wait until every fetched batch is completed and committed."""
        await self._inflight.join()

    async def _fetch(self) -> None:
        await self._tables.ready.wait()
        while not self._stopping:
            batches = await self._consumer.getmany(timeout_ms=100, max_records=self._settings.executor_batch_size)
            if batches:
                batch = self._prepare(batches)
                if batch.pending:
                    batch.outcomes = asyncio.ensure_future(self._pool.run([
                        Call(q.task_id, r.artifact.program_id, r.artifact.source_code, r.timeout_ms / 1000, q.input)
                        for q, r in batch.pending
                    ]))
                await self._inflight.put(batch)  # waits while too many batches are in flight

    async def _complete(self) -> None:
        while True:
            batch = await self._inflight.get()
            try:
                await self._finish(batch)
            except Exception:
                log.exception("a batch could not be completed; its offsets stay uncommitted")
            finally:
                self._inflight.task_done()

    def _prepare(self, batches: dict[TopicPartition, list[Message]]) -> _Batch:
        batch = _Batch({tp: (messages[0].offset, messages[-1].offset + 1) for tp, messages in batches.items()})
        for messages in batches.values():
            for message in messages:
                try:
                    self._prepare_one(message, batch)
                except Exception as exc:  # a bug must not cost the request: it goes to the dead letters
                    log.exception("request at %s:%d failed", message.topic, message.offset)
                    batch.letters.append(self._dead_letter(message, f"internal error: {exc}", type(exc).__name__))
        return batch

    def _prepare_one(self, message: Message, batch: _Batch) -> None:
        if message.value is None:
            batch.letters.append(self._dead_letter(message, "message has no value", "EmptyMessage"))
            return
        try:
            request = self._requests.decode(message.value)
        except DecodeError as exc:
            fields = self._requests.loose(message.value) or {}
            request_id, task_id = fields.get("request_id"), fields.get("task_id")
            if isinstance(request_id, str) and request_id and isinstance(task_id, str) and task_id:
                # We can name the request, so it gets its one result, saying why it was refused.
                batch.ready.append(self._fields(batch, task_id, request_id, status=ExecutionStatus.REJECTED,
                                                error_message=str(exc)))
            else:
                batch.letters.append(self._dead_letter(message, str(exc), "DecodeError"))
            return
        decision = resolve(request, self._tables.tasks.get, self._tables.artifacts.version,
                           self._validators, self._settings.default_timeout_ms)
        if isinstance(decision, Refused):
            batch.ready.append(self._fields(batch, request.task_id, request.request_id, status=ExecutionStatus.REJECTED,
                                            error_message=decision.message, version=decision.version))
        else:
            batch.pending.append((request, decision))

    async def _finish(self, batch: _Batch) -> None:
        results = batch.ready
        if batch.outcomes is not None:
            outcomes = await batch.outcomes
            executed_at = batch.fetched_at = utc_now()  # results carry when their batch finished executing
            worker_id = self._settings.worker_id
            for (request, runnable), outcome in zip(batch.pending, outcomes, strict=True):
                execution_id = execution_id_for(request.task_id, request.request_id)
                artifact = runnable.artifact
                results.append({  # every ExecutionResult field, in .avsc order (see _fields)
                    "execution_id": execution_id, "request_id": request.request_id, "task_id": request.task_id,
                    "program_id": artifact.program_id, "version": artifact.version, "status": outcome.status,
                    "output": outcome.output, "error_message": outcome.error, "latency_ms": outcome.latency_ms,
                    "memory_usage_mb": outcome.memory_mb,
                    "sampled_for_validation": is_sampled(execution_id, runnable.sampling_rate,
                                                         request.force_validation),
                    "executed_at": executed_at, "worker_id": worker_id,
                })
        encoded = self._encode(results, batch.letters)
        while True:
            try:
                sender = BatchSender(self._producer)
                for topic, partition, key, value in encoded:
                    if not sender.try_add(topic, partition, key, value):
                        await sender.add_after_full(topic, partition, key, value)
                await asyncio.gather(*await sender.flush())
                break
            except KafkaError as exc:
                # Nothing of this batch is committed yet; the same bytes are sent again (same ids).
                log.warning("sending a batch failed (%s); retrying", exc)
                await asyncio.sleep(0.5)
        self.executed += len(results)
        self.dead_lettered += len(batch.letters)
        await self._commit(batch)

    async def _commit(self, batch: _Batch) -> None:
        offsets = {tp: end for tp, (_, end) in batch.offsets.items()}
        try:
            await self._consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            # The partitions moved to another worker, which redoes the batch: duplicates, never losses.
            log.warning("commit failed after a rebalance: %s", exc)

    def _encode(
        self, results: list[dict[str, Any]], letters: list[DeadLetter]
    ) -> list[tuple[str, int, bytes | None, bytes]]:
        out: list[tuple[str, int, bytes | None, bytes]] = []
        topic = self._topics.execution_results.name
        partitions = self._partitions[topic]
        for fields in results:
            key = fields["task_id"].encode()
            out.append((topic, partition_for(key, partitions), key, self._results.encode_fields(fields)))
        dead_topic = self._topics.dead_letters.name
        for letter in letters:
            partition = letter.source_partition % self._partitions[dead_topic]
            out.append((dead_topic, partition, letter.key, self._dead_letters.encode(letter)))
        return out

    def _fields(self, batch: _Batch, task_id: str, request_id: str, **fields: Any) -> dict[str, Any]:
        """The fields of one ExecutionResult (the codec encodes them without building a model)."""
        result = {**_RESULT_DEFAULTS, "task_id": task_id, "request_id": request_id,
                  "executed_at": batch.fetched_at, "worker_id": self._settings.worker_id, **fields}
        if "execution_id" not in fields:
            result["execution_id"] = execution_id_for(task_id, request_id)
        return result

    def _dead_letter(self, message: Message, reason: str, error_type: str) -> DeadLetter:
        return DeadLetter(
            reason=reason, error_type=error_type, source_topic=message.topic,
            source_partition=message.partition, source_offset=message.offset,
            key=message.key, value=message.value, worker_id=self._settings.worker_id,
            dead_lettered_at=utc_now(),
        )
