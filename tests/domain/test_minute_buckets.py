from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from app.contract.records import StatsPartial
from app.domain.daily_stats import WindowStats
from app.domain.latency_sketch import LatencySketch
from app.domain.minute_buckets import MinuteBuckets, minute_start

T0 = datetime(2026, 11, 22, 12, tzinfo=UTC)


def partial(at: datetime, ok: int = 0, error: int = 0, timeout: int = 0, latencies: tuple[float, ...] = (),
            version: int | None = 1, **counts: Any) -> StatsPartial:
    sketch = LatencySketch()
    sketch.add_all(latencies)
    return StatsPartial(task_id="spam", version=version, date="2026-11-22", time_zone="UTC", ok=ok, error=error,
                        timeout=timeout, sketch=sketch.to_bytes(), event_at=at, **counts)


def test_partials_fold_into_the_minute_of_their_event() -> None:
    buckets = MinuteBuckets(lateness=timedelta(seconds=5))
    buckets.add_partial(partial(T0 + timedelta(seconds=10), ok=3, latencies=(1.0, 2.0, 3.0)))
    buckets.add_partial(partial(T0 + timedelta(seconds=59), error=1, timeout=0, latencies=(100.0,)))
    buckets.add_partial(partial(T0 + timedelta(seconds=60), ok=1, latencies=(1.0,)))
    assert buckets.close(T0 + timedelta(seconds=64)) == []  # the first minute is still within its lateness
    [first] = buckets.close(T0 + timedelta(seconds=65))
    assert (first.minute_end, first.ran, first.error_rate) == (T0 + timedelta(minutes=1), 4, 0.25)
    assert first.p99_latency_ms == pytest.approx(3.0, rel=0.01)  # of 4, rank floor(0.99 * 3): the third
    [second] = buckets.close(T0 + timedelta(minutes=2, seconds=5))
    assert second.ran == 1 and second.error_rate == 0.0


def test_minutes_close_oldest_first_per_version() -> None:
    buckets = MinuteBuckets()
    for at, version in [(T0 + timedelta(minutes=2), 1), (T0, 2), (T0 + timedelta(minutes=1), 1), (T0, 1)]:
        buckets.add_partial(partial(at, ok=1, latencies=(1.0,), version=version))
    closed = buckets.close(T0 + timedelta(minutes=10))
    assert [(m.minute_end - T0, m.version) for m in closed] == [
        (timedelta(minutes=1), 2), (timedelta(minutes=1), 1), (timedelta(minutes=2), 1), (timedelta(minutes=3), 1)]


def test_what_arrives_for_a_closed_minute_is_dropped_and_counted() -> None:
    buckets = MinuteBuckets()
    buckets.close(T0 + timedelta(minutes=1, seconds=5))  # closes the minute at T0, empty as it is
    assert not buckets.add_partial(partial(T0 + timedelta(seconds=30), ok=1, latencies=(1.0,)))
    assert buckets.dropped_late == 1
    assert buckets.add_partial(partial(T0 + timedelta(minutes=1), ok=1, latencies=(1.0,)))


def test_partials_with_nothing_that_ran_make_no_minute() -> None:
    buckets = MinuteBuckets()
    buckets.add_partial(partial(T0, validated=3, matched=3))
    buckets.add_partial(partial(T0, rejected=5, version=None))
    assert buckets.close(T0 + timedelta(hours=1)) == []


def test_results_and_stats_go_the_same_way() -> None:
    buckets = MinuteBuckets()
    buckets.add_results([{"task_id": "spam", "version": 1, "status": "timeout", "latency_ms": 1000.0,
                          "executed_at": T0}])
    stats = WindowStats()
    stats.add("ok", 1.0, False)
    buckets.add("spam", 1, T0 + timedelta(seconds=1), stats)
    [minute] = buckets.close(T0 + timedelta(minutes=2))
    assert minute.ran == 2 and minute.error_rate == 0.5


def test_minute_start_is_utc() -> None:
    paris = datetime.fromisoformat("2026-11-22T13:00:59.5+01:00")
    assert minute_start(paris) == T0
