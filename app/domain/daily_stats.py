"""Daily statistics per task and per task version: consumes results, validations or StatsPartials, produces
StatsPartials (per batch, for the executor) and DailyStats (per closed or running day)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from app.contract.records import DailyStats, ExecutionResult, StatsPartial, ValidationStatus
from app.domain.daily_windows import DailyWindow, DailyWindows
from app.domain.latency_sketch import LatencySketch
from app.domain.validation import ValidationFields

# WindowStats is the accumulator of one task/version/day. Merging is associative and commutative, so partials
# can be folded in any order and grouping. Latency figures cover the results whose program ran (ok, error,
# timeout); a rejected request never ran, is never sampled, and counts only in executions and rejected.

ALL_VERSIONS = "all"
_STATUSES = ("ok", "error", "timeout", "rejected")


@dataclass(frozen=True, slots=True)
class StatsKey:
    """What one DailyStats covers; encoded "task/version/date" on the analytics topic ("all" for version None)."""

    task_id: str
    version: int | None
    date: str

    def encode(self) -> str:
        """The key as tables store it, task_id/version/date (version ALL_VERSIONS for the whole task)."""
        version = ALL_VERSIONS if self.version is None else str(self.version)
        return f"{self.task_id}/{version}/{self.date}"

    @classmethod
    def parse(cls, key: str) -> StatsKey:
        """The key encode() wrote; ValueError for anything else."""
        task_id, version, day = key.rsplit("/", 2)
        if not task_id or not (version == ALL_VERSIONS or version.isdigit()):
            raise ValueError(f"not a daily stats key: {key!r}")
        return cls(task_id, None if version == ALL_VERSIONS else int(version), day)


def stats_keys_of(partial: StatsPartial) -> list[StatsKey]:
    """The windows a partial counts in: its version's and the all-versions one (only that, without a version)."""
    whole_task = StatsKey(partial.task_id, None, partial.date)
    return [whole_task] if partial.version is None else [StatsKey(partial.task_id, partial.version, partial.date),
                                                         whole_task]


