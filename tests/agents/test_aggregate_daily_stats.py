"""Daily analytics end to end on the embedded broker: executors' partials merged by the workers that own their
tasks, days closed on time and emitted once, late partials dropped, open windows surviving a restart.

Past days are simulated by partials dated in the past (what an executor sends for results executed then), with a
grace period that ends a few seconds into the test."""

import asyncio
from datetime import timedelta
from pathlib import Path

from app.contract.codecs import codec_for
from app.contract.records import DailyStats, StatsPartial, TaskSpec, utc_now
from app.contract.topics import topics_for
from app.control.plane import ControlPlane
from app.domain.daily_stats import StatsKey, WindowStats
from app.domain.daily_windows import DailyWindow, DailyWindows
from app.domain.open_windows import OpenWindows
from app.kafka.clients import apply_topics, make_producer, partition_for
from app.kafka.loop_client import RequestSender, request_from
from app.kafka.partitioned_state import read_state
from app.settings import Settings
from devtools.broker import EmbeddedBroker
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
    # Yesterday's partials must be in before it closes: a worker start on a busy machine takes up to ~20 s.
    settings, day = settings_closing(broker, after_s=30)
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
        records = await collect(settings, "analytics", lambda rs: len(closed(rs)) >= 5, timeout_s=40)
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
