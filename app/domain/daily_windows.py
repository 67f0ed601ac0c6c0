"""Tumbling one-day windows in event time, in a time zone, with a grace period for late events."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

# Consumes instants (a result's executed_at, aware datetimes) and produces the local day they fall in, that
# day's [start, end) in UTC, and when it closes: end + grace. A day is local midnight to the next local
# midnight, so it lasts 23 or 25 hours when the clocks change (the model is Kafka Streams' DailyTimeWindows).


@dataclass(frozen=True, slots=True)
class DailyWindow:
    """One local day: its date and its bounds as UTC instants (start inclusive, end exclusive)."""

    day: date
    start: datetime
    end: datetime

    @property
    def date(self) -> str:
        """The day as YYYY-MM-DD, as records carry it."""
        return self.day.isoformat()

    def __contains__(self, instant: datetime) -> bool:
        return self.start <= instant < self.end


class DailyWindows:
    """The daily windows of one time zone and grace period."""

    def __init__(self, time_zone: str, grace: timedelta = timedelta(0)) -> None:
        try:
            self.zone = ZoneInfo(time_zone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {time_zone!r}") from exc
        if grace < timedelta(0):
            raise ValueError(f"grace must not be negative, not {grace}")
        self.time_zone = time_zone
        self.grace = grace

    def _midnight(self, day: date) -> datetime:
        # fold=0: where midnight is skipped or repeated, the first reading of the wall clock. The same rule
        # gives a day's start and the previous day's end, so the days tile time without gap or overlap.
        return datetime.combine(day, time(0), tzinfo=self.zone).astimezone(UTC)

    def of_date(self, day: date | str) -> DailyWindow:
        """The window of a local day (a date or YYYY-MM-DD)."""
        if isinstance(day, str):
            day = date.fromisoformat(day)
        return DailyWindow(day, self._midnight(day), self._midnight(day + timedelta(days=1)))

    def window_for(self, instant: datetime) -> DailyWindow:
        """The window an instant falls in. A naive datetime is refused: it names no instant."""
        if instant.tzinfo is None:
            raise ValueError(f"naive datetime {instant.isoformat()}: event times must carry their zone")
        return self.of_date(instant.astimezone(self.zone).date())

    def closes_at(self, window: DailyWindow) -> datetime:
        """When the window closes: its end plus the grace period."""
        return window.end + self.grace

    def is_closed(self, window: DailyWindow, now: datetime) -> bool:
        """Whether the window is closed at `now` (a stream's watermark, or the wall clock when idle)."""
        return now >= self.closes_at(window)

    def accepts(self, instant: datetime, now: datetime) -> bool:
        """Whether an event at `instant` still counts at `now`: false once its window has closed (too late)."""
        return not self.is_closed(self.window_for(instant), now)

    def today(self, now: datetime) -> DailyWindow:
        """The window `now` falls in: the running day."""
        return self.window_for(now)
