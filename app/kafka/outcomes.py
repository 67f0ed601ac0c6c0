"""The records a request ends as, on their way out (ResultWriter): its result or dead letter, its validation
request and the daily-stats partials. Whatever the cluster refuses for good falls back to a dead letter; when not
even that can be sent, Undeliverable is raised."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Generic, TypeAlias, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.abc import ConsumerRebalanceListener

from app.contract.codecs import codec_for
from app.contract.records import (
    DeadLetter,
    ExecutionResult,
    StatsPartial,
    ValidationRequest,
    utc_now,
)
from app.contract.topics import Topics
from app.domain.daily_stats import summarise_results, summarise_validations
from app.domain.validation import ValidationFields
from app.kafka.clients import partition_for, stop_clients
from app.kafka.delivery import Outbox, Outgoing, Undelivered, deliver
from app.kafka.metadata import topic_partitions
from app.settings import Settings

log = logging.getLogger(__name__)
Message: TypeAlias = ConsumerRecord[Any, Any]
Fields = TypeVar("Fields", bound=Mapping[str, Any])
Tag: TypeAlias = "Message | DeadLetter"  # what an outgoing record stands for: a request's result, or a letter


class Undeliverable(Exception):
    """Not even a dead letter could be sent: the request would be lost if its offset were committed."""


def dead_letter_for(message: Message, reason: str, error_type: str, worker_id: str) -> DeadLetter:
    """A dead letter carrying the message's origin and original bytes."""
    return DeadLetter(
        reason=reason, error_type=error_type, source_topic=message.topic,
        source_partition=message.partition, source_offset=message.offset,
        key=message.key, value=message.value, worker_id=worker_id, dead_lettered_at=utc_now(),
    )


async def start_answering(consumer: AIOKafkaConsumer, producer: AIOKafkaProducer, settings: Settings, topics: Topics,
                          source: str, listener: ConsumerRebalanceListener) -> ResultWriter:
    """Start the clients of a service that answers a topic's records in batches (the executor, the validators):
    the producer, its ResultWriter (returned), then the consumer of `source`. If one fails to start, both
    clients are stopped."""
    try:
        await producer.start()
        writer = ResultWriter(settings, topics, producer)
        await writer.start()
        consumer.subscribe([source], listener=listener)
        await consumer.start()
    except BaseException:
        await stop_clients(consumer, producer)
        raise
    return writer


# A commit sends one daily-stats partial per task answered since the last, and a partial costs the worker and its
# agents about what a few dozen results cost. With many tasks, each with few results per commit interval, a commit
# may wait (Pipeline's max_commit_interval_s, or until nothing is in flight) until its partials summarise enough.
RESULTS_PER_PARTIAL = 32


class UnsentStats(Generic[Fields]):
    """Records acknowledged since the last commit (results or validations, as field dicts), whose daily-stats
    partials `send` writes before the commit."""

    def __init__(self, send: Callable[[list[Fields]], Awaitable[None]]) -> None:
        self.records: list[Fields] = []
        self._send = send

    def add(self, records: list[Fields]) -> None:
        self.records += records

    def worth_sending(self) -> bool:
        """Whether their partials, one per task, would summarise RESULTS_PER_PARTIAL records each."""
        records = self.records
        return len(records) >= RESULTS_PER_PARTIAL * len({fields["task_id"] for fields in records})

    async def send(self) -> None:
        records, self.records = self.records, []
        await self._send(records)


