"""Emits retention events: reads task-specs, program-artifacts, analytics and the retention-events trail to their true
end, produces tombstones (expired analytics days, unused program versions beyond keep_versions) and RetentionEvents
(those, and the days the deleting topics drop), planned by app/domain/retention.py."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import faust
from aiokafka import ConsumerRecord, TopicPartition

from app.contract.codecs import codec_for
from app.contract.records import DailyStats, RetentionEvent, TaskSpec, utc_now
from app.contract.topics import Topics
from app.domain.daily_stats import StatsKey
from app.domain.daily_windows import DailyWindows
from app.domain.retention import RetentionPlan, expire_analytics, expire_topic_days, expire_versions, protected_versions
from app.kafka.clients import make_consumer, make_producer, partition_for
from app.kafka.metadata import topic_partitions
from app.kafka.tables import ArtifactTable, Table, consume_to_end, read_to_end
from app.settings import Settings

# Runs on a faust timer on the group's leader only. A run that doubles one (two leaders for a moment around a
# rebalance) is harmless: a tombstone written twice deletes the same key, and the next run reads them all back, so it
# plans nothing twice; only events of keys both runs planned at once can repeat.

log = logging.getLogger(__name__)

# The days a deleting topic drops are named in UTC: retention.ms counts milliseconds, not local days.
_TOPIC_DAYS = DailyWindows("UTC")
_READ_TIMEOUT_S = 60.0


@dataclass
class Snapshot:
    """The compacted topics as one run read them, and the partition each key was read from: a tombstone must
    land in the partition of the record it deletes, whatever partitioner wrote that record."""

    tasks: Table[TaskSpec]
    artifacts: ArtifactTable
    analytics: Table[DailyStats]
    partitions: dict[tuple[str, str], int] = field(default_factory=dict)
    last_expired: dict[str, date] = field(default_factory=dict)  # topic -> last day an earlier event named


class RetentionJob:
    """One retention run at a time: plan() reads and decides, write() re-checks the tasks and produces."""

    def __init__(self, settings: Settings, topics: Topics) -> None:
        self._settings = settings
        self._topics = topics
        self._events = codec_for(RetentionEvent, settings, topics.retention_events)

    async def run(self, now: datetime) -> RetentionPlan:
        """Plan and write one run; returns what was written."""
        snapshot, plan = await self.plan(now)
        return await self.write(snapshot, plan)

    async def plan(self, now: datetime) -> tuple[Snapshot, RetentionPlan]:
        """Read the topics to their true end and plan what expires at `now`, past what earlier runs' events say."""
        topics, settings = self._topics, self._settings
        snapshot = Snapshot(Table(topics.task_specs, settings), ArtifactTable(topics.program_artifacts, settings),
                            Table(topics.analytics, settings))
        await self._read(snapshot.partitions, snapshot.tasks, snapshot.artifacts, snapshot.analytics)
        for event in await read_to_end(settings, topics.retention_events, _READ_TIMEOUT_S):
            assert isinstance(event, RetentionEvent)
            if event.key is None and event.date_to is not None:
                day = date.fromisoformat(event.date_to)
                snapshot.last_expired[event.topic] = max(day, snapshot.last_expired.get(event.topic, day))
        plan = RetentionPlan()
        for time_zone, keys in self._analytics_keys(snapshot).items():
            plan.extend(expire_analytics(keys, topics.analytics, DailyWindows(time_zone), settings.retention_days,
                                         now))
        tasks = {task.name: task for task in snapshot.tasks.values()}
        versions = {task_id: snapshot.artifacts.versions_of(task_id)
                    for task_id in {a.task_id for a in snapshot.artifacts.values()}}
        plan.extend(expire_versions(versions, tasks, topics.program_artifacts, settings.keep_versions, now))
        plan.extend(expire_topic_days(topics.all(), _TOPIC_DAYS, now, snapshot.last_expired))
        return snapshot, plan

    async def write(self, snapshot: Snapshot, plan: RetentionPlan) -> RetentionPlan:
        """Produce the plan's tombstones, then its events; a version that became active, canary or shadow since
        the plan read the tasks (read again here, to the end) is left out of both."""
        in_use = await self._versions_in_use_now(snapshot, plan)
        written = RetentionPlan(
            [t for t in plan.tombstones if (t.topic, t.key) not in in_use],
            [e for e in plan.events if (e.topic, e.key) not in in_use],
        )
        producer = make_producer(self._settings)
        await producer.start()
        try:
            acks = [await producer.send(t.topic, None, key=t.key.encode(),
                                        partition=snapshot.partitions[t.topic, t.key]) for t in written.tombstones]
            await asyncio.gather(*acks)  # every tombstone is in before an event says it is
            spec = self._topics.retention_events
            count = len(await topic_partitions(producer, spec.name))
            acks = [await producer.send(spec.name, self._events.encode(e), key=e.topic.encode(),
                                        partition=partition_for(e.topic.encode(), count)) for e in written.events]
            await asyncio.gather(*acks)
        finally:
            await producer.stop()
        return written

    async def _versions_in_use_now(self, snapshot: Snapshot, plan: RetentionPlan) -> set[tuple[str, str]]:
        topic = self._topics.program_artifacts.name
        doomed = [t for t in plan.tombstones if t.topic == topic]
        if not doomed:
            return set()
        tasks: Table[TaskSpec] = Table(self._topics.task_specs, self._settings)
        await self._read({}, tasks)
        in_use = set()
        for tombstone in doomed:
            artifact = snapshot.artifacts.get(tombstone.key)
            task = tasks.get(artifact.task_id) if artifact is not None else None
            if artifact is None or task is None or artifact.version in protected_versions(task):
                log.warning("retention: %s is in use now (or its task is gone); not tombstoned", tombstone.key)
                in_use.add((topic, tombstone.key))
        return in_use

    def _analytics_keys(self, snapshot: Snapshot) -> dict[str, list[StatsKey]]:
        """Analytics keys by the time zone their day is in (each DailyStats names it)."""
        by_zone: dict[str, list[StatsKey]] = defaultdict(list)
        topic = self._topics.analytics.name
        for (name, key) in snapshot.partitions:
            stats = snapshot.analytics.get(key) if name == topic else None
            if stats is None:
                continue
            try:
                by_zone[stats.time_zone].append(StatsKey.parse(key))
            except ValueError as exc:
                log.error("retention: analytics key %r left alone: %s", key, exc)
        return by_zone

    async def _read(self, partitions: dict[tuple[str, str], int], *tables: Table[Any]) -> None:
        """Fill tables from their topics, beginning to true end, noting the partition of each (topic, key)."""
        by_topic = {table.spec.name: table for table in tables}

        def apply(tp: TopicPartition, message: ConsumerRecord[bytes, bytes]) -> None:
            by_topic[tp.topic].apply(message.key, message.value, message.offset)
            if message.key is not None:
                partitions[tp.topic, message.key.decode("utf-8", "replace")] = tp.partition

        consumer = make_consumer(self._settings, fetch_max_wait_ms=100)
        await consumer.start()
        try:
            assigned = [TopicPartition(name, p) for name in by_topic for p in await topic_partitions(consumer, name)]
            consumer.assign(assigned)
            await consumer.seek_to_beginning(*assigned)
            await asyncio.wait_for(consume_to_end(consumer, assigned, apply), _READ_TIMEOUT_S)
        finally:
            await consumer.stop()


class EmitRetentionEvents:
    """The retention job of a worker, on a faust timer that runs on the group's leader only."""

    def __init__(self, app: faust.App, settings: Settings, topics: Topics) -> None:
        self.job = RetentionJob(settings, topics)
        self._worker_id = settings.worker_id
        app.timer(settings.retention_interval_s, on_leader=True, name="emit_retention_events")(self._tick)

    async def _tick(self) -> None:
        try:
            written = await self.job.run(utc_now())
        except Exception:  # one failed run must not stop the worker; the next run plans again from the topics
            log.exception("retention run failed; the next one retries")
            return
        log.info("retention run by worker %s: %d tombstones, %d events", self._worker_id,
                 len(written.tombstones), len(written.events))
