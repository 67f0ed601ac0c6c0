from datetime import UTC, datetime, timedelta

from app.contract.records import AnomalyMethod, AnomalyMetric, AnomalySignal, StatsPartial
from app.domain.anomaly_watch import AnomalyWatch
from tests.synthetic_partials import partials

T0 = datetime(2026, 11, 22, 9, tzinfo=UTC)
NOW = datetime(2026, 11, 22, 18, tzinfo=UTC)  # the wall clock: hours after the traffic, as in a replay
IDLE, LATENESS = timedelta(seconds=10), timedelta(seconds=5)


def watch() -> AnomalyWatch:
    return AnomalyWatch(lateness=LATENESS, idle=IDLE)


def burst(watch: AnomalyWatch, stream: list[StatsPartial], now: datetime = NOW) -> list[AnomalySignal]:
    """Every partial arriving at once: only the partials' event times can close their minutes."""
    return [signal for partial in stream for signal in watch.add(partial, now)]


def test_a_replayed_spike_is_judged_in_event_time() -> None:
    w = watch()
    spike = list(partials("spam", 1, T0, 120, seed=1, error_rate=lambda m: 0.25 if m in (90, 91) else 0.01))
    [signal] = burst(w, spike)
    assert (signal.metric, signal.method, signal.version) == (AnomalyMetric.ERROR_RATE, AnomalyMethod.ZSCORE, 1)
    assert signal.detected_at == T0 + timedelta(minutes=91)
    assert w.dropped_late == 0


def test_a_quiet_stream_raises_nothing() -> None:
    w = watch()
    assert burst(w, list(partials("spam", 1, T0, 300, seed=2))) == []
    assert w.tick(NOW + timedelta(hours=1)) == []


def test_a_slow_latency_drift_is_caught_by_the_ewma() -> None:
    # From minute 90 p99 creeps up 0.1% a minute (6% an hour), under 8% noise a minute.
    stream = partials("spam", 1, T0, 400, seed=3, p99_ms=lambda m: 50.0 * (1 + 0.001 * max(0, m - 90)))
    [signal] = burst(watch(), list(stream))
    assert (signal.metric, signal.method) == (AnomalyMetric.P99_LATENCY, AnomalyMethod.EWMA)
    assert T0 + timedelta(minutes=120) < signal.detected_at < T0 + timedelta(minutes=330)


def test_the_last_minutes_of_a_task_that_goes_quiet_are_judged_on_the_wall_clock() -> None:
    w = watch()
    stream = list(partials("spam", 1, T0, 80, seed=4, error_rate=lambda m: 0.3 if m == 79 else 0.01))
    assert burst(w, stream) == []  # the spike is in the last minute, which nothing later closes
    last_event = stream[-1].event_at
    assert w.clock("spam", NOW + IDLE) == last_event  # a pause shorter than `idle` moves nothing
    minute_end = T0 + timedelta(minutes=80)
    judged_at = NOW + IDLE + (minute_end - last_event) + LATENESS  # the clock moves with the wall clock
    assert w.tick(judged_at - timedelta(milliseconds=10)) == []
    [signal] = w.tick(judged_at)
    assert signal.detected_at == minute_end and signal.value > 0.2
    assert w.clock("elsewhere", NOW) is None


def test_a_task_with_traffic_keeps_its_event_clock() -> None:
    """Partials an hour behind the wall clock, a minute's worth every 10 s: none is dropped as late."""
    w = watch()
    for i, partial in enumerate(partials("spam", 1, T0, 90, seed=5)):
        w.add(partial, NOW + timedelta(seconds=5 * i))
        w.tick(NOW + timedelta(seconds=5 * i + 4))
    assert w.dropped_late == 0


def test_a_new_version_is_judged_against_its_task_from_its_first_minutes() -> None:
    w = watch()
    burst(w, list(partials("spam", 1, T0, 90, seed=6)))
    later = T0 + timedelta(minutes=90)
    # A canary like the active version raises nothing; a broken one is caught in its third minute.
    assert burst(w, list(partials("spam", 2, later, 30, seed=7))) == []
    later += timedelta(minutes=30)
    [signal] = burst(w, list(partials("spam", 3, later, 5, seed=8, error_rate=lambda m: 0.3 if m >= 2 else 0.01)))
    assert (signal.version, signal.metric, signal.detected_at) == (3, AnomalyMetric.ERROR_RATE,
                                                                   later + timedelta(minutes=3))


def test_a_forgotten_task_is_judged_no_more() -> None:
    w = watch()
    burst(w, list(partials("spam", 1, T0, 80, seed=9, error_rate=lambda m: 0.3 if m == 79 else 0.01)))
    w.forget({"spam"})
    assert w.tick(NOW + timedelta(hours=1)) == [] and w.clock("spam", NOW) is None