class ResultWriter:
    """Sends results and dead letters, then the validation requests of sampled executions; start() learns the
    partition counts of the topics."""

    def __init__(self, settings: Settings, topics: Topics, producer: AIOKafkaProducer) -> None:
        self._settings = settings
        self._producer = producer
        self._results_topic = topics.execution_results.name
        self._letters_topic = topics.dead_letters.name
        self._validations_topic = topics.validation_requests.name
        self._validations = codec_for(ValidationRequest, settings, topics.validation_requests)
        self._results = codec_for(ExecutionResult, settings, topics.execution_results)
        self._letters = codec_for(DeadLetter, settings, topics.dead_letters)
        self._partials_topic = topics.stats_partials.name
        self._partials = codec_for(StatsPartial, settings, topics.stats_partials)
        self._windows = settings.daily_windows()
        self._partitions: dict[str, int] = {}

    async def start(self) -> None:
        """Learn the partition count of each topic written (the cluster's, which topics.yaml may not match)."""
        self.validations_dropped = 0
        self.partials_dropped = 0
        for topic in (self._results_topic, self._letters_topic, self._validations_topic, self._partials_topic):
            self._partitions[topic] = len(await topic_partitions(self._producer, topic))

    async def write(self, results: list[tuple[dict[str, Any], Message]],
                    letters: list[DeadLetter]) -> tuple[list[dict[str, Any]], int]:
        """Deliver every result and letter, or its fallback; returns the results that went out (their fields)
        and how many letters did. Raises Undeliverable if a dead letter was refused even without the request's
        bytes."""
        refused: set[int] = set()  # id() of the request messages whose result went out as a dead letter
        outbox = self._encode(results, letters, refused)
        sent_letters = len(letters)
        fallen_back = await self.deliver(outbox)
        refused |= fallen_back
        sent = [fields for fields, message in results if id(message) not in refused] if refused else \
            [fields for fields, _ in results]
        return sent, sent_letters + len(fallen_back)

    async def deliver(self, outbox: Outbox[Tag]) -> set[int]:
        """Deliver answers (each tagged with the request message it answers) and dead letters (tagged with
        themselves); an answer refused for good goes as its request's dead letter instead. Returns the id() of
        the messages whose answer went out as a dead letter. Raises Undeliverable as write() does."""
        refused: set[int] = set()
        undelivered = await deliver(self._producer, outbox, self._settings.delivery_timeout_s)
        while undelivered:
            outbox = Outbox()
            for item in undelivered:
                self.add_letter(outbox, self._fall_back(item))
                if not isinstance(item.tag, DeadLetter):
                    refused.add(id(item.tag))
            undelivered = await deliver(self._producer, outbox, self._settings.delivery_timeout_s)
        return refused

    async def write_stats(self, results: list[dict[str, Any]]) -> None:
        """Send the daily-stats partials of a batch's delivered results, one per task/version/day, keyed by
        task_id (before the batch commits: a batch redelivered after a crash counts twice). A partial that cannot
        be sent is logged and counted, never dead-lettered: it costs statistics, not a request."""
        if results:
            await self.write_partials(summarise_results(results, self._windows))

    async def write_validation_stats(self, validations: list[ValidationFields]) -> None:
        """Send the daily-stats partials of a batch's delivered validations (validated and matched counts), as
        write_stats does for results: the analytics and canary agents count validations from these."""
        if validations:
            await self.write_partials(summarise_validations(validations, self._windows))

    async def write_partials(self, partials: list[StatsPartial]) -> None:
        """Send partials keyed by task_id; one that cannot be sent is logged and counted."""
        outbox: Outbox[str] = Outbox()
        partitions = self._partitions[self._partials_topic]
        for partial in partials:
            key = partial.task_id.encode()
            outbox.add(self._partials_topic, partition_for(key, partitions), key, self._partials.encode(partial),
                       f"{partial.task_id}/{partial.version}/{partial.date}")
        for item in await deliver(self._producer, outbox, self._settings.delivery_timeout_s):
            self.partials_dropped += 1
            log.warning("stats partial of %s dropped: %s", item.tag, item.reason)

    async def write_validations(self, validations: list[dict[str, Any]]) -> None:
        """Send validation requests (before the batch commits, so a redelivered batch sends them again). One
        that cannot be sent is a sample lost, not a request: it is logged and counted, never dead-lettered."""
        if not validations:
            return
        outbox: Outbox[str] = Outbox()
        partitions = self._partitions[self._validations_topic]
        for fields in validations:
            try:
                key = fields["task_id"].encode()
                outbox.add(self._validations_topic, partition_for(key, partitions), key,
                           self._validations.encode_fields(fields), fields["execution_id"])
            except Exception as exc:
                self._drop(fields["execution_id"], f"cannot be encoded: {exc}")
        for item in await deliver(self._producer, outbox, self._settings.delivery_timeout_s):
            self._drop(item.tag, item.reason)

    def _drop(self, execution_id: str, reason: str) -> None:
        self.validations_dropped += 1
        log.warning("validation request of %s dropped: %s", execution_id, reason)

    def _encode(self, results: list[tuple[dict[str, Any], Message]], letters: list[DeadLetter],
                refused: set[int]) -> Outbox[Tag]:
        """Results and letters as records, by partition; a result that cannot be encoded is dead-lettered."""
        outbox: Outbox[Tag] = Outbox()
        topic = self._results_topic
        partitions = self._partitions[topic]
        encode = self._results.encode_fields
        routes: dict[str, tuple[bytes, list[Outgoing[Tag]]]] = {}  # task_id -> its key, its partition's records
        for fields, message in results:
            try:
                task_id = fields["task_id"]
                route = routes.get(task_id)
                if route is None:
                    key = task_id.encode()
                    route = routes[task_id] = (key, outbox.records(topic, partition_for(key, partitions)))
                route[1].append((route[0], encode(fields), message))
            except Exception as exc:  # e.g. a value the wire format cannot carry
                refused.add(id(message))
                letters.append(dead_letter_for(message, f"result cannot be encoded: {exc}", type(exc).__name__,
                                               self._settings.worker_id))
        for letter in letters:
            self.add_letter(outbox, letter)
        return outbox

    def add_letter(self, outbox: Outbox[Tag], letter: DeadLetter) -> None:
        """Add a dead letter, on the dead-letters partition its source partition maps to."""
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
