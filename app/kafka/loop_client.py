"""Client side of the loop: produce execution requests, follow a topic decoded, send requests then wait for what
each ended as (its result, or the dead letter carrying it), and read a task's daily analytics."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from app.contract.codecs import DecodeError, codec_for
from app.contract.records import DailyStats, DeadLetter, ExecutionRequest, ExecutionResult, Record, utc_now
from app.contract.topics import TopicSpec, topics_for
from app.domain.daily_stats import StatsKey
from app.domain.open_windows import OpenWindows
from app.domain.stats_report import by_key
from app.kafka.clients import make_consumer, make_producer, partition_for
from app.kafka.delivery import Outbox, deliver_all
from app.kafka.metadata import topic_partitions
from app.kafka.partitioned_state import read_state
from app.kafka.tables import read_table
from app.settings import Settings

log = logging.getLogger(__name__)


class RequestSender:
    """Produces requests, partitioned by task_id. Use as `async with RequestSender(settings) as sender:`."""

    def __init__(self, settings: Settings) -> None:
        self._spec = topics_for(settings.topic_prefix).execution_requests
        self._codec = codec_for(ExecutionRequest, settings, self._spec)
        self._settings = settings
        self._producer: AIOKafkaProducer
        self._partitions = 0

    async def __aenter__(self) -> RequestSender:
        self._producer = make_producer(self._settings)
        await self._producer.start()
        try:
            self._partitions = len(await topic_partitions(self._producer, self._spec.name))
        except BaseException:
            await self._producer.stop()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._producer.stop()

    async def send(self, requests: Iterable[ExecutionRequest]) -> int:
        """Send requests and wait for the broker's acknowledgement; returns how many."""
        outbox: Outbox[None] = Outbox()
        for request in requests:
            key = request.task_id.encode()
            outbox.add(self._spec.name, partition_for(key, self._partitions), key, self._codec.encode(request), None)
        return await deliver_all(self._producer, outbox, self._settings.delivery_timeout_s)


async def send_requests(settings: Settings, requests: Iterable[ExecutionRequest]) -> int:
    """Send requests with a producer of their own."""
    async with RequestSender(settings) as sender:
        return await sender.send(requests)


async def follow(
    settings: Settings, spec: TopicSpec, from_beginning: bool = True, idle_timeout_s: float | None = None
) -> AsyncIterator[tuple[TopicPartition, int, Record | DecodeError]]:
    """Yield (partition, offset, record) from a topic; undecodable values come as the DecodeError.
    Stops after idle_timeout_s without new records, if given. Raises TopicUnavailable for a missing topic."""
    codec = codec_for(spec.record, settings, spec)
    consumer = make_consumer(settings, auto_offset_reset="earliest" if from_beginning else "latest")
    await consumer.start()
    try:
        # The cluster's partitions, which may differ from topics.yaml for a topic made elsewhere.
        partitions = [TopicPartition(spec.name, p) for p in await topic_partitions(consumer, spec.name)]
        consumer.assign(partitions)
        if from_beginning:
            await consumer.seek_to_beginning(*partitions)
        else:
            await consumer.seek_to_end(*partitions)
        async for tp, message in messages_until_idle(consumer, idle_timeout_s):
            try:
                yield tp, message.offset, codec.decode(message.value)
            except DecodeError as exc:
                yield tp, message.offset, exc
    finally:
        await consumer.stop()


async def messages_until_idle(
    consumer: AIOKafkaConsumer, idle_timeout_s: float | None
) -> AsyncIterator[tuple[TopicPartition, ConsumerRecord[Any, Any]]]:
    """Each message the consumer fetches from where it stands, until idle_timeout_s pass without one (None: never)."""
    idle = 0.0
    while True:
        batches = await consumer.getmany(timeout_ms=200)
        if not batches:
            idle += 0.2
            if idle_timeout_s is not None and idle >= idle_timeout_s:
                return
            continue
        idle = 0.0
        for tp, messages in batches.items():
            for message in messages:
                yield tp, message


