"""State kept per owned partition in a compacted changelog: consumes the changelog's partitions when they are
assigned (from the beginning to their true end), produces one changelog record per change, acknowledged
before the change counts as made."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, Generic, TypeAlias, TypeVar

from aiokafka import ConsumerRecord, TopicPartition

from app.contract.topics import TopicSpec
from app.kafka.clients import make_consumer
from app.kafka.tables import consume_to_end, read_topic
from app.settings import Settings

# It stands in for a faust Table where recovery must be exact: faust reads a changelog up to ListOffsets(latest)
# - 1, and the embedded broker answers ListOffsets with the base offset of the last record batch + 1, so faust
# stops before the last batch's later records (app/kafka/tables.py). This reads to the high watermark of a real
# fetch instead (consume_to_end), right on both brokers.

log = logging.getLogger(__name__)
V = TypeVar("V")
Send: TypeAlias = Callable[[str, bytes, "bytes | None", int], Awaitable[Any]]


class NotOwned(KeyError):
    """The partition is not owned here (any more): another worker serves it."""


class PartitionedState(Generic[V]):
    """Values by key for the partitions this process owns. A value lives in the changelog partition of the
    same number as the source partition it belongs to, so an owner reads back exactly its own."""

    def __init__(self, settings: Settings, spec: TopicSpec, send: Send, decode: Callable[[bytes, bytes], V],
                 encode: Callable[[V], bytes | None], flush: Callable[[], Awaitable[Any]] | None = None) -> None:
        """`send(topic, key, value, partition)` produces a record (the faust app's producer, which lives as long
        as the agents) and waits for its acknowledgement, or, given `flush`, at least hands it to the producer;
        `flush()` then waits for every record handed over, and runs before a partition is read back.
        `decode(key, value)` raises ValueError for bytes it cannot read (logged and skipped); `encode` returns
        None for a value that is no more (a tombstone)."""
        self._settings = settings
        self.spec = spec
        self._decode = decode
        self._encode = encode
        self._values: dict[int, dict[bytes, V]] = {}
        self._ready: dict[int, asyncio.Event] = {}
        self._recoveries: dict[int, asyncio.Task[None]] = {}
        self._send = send
        self._flush = flush
        # Changes whose send returned while their partition was being read back (revoked and assigned again
        # meanwhile): the read-back may have ended before them, so they are applied on top of it.
        self._late: dict[int, dict[bytes, V | None]] = {}
        self.skipped = 0

    def assign(self, partitions: Iterable[int]) -> None:
        """Own exactly these partitions: read the new ones back in the background, forget the others."""
        wanted = set(partitions)
        for partition in set(self._ready) - wanted:
            recovery = self._recoveries.pop(partition, None)
            if recovery is not None:
                recovery.cancel()
            self._ready.pop(partition).set()  # wakes those waiting for it: values_of() tells them it is gone
            self._values.pop(partition, None)
            self._late.pop(partition, None)
        for partition in wanted - set(self._ready):
            self._ready[partition] = asyncio.Event()
            self._recoveries[partition] = asyncio.ensure_future(self._recover(partition))

    def revoke(self, partitions: Iterable[int]) -> None:
        """Stop owning these partitions."""
        self.assign(set(self._ready) - set(partitions))

    async def values_of(self, partition: int) -> dict[bytes, V]:
        """The values of an owned partition, once it has been read back. NotOwned if it is not owned, or stops
        being owned while it is read back."""
        ready = self._ready.get(partition)
        if ready is None:
            raise NotOwned(partition)
        await ready.wait()
        values = self._values.get(partition)
        if values is None or self._ready.get(partition) is not ready:  # revoked meanwhile (maybe assigned again)
            raise NotOwned(partition)
        return values

    def owned(self) -> Iterator[tuple[int, dict[bytes, V]]]:
        """The partitions owned and read back, with their values."""
        for partition, ready in list(self._ready.items()):
            if ready.is_set() and partition in self._values:
                yield partition, self._values[partition]

    def owns(self, partition: int) -> bool:
        """Whether the partition is assigned here (read back or still being read)."""
        return partition in self._ready

    async def put(self, partition: int, key: bytes, value: V) -> None:
        """Record a value (or its end, when encode gives None) in the changelog, then in memory."""
        encoded = self._encode(value)
        await self._send(self.spec.name, key, encoded, partition)
        values = self._values.get(partition)
        if values is None:
            if partition in self._ready:  # assigned again, and being read back: maybe to before this record
                self._late.setdefault(partition, {})[key] = None if encoded is None else value
            return  # else revoked meanwhile: the new owner reads the record back
        if encoded is None:
            values.pop(key, None)
        else:
            values[key] = value

    async def _recover(self, partition: int) -> None:
        values: dict[bytes, V] = {}
        tp = TopicPartition(self.spec.name, partition)

        def skipped(_: ConsumerRecord[bytes, bytes]) -> None:
            self.skipped += 1

        apply = _applier(values, self._decode, skipped)
        consumer = make_consumer(self._settings, fetch_max_wait_ms=100)
        try:
            if self._flush is not None:
                await self._flush()  # changes handed to the producer before now are in the log, to be read back
            await consumer.start()
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            await consume_to_end(consumer, [tp], apply)
        except asyncio.CancelledError:
            raise
        except Exception:  # without its state the partition cannot be served: retry rather than start empty
            log.exception("reading back %s failed; retrying", tp)
            await asyncio.sleep(1)
            if partition in self._ready:
                self._recoveries[partition] = asyncio.ensure_future(self._recover(partition))
            return
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()
        for key, late in self._late.pop(partition, {}).items():
            if late is None:
                values.pop(key, None)
            else:
                values[key] = late
        self._values[partition] = values
        self._ready[partition].set()
        log.info("%s read back: %d keys", tp, len(values))


async def read_state(settings: Settings, spec: TopicSpec, decode: Callable[[bytes, bytes], V],
                     timeout_s: float = 30.0) -> dict[bytes, V]:
    """Every key's latest value in a changelog, all partitions, read to their true end (as the owners see it
    when they take the partitions over). Unreadable values are logged and left out. TimeoutError past timeout_s."""
    values: dict[bytes, V] = {}
    await read_topic(settings, spec, _applier(values, decode, lambda _: None), timeout_s)
    return values


def _applier(values: dict[bytes, V], decode: Callable[[bytes, bytes], V],
             skipped: Callable[[ConsumerRecord[bytes, bytes]], None],
             ) -> Callable[[TopicPartition, ConsumerRecord[bytes, bytes]], None]:
    """Applies changelog records to `values`: a tombstone deletes its key; a record without a key, or one
    `decode` refuses, is logged and handed to `skipped`."""

    def apply(tp: TopicPartition, message: ConsumerRecord[bytes, bytes]) -> None:
        if message.key is None:
            skipped(message)
            return
        if message.value is None:
            values.pop(message.key, None)
            return
        try:
            values[message.key] = decode(message.key, message.value)
        except ValueError as exc:
            log.warning("%s offset %d cannot be read; skipped: %s", tp, message.offset, exc)
            skipped(message)

    return apply
