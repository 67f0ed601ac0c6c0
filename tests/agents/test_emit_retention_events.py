"""The retention job end to end on the embedded broker: it stores but does not enforce compaction, so the tests
assert on the tombstones and events written and on what tables rebuilt from the topics hold."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta

from aiokafka import TopicPartition

from app.agents.emit_retention_events import RetentionJob
from app.contract.codecs import codec_for
from app.contract.records import DailyStats, RetentionEvent, TaskSpec, utc_now
from app.contract.topics import Topics, topics_for
from app.control.plane import ControlPlane
from app.domain.daily_stats import StatsKey, WindowStats
from app.domain.daily_windows import DailyWindows
from app.kafka.clients import apply_topics, make_consumer, make_producer, partition_for
from app.kafka.metadata import topic_partitions
from app.kafka.tables import Table, TableReader, consume_to_end, read_to_end
from app.settings import Settings
from devtools.broker import EmbeddedBroker
from tests.conftest import WorkerProcess, collect, make_settings, wait_for_text

SOURCE = 'def run(input):\n    return "ham"\n'


async def prepared(broker: EmbeddedBroker, **overrides: object) -> tuple[Settings, Topics]:
    settings = make_settings(broker, retention_days=30, keep_versions=1, **overrides)
    await apply_topics(settings, topics_for(settings.topic_prefix))
    return settings, topics_for(settings.topic_prefix)


async def seed_versions(settings: Settings, versions: int, active: int, canary: int | None = None) -> None:
    """Task "spam" with versions 1..versions published, `active` active and `canary` on canary."""
    async with ControlPlane(settings) as control:
        await control.put_task(TaskSpec(name="spam", updated_at=utc_now()))
        for _ in range(versions):
            await control.publish("spam", SOURCE)
        await control.activate("spam", active)
        if canary is not None:
            await control.start_canary("spam", canary, 10)


async def seed_analytics(settings: Settings, days_ago: dict[str, list[int]], now: datetime) -> dict[str, int]:
    """DailyStats of a task per time zone (all versions and version 1), dated the given days before now's local
    day there, each record stamped with its day; returns their keys and ages in days."""
    spec = topics_for(settings.topic_prefix).analytics
    codec = codec_for(DailyStats, settings, spec)
    producer = make_producer(settings)
    await producer.start()
    keys = {}
    try:
        count = len(await topic_partitions(producer, spec.name))
        for zone, ages in days_ago.items():
            windows = DailyWindows(zone)
            for age in ages:
                day = windows.today(now - timedelta(days=age))
                stats = WindowStats()
                stats.add("ok", 3.0, sampled=False)
                for version in (None, 1):
                    key = StatsKey(f"spam-{zone.lower().replace('/', '-')}", version, day.date)
                    await producer.send_and_wait(
                        spec.name, codec.encode(stats.to_daily_stats(key, windows, closed_at=day.end)),
                        key=key.encode().encode(), partition=partition_for(key.task_id.encode(), count),
                        timestamp_ms=int(day.end.timestamp() * 1000))
                    keys[key.encode()] = age
    finally:
        await producer.stop()
    return keys


async def artifact_versions(settings: Settings, task_id: str) -> set[int]:
    """The versions a table rebuilt from program-artifacts holds."""
    topics = topics_for(settings.topic_prefix)
    reader = TableReader(settings, topics.task_specs, topics.program_artifacts)
    await reader.start()
    await reader.stop()
    return set(reader.artifacts.versions_of(task_id))


async def analytics_table(settings: Settings) -> Table[DailyStats]:
    """A table rebuilt from the analytics topic (tombstones delete their keys)."""
    table: Table[DailyStats] = Table(topics_for(settings.topic_prefix).analytics, settings)
    consumer = make_consumer(settings, fetch_max_wait_ms=100)
    await consumer.start()
    try:
        partitions = [TopicPartition(table.spec.name, p) for p in await topic_partitions(consumer, table.spec.name)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        await consume_to_end(consumer, partitions, lambda tp, m: table.apply(m.key, m.value, m.offset))
    finally:
        await consumer.stop()
    return table


async def raw_partitions(settings: Settings, topic: str) -> dict[str, set[int]]:
    """Each key of a topic and the partitions its records (tombstones included) are in."""
    seen: dict[str, set[int]] = {}
    consumer = make_consumer(settings, fetch_max_wait_ms=100)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in await topic_partitions(consumer, topic)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        await consume_to_end(consumer, partitions,
                             lambda tp, m: seen.setdefault(m.key.decode(), set()).add(tp.partition))
    finally:
        await consumer.stop()
    return seen


async def events_of(settings: Settings) -> list[RetentionEvent]:
    records = await read_to_end(settings, topics_for(settings.topic_prefix).retention_events)
    return [r for r in records if isinstance(r, RetentionEvent)]


async def test_a_run_tombstones_what_expired_and_says_so(broker: EmbeddedBroker) -> None:
    settings, topics = await prepared(broker)
    # Noon UTC: already tomorrow at UTC+14, so a day there is judged in its own zone or the test sees it.
    now = utc_now().replace(hour=12, minute=0, second=0, microsecond=0)
    # spam: active 4, canary 2; unused 1, 3, 5, 6: keep_versions=1 keeps 6, so 1, 3 and 5 go.
    await seed_versions(settings, versions=6, active=4, canary=2)
    # Retention 30 days: days 31 and 40 days back expire, days 30 and 1 back stay (in the zone of each record).
    keys = await seed_analytics(settings, {"UTC": [40, 31, 30, 1], "Pacific/Kiritimati": [31, 29]}, now)

    written = await RetentionJob(settings, topics).run(now)

    expired = {k for k, age in keys.items() if age > 30}
    artifacts = {f"spam/{v}" for v in (1, 3, 5)}
    assert {(t.topic, t.key) for t in written.tombstones} == (
        {(topics.analytics.name, k) for k in expired} | {(topics.program_artifacts.name, k) for k in artifacts})
    events = await events_of(settings)
    assert Counter((e.topic, e.key) for e in events if e.key is not None) == Counter(
        {(t.topic, t.key): 1 for t in written.tombstones})
    assert all("retention_days=30" in e.reason for e in events if e.topic == topics.analytics.name)
    assert all("in use: 2, 4" in e.reason for e in events if e.topic == topics.program_artifacts.name)
    # The deleting topics: one event each naming the days their retention.ms has dropped.
    dropping = {s.name for s in topics.all() if not s.compacted and "retention.ms" in s.config}
    day_events = [e for e in events if e.key is None]
    assert sorted(e.topic for e in day_events) == sorted(dropping)
    week_ago = DailyWindows("UTC").today(now - timedelta(days=7)).day - timedelta(days=1)
    assert {e.date_to for e in day_events if e.topic == topics.execution_results.name} == {week_ago.isoformat()}

    # What a table rebuilt from the topics holds, and each tombstone sits in its record's partition.
    assert await artifact_versions(settings, "spam") == {2, 4, 6}
    assert {k for k in keys if (await analytics_table(settings)).get(k) is not None} == set(keys) - expired
    for name in (topics.analytics.name, topics.program_artifacts.name):
        assert all(len(p) == 1 for p in (await raw_partitions(settings, name)).values())

    # A second run finds nothing more to do: no tombstone, no event written twice.
    again = await RetentionJob(settings, topics).run(now)
    assert again.tombstones == [] and again.events == []
    assert len(await events_of(settings)) == len(events)


async def test_a_version_in_use_by_the_time_of_writing_is_never_tombstoned(broker: EmbeddedBroker) -> None:
    settings, topics = await prepared(broker)
    await seed_versions(settings, versions=5, active=5)  # unused 1..4: keep 4, doom 1, 2, 3
    job = RetentionJob(settings, topics)
    snapshot, plan = await job.plan(utc_now())
    assert {t.key for t in plan.tombstones if t.topic == topics.program_artifacts.name} == {"spam/1", "spam/2",
                                                                                            "spam/3"}
    async with ControlPlane(settings) as control:  # after the plan read the tasks: a canary, a rollback
        await control.start_canary("spam", 2, 5)
        await control.activate("spam", 1)

    written = await job.write(snapshot, plan)

    assert [t.key for t in written.tombstones if t.topic == topics.program_artifacts.name] == ["spam/3"]
    assert await artifact_versions(settings, "spam") == {1, 2, 4, 5}
    assert [e.key for e in await events_of(settings) if e.topic == topics.program_artifacts.name] == ["spam/3"]


async def test_two_workers_run_it_once(broker: EmbeddedBroker, start_worker: Callable[..., WorkerProcess]) -> None:
    settings, topics = await prepared(broker, retention_interval_s=1.0, sandbox_processes=2)
    workers = [start_worker(settings, "retention-a"), start_worker(settings, "retention-b")]
    # "serving" comes before faust's group has assigned the leader: wait until both are in it, or the leadership
    # may move from one to the other while the runs below are counted.
    for worker in workers:
        assert worker.process is not None
        await asyncio.to_thread(wait_for_text, worker.log_path, "[^Worker]: Ready", worker.process, 60)
    now = utc_now()
    await seed_versions(settings, versions=4, active=4)  # keep_versions=1: 1 and 2 go
    keys = await seed_analytics(settings, {"UTC": [45, 2]}, now)
    expected = {(topics.program_artifacts.name, "spam/1"), (topics.program_artifacts.name, "spam/2")} | {
        (topics.analytics.name, k) for k, age in keys.items() if age == 45}

    events = await collect(settings, "retention_events",
                           lambda rs: expected <= {(r.topic, r.key) for r in rs}, timeout_s=40)
    runs_before = [len(runs_of(w)) for w in workers]
    await until(lambda: sum(len(runs_of(w)) for w in workers) >= sum(runs_before) + 3, timeout_s=20)

    events = await events_of(settings)
    assert Counter((e.topic, e.key) for e in events if e.key is not None) == Counter(dict.fromkeys(expected, 1))
    assert Counter(e.topic for e in events if e.key is None) == Counter(
        s.name for s in topics.all() if not s.compacted and "retention.ms" in s.config)
    new_runs = [len(runs_of(w)) - before for w, before in zip(workers, runs_before, strict=True)]
    assert sorted(new_runs)[0] == 0, f"both workers ran the job: {new_runs}"  # the leader alone
    assert await artifact_versions(settings, "spam") == {3, 4}


def runs_of(worker: WorkerProcess) -> list[str]:
    return re.findall(r"retention run by worker \S+: \d+ tombstones, \d+ events", worker.log())


async def until(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)
