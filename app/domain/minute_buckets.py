"""One-minute buckets per task version: consumes StatsPartials (or results), produces each closed minute's error
rate and p99 latency, in time order, for anomaly detection."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from app.contract.records import StatsPartial
from app.domain.daily_stats import WindowStats
from app.domain.latency_sketch import LatencySketch

# A partial lands in the minute of its event_at. A minute closes once `now` (a watermark or the wall clock) is
# past its end plus `lateness`; what arrives for a closed minute is dropped and counted.

MINUTE = timedelta(minutes=1)


@dataclass(frozen=True, slots=True)
class MinuteMetrics:
    """What one task version did in one minute, counting only the results whose program ran."""

    task_id: str
    version: int | None
    minute_end: datetime
    ran: int
    error_rate: float  # (error + timeout) / ran
    p99_latency_ms: float


def minute_start(instant: datetime) -> datetime:
    """The start of the UTC minute an aware instant falls in."""
    return instant.astimezone(UTC).replace(second=0, microsecond=0)


class MinuteBuckets:
    """Open minutes per task version, closed in time order."""

    def __init__(self, lateness: timedelta = timedelta(seconds=5)) -> None:
        self.lateness = lateness
        self.dropped_late = 0
        self._open: dict[tuple[str, int | None, datetime], WindowStats] = {}
        self._closed_before = datetime.min.replace(tzinfo=UTC)  # minutes starting earlier are closed

    def add(self, task_id: str, version: int | None, at: datetime, stats: WindowStats) -> bool:
        """Fold totals at instant `at` into their minute; False (and counted) if that minute has closed."""
        if not stats.ran:
            return True  # validations or rejections only: no error rate, no latency
        start = minute_start(at)
        if start < self._closed_before:
            self.dropped_late += 1
            return False
        bucket = self._open.get((task_id, version, start))
        if bucket is None:
            self._open[(task_id, version, start)] = bucket = WindowStats()
        bucket.merge(stats)
        return True

    def add_partial(self, partial: StatsPartial, sketch: LatencySketch | None = None) -> bool:
        """Fold a StatsPartial into the minute of its event_at (`sketch`: its sketch, if decoded already; merged
        in, not kept)."""
        stats = WindowStats(ok=partial.ok, error=partial.error, timeout=partial.timeout, rejected=partial.rejected,
                            sketch=LatencySketch.from_bytes(partial.sketch) if sketch is None else sketch)
        return self.add(partial.task_id, partial.version, partial.event_at, stats)

    def add_results(self, results: Iterable[Mapping[str, Any]]) -> None:
        """Fold results (their fields) one by one: for tests and small streams; the executor sends partials."""
        for result in results:
            stats = WindowStats()
            stats.add(str(result["status"]), result.get("latency_ms") or 0.0, False)
            self.add(result["task_id"], result.get("version"), result["executed_at"], stats)

    def close(self, now: datetime) -> list[MinuteMetrics]:
        """The minutes that ended at least `lateness` before `now`, oldest first; they are forgotten."""
        horizon = minute_start(now - self.lateness)  # minutes starting before it are closed
        self._closed_before = max(self._closed_before, horizon)
        due = sorted((key for key in self._open if key[2] < horizon), key=lambda key: key[2])
        closed = []
        for task_id, version, start in due:
            stats = self._open.pop((task_id, version, start))
            p99 = stats.sketch.quantile(0.99)
            closed.append(MinuteMetrics(task_id, version, start + MINUTE, stats.ran,
                                        (stats.error + stats.timeout) / stats.ran, p99 or 0.0))
        return closed
