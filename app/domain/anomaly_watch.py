"""Anomaly watch of the tasks one worker owns: consumes StatsPartials, clock ticks and the tasks' targets,
produces the AnomalySignals of each task's closed minutes (app/domain/minute_buckets.py, app/domain/anomaly.py)
and of its targets as soon as they are surely breached (app/domain/anomaly_targets.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from app.contract.records import AnomalySignal, StatsPartial
from app.domain.anomaly import AnomalyDetector, AnomalyThresholds
from app.domain.anomaly_targets import TargetDetector, TargetLimits, Targets
from app.domain.latency_sketch import LatencySketch
from app.domain.minute_buckets import MinuteBuckets

_NEVER = datetime.min.replace(tzinfo=UTC)


@dataclass
class _TaskMinutes:
    buckets: MinuteBuckets
    latest_event: datetime = _NEVER
    arrived_at: datetime = _NEVER  # wall clock, when its latest partial came


@dataclass
class AnomalyWatch:
    """Minute buckets and event-time clocks per task, and one detector over all of them.

    A task's clock is the latest event_at seen for it, so a backlog or a replay of old partials is judged minute
    by minute as it happened. While the task's partials stop arriving the clock moves on with the wall clock,
    once `idle` has passed (an idle source, as in Flink's withIdleness), so the last minutes of a task that stops
    getting traffic are still judged. A minute with no traffic is no observation: no error rate or latency to
    judge, nothing learned; a drop in traffic is not what these signals watch.

    `targets_of` names a task's targets (None: a task without a spec, not judged against targets); they are judged
    on every partial, on the same clock.
    """

    thresholds: AnomalyThresholds = field(default_factory=AnomalyThresholds)
    lateness: timedelta = timedelta(seconds=5)
    idle: timedelta = timedelta(seconds=10)
    target_limits: TargetLimits = field(default_factory=TargetLimits)
    targets_of: Callable[[str], Targets | None] = lambda task_id: None
    _tasks: dict[str, _TaskMinutes] = field(default_factory=dict)
    _detector: AnomalyDetector = field(init=False)
    _targets: TargetDetector = field(init=False)

    def __post_init__(self) -> None:
        self._detector = AnomalyDetector(self.thresholds)
        self._targets = TargetDetector(self.target_limits)

    @property
    def dropped_late(self) -> int:
        """Partials that came for a minute already judged."""
        return sum(task.buckets.dropped_late for task in self._tasks.values())

    def add(self, partial: StatsPartial, now: datetime) -> list[AnomalySignal]:
        """Take one partial arriving at wall-clock `now`; the signals of the minutes its event time closes."""
        task = self._tasks.get(partial.task_id)
        if task is None:
            task = self._tasks[partial.task_id] = _TaskMinutes(MinuteBuckets(self.lateness))
        sketch = LatencySketch.from_bytes(partial.sketch)  # once, for the minutes and the targets
        task.buckets.add_partial(partial, sketch)
        task.latest_event = max(task.latest_event, partial.event_at)
        task.arrived_at = now
        targets = self.targets_of(partial.task_id)
        breached = [] if targets is None else self._targets.add(partial, targets, self._clock(task, now), sketch)
        return breached + self._close(task, now)

    def tick(self, now: datetime) -> list[AnomalySignal]:
        """The signals of the minutes that idle tasks' clocks close by wall-clock `now`."""
        self._targets.tick({task_id: self._clock(task, now) for task_id, task in self._tasks.items()},
                           self.targets_of)
        return [signal for task in self._tasks.values() for signal in self._close(task, now)]

    def forget(self, task_ids: set[str]) -> None:
        """Drop tasks another worker owns now: their open minutes and clocks go with them (see the agent)."""
        for task_id in task_ids:
            self._tasks.pop(task_id, None)
        self._targets.forget(task_ids)

    def clock(self, task_id: str, now: datetime) -> datetime | None:
        """A task's event-time clock at wall-clock `now`; None for a task not seen."""
        task = self._tasks.get(task_id)
        return None if task is None else self._clock(task, now)

    def _clock(self, task: _TaskMinutes, now: datetime) -> datetime:
        silent = now - task.arrived_at - self.idle
        return task.latest_event + max(silent, timedelta(0))

    def _close(self, task: _TaskMinutes, now: datetime) -> list[AnomalySignal]:
        return [signal for minute in task.buckets.close(self._clock(task, now))
                for signal in self._detector.observe(minute)]
