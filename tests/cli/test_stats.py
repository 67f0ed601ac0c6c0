"""`loopai stats` through click's CliRunner on the embedded broker: closed days as the aggregator emits them to
analytics, the running day as it keeps it in its changelog."""

import asyncio
import re
from datetime import datetime, timedelta

import pytest
from click.testing import CliRunner

from app.cli import cli
from app.contract.codecs import codec_for
from app.contract.records import DailyStats, OracleKind, OracleSpec, TaskSpec, utc_now
from app.contract.topics import topics_for
from app.control.plane import ControlPlane
from app.domain.daily_stats import StatsKey, WindowStats
from app.domain.daily_windows import DailyWindows
from app.domain.open_windows import OpenWindows
from app.kafka.clients import apply_topics, make_producer, partition_for
from app.settings import Settings
from devtools.broker import EmbeddedBroker
from tests.conftest import make_settings

ZONE = "Europe/Paris"
WINDOWS = DailyWindows(ZONE, timedelta(hours=1))


def day_stats(ok: int, error: int, latency_ms: float, version: int | None = None) -> WindowStats:
    stats = WindowStats(ok=ok, error=error, latency_sum_ms=latency_ms * (ok + error))
    stats.sketch.add_all([latency_ms] * (ok + error))
    return stats


async def publish(settings: Settings, now: datetime) -> None:
    """Five closed days of spam (each slower and less successful than the one before), and today's running
    window in the changelog: 40 ok, 10 errors, of which version 2 ran 5."""
    await apply_topics(settings, topics_for(settings.topic_prefix))
    topics = topics_for(settings.topic_prefix)
    today = WINDOWS.today(now)
    codec = codec_for(DailyStats, settings, topics.analytics)
    producer = make_producer(settings)
    await producer.start()
    try:
        for back in range(1, 6):
            window = WINDOWS.of_date(today.day - timedelta(days=back))
            for version in (None, 1):
                key = StatsKey("spam", version, window.date)
                daily = day_stats(100 - back, back, 10.0 * back).to_daily_stats(key, WINDOWS, WINDOWS.closes_at(window))
                await producer.send_and_wait(topics.analytics.name, codec.encode(daily), key=key.encode().encode())
        opened = OpenWindows("spam", WINDOWS)
        opened.stats[StatsKey("spam", None, today.date)] = day_stats(40, 10, 3.0)
        opened.stats[StatsKey("spam", 2, today.date)] = day_stats(5, 0, 2.0)
        await producer.send_and_wait(topics.daily_windows.name, opened.to_json(), key=b"spam",
                                     partition=partition_for(b"spam", topics.daily_windows.partitions))
    finally:
        await producer.stop()


async def _create_task(settings: Settings, oracle: OracleSpec | None) -> None:
    async with ControlPlane(settings) as control:
        await control.put_task(TaskSpec(name="spam", updated_at=utc_now(), oracle=oracle))


def p99_of(chart_line: str) -> float:
    """The latency a chart line ends with: the sketch's, within 1% of the exact value."""
    found = re.search(r"([0-9.]+) ms$", chart_line.rstrip())
    assert found, chart_line
    return float(found.group(1))


def stats(settings: Settings, *args: str) -> str:
    result = CliRunner().invoke(cli, ["stats", *args], env=settings.to_env(), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_stats_of_today_a_closed_day_and_a_version(broker: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(broker, analytics_time_zone=ZONE, analytics_grace_s=3600)
    # One instant for the data and the CLI's "today": run at midnight in Paris, they would name different days.
    now = utc_now()
    monkeypatch.setattr("app.cli.stats.utc_now", lambda: now)
    asyncio.run(publish(settings, now))
    today = WINDOWS.today(now)

    running = stats(settings, "spam")
    assert "(why none validated: there is no such task now)" in running  # no spec: only its analytics
    asyncio.run(_create_task(settings, oracle=None))
    assert ("(why none validated: the task has no oracle, and its requests carried no expected_output, so "
            "nothing judges its sampled executions; give it one with `loopai task update spam --oracle"
            ) in stats(settings, "spam")
    asyncio.run(_create_task(settings, oracle=OracleSpec(kind=OracleKind.EXTERNAL)))
    assert "(why none validated: no execution was sampled (sampling_rate 0.05;" in stats(settings, "spam")
    assert f"{today.date} (Europe/Paris), all versions, open (running totals)" in running
    assert "executions                       50" in running and "80.0%" in running
    assert "40 / 10 / 0 / 0" in running and "latency avg / p50                3.00 ms /" in running
    chart = running.split("last 7 days, all versions:\n")[1].splitlines()
    assert [line[:10] for line in chart[1:]] == [(today.day - timedelta(days=back)).isoformat()
                                                 for back in range(5, -1, -1)]
    # The slowest day (5 days back, 50 ms) has the full latency bar, today (3 ms) a short one.
    assert chart[1].count("█") == 22 + 24 and abs(p99_of(chart[1]) - 50.0) <= 0.5  # 95% success: 22.8 of 24
    assert abs(p99_of(chart[-1]) - 3.0) <= 0.03 and chart[-1].count("█") == 19 + 1  # 80%, then 3/50 of 24

    two_days_ago = (today.day - timedelta(days=2)).isoformat()
    closed = stats(settings, "spam", "--date", two_days_ago, "--version", "1")
    assert f"{two_days_ago} (Europe/Paris), version 1, closed at" in closed
    assert "98 / 2 / 0 / 0" in closed and "98.0%" in closed and "20.00 ms" in closed

    version_two = stats(settings, "spam", "--version", "2", "--days", "3")
    assert "version 2, open" in version_two and "100.0%" in version_two and "last 3 days, version 2" in version_two

    assert "no executions on 2020-01-01" in stats(settings, "spam", "--date", "2020-01-01")
    bad = CliRunner().invoke(cli, ["stats", "spam", "--date", "yesterday"], env=settings.to_env())
    assert bad.exit_code == 2 and "--date" in bad.output
