"""Anomaly detection on one-minute metrics: consumes MinuteMetrics in time order, produces AnomalySignals when a task
version's error rate or p99 latency rises (a z-score for spikes, an EWMA for slow drifts)."""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime

from app.contract.records import AnomalyMethod, AnomalyMetric, AnomalySignal
from app.domain.minute_buckets import MinuteMetrics

# Per task version and metric (error rate, p99 latency), two methods watch each closed minute, upward only:
# - zscore: the minute against the mean and stdev of the last `baseline_minutes` quiet minutes (sudden spikes);
# - ewma: an exponentially weighted mean (weight `ewma_lambda`) against a reference mean that follows quiet minutes
#   only slowly (`reference_alpha` per minute), in units of the chart's stdev sigma*sqrt(l/(2-l)): slow drifts, which
#   a rolling baseline would learn as normal.
# Hysteresis: a detector that raised a signal stays quiet until both scores have stayed under their re-arm thresholds
# for `rearm_minutes`, so one incident is one signal; minutes inside an incident teach no baseline.
# Stdevs have floors, so a perfectly steady metric does not turn noise into an incident: for error rates the binomial
# stdev at max(mean, `error_rate_floor`), for latency `latency_floor` times the mean.
# A version seen for the first time starts from a copy of the baseline of its task's warmed-up version seen last, so a
# canary is judged against what the task did before it from its first minute, not after an hour of learning (which
# would learn a broken canary as normal); a task's first version learns for `baseline_minutes`.


@dataclass(frozen=True, slots=True)
class AnomalyThresholds:
    """The knobs, as settings pass them in."""

    baseline_minutes: int = 60
    min_executions: int = 20  # a minute with fewer results that ran says too little: skipped
    zscore_raise: float = 6.0
    zscore_rearm: float = 2.0
    ewma_lambda: float = 0.1
    ewma_raise: float = 4.5
    ewma_rearm: float = 1.0
    rearm_minutes: int = 15  # consecutive minutes under both re-arm thresholds that end an incident
    reference_alpha: float = 0.002
    error_rate_floor: float = 0.02
    latency_floor: float = 0.05

    def __post_init__(self) -> None:
        if self.baseline_minutes < 2:
            raise ValueError("baseline_minutes must be at least 2 (a stdev needs two minutes)")
        if not (0 < self.ewma_lambda <= 1 and 0 < self.reference_alpha < 1):
            raise ValueError("ewma_lambda must be in (0, 1] and reference_alpha in (0, 1)")
        if self.zscore_rearm > self.zscore_raise or self.ewma_rearm > self.ewma_raise:
            raise ValueError("a re-arm threshold above its raise threshold would end incidents before they start")


@dataclass
class MetricDetector:
    """The state of one task version's metric."""

    metric: AnomalyMetric
    limits: AnomalyThresholds
    history: deque[float] = field(default_factory=deque)
    ewma: float = 0.0
    reference_mean: float = 0.0
    reference_var: float = 0.0
    armed: bool = True
    quiet_minutes: int = 0  # while disarmed: how long both scores have been under their re-arm thresholds

    def _floor(self, mean: float, ran: int) -> float:
        if self.metric == AnomalyMetric.ERROR_RATE:
            rate = min(max(mean, self.limits.error_rate_floor), 1.0)
            return math.sqrt(rate * (1 - rate) / ran)
        return self.limits.latency_floor * abs(mean)

    def observe(self, value: float, ran: int) -> tuple[AnomalyMethod, float, float, float] | None:
        """Take one minute; (method, score, baseline, value) when it raises a signal."""
        limits = self.limits
        if len(self.history) < limits.baseline_minutes:  # warming up: learn what normal is
            self.history.append(value)
            self.ewma = self.reference_mean = statistics.fmean(self.history)
            self.reference_var = statistics.pvariance(self.history)
            return None
        mean, long_run_sd = statistics.fmean(self.history), math.sqrt(self.reference_var)
        # The long-run stdev bounds the rolling one from below: an hour that happened to be calm must not make
        # ordinary noise look like a spike.
        zscore = (value - mean) / max(statistics.stdev(self.history), long_run_sd, self._floor(mean, ran))
        lam = limits.ewma_lambda
        self.ewma = lam * value + (1 - lam) * self.ewma
        chart_sd = max(long_run_sd, self._floor(self.reference_mean, ran))
        ewma_score = (self.ewma - self.reference_mean) / (chart_sd * math.sqrt(lam / (2 - lam)))
        raised: tuple[AnomalyMethod, float, float, float] | None = None
        if self.armed:
            if zscore >= limits.zscore_raise:
                raised = (AnomalyMethod.ZSCORE, zscore, mean, value)
            elif ewma_score >= limits.ewma_raise:
                raised = (AnomalyMethod.EWMA, ewma_score, self.reference_mean, self.ewma)
            self.armed, self.quiet_minutes = raised is None, 0
        else:
            quiet = zscore < limits.zscore_rearm and ewma_score < limits.ewma_rearm
            self.quiet_minutes = self.quiet_minutes + 1 if quiet else 0
            self.armed = self.quiet_minutes >= limits.rearm_minutes
        if self.armed:
            self.history.append(value)
            if len(self.history) > limits.baseline_minutes:
                self.history.popleft()
            alpha = limits.reference_alpha
            deviation = value - self.reference_mean
            self.reference_mean += alpha * deviation
            self.reference_var = (1 - alpha) * (self.reference_var + alpha * deviation * deviation)
        return raised


