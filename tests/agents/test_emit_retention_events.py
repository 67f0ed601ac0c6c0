"""The retention job end to end on the embedded broker: it stores but does not enforce compaction, so the tests
assert on the tombstones and events written and on what tables rebuilt from the topics hold.

The agent's tick is also tested fast, at the end: Kafka stood in for in memory, without a broker or a worker."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition

from app.agents import emit_retention_events
from app.agents.emit_retention_events import EmitRetentionEvents, RetentionJob
from app.contract.codecs import codec_for, json_codec
from app.contract.records import (
    DailyStats,
    OracleKind,
    OracleSpec,
    ProgramArtifact,
    Record,
    RetentionEvent,
    TaskSpec,
    artifact_key,
    utc_now,
)
from app.contract.topics import Topics, TopicSpec, topics_for
from app.control.plane import ControlPlane
from app.domain.daily_stats import StatsKey, WindowStats
from app.domain.daily_windows import DailyWindows
from app.kafka.clients import apply_topics, make_consumer, make_producer, partition_for
from app.kafka.metadata import topic_partitions
from app.kafka.tables import Table, TableReader, consume_to_end, read_to_end
from app.settings import Settings
from app.worker import build_app
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


# Fast tests: the agent's tick awaited as its timer would, at a fixed time, with Kafka stood in for where the
# retention job meets it (its consumers and producer, partition lookups, the read of past retention events).
# The job's own reading of the topics, planning and writing run as they are.

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


class InMemoryKafka:
    """The topics' records (partition, key, value) in the order written; serves as the job's consumer and
    producer, and records what the job produced."""

    def __init__(self, settings: Settings, topics: Topics) -> None:
        self._settings = settings
        self._partitions = {spec.name: spec.partitions for spec in topics.all()}
        self.records: dict[str, list[tuple[int, bytes | None, bytes | None]]] = defaultdict(list)
        self.produced: list[tuple[str, int, bytes | None, bytes | None]] = []
        self.reachable = True

    def put(self, spec: TopicSpec, key: str, record: Record, partition: int | None = None) -> int:
        """A record written before the run, by default in a partition the key's hash does not give (as the
        aggregator writes analytics, by task); returns the partition."""
        if partition is None:
            partition = (partition_for(key.encode(), spec.partitions) + 1) % spec.partitions
        value = codec_for(type(record), self._settings, spec).encode(record)
        self.records[spec.name].append((partition, key.encode(), value))
        return partition

    def client(self, settings: Settings, **_: Any) -> InMemoryKafka:
        return self

    async def start(self) -> None:
        if not self.reachable:
            raise ConnectionError("broker gone")

    async def stop(self) -> None:
        pass

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        pass

    async def seek_to_beginning(self, *partitions: TopicPartition) -> None:
        pass

    async def send(self, topic: str, value: bytes | None, key: bytes | None = None,
                   partition: int | None = None) -> asyncio.Future[None]:
        assert partition is not None, "the job names the partition of every record"
        self.records[topic].append((partition, key, value))
        self.produced.append((topic, partition, key, value))
        acknowledged: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        acknowledged.set_result(None)
        return acknowledged

    async def topic_partitions(self, client: Any, topic: str) -> list[int]:
        return list(range(self._partitions[topic]))

    async def consume_to_end(self, consumer: Any, partitions: list[TopicPartition],
                             apply: Callable[[TopicPartition, Any], None]) -> None:
        for tp in partitions:
            records = [(key, value) for partition, key, value in self.records[tp.topic] if partition == tp.partition]
            for offset, (key, value) in enumerate(records):
                apply(tp, SimpleNamespace(key=key, value=value, offset=offset))

    async def read_to_end(self, settings: Settings, spec: TopicSpec, timeout_s: float = 30.0) -> list[Record]:
        codec = codec_for(spec.record, settings, spec)
        return [codec.decode(value) for _, _, value in self.records[spec.name] if value is not None]

    def tombstones(self) -> list[tuple[str, int, str]]:
        """The tombstones produced: (topic, partition, key)."""
        return [(topic, partition, key.decode()) for topic, partition, key, value in self.produced
                if value is None and key is not None]

    def events(self) -> list[RetentionEvent]:
        """The retention events produced."""
        codec = json_codec(RetentionEvent)
        return [codec.decode(value) for topic, _, _, value in self.produced
                if topic == "p.retention-events" and value is not None]


@dataclass
class Retention:
    """The agent under test, the Kafka it sees, and its clock."""

    agent: EmitRetentionEvents
    kafka: InMemoryKafka
    topics: Topics
    now: datetime = NOW

    async def tick(self) -> None:
        """One run of its timer."""
        await self.agent._tick()


@pytest.fixture
async def retention(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Retention:
    settings = Settings(bootstrap_servers="127.0.0.1:9", topic_prefix="p.", data_dir=tmp_path, worker_id="w1",
                        retention_days=30, keep_versions=1)
    topics = topics_for(settings.topic_prefix)
    kafka = InMemoryKafka(settings, topics)
    retention = Retention(EmitRetentionEvents(build_app(settings), settings, topics), kafka, topics)
    for name in ("make_consumer", "make_producer"):
        monkeypatch.setattr(emit_retention_events, name, kafka.client)
    for name in ("topic_partitions", "consume_to_end", "read_to_end"):
        monkeypatch.setattr(emit_retention_events, name, getattr(kafka, name))
    monkeypatch.setattr(emit_retention_events, "utc_now", lambda: retention.now)
    return retention


def task(name: str, active: int | None = None, canary: int | None = None, shadow: int | None = None) -> TaskSpec:
    oracle = None if shadow is None else OracleSpec(kind=OracleKind.SHADOW, shadow_version=shadow)
    return TaskSpec(name=name, active_version=active, canary_version=canary, canary_percent=10.0 if canary else 0.0,
                    oracle=oracle, updated_at=NOW)


def publish(r: Retention, task_id: str, versions: Iterable[int]) -> dict[str, int]:
    """Artifacts of these versions; returns their keys and partitions."""
    return {artifact_key(task_id, v): r.kafka.put(r.topics.program_artifacts, artifact_key(task_id, v),
                                                  ProgramArtifact(task_id=task_id, version=v, program_id=f"p{v}",
                                                                  source_code=SOURCE, created_at=NOW))
            for v in versions}


def daily_stats(r: Retention, task_id: str, zone: str, ages: Iterable[int]) -> dict[str, int]:
    """DailyStats of a task's local days `ages` days before NOW in `zone`; returns their keys and partitions."""
    windows = DailyWindows(zone)
    partitions = {}
    for age in ages:
        key = StatsKey(task_id, None, windows.today(NOW - timedelta(days=age)).date)
        stats = WindowStats()
        stats.add("ok", 3.0, sampled=False)
        partitions[key.encode()] = r.kafka.put(r.topics.analytics, key.encode(),
                                               stats.to_daily_stats(key, windows, closed_at=NOW))
    return partitions


