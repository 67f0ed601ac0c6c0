"""Validates sampled executions: consumes validation-requests in batches, produces one validation per request (a
label oracle compares with the expected output, a shadow oracle runs another version in the sandbox), or forwards
it to oracle-requests for an external oracle, or a dead letter saying why (docs/validation.md)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer, TopicPartition

from app.contract.codecs import DecodeError, codec_for
from app.contract.records import OracleKind, Validation, ValidationRequest, ValidationStatus, utc_now
from app.contract.topics import Topics
from app.domain.resolution import unpinned_timeout_ms
from app.domain.validation import ValidationFields, shadow_version_for, unvalidated, validated
from app.kafka.clients import consumer_failure, make_consumer, make_producer, partition_for, stop_clients
from app.kafka.delivery import Outbox, describe_error
from app.kafka.metadata import topic_partitions
from app.kafka.outcomes import (
    Message,
    ResultWriter,
    Tag,
    Undeliverable,
    UnsentStats,
    dead_letter_for,
    start_answering,
)
from app.kafka.pipeline import Pipeline
from app.kafka.progress import Mark
from app.kafka.tables import TableReader
from app.sandbox.calls import Call
from app.sandbox.pool import SandboxPool
from app.settings import Settings

log = logging.getLogger(__name__)
_BATCH = 1000  # validation requests fetched at most per batch


@dataclass(slots=True)
class _Batch:
    """One fetch's answers: validations and oracle requests (tagged with their request message) and letters."""

    marks: list[Mark]  # the request records it answers
    outbox: Outbox[Tag] = field(default_factory=Outbox)
    shadows: list[tuple[ValidationRequest, int, Call, Message]] = field(default_factory=list)  # (.., version, ..)
    validations: list[tuple[int, ValidationFields]] = field(default_factory=list)  # (id() of its message, ..)
    forwarded: list[int] = field(default_factory=list)  # id() of those forwarded to an external oracle
    letters: int = 0


