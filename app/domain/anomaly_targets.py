"""Target breaches from a task's first minute: consumes each task version's counts as its StatsPartials arrive, with the
task's targets, produces an AnomalySignal (method `target`) as soon as a target is surely breached, with no baseline
to learn first."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from statistics import NormalDist

from app.contract.records import AnomalyMethod, AnomalyMetric, AnomalySignal, StatsPartial, TaskSpec
from app.domain.latency_sketch import LatencySketch
from app.domain.minute_buckets import MINUTE, minute_start

# The counts: results that ran, failed, ran past the latency target; validated and matched.
# "Surely" is a one-sided binomial score test over the last `window_minutes`: with n observations and a share p of
# them on the wrong side, the target p0 is breached when (p - p0) / sqrt(p0 (1 - p0) / n) >= z, z the normal quantile
# of `confidence`, and n >= `min_executions`. That is exactly "p0 lies outside the Wilson score interval" of the
# observed share. What it tests, per task version:
# - error rate: (error + timeout) / ran above the task's `max_error_rate`;
# - latency: the share of calls that ran longer than `latency_target_ms` above 1 - `latency_quantile` (the target is a
#   p99: breached when surely more than 1 % of calls are slower);
# - accuracy: matched / validated below `accuracy_target` (only a task whose executions are validated).
# Hysteresis, as the baseline detectors (app/domain/anomaly.py): a target that raised a signal stays quiet until
# `rearm_minutes` minutes in a row, each closing a window that holds observations, score under `rearm_z`.


@dataclass(frozen=True, slots=True)
class Targets:
    """What a task promised; None: not watched."""

    max_error_rate: float | None = None
    latency_target_ms: float | None = None
    accuracy_target: float | None = None

    @classmethod
    def of(cls, spec: TaskSpec) -> Targets:
        """The targets a task's spec sets."""
        return cls(spec.max_error_rate, spec.latency_target_ms, spec.accuracy_target)


@dataclass(frozen=True, slots=True)
class TargetLimits:
    """The knobs, as settings pass them in (anomaly_target_*, anomaly_rearm_minutes)."""

    min_executions: int = 20
    confidence: float = 0.999
    window_minutes: int = 5
    rearm_minutes: int = 15
    rearm_z: float = 1.0
    latency_quantile: float = 0.99

    def __post_init__(self) -> None:
        if not 0.5 < self.confidence < 1:
            raise ValueError("the target confidence must be in (0.5, 1)")
        if self.window_minutes < 1 or self.min_executions < 1:
            raise ValueError("the target window and minimum executions must be at least 1")

    @property
    def z(self) -> float:
        """The normal quantile of `confidence`: the score a breach must reach."""
        return NormalDist().inv_cdf(self.confidence)


def breach_score(wrong: int, seen: int, bound: float) -> float:
    """How many standard errors (under the bound) the share wrong/seen lies above `bound` (negative: below)."""
    spread = math.sqrt(max(bound * (1 - bound), 1e-12) / seen)  # a bound of 0 or 1: any step past it is far
    return (wrong / seen - bound) / spread


@dataclass
class _Minute:
    counts: list[int] = field(default_factory=lambda: [0] * 5)  # ran, failed, slow, validated, mismatched
    sketch: LatencySketch = field(default_factory=LatencySketch)


@dataclass
class _Watched:
    armed: bool = True
    quiet: int = 0


_RAN, _FAILED, _SLOW, _VALIDATED, _MISMATCHED = range(5)
_METRICS = {  # metric -> (index of n, index of the ones on the wrong side)
    AnomalyMetric.ERROR_RATE: (_RAN, _FAILED),
    AnomalyMetric.P99_LATENCY: (_RAN, _SLOW),
    AnomalyMetric.ACCURACY: (_VALIDATED, _MISMATCHED),
}


