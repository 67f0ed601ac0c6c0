"""Delivery of one batch's records: consumes records grouped by partition, each with a tag, and produces them
as record batches, awaiting every acknowledgement. Returns the records the cluster would not take, with why."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    CorruptRecordException,
    InvalidTimestampError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    UnknownError,
)

# Retriable errors are retried with backoff until a deadline. A batch refused for a reason that may concern
# one record (too large, invalid) is split in halves until the records at fault stand alone; a refusal that
# concerns the whole topic (authorization) fails every record of the batch at once.

log = logging.getLogger(__name__)

T = TypeVar("T")
Slot = tuple[str, int]  # (topic, partition)
Outgoing = tuple[bytes | None, bytes, T]  # (key, value, tag)

# Refusals that may concern a single record of a batch (Kafka answers INVALID_RECORD with a code aiokafka
# does not know, hence UnknownError).
_RECORD_ERRORS = (MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError, CorruptRecordException,
                  InvalidTimestampError, UnknownError)
_FIRST_BACKOFF_S = 0.2
_MAX_BACKOFF_S = 5.0


@dataclass(frozen=True, slots=True)
class Undelivered(Generic[T]):
    """A record the cluster would not take."""

    topic: str
    partition: int
    tag: T
    reason: str  # "<ErrorType>: <message>"
    error_type: str


class Outbox(Generic[T]):
    """Records to deliver, grouped by partition in the order they were added."""

    __slots__ = ("slots",)

    def __init__(self) -> None:
        self.slots: dict[Slot, list[Outgoing[T]]] = {}

    def add(self, topic: str, partition: int, key: bytes | None, value: bytes, tag: T) -> None:
        """Add a record for a partition; `tag` comes back with its outcome."""
        self.records(topic, partition).append((key, value, tag))

    def records(self, topic: str, partition: int) -> list[Outgoing[T]]:
        """The records for one partition, to append to (in order) directly."""
        slot = (topic, partition)
        records = self.slots.get(slot)
        if records is None:
            records = self.slots[slot] = []
        return records

    def __len__(self) -> int:
        return sum(len(records) for records in self.slots.values())


async def deliver(producer: AIOKafkaProducer, outbox: Outbox[T], timeout_s: float) -> list[Undelivered[T]]:
    """Produce every record of the outbox; returns those that could not be delivered within timeout_s."""
    deadline = time.monotonic() + timeout_s
    backoff = _FIRST_BACKOFF_S
    chunks: list[tuple[Slot, list[Outgoing[T]]]] = list(outbox.slots.items())
    undelivered: list[Undelivered[T]] = []
    while chunks:
        retry: list[tuple[Slot, list[Outgoing[T]]]] = []
        last_error: BaseException | None = None
        next_chunks: list[tuple[Slot, list[Outgoing[T]]]] = []
        for slot, records, error in await _send(producer, chunks):
            if error is None:
                continue
            if isinstance(error, KafkaError) and error.retriable:
                retry.append((slot, records))
                last_error = error
            elif len(records) > 1 and isinstance(error, _RECORD_ERRORS):
                half = len(records) // 2
                next_chunks += [(slot, records[:half]), (slot, records[half:])]
            else:
                undelivered += _refused(slot, records, describe_error(error), type(error).__name__)
        if retry:
            if time.monotonic() + backoff > deadline:
                reason = f"still failing after {timeout_s:g} s of retries: {describe_error(last_error)}"
                for slot, records in retry:
                    undelivered += _refused(slot, records, reason, type(last_error).__name__)
            else:
                log.warning("%d record batch(es) not acknowledged (%s); retrying in %.1f s",
                            len(retry), describe_error(last_error), backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
                next_chunks += retry
        chunks = next_chunks
    return undelivered


async def _send(
    producer: AIOKafkaProducer, chunks: list[tuple[Slot, list[Outgoing[T]]]]
) -> list[tuple[Slot, list[Outgoing[T]], BaseException | None]]:
    """Ship each chunk as one or more record batches; the error of each shipped part (None if acknowledged)."""
    shipped: list[tuple[Slot, list[Outgoing[T]], Any]] = []
    for slot, records in chunks:
        batch = producer.create_batch()
        start = 0
        for index, (key, value, _) in enumerate(records):
            if batch.append(key=key, value=value, timestamp=None) is None:  # full: ship it, start another
                shipped.append((slot, records[start:index], await _ship(producer, slot, batch)))
                batch = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)  # a record always fits an empty batch
                start = index
        shipped.append((slot, records[start:], await _ship(producer, slot, batch)))
    acks = await asyncio.gather(*(ack for _, _, ack in shipped), return_exceptions=True)
    return [(slot, records, ack if isinstance(ack, BaseException) else None)
            for (slot, records, _), ack in zip(shipped, acks, strict=True)]


async def _ship(producer: AIOKafkaProducer, slot: Slot, batch: Any) -> asyncio.Future[Any]:
    """send_batch, with an error raised while handing the batch over turned into a failed acknowledgement."""
    batch.close()
    try:
        ack: asyncio.Future[Any] = await producer.send_batch(batch, slot[0], partition=slot[1])
    except Exception as exc:  # e.g. metadata or buffer timeouts: classified with the broker's answers
        ack = asyncio.get_running_loop().create_future()
        ack.set_exception(exc)
    return ack


class DeliveryFailed(KafkaError):
    """Records a producer with no dead letters to fall back on could not deliver."""


async def deliver_all(producer: AIOKafkaProducer, outbox: Outbox[T], timeout_s: float) -> int:
    """Produce every record of the outbox, or raise DeliveryFailed naming the first refusal; how many."""
    undelivered = await deliver(producer, outbox, timeout_s)
    if undelivered:
        first = undelivered[0]
        raise DeliveryFailed(f"{len(undelivered)} of {len(outbox)} record(s) not delivered; {first.topic} "
                             f"partition {first.partition}: {first.reason}")
    return len(outbox)


def _refused(slot: Slot, records: list[Outgoing[T]], reason: str, error_type: str) -> list[Undelivered[T]]:
    return [Undelivered(slot[0], slot[1], tag, reason, error_type) for _, _, tag in records]


def describe_error(error: BaseException | None) -> str:
    """"MessageSizeTooLargeError: The server has a configurable maximum message size…" and the like."""
    name = type(error).__name__
    detail = str(error).removeprefix(f"[Error {getattr(error, 'errno', '')}] ").removeprefix(name).lstrip(": ")
    detail = detail or getattr(error, "description", "")
    return f"{name}: {detail}" if detail else name