class ValidateExecutions:
    """The validation service of a worker. start() joins the validators' group; stop() finishes the batches in
    hand. Its `pipeline` tells (`failed`, `failure`) why it had to stop without committing."""

    def __init__(self, settings: Settings, topics: Topics, tables: TableReader, pool: SandboxPool) -> None:
        self._settings = settings
        self._topics = topics
        self._tables = tables
        self._pool = pool
        self._requests = codec_for(ValidationRequest, settings, topics.validation_requests)
        self._oracle_codec = codec_for(ValidationRequest, settings, topics.oracle_requests)
        self._validations = codec_for(Validation, settings, topics.validations)
        self._partitions: dict[str, int] = {}
        self._producer: AIOKafkaProducer
        self._writer: ResultWriter
        # Validations acknowledged since the last commit: their daily-stats partials go out before it.
        self._unsent: UnsentStats[ValidationFields] = UnsentStats(
            lambda validations: self._writer.write_validation_stats(validations))
        self.pipeline = Pipeline(
            "validator", "validation requests", batch_size=_BATCH, max_in_flight=2 * _BATCH,
            commit_interval_s=settings.executor_commit_interval_ms / 1000, before_commit=self._unsent.send,
            failure_of=consumer_failure(topics.validation_requests.name, settings))
        self.validated = 0  # validations produced
        self.forwarded = 0  # requests forwarded to an external oracle
        self.dead_lettered = 0

    async def start(self) -> None:
        """Join the validators' group and start answering validation requests once the tables are read."""
        settings = self._settings
        self._producer = make_producer(settings)
        self.pipeline.consumer = make_consumer(settings, group_id=f"{settings.app_id}-validators",
                                               fetch_max_wait_ms=settings.agent_fetch_max_wait_ms,
                                               **settings.group_args())
        writer = await start_answering(self.pipeline.consumer, self._producer, settings, self._topics,
                                       self._topics.validation_requests.name, self.pipeline.listener)
        partitions = {}
        for spec in (self._topics.validations, self._topics.oracle_requests):  # before the first batch is read
            partitions[spec.name] = len(await topic_partitions(self._producer, spec.name))
        self.answer_with(writer, partitions)
        self.pipeline.start(self._take, self._tables.ready.wait())  # a shadow oracle needs the artifacts

    def answer_with(self, writer: ResultWriter, partitions: dict[str, int]) -> None:
        """Where answers go: the writer (letters, partials) and the partition counts of validations and
        oracle-requests. start() learns them from the cluster; a test may hand in its own."""
        self._writer, self._partitions = writer, partitions

    def fail(self, reason: str) -> None:
        """Stop fetching and committing: from now on nothing is committed."""
        self.pipeline.fail(reason)

    async def stop(self) -> None:
        """Finish and commit the batches in hand (unless failed), then leave the group."""
        await self.pipeline.stop()
        await stop_clients(getattr(self.pipeline, "consumer", None), getattr(self, "_producer", None))

    def _take(self, fetched: dict[TopicPartition, list[Message]]) -> None:
        batch = _Batch(marks=[])
        for tp, messages in fetched.items():
            segment = self.pipeline.track(tp, messages)
            batch.marks += [(segment, index) for index in range(len(messages))]
            for message in messages:
                self._answer(message, batch)
        self.pipeline.spawn(self._finish(batch))

    async def _finish(self, batch: _Batch) -> None:
        """Run the batch's shadow versions, deliver its answers, then count its requests done."""
        try:
            if batch.shadows:
                await self._run_shadows(batch)
            fallen_back = await self._writer.deliver(batch.outbox)  # those answers went as dead letters instead
        except Undeliverable as exc:
            self.fail(str(exc))
            self.pipeline.let_go(len(batch.marks))
            return
        except Exception as exc:  # a bug: stop rather than commit past requests without an answer
            log.exception("validating a batch failed")
            self.fail(f"validating a batch failed ({describe_error(exc)}); it stays uncommitted")
            self.pipeline.let_go(len(batch.marks))
            return
        delivered = [record for key, record in batch.validations if key not in fallen_back]
        self._unsent.add(delivered)
        self.validated += len(delivered)
        self.forwarded += sum(1 for key in batch.forwarded if key not in fallen_back)
        self.dead_lettered += batch.letters + len(fallen_back)
        await self.pipeline.done(batch.marks)

    def _answer(self, message: Message, batch: _Batch) -> None:
        """Adds a message's answer to the batch (a shadow run is only queued, see _run_shadows)."""
        try:
            if message.value is None:
                self._letter(batch, message, "message has no value", "EmptyMessage")
                return
            request = self._requests.decode(message.value)
        except DecodeError as exc:
            self._letter(batch, message, str(exc), "DecodeError")
            return
        try:
            kind = request.oracle.kind
            if kind is OracleKind.EXTERNAL:
                self._add_record(batch, self._topics.oracle_requests.name, request.execution_id,
                          self._oracle_codec.encode(request), message)
                batch.forwarded.append(id(message))
            elif kind is OracleKind.LABEL:
                self._add_validation(batch, validated(request, request.expected_output, utc_now()), message)
            else:
                self._queue_shadow(request, message, batch)
        except Exception as exc:  # one request's failure must not stop the stream
            log.exception("validating %s failed", request.execution_id)
            self._letter(batch, message, f"validation failed: {exc}", type(exc).__name__)

    def _queue_shadow(self, request: ValidationRequest, message: Message, batch: _Batch) -> None:
        """The shadow version runs on the request's input, in the sandbox like any program."""
        task = self._tables.tasks.get(request.task_id)
        version = shadow_version_for(request, task)
        artifact = self._tables.artifacts.version(request.task_id, version) if version is not None else None
        if task is None or version is None or artifact is None:
            failed = unvalidated(request, ValidationStatus.FAILED,
                                 f"no shadow version to compare with (wanted {version})", utc_now())
            self._add_validation(batch, failed, message)
            return
        call = Call(request.task_id, artifact.program_id, artifact.source_code,
                    unpinned_timeout_ms(task, self._settings.default_timeout_ms) / 1000, request.input)
        batch.shadows.append((request, version, call, message))

    async def _run_shadows(self, batch: _Batch) -> None:
        try:
            outcomes = await self._pool.run([call for _, _, call, _ in batch.shadows])
        except Exception as exc:
            log.warning("the sandbox pool failed %d shadow runs: %s", len(batch.shadows), describe_error(exc))
            for _, _, _, message in batch.shadows:
                self._letter(batch, message, f"validation failed: {describe_error(exc)}", type(exc).__name__)
            return
        for (request, version, _, message), outcome in zip(batch.shadows, outcomes, strict=True):
            if outcome.status != "ok":
                record = unvalidated(request, ValidationStatus.FAILED,
                                     f"shadow version {version} ended as {outcome.status}: {outcome.error}", utc_now())
            else:
                record = validated(request, outcome.output, utc_now())
            self._add_validation(batch, record, message)

    def _add_validation(self, batch: _Batch, record: ValidationFields, message: Message) -> None:
        self._add_record(batch, self._topics.validations.name, record["task_id"],
                         self._validations.encode_fields(record), message)
        batch.validations.append((id(message), record))

    def _add_record(self, batch: _Batch, topic: str, key: str, value: bytes, message: Message) -> None:
        encoded = key.encode()
        batch.outbox.add(topic, partition_for(encoded, self._partitions[topic]), encoded, value, message)

    def _letter(self, batch: _Batch, message: Message, reason: str, error_type: str) -> None:
        self._writer.add_letter(batch.outbox, dead_letter_for(message, reason, error_type, self._settings.worker_id))
        batch.letters += 1