@dataclass
class WindowStats:
    """The running totals of one task/version/day."""

    ok: int = 0
    error: int = 0
    timeout: int = 0
    rejected: int = 0
    sampled: int = 0
    validated: int = 0
    matched: int = 0
    latency_sum_ms: float = 0.0
    sketch: LatencySketch = field(default_factory=LatencySketch)

    @property
    def executions(self) -> int:
        return self.ok + self.error + self.timeout + self.rejected

    @property
    def ran(self) -> int:
        """Results whose program ran: the ones with a latency."""
        return self.ok + self.error + self.timeout

    def add(self, status: str, latency_ms: float, sampled: bool) -> None:
        """Count one result."""
        if status not in _STATUSES:
            raise ValueError(f"unknown result status {status!r}")
        setattr(self, status, getattr(self, status) + 1)
        if status != "rejected":
            self.latency_sum_ms += latency_ms
            self.sketch.add(latency_ms)
        self.sampled += sampled

    def add_validation(self, validation: ValidationFields) -> None:
        """Count one validation (its fields); expired and failed ones validated nothing."""
        if validation["status"] == ValidationStatus.VALIDATED:
            self.validated += 1
            self.matched += bool(validation["match"])

    def merge(self, other: WindowStats) -> None:
        """Fold `other` in (in place); `other` is unchanged."""
        for name in ("ok", "error", "timeout", "rejected", "sampled", "validated", "matched", "latency_sum_ms"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.sketch.merge(other.sketch)

    @classmethod
    def from_partial(cls, partial: StatsPartial, time_zone: str) -> WindowStats:
        """The totals a partial carries. ValueError if its day was taken in another zone than `time_zone`
        (an emitter configured differently), SketchError if its sketch cannot be read."""
        if partial.time_zone != time_zone:
            raise ValueError(f"partial of {partial.task_id} dated in {partial.time_zone}, not {time_zone}")
        return cls(ok=partial.ok, error=partial.error, timeout=partial.timeout, rejected=partial.rejected,
                   sampled=partial.sampled, validated=partial.validated, matched=partial.matched,
                   latency_sum_ms=partial.latency_sum_ms, sketch=LatencySketch.from_bytes(partial.sketch))

    def to_partial(self, task_id: str, version: int | None, window: DailyWindow, time_zone: str,
                   event_at: datetime) -> StatsPartial:
        """These totals as a partial of one task/version/day, the latest event summarised at `event_at`."""
        return StatsPartial(task_id=task_id, version=version, date=window.date, time_zone=time_zone, ok=self.ok,
                            error=self.error, timeout=self.timeout, rejected=self.rejected, sampled=self.sampled,
                            validated=self.validated, matched=self.matched, latency_sum_ms=self.latency_sum_ms,
                            sketch=self.sketch.to_bytes(), event_at=event_at)

    def to_daily_stats(self, key: StatsKey, windows: DailyWindows, closed_at: datetime | None = None) -> DailyStats:
        """The DailyStats record of these totals; `closed_at` None while the window is open."""
        window = windows.of_date(key.date)
        ran, executions, sketch = self.ran, self.executions, self.sketch
        return DailyStats(
            task_id=key.task_id, version=key.version, date=key.date, time_zone=windows.time_zone,
            executions=executions, ok=self.ok, error=self.error, timeout=self.timeout, rejected=self.rejected,
            success_rate=self.ok / executions if executions else 0.0, sampled=self.sampled,
            sampling_rate=self.sampled / ran if ran else 0.0, validated=self.validated, matched=self.matched,
            accuracy=self.matched / self.validated if self.validated else None,
            avg_latency_ms=self.latency_sum_ms / ran if ran else None,
            p50_latency_ms=sketch.quantile(0.50), p95_latency_ms=sketch.quantile(0.95),
            p99_latency_ms=sketch.quantile(0.99), sketch=sketch.to_bytes(), window_start=window.start,
            window_end=window.end, closed_at=closed_at,
        )


class _Group:
    """One task/version/day of a batch being summarised: counts by status, and the latencies to sketch."""

    __slots__ = ("counts", "latencies", "latest", "sampled")

    def __init__(self, executed_at: datetime) -> None:
        self.counts: dict[str, int] = {}
        self.latencies: list[float] = []
        self.sampled = 0
        self.latest = executed_at

    def to_stats(self) -> WindowStats:
        unknown = {str(status) for status in self.counts} - set(_STATUSES)
        if unknown:
            raise ValueError(f"unknown result status {sorted(unknown)[0]!r}")
        stats = WindowStats(sampled=self.sampled, latency_sum_ms=sum(self.latencies))
        for status, count in self.counts.items():  # StrEnum members or their values
            setattr(stats, str(status), count)
        stats.sketch.add_all(self.latencies)
        return stats


def summarise_results(results: Iterable[ExecutionResult | Mapping[str, Any]],
                      windows: DailyWindows) -> list[StatsPartial]:
    """One StatsPartial per task/version/day of a batch of results (models, or their fields as the executor
    holds them), in the order each group first appears. It runs on the executor's hot path: the loop does
    no more than count and collect, and the sketch takes each group's latencies at once."""
    by_day: dict[DailyWindow, dict[tuple[str, int | None], _Group]] = {}
    in_order: list[tuple[str, int | None, DailyWindow, _Group]] = []  # partials in order of first appearance
    groups: dict[tuple[str, int | None], _Group] = {}
    window: DailyWindow = windows.of_date("1970-01-01")  # no result falls in it: the first one moves on
    last_at: datetime | None = None
    for result in results:
        fields = result.model_dump() if isinstance(result, ExecutionResult) else result
        executed_at = fields["executed_at"]
        if executed_at is not last_at:  # a batch's results share one executed_at: skip the zone maths
            last_at = executed_at
            if executed_at.tzinfo is None or executed_at not in window:
                window = windows.window_for(executed_at)
                groups = by_day.setdefault(window, {})
        group_key = (fields["task_id"], fields["version"])
        group = groups.get(group_key)
        if group is None:
            group = groups[group_key] = _Group(executed_at)
            in_order.append((group_key[0], group_key[1], window, group))
        elif executed_at > group.latest:
            group.latest = executed_at
        status = fields["status"]
        group.counts[status] = group.counts.get(status, 0) + 1
        if status != "rejected":
            group.latencies.append(fields["latency_ms"] or 0.0)
        if fields["sampled_for_validation"]:
            group.sampled += 1
    return [group.to_stats().to_partial(task_id, version, day, windows.time_zone, group.latest)
            for task_id, version, day, group in in_order]


def summarise_validations(validations: Iterable[ValidationFields], windows: DailyWindows) -> list[StatsPartial]:
    """One StatsPartial per task/version/day of a batch of validations (their fields: app/domain/validation.py),
    the day of validated_at."""
    groups: dict[tuple[str, int, DailyWindow], WindowStats] = {}
    latest: dict[tuple[str, int, DailyWindow], datetime] = {}
    window: DailyWindow = windows.of_date("1970-01-01")  # no validation falls in it: the first one moves on
    for validation in validations:
        at = validation["validated_at"]
        if at.tzinfo is None or at not in window:  # a batch's mostly share a day: skip the zone maths
            window = windows.window_for(at)  # (which refuses a naive time)
        group = (validation["task_id"], validation["version"], window)
        stats = groups.get(group)
        if stats is None:  # (a WindowStats holds a sketch: not one made per validation only to be dropped)
            stats = groups[group] = WindowStats()
            latest[group] = at
        stats.add_validation(validation)
        if at > latest[group]:
            latest[group] = at
    return [stats.to_partial(group[0], group[1], group[2], windows.time_zone, latest[group])
            for group, stats in groups.items()]
