"""Tables materialised from compacted topics (task specs, program artifacts, task suspensions), read by every worker."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from app.contract.codecs import Codec, DecodeError, codec_for
from app.contract.records import ProgramArtifact, Record, TaskSpec, TaskSuspension
from app.contract.records import artifact_key as artifact_key  # its home is records; importers here keep working
from app.contract.topics import TopicSpec, topics_for
from app.kafka.clients import cancel_and_wait, make_consumer
from app.kafka.metadata import topic_partitions
from app.settings import Settings

# Reads each topic from the beginning to its true end, then follows it live. The true end is the high
# watermark of a real fetch: the embedded broker's ListOffsets(latest) under-reports it (base offset of the
# last record batch + 1), which is also why faust table recovery comes back stale on it.

log = logging.getLogger(__name__)
R = TypeVar("R", bound=Record)


class Table(Generic[R]):
    """The latest record per key of one compacted topic; a null value (tombstone) deletes the key."""

    def __init__(self, spec: TopicSpec, settings: Settings) -> None:
        self.spec = spec
        # The spec's record type is R by construction (Table[TaskSpec] on the task-specs topic).
        self._codec: Codec[R] = codec_for(spec.record, settings, spec)  # type: ignore[arg-type]
        self._rows: dict[str, R] = {}
        self.skipped = 0
        self.on_record: Callable[[R], None] | None = None  # told of every record applied (not of tombstones)

    def apply(self, key: bytes | None, value: bytes | None, offset: int) -> None:
        """Apply one record of the topic: a value replaces its key's row, a tombstone removes it."""
        if key is None:
            self.skipped += 1
            log.error("%s offset %d has no key; skipped", self.spec.name, offset)
            return
        name = key.decode("utf-8", "replace")
        if value is None:
            self._forget(name)
            return
        try:
            record = self._codec.decode(value)
        except DecodeError as exc:
            # Every worker reads this topic, so a dead letter per worker would repeat it; log instead.
            self.skipped += 1
            log.error("%s offset %d key %s cannot be decoded; skipped: %s", self.spec.name, offset, name, exc)
            return
        self._remember(name, record)
        if self.on_record is not None:
            try:
                self.on_record(record)
            except Exception:  # a listener's bug must not stop the table from following its topic
                log.exception("%s offset %d key %s: the listener failed", self.spec.name, offset, name)

    def _remember(self, key: str, record: R) -> None:
        self._rows[key] = record

    def _forget(self, key: str) -> None:
        self._rows.pop(key, None)

    def get(self, key: str) -> R | None:
        return self._rows.get(key)

    def __len__(self) -> int:
        return len(self._rows)

    def values(self) -> Iterator[R]:
        """The rows as they are now (a copy: records may be applied meanwhile)."""
        return iter(list(self._rows.values()))


class ArtifactTable(Table[ProgramArtifact]):
    """Program artifacts, also indexed by task: versions_of(task) without scanning the table."""

    def __init__(self, spec: TopicSpec, settings: Settings) -> None:
        super().__init__(spec, settings)
        self._by_task: dict[str, dict[int, ProgramArtifact]] = {}

    def _remember(self, key: str, record: ProgramArtifact) -> None:
        super()._remember(key, record)
        self._by_task.setdefault(record.task_id, {})[record.version] = record

    def _forget(self, key: str) -> None:
        record = self.get(key)
        super()._forget(key)
        if record is not None:
            self._by_task.get(record.task_id, {}).pop(record.version, None)

    def version(self, task_id: str, version: int) -> ProgramArtifact | None:
        return self._by_task.get(task_id, {}).get(version)

    def versions_of(self, task_id: str) -> dict[int, ProgramArtifact]:
        return dict(self._by_task.get(task_id, {}))


class SuspensionTable(Table[TaskSuspension]):
    """Task suspensions: the latest record per task by the time it was made (updated_at), not by its offset. A
    worker's suspension may reach the topic after an operator's later resume; it must not suspend the task again
    in the views, as it does not in the workers' budgets (app/domain/task_budget.py decides the same way)."""

    def _remember(self, key: str, record: TaskSuspension) -> None:
        current = self.get(key)
        if current is None or record.updated_at >= current.updated_at:
            super()._remember(key, record)


