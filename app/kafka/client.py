"""Client side of the loop: produce execution requests, follow a topic decoded."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition

from app.contract.codecs import DecodeError, codec_for
from app.contract.records import ExecutionRequest, Record, utc_now
from app.contract.topics import TopicSpec, topics_for
from app.kafka.clients import BatchSender, make_consumer, make_producer, partition_for
from app.kafka.metadata import topic_partitions
from app.settings import Settings


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
        sender = BatchSender(self._producer)
        count = 0
        for request in requests:
            key = request.task_id.encode()
            await sender.add(self._spec.name, partition_for(key, self._partitions), key,
                             self._codec.encode(request))
            count += 1
        await asyncio.gather(*await sender.flush())
        return count


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
                    try:
                        yield tp, message.offset, codec.decode(message.value)
                    except DecodeError as exc:
                        yield tp, message.offset, exc
    finally:
        await consumer.stop()


def request_from(task_id: str, value: dict[str, Any], **fields: Any) -> ExecutionRequest:
    """A request, with a fresh request_id and stamped now unless fields give them."""
    fields["request_id"] = fields.get("request_id") or str(uuid.uuid4())
    fields.setdefault("requested_at", utc_now())
    return ExecutionRequest(task_id=task_id, input=value, **fields)