class TargetDetector:
    """Windows of minute counts and an incident state per task version and target."""

    def __init__(self, limits: TargetLimits | None = None) -> None:
        self.limits = limits or TargetLimits()
        self._z = self.limits.z
        self._minutes: dict[tuple[str, int], dict[datetime, _Minute]] = {}
        self._watched: dict[tuple[str, int, AnomalyMetric], _Watched] = {}
        self._judged_until: dict[tuple[str, int], datetime] = {}  # minutes before it were judged for re-arming

    def add(self, partial: StatsPartial, targets: Targets, clock: datetime,
            sketch: LatencySketch | None = None) -> list[AnomalySignal]:
        """Fold one partial in and judge its task version's targets now (`clock`: the task's event-time clock;
        `sketch`: the partial's, if decoded already)."""
        if partial.version is None:
            return []  # rejections of no version: nothing ran
        key = (partial.task_id, partial.version)
        minutes = self._minutes.setdefault(key, {})
        start = minute_start(partial.event_at)
        if start <= minute_start(clock) - self.limits.window_minutes * MINUTE:
            return []  # older than any window still judged
        minute = minutes.get(start)
        if minute is None:
            minute = minutes[start] = _Minute()
        counts, ran = minute.counts, partial.ok + partial.error + partial.timeout
        counts[_RAN] += ran
        counts[_FAILED] += partial.error + partial.timeout
        counts[_VALIDATED] += partial.validated
        counts[_MISMATCHED] += partial.validated - partial.matched
        if ran and partial.sketch:
            sketch = LatencySketch.from_bytes(partial.sketch) if sketch is None else sketch
            if targets.latency_target_ms is not None:
                counts[_SLOW] += sketch.count_above(targets.latency_target_ms)
            minute.sketch.merge(sketch)
        self._rearm(key, targets, clock)
        signals = []
        for metric, bound in _bounds(targets, self.limits):
            watched = self._watched.setdefault((*key, metric), _Watched())
            n, wrong = self._window(key, metric, minute_start(clock) + MINUTE)
            if watched.armed and n >= self.limits.min_executions and breach_score(wrong, n, bound) >= self._z:
                watched.armed, watched.quiet = False, 0
                signals.append(self._signal(key, metric, n, wrong, bound, targets, partial.event_at,
                                            minute_start(clock) + MINUTE))
        return signals

    def tick(self, clocks: Mapping[str, datetime], targets_of: Callable[[str], Targets | None]) -> None:
        """Judge the minutes the tasks' clocks have closed since their last partials, for re-arming."""
        for key in list(self._minutes):
            clock, targets = clocks.get(key[0]), targets_of(key[0])
            if clock is not None and targets is not None:
                self._rearm(key, targets, clock)

    def forget(self, task_ids: Iterable[str]) -> None:
        """Drop the state of tasks another worker owns now."""
        gone = set(task_ids)
        for key in [k for k in self._minutes if k[0] in gone]:
            del self._minutes[key]
            self._judged_until.pop(key, None)
        for watched in [k for k in self._watched if k[0] in gone]:
            del self._watched[watched]

    def _window(self, key: tuple[str, int], metric: AnomalyMetric, end: datetime) -> tuple[int, int]:
        """(n, wrong) of the metric over the window's minutes starting before `end`."""
        n_at, wrong_at = _METRICS[metric]
        first = end - self.limits.window_minutes * MINUTE
        n = wrong = 0
        for start, minute in self._minutes.get(key, {}).items():
            if first <= start < end:
                n += minute.counts[n_at]
                wrong += minute.counts[wrong_at]
        return n, wrong

    def _rearm(self, key: tuple[str, int], targets: Targets, clock: datetime) -> None:
        """Count, for each target in an incident, the windows closed since last time that look back in bounds;
        then forget the minutes that no window still open holds."""
        now, span = minute_start(clock), self.limits.window_minutes * MINUTE
        minutes = self._minutes.get(key, {})
        end = max(self._judged_until.get(key, now), min(minutes, default=now))
        last_with_data = max(minutes, default=now) + span  # windows ending later hold nothing
        while end < min(now, last_with_data):
            end += MINUTE
            for metric, bound in _bounds(targets, self.limits):
                watched = self._watched.get((*key, metric))
                if watched is None or watched.armed:
                    continue
                n, wrong = self._window(key, metric, end)
                if n:
                    calm = breach_score(wrong, n, bound) < self.limits.rearm_z
                    watched.quiet = watched.quiet + 1 if calm else 0
                    watched.armed = watched.quiet >= self.limits.rearm_minutes
        self._judged_until[key] = now
        for start in [s for s in minutes if s <= now - span]:
            del minutes[start]

    def _signal(self, key: tuple[str, int], metric: AnomalyMetric, n: int, wrong: int, bound: float,
                targets: Targets, at: datetime, end: datetime) -> AnomalySignal:
        score = breach_score(wrong, n, bound)
        minutes = f"the last {self.limits.window_minutes} min"
        if metric is AnomalyMetric.ERROR_RATE:
            value, baseline = wrong / n, bound
            hint = (f"error rate {value:.1%} over {n} calls in {minutes}, above the task's max_error_rate "
                    f"{bound:.1%}")
        elif metric is AnomalyMetric.ACCURACY:
            value, baseline = 1 - wrong / n, 1 - bound
            hint = (f"accuracy {value:.1%} over {n} validations in {minutes}, below the task's accuracy_target "
                    f"{baseline:.1%}")
        else:
            sketch = LatencySketch()
            for start, minute in self._minutes[key].items():
                if end - self.limits.window_minutes * MINUTE <= start < end:
                    sketch.merge(minute.sketch)
            q = self.limits.latency_quantile
            value, baseline = sketch.quantile(q) or 0.0, targets.latency_target_ms or 0.0
            hint = (f"p{q * 100:g} latency {value:.1f} ms: {wrong / n:.1%} of {n} calls in {minutes} ran longer "
                    f"than the task's latency_target_ms {baseline:g} ms")
        return AnomalySignal(task_id=key[0], version=key[1], metric=metric, value=value, baseline=baseline,
                             score=score, method=AnomalyMethod.TARGET, hint=hint, detected_at=at)


def _bounds(targets: Targets, limits: TargetLimits) -> list[tuple[AnomalyMetric, float]]:
    """Each watched target as (metric, the bound on the share of observations on its wrong side)."""
    bounds = []
    if targets.max_error_rate is not None:
        bounds.append((AnomalyMetric.ERROR_RATE, targets.max_error_rate))
    if targets.latency_target_ms is not None:
        bounds.append((AnomalyMetric.P99_LATENCY, 1 - limits.latency_quantile))
    if targets.accuracy_target is not None:
        bounds.append((AnomalyMetric.ACCURACY, 1 - targets.accuracy_target))
    return bounds

