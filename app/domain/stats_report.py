"""Daily stats for a terminal: consumes DailyStats (closed days and running ones), produces the lines
`loopai stats` prints: one window as a table, and the last days' success rate and p99 latency as bars."""

from __future__ import annotations

from collections.abc import Iterable

from app.contract.records import DailyStats
from app.domain.daily_stats import StatsKey

_BAR = 24  # characters of the longest bar
_EIGHTHS = " ▏▎▍▌▋▊▉"


def by_key(closed: Iterable[DailyStats], running: Iterable[DailyStats]) -> dict[StatsKey, DailyStats]:
    """Each day once: the closed record where there is one (final), else the running totals."""
    days = {StatsKey(d.task_id, d.version, d.date): d for d in running}
    days.update({StatsKey(d.task_id, d.version, d.date): d for d in closed})
    return days


def window_table(day: DailyStats) -> list[str]:
    """One window, a field per line."""
    version = "all versions" if day.version is None else f"version {day.version}"
    state = "open (running totals)" if day.closed_at is None else f"closed at {day.closed_at:%Y-%m-%d %H:%M:%S} UTC"
    rows = [
        ("window", f"{day.date} ({day.time_zone}), {version}, {state}"),
        ("executions", str(day.executions)),
        ("ok / error / timeout / rejected", f"{day.ok} / {day.error} / {day.timeout} / {day.rejected}"),
        ("success rate", _percent(day.success_rate)),
        ("sampled", f"{day.sampled} (rate {_percent(day.sampling_rate)})"),
        ("validated", f"{day.validated} (matched {day.matched}, accuracy {_percent(day.accuracy)})"),
        ("latency avg / p50", f"{_ms(day.avg_latency_ms)} / {_ms(day.p50_latency_ms)}"),
        ("latency p95 / p99", f"{_ms(day.p95_latency_ms)} / {_ms(day.p99_latency_ms)}  (sketch: within 1%)"),
    ]
    width = max(len(name) for name, _ in rows)
    return [f"{name.ljust(width)}  {value}" for name, value in rows]


def chart(days: list[DailyStats]) -> list[str]:
    """A line per day, oldest first: success rate as a bar of 100%, p99 latency as a bar of the slowest day."""
    if not days:
        return []
    slowest = max((d.p99_latency_ms or 0.0) for d in days) or 1.0
    lines = [f"{'day':10}  {'success rate':<{_BAR + 8}}  p99 latency"]
    for d in days:
        rate = f"{_bar(d.success_rate)} {_percent(d.success_rate):>6}"
        p99 = d.p99_latency_ms
        latency = "-" if p99 is None else f"{_bar(p99 / slowest)} {_ms(p99)}"
        lines.append(f"{d.date}  {rate:<{_BAR + 8}}  {latency}")
    return lines


def _bar(fraction: float) -> str:
    eighths = round(max(0.0, min(fraction, 1.0)) * _BAR * 8)
    return ("█" * (eighths // 8) + (_EIGHTHS[eighths % 8] if eighths % 8 else "")).ljust(_BAR)


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.1f}%"


def _ms(latency: float | None) -> str:
    return "-" if latency is None else f"{latency:.2f} ms"
