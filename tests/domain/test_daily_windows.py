import random
from datetime import UTC, date, datetime, timedelta

import pytest

from app.domain.daily_windows import DailyWindows


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def test_the_day_is_the_local_one() -> None:
    paris = DailyWindows("Europe/Paris")
    assert paris.window_for(at("2026-11-22T22:59:59.999+00:00")).date == "2026-11-22"
    assert paris.window_for(at("2026-11-22T23:00:00+00:00")).date == "2026-11-23"
    window = paris.of_date("2026-11-23")
    assert window.start == at("2026-11-22T23:00:00+00:00") and window.end == at("2026-11-23T23:00:00+00:00")


@pytest.mark.parametrize(("zone", "day", "hours"), [
    ("Europe/Paris", "2026-03-29", 23), ("Europe/Paris", "2026-10-25", 25), ("Europe/Paris", "2026-10-26", 24),
    ("America/Santiago", "2026-09-06", 23),  # the clocks skip local midnight itself
    ("UTC", "2026-03-29", 24),
])
def test_a_day_lasts_from_midnight_to_midnight_across_clock_changes(zone: str, day: str, hours: int) -> None:
    window = DailyWindows(zone).of_date(day)
    assert window.end - window.start == timedelta(hours=hours)


@pytest.mark.parametrize("zone", ["Europe/Paris", "America/Santiago", "Asia/Kolkata", "Pacific/Chatham"])
def test_windows_tile_time_without_gap_or_overlap(zone: str) -> None:
    windows = DailyWindows(zone)
    rng = random.Random(zone)
    for _ in range(2_000):
        instant = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=rng.randrange(366 * 86_400))
        window = windows.window_for(instant)
        assert instant in window
        assert windows.of_date(window.day + timedelta(days=1)).start == window.end


def test_a_window_closes_after_its_grace() -> None:
    windows = DailyWindows("UTC", grace=timedelta(minutes=10))
    window = windows.of_date(date(2026, 11, 22))
    assert windows.closes_at(window) == at("2026-11-23T00:10:00+00:00")
    assert not windows.is_closed(window, at("2026-11-23T00:09:59+00:00"))
    assert windows.is_closed(window, at("2026-11-23T00:10:00+00:00"))


def test_late_events_count_within_the_grace_only() -> None:
    windows = DailyWindows("UTC", grace=timedelta(minutes=10))
    late = at("2026-11-22T23:59:00+00:00")
    assert windows.accepts(late, now=at("2026-11-23T00:05:00+00:00"))
    assert not windows.accepts(late, now=at("2026-11-23T00:10:00+00:00"))
    assert windows.today(at("2026-11-23T00:05:00+00:00")).date == "2026-11-23"


def test_refusals() -> None:
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        DailyWindows("Mars/Olympus")
    with pytest.raises(ValueError, match="grace"):
        DailyWindows("UTC", grace=timedelta(seconds=-1))
    with pytest.raises(ValueError, match="naive datetime"):
        DailyWindows("UTC").window_for(datetime(2026, 11, 22))
