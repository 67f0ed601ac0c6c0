"""Executes requests: consumes execution-requests in Kafka batches, runs each against its program version in
the sandbox pool, produces exactly one execution-result per request (or a dead letter for undecodable
bytes), and commits a batch's offsets only once everything it produced is acknowledged (at-least-once;
a redelivered request yields the same execution_id).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from app.codecs import DecodeError, codec_for
from app.domain.resolution import InputValidators, Refused, Runnable, resolve
from app.domain.sampling import is_sampled
from app.kafka import BatchSender, make_consumer, make_producer, partition_for
from app.records import (
    DeadLetter,
    ExecutionRequest,
    ExecutionResult,
    ExecutionStatus,
    execution_id_for,
    utc_now,
)
from app.sandbox.pool import Call, SandboxPool
from app.settings import Settings
from app.tables import TableReader
from app.topics import Topics

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Pending:
    request: ExecutionRequest
    runnable: Runnable


class ExecuteRequests:
    """The executor service of a worker. start() joins the executor group; stop() finishes the batch."""

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
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.executed = 0
        self.dead_lettered = 0

    async def start(self) -> None:
        settings = self._settings
        self._producer = make_producer(settings)
        self._consumer = make_consumer(
            settings,
            self._topics.execution_requests.name,
            group_id=f"{settings.app_id}-executors",
            fetch_max_wait_ms=50,
            **settings.group_args(),
        )
        await self._producer.start()
        for spec in (self._topics.execution_results, self._topics.dead_letters):
            self._partitions[spec.name] = len(await self._producer.partitions_for(spec.name))
        await self._consumer.start()
        self._task = asyncio.ensure_future(self._consume())

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=30)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        await self._consumer.stop()
        await self._producer.stop()

    async def _consume(self) -> None:
        await self._tables.ready.wait()
        while not self._stopping:
            batches = await self._consumer.getmany(
                timeout_ms=200, max_records=self._settings.executor_batch_size
            )
            if not batches:
                continue
            try:
                await self.process(batches)
            except KafkaError as exc:
                # Nothing of this batch is committed: rewind and do it again (same execution ids).
                log.warning("batch failed (%s); retrying it", exc)
                for tp, messages in batches.items():
                    self._consumer.seek(tp, messages[0].offset)
                await asyncio.sleep(0.5)

    async def process(self, batches: dict[TopicPartition, list[ConsumerRecord[Any, Any]]]) -> None:
        """One Kafka batch: decode, resolve, run, produce, wait for acks, commit."""
        sender = BatchSender(self._producer)
        pending: list[_Pending] = []
        for messages in batches.values():
            for message in messages:
                try:
                    prepared = self._prepare(message)
                except Exception as exc:  # a bug must not cost the request: it goes to the dead letters
                    log.exception("request at %s:%d failed", message.topic, message.offset)
                    prepared = self._dead_letter(message, f"internal error: {exc}", type(exc).__name__)
                if isinstance(prepared, _Pending):
                    pending.append(prepared)
                elif isinstance(prepared, ExecutionResult):
                    await self._send_result(sender, prepared)
                else:
                    await self._send_dead_letter(sender, prepared)
        await self._run(pending, sender)
        await asyncio.gather(*await sender.flush())
        offsets = {tp: messages[-1].offset + 1 for tp, messages in batches.items()}
        try:
            await self._consumer.commit(offsets)
        except CommitFailedError as exc:
            # The partitions moved to another worker, which redoes the batch: duplicates, never losses.
            log.warning("commit failed after a rebalance: %s", exc)

    def _prepare(self, message: ConsumerRecord[Any, Any]) -> _Pending | ExecutionResult | DeadLetter:
        if message.value is None:
            return self._dead_letter(message, "message has no value", "EmptyMessage")
        try:
            request = self._requests.decode(message.value)
        except DecodeError as exc:
            return self._reject_undecodable(message, exc)
        tables = self._tables
        decision = resolve(
            request,
            tables.tasks.get,
            tables.artifacts.version,
            self._validators,
            self._settings.default_timeout_ms,
        )
        if isinstance(decision, Refused):
            return self._result(request.task_id, request.request_id, ExecutionStatus.REJECTED,
                                error_message=decision.message, version=decision.version)
        return _Pending(request, decision)

    def _reject_undecodable(self, message: ConsumerRecord[Any, Any], exc: DecodeError) -> ExecutionResult | DeadLetter:
        """A request we can name (request_id and task_id readable) gets a rejected result; else a dead letter."""
        fields = self._requests.loose(message.value)
        if fields is not None:
            request_id, task_id = fields.get("request_id"), fields.get("task_id")
            if isinstance(request_id, str) and request_id and isinstance(task_id, str) and task_id:
                return self._result(task_id, request_id, ExecutionStatus.REJECTED, error_message=str(exc))
        return self._dead_letter(message, str(exc), "DecodeError")

    async def _run(self, pending: list[_Pending], sender: BatchSender) -> None:
        calls = [
            Call(p.runnable.artifact.program_id, p.runnable.artifact.source_code,
                 p.runnable.timeout_ms / 1000, p.request.input)
            for p in pending
        ]
        outcomes = await self._pool.run(calls)
        for item, outcome in zip(pending, outcomes, strict=True):
            request, artifact = item.request, item.runnable.artifact
            execution_id = execution_id_for(request.task_id, request.request_id)
            result = self._result(
                request.task_id, request.request_id, ExecutionStatus(outcome.status),
                execution_id=execution_id,
                program_id=artifact.program_id,
                version=artifact.version,
                output=outcome.output,
                error_message=outcome.error,
                latency_ms=outcome.latency_ms,
                memory_usage_mb=outcome.memory_mb,
                sampled_for_validation=is_sampled(
                    execution_id, item.runnable.sampling_rate, request.force_validation
                ),
            )
            await self._send_result(sender, result)

    def _result(self, task_id: str, request_id: str, status: ExecutionStatus, **fields: Any) -> ExecutionResult:
        fields.setdefault("execution_id", execution_id_for(task_id, request_id))
        return ExecutionResult.model_construct(
            task_id=task_id, request_id=request_id, status=status, executed_at=utc_now(),
            worker_id=self._settings.worker_id, **{**_RESULT_DEFAULTS, **fields},
        )

    def _dead_letter(self, message: ConsumerRecord[Any, Any], reason: str, error_type: str) -> DeadLetter:
        return DeadLetter(
            reason=reason, error_type=error_type, source_topic=message.topic,
            source_partition=message.partition, source_offset=message.offset,
            key=message.key, value=message.value, worker_id=self._settings.worker_id,
            dead_lettered_at=utc_now(),
        )

    async def _send_result(self, sender: BatchSender, result: ExecutionResult) -> None:
        topic = self._topics.execution_results.name
        key = result.task_id.encode()
        await sender.add(topic, partition_for(key, self._partitions[topic]), key, self._results.encode(result))
        self.executed += 1

    async def _send_dead_letter(self, sender: BatchSender, letter: DeadLetter) -> None:
        topic = self._topics.dead_letters.name
        partition = letter.source_partition % self._partitions[topic]
        await sender.add(topic, partition, letter.key, self._dead_letters.encode(letter))
        self.dead_lettered += 1


_RESULT_DEFAULTS: dict[str, Any] = {
    name: field.default for name, field in ExecutionResult.model_fields.items() if not field.is_required()
}
