"""The records a request ends as: builds results from sandbox outcomes, and produces a batch's results and
dead letters (each with the request message it answers) to execution-results and dead-letters. Whatever the
cluster refuses for good falls back to a dead letter; when not even that can be sent, Undeliverable is raised."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, TypeAlias

import orjson
from aiokafka import AIOKafkaProducer, ConsumerRecord

from app.codecs import codec_for
from app.delivery import Outbox, Undelivered, deliver
from app.domain.resolution import Runnable
from app.domain.sampling import is_sampled
from app.kafka import partition_for
from app.metadata import topic_partitions
from app.records import DeadLetter, ExecutionRequest, ExecutionResult, execution_id_for, utc_now
from app.sandbox.pool import Outcome
from app.settings import Settings
from app.topics import Topics

Message: TypeAlias = ConsumerRecord[Any, Any]
Tag: TypeAlias = "Message | DeadLetter"  # what an outgoing record stands for: a request's result, or a letter


_RESULT_DEFAULTS: dict[str, Any] = {
    name: info.default for name, info in ExecutionResult.model_fields.items() if not info.is_required()
}


class Undeliverable(Exception):
    """Not even a dead letter could be sent: the request would be lost if its offset were committed."""


def dead_letter_for(message: Message, reason: str, error_type: str, worker_id: str) -> DeadLetter:
    """A dead letter carrying the message's origin and original bytes."""
    return DeadLetter(
        reason=reason, error_type=error_type, source_topic=message.topic,
        source_partition=message.partition, source_offset=message.offset,
        key=message.key, value=message.value, worker_id=worker_id, dead_lettered_at=utc_now(),
    )


def result_fields(
    task_id: str, request_id: str, executed_at: datetime, worker_id: str, **fields: Any
) -> dict[str, Any]:
    """The fields of one ExecutionResult (the codec encodes them without building a model)."""
    result = {**_RESULT_DEFAULTS, "task_id": task_id, "request_id": request_id, "executed_at": executed_at,
              "worker_id": worker_id, **fields}
    if "execution_id" not in fields:
        result["execution_id"] = execution_id_for(task_id, request_id)
    return result


def executed_results(
    pending: Sequence[tuple[ExecutionRequest, Runnable, Message]], outcomes: Sequence[Outcome | Exception],
    executed_at: datetime, worker_id: str, results: list[tuple[dict[str, Any], Message]], letters: list[DeadLetter],
) -> None:
    """Append a result per sandbox outcome, or a dead letter where the sandbox could not run the call."""
    for (request, runnable, message), outcome in zip(pending, outcomes, strict=True):
        if isinstance(outcome, Exception):
            letters.append(dead_letter_for(message, f"the sandbox could not run it: {outcome}",
                                           type(outcome).__name__, worker_id))
            continue
        try:
            execution_id = execution_id_for(request.task_id, request.request_id)
            artifact = runnable.artifact
            results.append(({  # every ExecutionResult field, in .avsc order (see result_fields)
                "execution_id": execution_id, "request_id": request.request_id, "task_id": request.task_id,
                "program_id": artifact.program_id, "version": artifact.version, "status": outcome.status,
                "output": None if outcome.output_json is None else orjson.Fragment(outcome.output_json),
                "error_message": outcome.error, "latency_ms": outcome.latency_ms,
                "memory_usage_mb": outcome.memory_mb,
                "sampled_for_validation": is_sampled(execution_id, runnable.sampling_rate, request.force_validation),
                "executed_at": executed_at, "worker_id": worker_id,
            }, message))
        except Exception as exc:  # a bug must not cost the request: it goes to the dead letters
            letters.append(dead_letter_for(message, f"internal error: {exc}", type(exc).__name__, worker_id))


class OutcomeWriter:
    """Sends results and dead letters; start() learns the partition counts of both topics."""

    def __init__(self, settings: Settings, topics: Topics, producer: AIOKafkaProducer) -> None:
        self._settings = settings
        self._producer = producer
        self._results_topic = topics.execution_results.name
        self._letters_topic = topics.dead_letters.name
        self._results = codec_for(ExecutionResult, settings.wire_format)
        self._letters = codec_for(DeadLetter, settings.wire_format)
        self._partitions: dict[str, int] = {}

    async def start(self) -> None:
        for topic in (self._results_topic, self._letters_topic):
            self._partitions[topic] = len(await topic_partitions(self._producer, topic))

    async def write(self, results: list[tuple[dict[str, Any], Message]], letters: list[DeadLetter]) -> tuple[int, int]:
        """Deliver every result and letter, or its fallback; returns how many results and letters went out.
        Raises Undeliverable if a dead letter was refused even without the request's bytes."""
        outbox = self._encode(results, letters)
        sent_letters = len(letters)
        sent_results = len(outbox) - sent_letters
        undelivered = await deliver(self._producer, outbox, self._settings.delivery_timeout_s)
        while undelivered:
            outbox = Outbox()
            for item in undelivered:
                self._add_letter(outbox, self._fall_back(item))
                if not isinstance(item.tag, DeadLetter):
                    sent_results, sent_letters = sent_results - 1, sent_letters + 1
            undelivered = await deliver(self._producer, outbox, self._settings.delivery_timeout_s)
        return sent_results, sent_letters

    def _encode(self, results: list[tuple[dict[str, Any], Message]], letters: list[DeadLetter]) -> Outbox[Tag]:
        """Results and letters as records, by partition; a result that cannot be encoded is dead-lettered."""
        outbox: Outbox[Tag] = Outbox()
        topic = self._results_topic
        partitions = self._partitions[topic]
        encode = self._results.encode_fields
        for fields, message in results:
            try:
                key = fields["task_id"].encode()
                outbox.add(topic, partition_for(key, partitions), key, encode(fields), message)
            except Exception as exc:  # e.g. a value the wire format cannot carry
                letters.append(dead_letter_for(message, f"result cannot be encoded: {exc}", type(exc).__name__,
                                               self._settings.worker_id))
        for letter in letters:
            self._add_letter(outbox, letter)
        return outbox

    def _add_letter(self, outbox: Outbox[Tag], letter: DeadLetter) -> None:
        topic = self._letters_topic
        outbox.add(topic, letter.source_partition % self._partitions[topic], letter.key,
                   self._letters.encode(letter), letter)

    def _fall_back(self, item: Undelivered[Tag]) -> DeadLetter:
        """What to send instead of a record refused for good: a result becomes a dead letter; a dead letter
        goes again without the request's key and value (its topic, partition and offset still locate it)."""
        if not isinstance(item.tag, DeadLetter):
            return dead_letter_for(item.tag, f"result could not be sent to {item.topic}: {item.reason}",
                                   item.error_type, self._settings.worker_id)
        letter = item.tag
        if letter.key is None and letter.value is None:
            where = f"{letter.source_topic}:{letter.source_partition}:{letter.source_offset}"
            raise Undeliverable(f"the dead letter for {where} could not be sent to {item.topic}: {item.reason}")
        return letter.model_copy(update={
            "key": None, "value": None,
            "reason": f"{letter.reason} [original key and value left out, the letter was refused: {item.reason}]",
        })