async def test_a_tick_tombstones_the_expired_analytics_days_in_their_partitions(retention: Retention) -> None:
    r = retention
    expired = daily_stats(r, "spam", "UTC", [40, 31])
    kept = daily_stats(r, "spam", "UTC", [30, 1])
    # At noon UTC it is already tomorrow at UTC+14: a day 31 days back there is 30 back in UTC, kept if judged there.
    expired |= daily_stats(r, "eggs", "Pacific/Kiritimati", [31])
    kept |= daily_stats(r, "eggs", "Pacific/Kiritimati", [30])

    await r.tick()

    assert sorted(r.kafka.tombstones()) == sorted(("p.analytics", partition, key)
                                                  for key, partition in expired.items())
    events = [e for e in r.kafka.events() if e.topic == "p.analytics"]
    assert sorted(e.key or "" for e in events) == sorted(expired)
    assert all(e.key and e.date_from == e.date_to == e.key.rsplit("/", 1)[1] for e in events)
    assert all(e.reason.startswith("analytics day older than retention_days=30") for e in events)
    assert not set(kept) & {key for _, _, key in r.kafka.tombstones()}


async def test_a_tick_tombstones_unused_versions_beyond_keep_versions_never_one_in_use(
        retention: Retention, caplog: pytest.LogCaptureFixture) -> None:
    r = retention
    r.kafka.put(r.topics.task_specs, "spam", task("spam", active=4, canary=2, shadow=6))
    r.kafka.put(r.topics.task_specs, "eggs", task("eggs"))  # nothing active yet
    spam = publish(r, "spam", range(1, 8))  # unused: 7, 5, 3, 1; keep_versions=1 keeps 7
    eggs = publish(r, "eggs", [1, 2])
    publish(r, "ghost", [1, 2, 3])  # no spec: what it runs is unknown, nothing goes

    with caplog.at_level(logging.INFO, logger="app.agents.emit_retention_events"):
        await r.tick()

    doomed = ["spam/1", "spam/3", "spam/5", "eggs/1"]
    partitions = spam | eggs
    assert sorted(r.kafka.tombstones()) == sorted(("p.program-artifacts", partitions[k], k) for k in doomed)
    events = {e.key: e for e in r.kafka.events() if e.topic == "p.program-artifacts"}
    assert sorted(events) == sorted(doomed)
    assert events["spam/1"].reason == "unused version beyond keep_versions=1 (in use: 2, 4, 6)"
    assert events["eggs/1"].reason == "unused version beyond keep_versions=1 (in use: none)"
    # Every tombstone is in before an event says it is.
    last_tombstone = max(i for i, (_, _, _, value) in enumerate(r.kafka.produced) if value is None)
    assert all(topic == "p.retention-events" for topic, *_ in r.kafka.produced[last_tombstone + 1:])
    assert all(topic != "p.retention-events" for topic, *_ in r.kafka.produced[:last_tombstone + 1])
    events_written = len(r.kafka.events())
    assert f"retention run by worker w1: 4 tombstones, {events_written} events" in caplog.text


