"""Daily analytics end to end on the embedded broker: executors' partials merged by the workers that own their
tasks, days closed on time and emitted once, late partials dropped, open windows surviving a restart.

Past days are simulated by partials dated in the past (what an executor sends for results executed then), with a
grace period that ends a few seconds into the test.

The agent's logic is also tested fast, at the end: its handlers called directly, without a broker or a worker."""

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import faust
import pytest

from app.agents import aggregate_daily_stats
from app.agents.aggregate_daily_stats import AggregateDailyStats
from app.contract.codecs import Codec, codec_for, json_codec
from app.contract.records import DailyStats, DeadLetter, StatsPartial, TaskSpec, utc_now
from app.contract.topics import topics_for
from app.control.plane import ControlPlane
from app.domain.daily_stats import StatsKey, WindowStats
from app.domain.daily_windows import DailyWindow, DailyWindows
from app.domain.open_windows import OpenWindows
from app.kafka.clients import apply_topics, make_producer, partition_for
from app.kafka.loop_client import RequestSender, request_from
from app.kafka.partitioned_state import NotOwned, read_state
from app.settings import Settings
from app.worker import build_app
from devtools.broker import EmbeddedBroker
from tests.agents.test_decide_canaries import eventually
from tests.conftest import WorkerProcess, collect, make_settings

ZONE = "Europe/Paris"


def settings_closing(broker: EmbeddedBroker, after_s: float, **overrides: object) -> tuple[Settings, DailyWindow]:
    """Settings whose grace makes yesterday's window close `after_s` seconds from now, and that window.

    Both from one reading of the clock: read again later, "yesterday" could be past midnight, another day."""
    windows = DailyWindows(ZONE)
    now = utc_now()
    grace = (now - windows.today(now).start).total_seconds() + after_s
    settings = make_settings(broker, analytics_time_zone=ZONE, analytics_grace_s=grace,
                             analytics_close_interval_s=0.3, **overrides)
    return settings, windows.of_date(windows.today(now).day - timedelta(days=1))


async def send_partials(settings: Settings, partials: list[StatsPartial]) -> None:
    topic = topics_for(settings.topic_prefix).stats_partials
    codec = codec_for(StatsPartial, settings, topic)
    producer = make_producer(settings)
    await producer.start()
    try:
        for partial in partials:
            key = partial.task_id.encode()
            await producer.send_and_wait(topic.name, codec.encode(partial), key=key,
                                         partition=partition_for(key, topic.partitions))
    finally:
        await producer.stop()


def partial(task: str, day: DailyWindow, ok: int, error: int = 0, version: int = 1) -> StatsPartial:
    stats = WindowStats(ok=ok, error=error, latency_sum_ms=float(ok + error))
    stats.sketch.add_all([1.0] * (ok + error))
    return stats.to_partial(task, version, day, ZONE, day.start + timedelta(hours=12))


async def open_windows(settings: Settings) -> dict[str, OpenWindows]:
    windows = DailyWindows(ZONE, timedelta(seconds=settings.analytics_grace_s))
    state = await read_state(settings, topics_for(settings.topic_prefix).daily_windows,
                             lambda key, value: OpenWindows.from_json(key.decode(), value, windows))
    return {key.decode(): opened for key, opened in state.items()}


