"""When a task's active program falls short: consumes its validations and anomaly signals, produces a Shortfall (the
figures for the request) and the diverse failing examples to show a generator."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from app.contract.records import AnomalyMetric, AnomalySignal, FailingExample, ImprovementTrigger, Validation
from app.domain.diversity import choose_diverse, features

# A task falls short when, over its last `window` validations of the active version (at least `min_validations`), an
# exact one-sided binomial test rejects "accuracy >= accuracy_target" at level `alpha`: P(X <= matched) < alpha for X
# ~ Binomial(validated, accuracy_target). It is tested after every batch, so over many looks the chance of a false
# alarm is above `alpha` (hence a small one); the hysteresis below bounds what a false alarm costs: one request. An
# error-rate (or timeout) anomaly signal on the active version falls short at once.
# Hysteresis: one request per incident. Once a task has fallen short, nothing more is asked for it until a new version
# goes live (the watch starts afresh on it) or the task recovers: its last `min_validations` validations since then
# reach the target, after which it may fall short again.

_SIGNAL_METRICS = frozenset({AnomalyMetric.ERROR_RATE, AnomalyMetric.TIMEOUTS})


def binomial_lower_tail(matched: int, validated: int, p: float) -> float:
    """P(X <= matched) for X ~ Binomial(validated, p), summed exactly in log space (no overflow at large n)."""
    if validated <= 0 or matched >= validated or p <= 0:
        return 1.0
    if p >= 1:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    total = 0.0
    for k in range(matched + 1):
        log_term = (math.lgamma(validated + 1) - math.lgamma(k + 1) - math.lgamma(validated - k + 1)
                    + k * log_p + (validated - k) * log_q)
        total += math.exp(log_term)
    return min(1.0, total)


@dataclass(frozen=True, slots=True)
class Shortfall:
    """Why a task's program needs improving: the figures go on the request."""

    trigger: ImprovementTrigger
    reason: str
    accuracy: float | None
    validated: int


@dataclass(slots=True)
class _TaskWatch:
    version: int | None
    outcomes: deque[bool]
    failures: deque[FailingExample]
    in_incident: bool = False
    since_incident: deque[bool] = field(default_factory=deque)  # the last min_validations outcomes since then


class ImprovementWatch:
    """Per task: the active version's recent validations and failures, and whether an incident is open."""

    def __init__(self, min_validations: int = 50, window: int = 200, alpha: float = 0.01,
                 failures_kept: int = 200) -> None:
        if not 1 <= min_validations <= window:
            raise ValueError(f"min_validations ({min_validations}) must be between 1 and window ({window})")
        self.min_validations, self.window, self.alpha = min_validations, window, alpha
        self._failures_kept = failures_kept
        self._tasks: dict[str, _TaskWatch] = {}

    def _watch(self, task_id: str, active_version: int | None) -> _TaskWatch:
        watch = self._tasks.get(task_id)
        if watch is None or watch.version != active_version:  # a new version is live: a new watch, re-armed
            watch = self._tasks[task_id] = _TaskWatch(active_version, deque(maxlen=self.window),
                                                     deque(maxlen=self._failures_kept))
        return watch

    def in_incident(self, task_id: str, active_version: int | None) -> bool:
        """Whether the task's active version has an open incident (its request made, no recovery yet)."""
        watch = self._tasks.get(task_id)
        return watch is not None and watch.version == active_version and watch.in_incident

    def open_incident(self, task_id: str, active_version: int | None) -> None:
        """Mark an incident as open (a request was made for it, here or before a restart)."""
        self._watch(task_id, active_version).in_incident = True

    def observe_validation(self, validation: Validation, active_version: int | None,
                           accuracy_target: float) -> Shortfall | None:
        """Fold in one validation; a Shortfall when this one makes the task fall short outside an incident."""
        if validation.match is None or validation.version != active_version or active_version is None:
            return None  # expired, failed, or another version's (a canary's): says nothing of the active one
        watch = self._watch(validation.task_id, active_version)
        watch.outcomes.append(validation.match)
        if not validation.match:
            got, error = validation.program_output, None
            if got is None and validation.details:
                error = validation.details
            watch.failures.append(FailingExample(input=validation.input, expected=validation.oracle_output,
                                                 got=got, error=error))
        if watch.in_incident:
            recent = watch.since_incident
            recent.append(validation.match)
            if len(recent) > self.min_validations:
                recent.popleft()
            if len(recent) == self.min_validations and sum(recent) / len(recent) >= accuracy_target:
                watch.in_incident = False  # recovered: re-armed, on fresh evidence only
                recent.clear()
                watch.outcomes.clear()
            return None
        return self._judge(watch, accuracy_target)

    def _judge(self, watch: _TaskWatch, accuracy_target: float) -> Shortfall | None:
        validated = len(watch.outcomes)
        if validated < self.min_validations:
            return None
        matched = sum(watch.outcomes)
        p_value = binomial_lower_tail(matched, validated, accuracy_target)
        if p_value >= self.alpha:
            return None
        accuracy = matched / validated
        return Shortfall(ImprovementTrigger.ACCURACY,
                         f"v{watch.version}: validated accuracy {accuracy:.3f} ({matched} of {validated}) is below "
                         f"the target {accuracy_target:.3f} (one-sided exact binomial test, p = {p_value:.2g} < "
                         f"{self.alpha:g})", accuracy, validated)

    def observe_signal(self, signal: AnomalySignal, active_version: int | None) -> Shortfall | None:
        """A Shortfall for an error-rate or timeout signal on the active version, outside an incident."""
        if signal.metric not in _SIGNAL_METRICS or signal.version != active_version or active_version is None:
            return None
        watch = self._watch(signal.task_id, active_version)
        if watch.in_incident:
            return None
        validated = len(watch.outcomes)
        return Shortfall(ImprovementTrigger.ANOMALY,
                         f"v{active_version}: {signal.hint} ({signal.metric.value} {signal.value:.3g}, baseline "
                         f"{signal.baseline:.3g}, {signal.method.value} score {signal.score:.1f})",
                         sum(watch.outcomes) / validated if validated else None, validated)

    def failing_examples(self, task_id: str, count: int) -> list[FailingExample]:
        """Up to `count` of the task's recent failures, as different from each other as they come (newest first
        among equals)."""
        watch = self._tasks.get(task_id)
        if watch is None:
            return []
        newest_first = list(reversed(watch.failures))
        return choose_diverse(newest_first, count, lambda failure: features(
            {"input": failure.input, "expected": failure.expected, "got": failure.got, "error": failure.error}))
