import math
import random
from datetime import UTC, datetime, timedelta
from statistics import NormalDist

import pytest

from app.contract.records import AnomalyMethod, AnomalyMetric, AnomalySignal, StatsPartial
from app.domain.anomaly_targets import TargetDetector, TargetLimits, Targets, breach_score
from app.domain.anomaly_watch import AnomalyWatch
from app.domain.canary import signals_against
from app.domain.latency_sketch import LatencySketch

T0 = datetime(2026, 12, 7, 9, tzinfo=UTC)
ERRORS = Targets(max_error_rate=0.05)


def partial(at: datetime, ok: int = 0, error: int = 0, latency_ms: float = 1.0, validated: int = 0,
            matched: int = 0, version: int = 1, task_id: str = "new") -> StatsPartial:
    sketch = LatencySketch()
    sketch.add_all([latency_ms] * (ok + error))
    return StatsPartial(task_id=task_id, version=version, date=at.date().isoformat(), time_zone="UTC", ok=ok,
                        error=error, validated=validated, matched=matched, sketch=sketch.to_bytes(), event_at=at)


def traffic(seconds: int, error_rate: float, seed: int, start: datetime = T0, per_second: int = 2,
            latency_ms: float = 1.0) -> list[StatsPartial]:
    """A partial a second, each of `per_second` results, each an error with probability error_rate."""
    rng = random.Random(seed)
    out = []
    for s in range(seconds):
        error = sum(rng.random() < error_rate for _ in range(per_second))
        out.append(partial(start + timedelta(seconds=s), ok=per_second - error, error=error, latency_ms=latency_ms))
    return out


def run(detector: TargetDetector, stream: list[StatsPartial], targets: Targets = ERRORS) -> list[AnomalySignal]:
    return [signal for p in stream for signal in detector.add(p, targets, p.event_at)]


def wilson_lower(wrong: int, n: int, z: float) -> float:
    p = wrong / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)


@pytest.mark.parametrize(("wrong", "n", "bound"), [(3, 20, 0.05), (4, 20, 0.05), (10, 20, 0.05), (6, 100, 0.01),
                                                   (5, 100, 0.01), (1, 20, 0.0), (0, 20, 0.0), (30, 40, 0.5)])
def test_the_score_test_is_the_wilson_interval(wrong: int, n: int, bound: float) -> None:
    """Breached (score >= z) exactly when the bound lies below the Wilson interval's lower end."""
    z = NormalDist().inv_cdf(0.999)
    assert (breach_score(wrong, n, bound) >= z) == (wilson_lower(wrong, n, z) > bound + 1e-12)


def test_a_new_task_at_half_errors_is_signalled_in_its_first_seconds_once() -> None:
    stream = traffic(10 * 60, 0.5, seed=1)  # ten minutes at 2 results a second
    [signal] = run(TargetDetector(), stream)
    assert (signal.metric, signal.method, signal.version) == (AnomalyMetric.ERROR_RATE, AnomalyMethod.TARGET, 1)
    assert signal.detected_at < T0 + timedelta(seconds=30), signal  # 20 results is 10 s of this traffic
    assert signal.baseline == 0.05 and 0.35 < signal.value < 0.75 and signal.score >= 3.09
    assert signal.hint.startswith("error rate ") and "above the task's max_error_rate 5.0%" in signal.hint


def test_fewer_results_than_the_minimum_say_nothing() -> None:
    detector = TargetDetector(TargetLimits(min_executions=20))
    assert run(detector, [partial(T0, error=19)]) == []
    [signal] = run(detector, [partial(T0 + timedelta(seconds=1), error=1)])
    assert signal.value == 1.0


def test_a_task_within_its_bound_stays_quiet_for_hours() -> None:
    # 3 % errors against a 5 % bound, judged on every one of 7,200 partials of an hour: no false alarm.
    assert run(TargetDetector(), traffic(3600, 0.03, seed=2, per_second=5)) == []


def test_a_task_just_over_its_bound_is_not_signalled_on_a_few_errors() -> None:
    # 7 % errors against 5 %: a breach, but small; the score test waits for enough results to be sure.
    signals = run(TargetDetector(), traffic(600, 0.07, seed=3, per_second=2))
    assert all(s.detected_at > T0 + timedelta(seconds=60) for s in signals)


def test_an_incident_is_one_signal_until_the_rate_has_been_calm_for_rearm_minutes() -> None:
    limits = TargetLimits(rearm_minutes=5)
    bad1 = traffic(180, 0.5, seed=4)
    calm_short = traffic(240, 0.0, seed=5, start=T0 + timedelta(minutes=3))  # windows calm for too few minutes
    bad2 = traffic(120, 0.5, seed=6, start=T0 + timedelta(minutes=7))
    calm_long = traffic(600, 0.0, seed=7, start=T0 + timedelta(minutes=9))
    bad3 = traffic(120, 0.5, seed=8, start=T0 + timedelta(minutes=19))
    signals = run(TargetDetector(limits), bad1 + calm_short + bad2 + calm_long + bad3)
    assert [s.detected_at.replace(second=0) for s in signals] == [T0, T0 + timedelta(minutes=19)], signals


