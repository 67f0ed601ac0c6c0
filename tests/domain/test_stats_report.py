"""What `loopai stats` prints from DailyStats: each day once (a closed record over running totals), one window as a
table, and the last days as bars."""

from datetime import UTC, datetime

from app.contract.records import DailyStats
from app.domain.daily_stats import StatsKey
from app.domain.stats_report import by_key, chart, window_table

START = datetime(2026, 12, 6, tzinfo=UTC)


def day(date: str = "2026-12-06", version: int | None = None, closed: bool = False, **fields: object) -> DailyStats:
    values: dict[str, object] = {
        "task_id": "spam", "version": version, "date": date, "time_zone": "UTC", "executions": 10, "ok": 8,
        "error": 1, "timeout": 1, "rejected": 0, "success_rate": 0.8, "sampled": 2, "sampling_rate": 0.2,
        "validated": 2, "matched": 1, "accuracy": 0.5, "avg_latency_ms": 1.25, "p50_latency_ms": 1.0,
        "p95_latency_ms": 3.0, "p99_latency_ms": 4.0, "sketch": b"", "window_start": START,
        "window_end": START, "closed_at": datetime(2026, 12, 7, 1, 0, 5, tzinfo=UTC) if closed else None,
    }
    return DailyStats(**{**values, **fields})


def test_a_closed_day_wins_over_its_running_totals() -> None:
    running = [day(executions=5), day(date="2026-12-07", executions=3), day(version=2, executions=4)]
    closed = [day(closed=True, executions=10)]
    days = by_key(closed, running)
    assert days[StatsKey("spam", None, "2026-12-06")].executions == 10  # final
    assert days[StatsKey("spam", None, "2026-12-07")].executions == 3  # still open
    assert days[StatsKey("spam", 2, "2026-12-06")].executions == 4  # versions are days of their own
    assert len(days) == 3


def test_a_window_prints_a_field_per_line_aligned() -> None:
    lines = window_table(day(closed=True))
    column = len("ok / error / timeout / rejected  ")  # the longest name, then two spaces: where values start
    assert all(line[column - 2:column] == "  " and line[column] != " " for line in lines)
    shown = {line[:column].strip(): line[column:] for line in lines}
    assert shown["window"] == "2026-12-06 (UTC), all versions, closed at 2026-12-07 01:00:05 UTC"
    assert shown["executions"] == "10"
    assert shown["ok / error / timeout / rejected"] == "8 / 1 / 1 / 0"
    assert shown["success rate"] == "80.0%"
    assert shown["sampled"] == "2 (rate 20.0%)"
    assert shown["validated"] == "2 (matched 1, accuracy 50.0%)"
    assert shown["latency avg / p50"] == "1.25 ms / 1.00 ms"
    assert shown["latency p95 / p99"].startswith("3.00 ms / 4.00 ms")


def test_an_open_window_of_a_version_without_figures_prints_dashes() -> None:
    lines = window_table(day(version=3, accuracy=None, p50_latency_ms=None, avg_latency_ms=None))
    assert "version 3, open (running totals)" in lines[0]
    assert lines[5].endswith("accuracy -)") and lines[6].endswith("- / -")


def test_the_chart_draws_success_against_100_percent_and_p99_against_the_slowest_day() -> None:
    assert chart([]) == []
    lines = chart([day(success_rate=1.0, p99_latency_ms=8.0), day(date="2026-12-07", success_rate=0.5,
                                                                   p99_latency_ms=2.0),
                   day(date="2026-12-08", success_rate=0.0, p99_latency_ms=None)])
    assert lines[0].split() == ["day", "success", "rate", "p99", "latency"]
    full, half, empty = lines[1:]
    assert full.startswith("2026-12-06  " + "█" * 24 + " 100.0%") and full.endswith("█" * 24 + " 8.00 ms")
    assert half.startswith("2026-12-07  " + "█" * 12 + " " * 12 + "  50.0%")
    assert half.endswith("█" * 6 + " " * 18 + " 2.00 ms")  # a quarter of the slowest day's p99
    assert empty.endswith("-") and "0.0%" in empty


def test_bars_have_eighths_of_a_character() -> None:
    # 1/3 of 24 characters is 8; 0.35 of them is 8.4, 67 eighths: 8 whole and a three-eighths block
    line = chart([day(success_rate=0.35, p99_latency_ms=1.0)])[1]
    assert line[12:12 + 24] == "█" * 8 + "▍" + " " * 15
