import math
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from app.contract.records import AnomalyMethod, AnomalyMetric, AnomalySignal
from app.domain.anomaly import AnomalyDetector, AnomalyThresholds
from app.domain.minute_buckets import MinuteBuckets, MinuteMetrics

T0 = datetime(2026, 11, 22, tzinfo=UTC)
RAN = 300  # results per minute


def minutes(seed: int, count: int, error_rate: float = 0.01, p99_ms: float = 50.0,
            version: int = 1) -> Iterator[MinuteMetrics]:
    """A quiet task version: binomial errors, p99 with 8% log-normal noise from minute to minute."""
    rng = random.Random(seed)
    for m in range(count):
        errors = sum(rng.random() < error_rate for _ in range(RAN))
        yield MinuteMetrics("spam", version, T0 + timedelta(minutes=m + 1), RAN, errors / RAN,
                            p99_ms * math.exp(rng.gauss(0, 0.08)))


def run(stream: Iterator[MinuteMetrics], detector: AnomalyDetector | None = None) -> list[AnomalySignal]:
    detector = detector or AnomalyDetector()
    return [signal for minute in stream for signal in detector.observe(minute)]


def with_changes(stream: Iterator[MinuteMetrics], error_rate: dict[int, float] | None = None,
                 p99_extra_ms: dict[int, float] | None = None) -> Iterator[MinuteMetrics]:
    """The stream with some minutes' error rate replaced, or latency added."""
    for m, minute in enumerate(stream):
        rate = (error_rate or {}).get(m, minute.error_rate)
        extra = (p99_extra_ms or {}).get(m, 0.0)
        yield MinuteMetrics(minute.task_id, minute.version, minute.minute_end, minute.ran, rate,
                            minute.p99_latency_ms + extra)


@pytest.mark.parametrize("seed", range(5))
def test_a_quiet_noisy_day_raises_nothing(seed: int) -> None:
    assert run(minutes(seed, 1440)) == []


def test_a_spike_is_one_zscore_signal() -> None:
    spike = {m: 0.2 for m in range(180, 183)}
    [signal] = run(with_changes(minutes(1, 360), error_rate=spike))
    assert (signal.metric, signal.method, signal.version) == (AnomalyMetric.ERROR_RATE, AnomalyMethod.ZSCORE, 1)
    assert signal.value == 0.2 and signal.baseline == pytest.approx(0.01, abs=0.005) and signal.score >= 6
    assert signal.detected_at == T0 + timedelta(minutes=181)
    assert signal.hint.startswith("error rate jumped to 20.0% against 1.")


def test_a_slow_drift_is_caught_by_ewma_and_missed_by_the_zscore() -> None:
    # From minute 120, p99 creeps up 0.05 ms a minute: 3 ms (6%) an hour, under 8% noise per minute.
    drift = {m: 0.05 * (m - 120) for m in range(120, 600)}
    [signal] = run(with_changes(minutes(2, 600), p99_extra_ms=drift))
    assert (signal.metric, signal.method) == (AnomalyMetric.P99_LATENCY, AnomalyMethod.EWMA)
    assert signal.detected_at < T0 + timedelta(minutes=120 + 180)
    assert signal.value > signal.baseline and signal.hint.startswith("p99 latency drifted up to")
    zscore_only = AnomalyDetector(AnomalyThresholds(ewma_raise=math.inf))
    assert run(with_changes(minutes(2, 600), p99_extra_ms=drift), zscore_only) == []


def test_one_long_incident_is_one_signal_and_the_next_incident_another() -> None:
    first = {m: 0.3 for m in range(120, 240)}  # two hours
    second = {m: 0.3 for m in range(400, 410)}
    signals = run(with_changes(minutes(3, 600), error_rate=first | second))
    assert [(s.metric, s.detected_at - T0) for s in signals] == [
        (AnomalyMetric.ERROR_RATE, timedelta(minutes=121)), (AnomalyMetric.ERROR_RATE, timedelta(minutes=401))]


def test_without_hysteresis_a_long_incident_would_raise_again() -> None:
    """The same incident, with re-arming at once: proves the test above depends on the hysteresis."""
    eager = AnomalyDetector(AnomalyThresholds(rearm_minutes=0))  # re-armed at once
    signals = run(with_changes(minutes(3, 300), error_rate={m: 0.3 for m in range(120, 240)}), eager)
    assert len(signals) > 1


def test_each_version_has_its_own_baseline() -> None:
    detector = AnomalyDetector()
    active, canary = minutes(4, 240, version=1), with_changes(minutes(5, 240, version=2), error_rate={200: 0.25})
    signals = [s for a, c in zip(active, canary, strict=True) for s in detector.observe(a) + detector.observe(c)]
    assert [(s.version, s.metric) for s in signals] == [(2, AnomalyMetric.ERROR_RATE)]


def test_minutes_with_too_few_results_are_skipped() -> None:
    detector = AnomalyDetector(AnomalyThresholds(min_executions=20))
    for minute in minutes(6, 120):
        detector.observe(minute)
    thin = MinuteMetrics("spam", 1, T0 + timedelta(minutes=121), 19, 1.0, 5_000.0)
    assert detector.observe(thin) == []
    assert detector.observe(MinuteMetrics("spam", 1, thin.minute_end, 20, 1.0, 5_000.0)) != []


def test_from_results_through_minute_buckets() -> None:
    """End to end on raw results: a five-minute latency spike in 3 hours of traffic is one p99 signal."""
    rng = random.Random(7)
    buckets, detector, signals = MinuteBuckets(), AnomalyDetector(AnomalyThresholds(min_executions=50)), []
    for m in range(180):
        start = T0 + timedelta(minutes=m)
        slow = 5.0 if 120 <= m < 125 else 1.0
        buckets.add_results({"task_id": "spam", "version": 1, "status": "ok", "executed_at": start + timedelta(
            seconds=i * 0.6), "latency_ms": slow * rng.lognormvariate(1.0, 0.5)} for i in range(100))
        signals += [s for minute in buckets.close(start + timedelta(minutes=1, seconds=5))
                    for s in detector.observe(minute)]
    [signal] = signals
    assert (signal.metric, signal.method) == (AnomalyMetric.P99_LATENCY, AnomalyMethod.ZSCORE)
    assert signal.detected_at == T0 + timedelta(minutes=121)


@pytest.mark.parametrize("knobs", [{"baseline_minutes": 1}, {"ewma_lambda": 0.0}, {"zscore_rearm": 7.0}])
def test_thresholds_that_make_no_sense_are_refused(knobs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        AnomalyThresholds(**knobs)  # type: ignore[arg-type]