def test_a_quiet_task_rearms_on_the_clock() -> None:
    detector = TargetDetector(TargetLimits(rearm_minutes=3, window_minutes=2))
    assert len(run(detector, traffic(60, 0.5, seed=9))) == 1
    assert run(detector, traffic(60, 0.0, seed=10, start=T0 + timedelta(minutes=1))) == []
    # No traffic since: its windows hold nothing, which is no calm minute.
    detector.tick({"new": T0 + timedelta(minutes=10)}, lambda task_id: ERRORS)
    assert run(detector, traffic(60, 0.5, seed=11, start=T0 + timedelta(minutes=10))) == []  # not calm long enough
    detector.tick({"new": T0 + timedelta(minutes=11)}, lambda task_id: ERRORS)
    calm = traffic(300, 0.0, seed=12, start=T0 + timedelta(minutes=11))
    assert run(detector, calm) == []
    detector.tick({"new": T0 + timedelta(minutes=20)}, lambda task_id: ERRORS)
    assert len(run(detector, traffic(60, 0.5, seed=13, start=T0 + timedelta(minutes=20)))) == 1


def test_versions_are_judged_apart() -> None:
    detector = TargetDetector()
    good = traffic(120, 0.0, seed=14)
    bad = [partial(p.event_at, ok=p.ok, error=p.error, version=2) for p in traffic(120, 0.5, seed=15)]
    signals = run(detector, sorted(good + bad, key=lambda p: p.event_at))
    assert [s.version for s in signals] == [2]


def test_latency_over_its_target_for_more_than_one_call_in_a_hundred() -> None:
    targets = Targets(latency_target_ms=10.0)
    slow = traffic(120, 0.0, seed=16, latency_ms=40.0)
    [signal] = run(TargetDetector(), slow, targets)
    assert (signal.metric, signal.method) == (AnomalyMetric.P99_LATENCY, AnomalyMethod.TARGET)
    assert signal.value == pytest.approx(40.0, rel=0.02) and signal.baseline == 10.0
    assert "ran longer than the task's latency_target_ms 10 ms" in signal.hint
    # One call in a hundred slower than the target is what a p99 target allows.
    mixed = [partial(T0 + timedelta(seconds=s), ok=1, latency_ms=40.0 if s % 100 == 0 else 2.0) for s in range(3600)]
    assert run(TargetDetector(), mixed, targets) == []


def test_accuracy_below_its_target_once_enough_validations_say_so() -> None:
    targets = Targets(accuracy_target=0.9)
    validations = [partial(T0 + timedelta(seconds=s), validated=2, matched=1) for s in range(60)]
    [signal] = run(TargetDetector(), validations, targets)
    assert (signal.metric, signal.value, signal.baseline) == (AnomalyMetric.ACCURACY, 0.5, 0.9)
    assert signal.detected_at <= T0 + timedelta(seconds=10)
    # 88 % against 90 %: not enough to be sure either way.
    close = [partial(T0 + timedelta(seconds=s), validated=25, matched=22) for s in range(2)]
    assert run(TargetDetector(), close, targets) == []


def test_no_targets_no_signals() -> None:
    assert run(TargetDetector(), traffic(120, 1.0, seed=17, latency_ms=500.0), Targets()) == []


def test_partials_older_than_the_window_are_ignored() -> None:
    detector = TargetDetector()
    old = partial(T0, error=50)
    assert detector.add(old, ERRORS, T0 + timedelta(minutes=30)) == []


def test_the_watch_judges_targets_from_a_tasks_first_partials() -> None:
    watch = AnomalyWatch(targets_of=lambda task_id: ERRORS if task_id == "new" else None)
    now = T0 + timedelta(hours=1)  # a replay: only event time counts
    signals = [s for p in traffic(60, 0.5, seed=18) for s in watch.add(p, now)]
    assert [(s.task_id, s.method) for s in signals] == [("new", AnomalyMethod.TARGET)]
    other = [partial(p.event_at, ok=p.ok, error=p.error, task_id="unknown") for p in traffic(60, 0.5, seed=19)]
    assert [s for p in other for s in watch.add(p, now)] == []  # no spec, no targets


def test_a_canary_is_not_rolled_back_on_its_accuracy_target_signal() -> None:
    """decide() judges a canary's accuracy (against the active version's too); its error rate and latency
    target signals count against it."""
    [accuracy] = run(TargetDetector(), [partial(T0, validated=40, matched=10, version=2)],
                     Targets(accuracy_target=0.9))
    [errors] = run(TargetDetector(), [partial(T0, error=40, version=2)])
    assert signals_against([accuracy, errors], 2, T0 - timedelta(minutes=1)) == [errors]
