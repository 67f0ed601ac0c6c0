"""The open daily windows of one task: consumes StatsPartials (and the clock), produces the DailyStats of
windows that have closed, and the open ones as JSON, the state an aggregator keeps in its changelog."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

import orjson

from app.contract.records import DailyStats, StatsPartial
from app.domain.daily_stats import StatsKey, WindowStats, stats_keys_of
from app.domain.daily_windows import DailyWindows
from app.domain.latency_sketch import LatencySketch

# A partial whose day has closed already (now >= day end + grace) is late: it is refused, never merged, so a
# window emitted as closed never changes afterwards. The windows also remember the offset of the last message
# merged from each source topic (a task's messages all come from one partition), so a message redelivered after
# a crash is recognised and not counted twice.

_COUNTS = ("ok", "error", "timeout", "rejected", "sampled", "validated", "matched")
_THROUGH = "_through"  # the JSON entry of the offsets merged; never a window key (those hold two slashes)


class OpenWindows:
    """The running totals of one task's open days, per version and for all versions."""

    def __init__(self, task_id: str, windows: DailyWindows) -> None:
        self.task_id = task_id
        self.windows = windows
        self.stats: dict[StatsKey, WindowStats] = {}
        self.through: dict[str, int] = {}  # source -> offset of the last message merged from it

    def __bool__(self) -> bool:
        return bool(self.stats)

    def merged(self, source: str, offset: int) -> bool:
        """Whether the message at `offset` of `source` (the task's partition of a topic) was merged already."""
        return offset <= self.through.get(source, -1)

    def mark(self, source: str, offset: int) -> None:
        """Remember that the message at `offset` of `source` has been merged."""
        self.through[source] = max(offset, self.through.get(source, -1))

    def add(self, partial: StatsPartial, now: datetime) -> bool:
        """Merge a partial of this task; False, merging nothing, if its day is closed at `now` (late).
        ValueError for a partial of another task, zone or an impossible date; SketchError for its sketch."""
        if partial.task_id != self.task_id:
            raise ValueError(f"partial of {partial.task_id} given to the windows of {self.task_id}")
        if self.windows.is_closed(self.windows.of_date(partial.date), now):
            return False
        stats = WindowStats.from_partial(partial, self.windows.time_zone)
        for key in stats_keys_of(partial):
            self.stats.setdefault(key, WindowStats()).merge(stats)
        return True

    def close(self, now: datetime) -> list[DailyStats]:
        """Remove the windows closed at `now` and return their DailyStats, closed_at set to when each closed."""
        closed = []
        for key in [key for key in self.stats if self.windows.is_closed(self.windows.of_date(key.date), now)]:
            closes_at = self.windows.closes_at(self.windows.of_date(key.date))
            closed.append(self.stats.pop(key).to_daily_stats(key, self.windows, closed_at=closes_at))
        return closed

    def running(self) -> list[DailyStats]:
        """The DailyStats of every open window, closed_at None."""
        return [stats.to_daily_stats(key, self.windows) for key, stats in self.stats.items()]

    def to_json(self) -> bytes:
        """The windows as JSON: {"task/version/date": {counts, latency_sum_ms, sketch (base64)}}."""
        state: dict[str, Any] = {}
        for key, stats in self.stats.items():
            fields: dict[str, Any] = {name: getattr(stats, name) for name in _COUNTS}
            fields["latency_sum_ms"] = stats.latency_sum_ms
            fields["sketch"] = base64.b64encode(stats.sketch.to_bytes()).decode()
            state[key.encode()] = fields
        if self.through:
            state[_THROUGH] = self.through
        return orjson.dumps(state)

    @classmethod
    def from_json(cls, task_id: str, data: bytes, windows: DailyWindows) -> OpenWindows:
        """The windows to_json() wrote. ValueError (or SketchError) for anything else."""
        opened = cls(task_id, windows)
        try:
            state = orjson.loads(data)
            opened.through = {str(source): int(offset) for source, offset in state.pop(_THROUGH, {}).items()}
            for encoded, fields in state.items():
                key = StatsKey.parse(encoded)
                if key.task_id != task_id:
                    raise ValueError(f"window {encoded} stored under task {task_id}")
                opened.stats[key] = WindowStats(
                    **{name: int(fields[name]) for name in _COUNTS},
                    latency_sum_ms=float(fields["latency_sum_ms"]),
                    sketch=LatencySketch.from_bytes(base64.b64decode(fields["sketch"])),
                )
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not the open windows of {task_id}: {exc}") from exc
        return opened