class TableReader:
    """One consumer (no group, every partition assigned) feeding the task, artifact and suspension tables.

    `on_suspension` (settable until start()) is told of every TaskSuspension applied, in topic order: during the
    catch-up too, so a worker's timeout budget learns the suspensions in force before it serves."""

    def __init__(self, settings: Settings, tasks_spec: TopicSpec, artifacts_spec: TopicSpec,
                 suspensions_spec: TopicSpec | None = None,
                 on_suspension: Callable[[TaskSuspension], None] | None = None) -> None:
        self._settings = settings
        self.tasks: Table[TaskSpec] = Table(tasks_spec, settings)
        self.artifacts = ArtifactTable(artifacts_spec, settings)
        if suspensions_spec is None:
            suspensions_spec = topics_for(settings.topic_prefix).task_suspensions
        self.suspensions = SuspensionTable(suspensions_spec, settings)
        self.suspensions.on_record = on_suspension
        self._tables: dict[str, Table[TaskSpec] | ArtifactTable | SuspensionTable] = {
            tasks_spec.name: self.tasks,
            artifacts_spec.name: self.artifacts,
            suspensions_spec.name: self.suspensions,
        }
        self._consumer: AIOKafkaConsumer | None = None
        self._follower: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    async def start(self, timeout_s: float = 60.0) -> None:
        """Read every table to its true end (follow() then keeps them current). Raises TopicUnavailable."""
        self._consumer = make_consumer(self._settings, fetch_max_wait_ms=100)
        await self._consumer.start()
        try:
            partitions = [
                TopicPartition(name, p) for name in self._tables for p in await topic_partitions(self._consumer, name)
            ]
            self._consumer.assign(partitions)
            await self._consumer.seek_to_beginning(*partitions)
            await asyncio.wait_for(self._catch_up(partitions), timeout_s)
        except BaseException:
            await self.stop()
            raise
        self.ready.set()
        log.info("tables ready: %d tasks, %d artifacts, %d suspension records", len(self.tasks), len(self.artifacts),
                 len(self.suspensions))

    @property
    def on_suspension(self) -> Callable[[TaskSuspension], None] | None:
        """Told of every suspension record applied (the worker's task budget listens)."""
        return self.suspensions.on_record

    @on_suspension.setter
    def on_suspension(self, listener: Callable[[TaskSuspension], None] | None) -> None:
        self.suspensions.on_record = listener

    def follow(self) -> None:
        """Keep applying new records in the background (a live artifact switch lands here)."""
        self._follower = asyncio.ensure_future(self._follow())

    async def stop(self) -> None:
        await cancel_and_wait(self._follower)
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def _catch_up(self, partitions: list[TopicPartition]) -> None:
        assert self._consumer is not None
        await consume_to_end(self._consumer, partitions, self._apply)

    async def _follow(self) -> None:
        while True:
            try:
                await self._poll(timeout_ms=500)
            except KafkaError as exc:
                log.warning("table reader: %s; retrying", exc)
                await asyncio.sleep(0.5)

    async def _poll(self, timeout_ms: int) -> None:
        assert self._consumer is not None
        for tp, messages in (await self._consumer.getmany(timeout_ms=timeout_ms)).items():
            for message in messages:
                self._apply(tp, message)

    def _apply(self, tp: TopicPartition, message: ConsumerRecord[bytes, bytes]) -> None:
        self._tables[tp.topic].apply(message.key, message.value, message.offset)


async def consume_to_end(
    consumer: AIOKafkaConsumer,
    partitions: list[TopicPartition],
    handle: Callable[[TopicPartition, ConsumerRecord[bytes, bytes]], None],
) -> None:
    """Hands every message of the assigned partitions to handle until each position reaches its true end."""
    while True:
        for tp, messages in (await consumer.getmany(timeout_ms=100)).items():
            for message in messages:
                handle(tp, message)
        if await _at_end(consumer, partitions):
            return


async def _at_end(consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> bool:
    for tp in partitions:
        highwater = consumer.highwater(tp)
        if highwater is None or await consumer.position(tp) < highwater:
            return False
    return True


async def read_topic(settings: Settings, spec: TopicSpec,
                     handle: Callable[[TopicPartition, ConsumerRecord[bytes, bytes]], None],
                     timeout_s: float = 30.0) -> list[TopicPartition]:
    """Hands every message of a topic, all partitions from the beginning to their true end, to handle; returns
    the partitions. Raises TimeoutError past timeout_s."""
    consumer = make_consumer(settings, fetch_max_wait_ms=100)
    await consumer.start()
    try:
        partitions = [TopicPartition(spec.name, p) for p in await topic_partitions(consumer, spec.name)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        try:
            await asyncio.wait_for(consume_to_end(consumer, partitions, handle), timeout_s)
        except TimeoutError:
            raise TimeoutError(f"could not read {spec.name} to its end within {timeout_s:g} s") from None
        return partitions
    finally:
        await consumer.stop()


async def read_table(settings: Settings, spec: TopicSpec, timeout_s: float = 30.0) -> Table[Record]:
    """A compacted topic read to its true end as a Table: the latest record per key, tombstoned keys gone."""
    table: Table[Record] = Table(spec, settings)
    await read_topic(settings, spec, lambda _, message: table.apply(message.key, message.value, message.offset),
                     timeout_s)
    return table


async def read_to_end(settings: Settings, spec: TopicSpec, timeout_s: float = 30.0) -> list[Record]:
    """Every decodable record of a topic, from the beginning to its true end, in partition order; tombstones
    and undecodable values are left out (the latter logged). Raises TimeoutError past timeout_s."""
    codec = codec_for(spec.record, settings, spec)
    records: dict[TopicPartition, list[Record]] = defaultdict(list)

    def keep(tp: TopicPartition, message: ConsumerRecord[bytes, bytes]) -> None:
        if message.value is None:
            return
        try:
            records[tp].append(codec.decode(message.value))
        except DecodeError as exc:
            log.warning("%s offset %d skipped: %s", tp, message.offset, exc)

    partitions = await read_topic(settings, spec, keep, timeout_s)
    return [record for tp in partitions for record in records[tp]]