async def send_and_wait(
    settings: Settings, requests: list[ExecutionRequest], timeout_s: float
) -> AsyncIterator[ExecutionResult | DeadLetter]:
    """Send requests, then yield what each ended as, in arrival order: its result, or a dead letter carrying its
    bytes. Reading starts at the end of both topics before anything is sent, so nothing is missed. Raises
    TimeoutError naming how many are still unanswered after timeout_s."""
    topics = topics_for(settings.topic_prefix)
    results = codec_for(ExecutionResult, settings, topics.execution_results)
    letters = codec_for(DeadLetter, settings, topics.dead_letters)
    requests_codec = codec_for(ExecutionRequest, settings, topics.execution_requests)
    waiting = {(request.task_id, request.request_id) for request in requests}
    consumer = make_consumer(settings)
    await consumer.start()
    try:
        partitions = [TopicPartition(spec.name, p) for spec in (topics.execution_results, topics.dead_letters)
                      for p in await topic_partitions(consumer, spec.name)]
        consumer.assign(partitions)
        await consumer.seek_to_end(*partitions)
        for tp in partitions:
            await consumer.position(tp)  # the end, fixed now: what arrives after this is read
        await send_requests(settings, requests)
        deadline = time.monotonic() + timeout_s
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(waiting)} of {len(requests)} request(s) unanswered after {timeout_s:g} s")
            for tp, messages in (await consumer.getmany(timeout_ms=int(min(left, 0.2) * 1000))).items():
                for message in messages:
                    ended = ending_of(tp.topic == topics.execution_results.name, message.value, results, letters,
                                    requests_codec)
                    if ended is not None and ended[0] in waiting:
                        waiting.discard(ended[0])
                        yield ended[1]
    finally:
        await consumer.stop()


def ending_of(is_result: bool, value: bytes | None, results: Any, letters: Any,
            requests: Any) -> tuple[tuple[str, str], ExecutionResult | DeadLetter] | None:
    """(task, request id) and the record, when the message is a result or a dead letter of a request."""
    try:
        if is_result:
            result: ExecutionResult = results.decode(value)
            return (result.task_id, result.request_id), result
        letter: DeadLetter = letters.decode(value)
        request: ExecutionRequest = requests.decode(letter.value)
        return (request.task_id, request.request_id), letter
    except DecodeError:
        return None  # another client's record, or a letter that is not a request


async def daily_stats(settings: Settings, task_id: str | None = None) -> dict[StatsKey, DailyStats]:
    """Every day known of a task (of all tasks if None), each once: the closed record from analytics where there
    is one, else the running totals of the open windows (the aggregator's changelog, read to its true end)."""
    topics = topics_for(settings.topic_prefix)
    windows = settings.daily_windows()
    # The changelog holds a record per task per commit of the aggregator (compaction leaves the active segment
    # alone): decoding each one (JSON and sketches) cost the worker's event loop seconds when the dashboard asked
    # every 10 s. Only the latest value of each wanted key is decoded.
    latest = await read_state(settings, topics.daily_windows, lambda key, value: value)
    running = []
    for key, value in latest.items():
        if task_id is not None and key != task_id.encode():
            continue
        try:
            running += OpenWindows.from_json(key.decode(), value, windows).running()
        except ValueError as exc:
            log.warning("%s: the open days of %r cannot be read; left out: %s", topics.daily_windows.name, key, exc)
    closed = [d for d in (await read_table(settings, topics.analytics)).values()
              if isinstance(d, DailyStats) and (task_id is None or d.task_id == task_id)]
    return by_key(closed, running)


def request_from(task_id: str, value: dict[str, Any], **fields: Any) -> ExecutionRequest:
    """A request, with a fresh request_id and stamped now unless fields give them."""
    fields["request_id"] = fields.get("request_id") or str(uuid.uuid4())
    fields.setdefault("requested_at", utc_now())
    return ExecutionRequest(task_id=task_id, input=value, **fields)