async def executions_open(settings: Settings, wanted: dict[str, int], timeout_s: float = 60,
                          besides: str = "") -> dict[str, int]:
    """Wait until each task's open all-version windows (but the day `besides`) hold the wanted executions;
    fails on more, or on timeout."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        found = {task: sum(s.executions for s in opened.running() if s.version is None and s.date != besides)
                 for task, opened in (await open_windows(settings)).items()}
        if found == wanted:
            return found
        assert all(found.get(task, 0) <= count for task, count in wanted.items()), found  # counted twice
        assert asyncio.get_running_loop().time() < deadline, f"open windows {found}, wanted {wanted}"
        await asyncio.sleep(0.2)


def closed(records: list[object]) -> dict[StatsKey, list[DailyStats]]:
    by_key: dict[StatsKey, list[DailyStats]] = {}
    for record in records:
        if isinstance(record, DailyStats):
            by_key.setdefault(StatsKey(record.task_id, record.version, record.date), []).append(record)
    return by_key


async def test_open_windows_survive_a_restart_then_close_on_time_once(broker: EmbeddedBroker,
                                                                      tmp_path: Path) -> None:
    """Yesterday's and today's windows fill on one worker; another takes over after it stops, goes on counting
    where it left off, and closes yesterday on time, with no traffic for it, exactly once."""
    # Yesterday must still be open when the second worker has started: two starts and a stop took over 30 s on a
    # machine with a load of 15 on two cores.
    settings, day = settings_closing(broker, after_s=60)
    await apply_topics(settings, topics_for(settings.topic_prefix))
    today = DailyWindows(ZONE).of_date(day.day + timedelta(days=1))  # today when the grace was set, even if
    long_ago = DailyWindows(ZONE).of_date(day.day - timedelta(days=3))  # the test runs past midnight
    # Sent before the worker starts, which reads them from the beginning: the close has only its start to wait.
    await send_partials(settings, [partial("late", long_ago, 5), partial("spam", day, 3, error=1),
                                   partial("spam", day, 2, version=2), partial("eggs", day, 7)]
                        + [partial(task, today, 10) for task in ("a", "b", "c") for _ in range(3)])
    first = WorkerProcess(settings, tmp_path / "first.log", "stats-first").start()
    try:
        await executions_open(settings, {"a": 30, "b": 30, "c": 30, "spam": 6, "eggs": 7})
    finally:
        assert first.stop() == 0, first.log()[-3000:]
    assert "late stats of late v1" in first.log()
    second = WorkerProcess(settings, tmp_path / "second.log", "stats-second").start()
    try:
        await send_partials(settings, [partial(task, today, 1) for task in ("a", "b", "c")])
        await executions_open(settings, {"a": 31, "b": 31, "c": 31, "spam": 6, "eggs": 7})  # continued, not reset
        records = await collect(settings, "analytics", lambda rs: len(closed(rs)) >= 5, timeout_s=100)  # at 60 s
        # Traffic after the close, and its window to wait for: by then a second emission would be there too.
        await send_partials(settings, [partial("spam", today, 1)])
        await executions_open(settings, {"a": 31, "b": 31, "c": 31, "spam": 1})
        records = await collect(settings, "analytics", lambda rs: len(closed(rs)) >= 5, timeout_s=30)
    finally:
        assert second.stop() == 0, second.log()[-3000:]
    days = closed(records)
    assert set(days) == {StatsKey("spam", 1, day.date), StatsKey("spam", 2, day.date),
                         StatsKey("spam", None, day.date), StatsKey("eggs", 1, day.date),
                         StatsKey("eggs", None, day.date)}, days
    assert all(len(emitted) == 1 for emitted in days.values()), days
    whole = days[StatsKey("spam", None, day.date)][0]
    assert (whole.executions, whole.ok, whole.error) == (6, 5, 1) and whole.success_rate == 5 / 6
    assert whole.closed_at == day.end + timedelta(seconds=settings.analytics_grace_s)
    assert whole.p99_latency_ms is not None and abs(whole.p99_latency_ms - 1.0) <= 0.01
    assert set(await open_windows(settings)) == {"a", "b", "c", "spam"}  # eggs closed its only day: tombstoned


async def test_two_workers_count_every_execution_exactly_once(broker: EmbeddedBroker, tmp_path: Path) -> None:
    # Yesterday's partials must be in before it closes: two worker starts on a busy machine take up to ~20 s,
    # after the tasks' provisioning. Sent first, they only wait for the workers' start.
    settings, day = settings_closing(broker, after_s=40)
    await apply_topics(settings, topics_for(settings.topic_prefix))
    tasks = [f"task-{i}" for i in range(6)]
    await send_partials(settings, [partial(task, day, ok=i + 1) for i, task in enumerate(tasks)])
    async with ControlPlane(settings) as control:
        for task in tasks:
            await control.put_task(TaskSpec(name=task, updated_at=utc_now()))
            await control.publish(task, "def run(input):\n    return input['n'] % 7\n", activate=True)
    workers = [WorkerProcess(settings, tmp_path / f"w{i}.log", f"stats-w{i}").launch() for i in (1, 2)]
    try:
        for worker in workers:
            worker.wait_serving()
        requests = [request_from(task, {"n": n}) for n in range(100) for task in tasks]
        async with RequestSender(settings) as sender:
            await sender.send(requests)
        # Executed today (around midnight, maybe over two days): their windows stay open, holding each task's
        # 100 results exactly.
        await executions_open(settings, dict.fromkeys(tasks, 100), besides=day.date)
        records = await collect(settings, "analytics", lambda rs: len(closed(rs)) >= 2 * len(tasks), timeout_s=60)
    finally:
        for worker in workers:
            assert worker.stop() == 0, worker.log()[-3000:]
    days = closed(records)
    whole_days = {key.task_id: emitted for key, emitted in days.items() if key.version is None}
    assert {task: [d.executions for d in emitted] for task, emitted in whole_days.items()} == {
        task: [i + 1] for i, task in enumerate(tasks)}
    assert sum(d[0].executions for d in whole_days.values()) == sum(range(1, len(tasks) + 1))
    logs = [worker.log() for worker in workers]
    assert all("daily-windows-changelog" in log for log in logs), "both workers owned windows"


# Fast tests: the agent's handlers called directly, without a broker or a worker. _consume is given its batches
# (faust's take_events makes them by timing, which a test should not depend on) and _close is awaited as its
# timer would; the per-partition state is a stand-in, and faust's sends are recorded. One test goes through
# faust's test_context, to show _consume reads faust's own events.

DAY = DailyWindows(ZONE).of_date("2026-03-09")  # far from a change of the clocks: 24 hours long
NEXT_DAY = DailyWindows(ZONE).of_date("2026-03-10")
GRACE = timedelta(hours=1)
CLOSES_AT = DAY.end + GRACE


class OwnedWindows:
    """Stands in for the agent's PartitionedState: owns the partitions given, read back empty, and records each
    changelog write as the windows it carried ({window key: executions}; {} for a tombstone)."""

    def __init__(self, partitions: Iterable[int]) -> None:
        self.values: dict[int, dict[bytes, OpenWindows]] = {partition: {} for partition in partitions}
        self.writes: list[tuple[int, bytes, dict[str, int]]] = []

    async def values_of(self, partition: int) -> dict[bytes, OpenWindows]:
        if partition not in self.values:
            raise NotOwned(partition)
        return self.values[partition]

    def owned(self) -> Iterator[tuple[int, dict[bytes, OpenWindows]]]:
        return iter(list(self.values.items()))

    def owns(self, partition: int) -> bool:
        return partition in self.values

    async def put(self, partition: int, key: bytes, value: OpenWindows) -> None:
        self.writes.append((partition, key, {k.encode(): stats.executions for k, stats in value.stats.items()}))
        if value:
            self.values[partition][key] = value
        else:
            self.values[partition].pop(key, None)


class Batches:
    """Stands in for an agent's faust stream: take_events() yields the batches given, events() their events one at
    a time, then either ends."""

    def __init__(self, batches: Iterable[list[Any]]) -> None:
        self._batches = list(batches)

    async def take_events(self, max_: int, within: float) -> AsyncIterator[list[Any]]:
        for batch in self._batches:
            yield batch

    async def events(self) -> AsyncIterator[Any]:
        for batch in self._batches:
            for event in batch:
                yield event


@dataclass
class Aggregator:
    """The agent under test, its state, what it sent (topic name, key, value), and its clock."""

    agent: AggregateDailyStats
    app: faust.App
    state: OwnedWindows
    codec: Codec[StatsPartial]
    now: datetime = DAY.end + timedelta(minutes=1)  # the next day, within the grace: both days open
    sent: list[tuple[str, bytes | None, bytes]] = field(default_factory=list)
    refusing: set[str] = field(default_factory=set)  # topics whose sends fail
    offset: int = 0

    def event(self, value: StatsPartial | bytes, partition: int = 0) -> Any:
        """An event of stats-partials, at the next offset, as faust hands it to the agent."""
        raw = value if isinstance(value, bytes) else self.codec.encode(value)
        key = value.task_id.encode() if isinstance(value, StatsPartial) else b"spam"
        message = SimpleNamespace(topic="p.stats-partials", partition=partition, offset=self.offset, key=key,
                                  value=raw)
        self.offset += 1
        return SimpleNamespace(message=message, value=raw)

    async def consume(self, *batches: list[Any]) -> None:
        await self.agent._consume(Batches(batches))

    def sent_to(self, topic: str, model: type) -> list[Any]:
        codec = json_codec(model)
        return [codec.decode(value) for name, _, value in self.sent if name == topic]


@pytest.fixture
async def aggregator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Aggregator:
    settings = Settings(bootstrap_servers="127.0.0.1:9", topic_prefix="p.", data_dir=tmp_path,
                        analytics_time_zone=ZONE, analytics_grace_s=GRACE.total_seconds())
    topics = topics_for(settings.topic_prefix)
    app = build_app(settings)
    agent = AggregateDailyStats(app, settings, topics)
    state = OwnedWindows([0, 1])
    agent.state = state  # type: ignore[assignment]
    aggregator = Aggregator(agent, app, state, codec_for(StatsPartial, settings, topics.stats_partials))

    async def send(topic: Any, key: bytes | None = None, value: bytes = b"", **_: Any) -> None:
        if topic.get_topic_name() in aggregator.refusing:
            raise ConnectionError("broker gone")
        aggregator.sent.append((topic.get_topic_name(), key, value))

    async def flush() -> None:
        pass

    monkeypatch.setattr(faust.topics.Topic, "send", send)  # days closed and dead letters: recorded
    app.producer = SimpleNamespace(flush=flush)  # type: ignore[assignment]
    monkeypatch.setattr(aggregate_daily_stats, "utc_now", lambda: aggregator.now)
    return aggregator


async def test_the_partials_of_a_batch_merge_into_one_changelog_write_per_task(aggregator: Aggregator) -> None:
    a = aggregator
    await a.consume([a.event(partial("spam", DAY, 3, error=1)), a.event(partial("eggs", DAY, 7), partition=1),
                     a.event(partial("spam", DAY, 2, version=2)), a.event(partial("spam", NEXT_DAY, 1))],
                    [a.event(partial("spam", DAY, 5))])
    day, next_day = DAY.date, NEXT_DAY.date
    assert a.state.writes == [
        (0, b"spam", {f"spam/1/{day}": 4, f"spam/2/{day}": 2, f"spam/all/{day}": 6, f"spam/1/{next_day}": 1,
                      f"spam/all/{next_day}": 1}),
        (1, b"eggs", {f"eggs/1/{day}": 7, f"eggs/all/{day}": 7}),
        # The next batch: one write again, on top of the first.
        (0, b"spam", {f"spam/1/{day}": 9, f"spam/2/{day}": 2, f"spam/all/{day}": 11, f"spam/1/{next_day}": 1,
                      f"spam/all/{next_day}": 1}),
    ]
    assert a.sent == []  # nothing closed, nothing dead


async def test_a_partial_merged_before_a_crash_is_not_counted_again(aggregator: Aggregator) -> None:
    a = aggregator
    merged = a.event(partial("spam", DAY, 3))
    await a.consume([merged])
    await a.consume([merged, a.event(partial("spam", DAY, 1))])  # delivered again, with the one after it
    assert a.state.writes[-1] == (0, b"spam", {f"spam/1/{DAY.date}": 4, f"spam/all/{DAY.date}": 4})
    assert a.agent.redelivered == 1


async def test_a_partial_for_a_closed_day_is_reported_late_and_not_merged(aggregator: Aggregator,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    a = aggregator
    a.now = CLOSES_AT - timedelta(microseconds=1)  # the last moment of the grace: still merged
    await a.consume([a.event(partial("spam", DAY, 3))])
    a.now = CLOSES_AT
    with caplog.at_level(logging.WARNING, logger="app.agents.aggregate_daily_stats"):
        await a.consume([a.event(partial("spam", DAY, 5)), a.event(partial("spam", NEXT_DAY, 2))])
    assert a.agent.late == 1
    assert f"late stats of spam v1 for {DAY.date} dropped (closed at {CLOSES_AT}; 1 late so far)" in caplog.text
    assert a.state.writes[-1] == (0, b"spam", {f"spam/1/{DAY.date}": 3, f"spam/all/{DAY.date}": 3,
                                               f"spam/1/{NEXT_DAY.date}": 2, f"spam/all/{NEXT_DAY.date}": 2})


async def test_a_day_closes_once_its_grace_has_passed_exactly_once(aggregator: Aggregator) -> None:
    a = aggregator
    await a.consume([a.event(partial("spam", DAY, 3, error=1)), a.event(partial("spam", DAY, 2, version=2)),
                     a.event(partial("spam", NEXT_DAY, 4)), a.event(partial("eggs", DAY, 7), partition=1)])
    a.now = CLOSES_AT - timedelta(microseconds=1)
    await a.agent._close()
    assert a.sent == [] and len(a.state.writes) == 2
    for a.now in (CLOSES_AT, CLOSES_AT + timedelta(minutes=5)):  # the timer's run on time, and a later one
        await a.agent._close()
    days = a.sent_to("p.analytics", DailyStats)
    assert [key for _, key, _ in a.sent] == [
        StatsKey(d.task_id, d.version, d.date).encode().encode() for d in days]
    assert sorted((d.task_id, d.version or 0, d.date, d.executions) for d in days) == [
        ("eggs", 0, DAY.date, 7), ("eggs", 1, DAY.date, 7),
        ("spam", 0, DAY.date, 6), ("spam", 1, DAY.date, 4), ("spam", 2, DAY.date, 2)]
    [whole] = [d for d in days if d.task_id == "spam" and d.version is None]
    assert (whole.ok, whole.error, whole.success_rate, whole.closed_at) == (5, 1, 5 / 6, CLOSES_AT)
    assert a.agent.closed == 5
    # The closed days are forgotten: spam keeps the next day open, eggs has no window left (a tombstone).
    assert a.state.writes[2:] == [(0, b"spam", {f"spam/1/{NEXT_DAY.date}": 4, f"spam/all/{NEXT_DAY.date}": 4}),
                                  (1, b"eggs", {})]


async def test_a_day_whose_emission_failed_is_closed_by_the_next_run(aggregator: Aggregator,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    a = aggregator
    await a.consume([a.event(partial("spam", DAY, 3))])
    a.now = CLOSES_AT
    a.refusing.add("p.analytics")
    with caplog.at_level(logging.ERROR, logger="app.agents.aggregate_daily_stats"):
        await a.agent._close()  # logged: the timer goes on
    assert "closing the daily windows of spam failed" in caplog.text
    assert (a.sent, len(a.state.writes), a.agent.closed) == ([], 1, 0)
    a.refusing.clear()
    await a.agent._close()
    assert [(d.version, d.executions) for d in a.sent_to("p.analytics", DailyStats)] == [(1, 3), (None, 3)]
    assert a.state.writes[-1] == (0, b"spam", {})


async def test_undecodable_events_become_dead_letters_and_the_batch_goes_on(aggregator: Aggregator) -> None:
    a = aggregator
    other_zone = partial("spam", DAY, 1).model_copy(update={"time_zone": "UTC"})
    await a.consume([a.event(b"\xff not a partial"), a.event(other_zone), a.event(partial("spam", DAY, 2))])
    letters = a.sent_to("p.dead-letters", DeadLetter)
    assert [(d.error_type, d.source_topic, d.source_partition, d.source_offset, d.value) for d in letters] == [
        ("DecodeError", "p.stats-partials", 0, 0, b"\xff not a partial"),
        ("ValueError", "p.stats-partials", 0, 1, a.codec.encode(other_zone))]
    assert letters[1].reason == f"cannot be aggregated: partial of spam dated in UTC, not {ZONE}"
    assert a.state.writes == [(0, b"spam", {f"spam/1/{DAY.date}": 2, f"spam/all/{DAY.date}": 2})]


async def test_partials_put_on_its_topic_are_merged_from_fausts_stream(aggregator: Aggregator) -> None:
    a = aggregator
    async with a.app.agents["aggregate_daily_stats"].test_context() as tested:
        for ok in (1, 2, 3):
            await tested.put(a.codec.encode(partial("spam", DAY, ok)), key=b"spam")
        await eventually(lambda: a.state.writes and a.state.writes[-1][2].get(f"spam/all/{DAY.date}") == 6,
                         "the three partials merged")
    assert a.state.values[0][b"spam"].through == {"p.stats-partials": 2}