async def test_a_version_that_came_into_use_after_the_plan_is_spared(retention: Retention) -> None:
    r = retention
    r.kafka.put(r.topics.task_specs, "spam", task("spam", active=5))
    publish(r, "spam", range(1, 6))  # unused 1..4: keep 4, doom 1, 2, 3
    job = r.agent.job
    snapshot, plan = await job.plan(NOW)
    r.kafka.put(r.topics.task_specs, "spam", task("spam", active=1, canary=2))  # a rollback, a canary since

    written = await job.write(snapshot, plan)

    assert [t.key for t in written.tombstones if t.topic == "p.program-artifacts"] == ["spam/3"]
    assert [key for topic, _, key in r.kafka.tombstones() if topic == "p.program-artifacts"] == ["spam/3"]
    assert [e.key for e in r.kafka.events() if e.topic == "p.program-artifacts"] == ["spam/3"]


async def test_the_next_tick_reads_back_what_one_wrote_and_names_only_the_days_dropped_since(
        retention: Retention) -> None:
    r = retention
    r.kafka.put(r.topics.task_specs, "spam", task("spam", active=3))
    publish(r, "spam", [1, 2, 3])
    daily_stats(r, "spam", "UTC", [40, 1])
    await r.tick()
    first = {e.topic: e for e in r.kafka.events() if e.key is None}
    dropping = {s.name for s in r.topics.all() if not s.compacted and "retention.ms" in s.config}
    assert set(first) == dropping and all(e.date_from is None for e in first.values())
    assert first["p.execution-results"].date_to == "2026-03-02"  # 7 days: the 3rd was partly kept
    written = len(r.kafka.produced)

    await r.tick()
    assert len(r.kafka.produced) == written  # tombstoned keys are gone, the days named already

    r.now = NOW + timedelta(days=1)
    await r.tick()
    later = r.kafka.events()[-len(dropping):]
    assert len(r.kafka.produced) == written + len(dropping)
    next_day = {topic: (date.fromisoformat(e.date_to or "") + timedelta(days=1)).isoformat()
                for topic, e in first.items()}
    assert {e.topic: (e.date_from, e.date_to) for e in later} == {topic: (d, d) for topic, d in next_day.items()}


async def test_a_failed_run_is_logged_and_the_timer_goes_on(retention: Retention,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    r = retention
    r.kafka.put(r.topics.task_specs, "spam", task("spam", active=3))
    publish(r, "spam", [1, 2, 3])
    r.kafka.reachable = False
    with caplog.at_level(logging.ERROR, logger="app.agents.emit_retention_events"):
        await r.tick()  # does not raise
    assert "retention run failed; the next one retries" in caplog.text and r.kafka.produced == []
    r.kafka.reachable = True
    await r.tick()  # the next run does it
    assert [key for _, _, key in r.kafka.tombstones()] == ["spam/1"]