_NAMES = {AnomalyMetric.ERROR_RATE: "error rate", AnomalyMetric.P99_LATENCY: "p99 latency"}


def _shown(metric: AnomalyMetric, value: float) -> str:
    return f"{value:.1%}" if metric == AnomalyMetric.ERROR_RATE else f"{value:.1f} ms"


def hint_for(metric: AnomalyMetric, method: AnomalyMethod, value: float, baseline: float) -> str:
    """One line for a human: what changed, by how much."""
    how = "jumped" if method == AnomalyMethod.ZSCORE else "drifted up"
    against = "its recent level" if method == AnomalyMethod.ZSCORE else "its long-run level"
    return f"{_NAMES[metric]} {how} to {_shown(metric, value)} against {_shown(metric, baseline)}, {against}"


class AnomalyDetector:
    """Detectors for every task version and metric seen."""

    def __init__(self, thresholds: AnomalyThresholds | None = None) -> None:
        self.thresholds = thresholds or AnomalyThresholds()
        self._detectors: dict[tuple[str, int | None, AnomalyMetric], MetricDetector] = {}
        self._last_seen: dict[tuple[str, int | None, AnomalyMetric], datetime] = {}

    def observe(self, minute: MinuteMetrics) -> list[AnomalySignal]:
        """Take one closed minute of one task version; the signals it raises (usually none)."""
        if minute.ran < self.thresholds.min_executions:
            return []
        signals = []
        for metric, value in ((AnomalyMetric.ERROR_RATE, minute.error_rate),
                              (AnomalyMetric.P99_LATENCY, minute.p99_latency_ms)):
            key = (minute.task_id, minute.version, metric)
            detector = self._detectors.get(key)
            if detector is None:
                detector = self._detectors[key] = self._seeded(minute.task_id, metric)
            self._last_seen[key] = minute.minute_end
            raised = detector.observe(value, minute.ran)
            if raised is not None:
                method, score, baseline, shown = raised
                signals.append(self._signal(minute, metric, method, score, baseline, shown, minute.minute_end))
        return signals

    def _seeded(self, task_id: str, metric: AnomalyMetric) -> MetricDetector:
        """A new version's detector: a copy of the baseline of the task's warmed-up version seen last."""
        warm = [key for key, detector in self._detectors.items()
                if key[0] == task_id and key[2] == metric and len(detector.history) >= self.thresholds.baseline_minutes]
        if not warm:
            return MetricDetector(metric, self.thresholds)
        source = self._detectors[max(warm, key=self._last_seen.__getitem__)]
        return MetricDetector(metric, self.thresholds, history=deque(source.history), ewma=source.reference_mean,
                              reference_mean=source.reference_mean, reference_var=source.reference_var)

    @staticmethod
    def _signal(minute: MinuteMetrics, metric: AnomalyMetric, method: AnomalyMethod, score: float,
                baseline: float, value: float, detected_at: datetime) -> AnomalySignal:
        return AnomalySignal(task_id=minute.task_id, version=minute.version, metric=metric, value=value,
                             baseline=baseline, score=score, method=method,
                             hint=hint_for(metric, method, value, baseline), detected_at=detected_at)
