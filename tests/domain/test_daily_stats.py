import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from app.contract.records import (
    Comparison,
    ExecutionResult,
    ExecutionStatus,
    OracleKind,
    StatsPartial,
    Validation,
    ValidationStatus,
)
from app.domain.daily_stats import StatsKey, WindowStats, stats_keys_of, summarise_results, summarise_validations
from app.domain.daily_windows import DailyWindows
from app.domain.latency_sketch import LatencySketch

NOON = datetime(2026, 11, 22, 12, tzinfo=UTC)
WINDOWS = DailyWindows("Europe/Paris", grace=timedelta(minutes=5))


def result(status: str = "ok", latency_ms: float = 1.0, version: int | None = 1, sampled: bool = False,
           task_id: str = "spam", executed_at: datetime = NOON) -> dict[str, Any]:
    return {"task_id": task_id, "version": version, "status": ExecutionStatus(status), "latency_ms": latency_ms,
            "sampled_for_validation": sampled, "executed_at": executed_at}


def validation(match: bool | None, status: ValidationStatus = ValidationStatus.VALIDATED,
               validated_at: datetime = NOON) -> dict[str, Any]:
    """A validation's fields, as the validators make them (app/domain/validation.py)."""
    return Validation(execution_id="e", request_id="r", task_id="spam", version=1, input={},
                      oracle_kind=OracleKind.LABEL, comparison=Comparison.EXACT, status=status, match=match,
                      validated_at=validated_at).model_dump()


def test_a_batch_becomes_one_partial_per_task_version_day() -> None:
    batch = [result("ok", 2.0, sampled=True), result("error", 4.0), result("timeout", 1000.0),
             result("rejected", 0.0, version=None), result("ok", 3.0, version=2),
             result("ok", 1.0, executed_at=datetime(2026, 11, 22, 23, 30, tzinfo=UTC))]  # Paris: the 23rd
    partials = summarise_results(batch, WINDOWS)
    assert [(p.task_id, p.version, p.date) for p in partials] == [
        ("spam", 1, "2026-11-22"), ("spam", None, "2026-11-22"), ("spam", 2, "2026-11-22"),
        ("spam", 1, "2026-11-23")]
    first = partials[0]
    assert (first.ok, first.error, first.timeout, first.rejected, first.sampled) == (1, 1, 1, 0, 1)
    assert first.latency_sum_ms == 1006.0 and first.time_zone == "Europe/Paris" and first.event_at == NOON
    assert LatencySketch.from_bytes(first.sketch).count == 3
    rejected = partials[1]
    assert rejected.rejected == 1 and rejected.latency_sum_ms == 0.0 and rejected.sketch == b""


def test_a_partial_is_stamped_with_its_latest_event() -> None:
    later = NOON + timedelta(seconds=30)
    [partial] = summarise_results([result(executed_at=NOON), result(executed_at=later), result()], WINDOWS)
    assert partial.event_at == later and partial.ok == 3


def test_results_may_be_models() -> None:
    model = ExecutionResult(execution_id="e", request_id="r", task_id="spam", version=1, status=ExecutionStatus.OK,
                            latency_ms=2.5, executed_at=NOON, worker_id="w")
    assert summarise_results([model], WINDOWS) == summarise_results([result("ok", 2.5)], WINDOWS)


def test_validations_count_only_when_validated() -> None:
    [partial] = summarise_validations([validation(True), validation(False), validation(True),
                                       validation(None, ValidationStatus.EXPIRED)], WINDOWS)
    assert (partial.validated, partial.matched, partial.ok, partial.sketch) == (3, 2, 0, b"")


def test_validations_count_on_the_day_and_latest_time_they_were_validated() -> None:
    late, later = datetime(2026, 11, 22, 23, 30, tzinfo=UTC), NOON + timedelta(seconds=30)  # late: the 23rd in Paris
    batch = [validation(True), validation(True, validated_at=late), validation(False, validated_at=later),
             validation(True)]
    assert [(p.date, p.validated, p.matched, p.event_at) for p in summarise_validations(batch, WINDOWS)] == [
        ("2026-11-22", 3, 2, later), ("2026-11-23", 1, 1, late)]
    with pytest.raises(ValueError, match="naive"):
        summarise_validations([validation(True), validation(True, validated_at=datetime(2026, 11, 22, 12))], WINDOWS)


def test_a_partial_counts_for_its_version_and_for_the_whole_task() -> None:
    partial = StatsPartial(task_id="spam", version=3, date="2026-11-22", time_zone="UTC", sketch=b"", event_at=NOON)
    assert stats_keys_of(partial) == [StatsKey("spam", 3, "2026-11-22"), StatsKey("spam", None, "2026-11-22")]
    versionless = partial.model_copy(update={"version": None})
    assert stats_keys_of(versionless) == [StatsKey("spam", None, "2026-11-22")]


@pytest.mark.parametrize("key", [StatsKey("spam-filter", 3, "2026-11-22"), StatsKey("a_b", None, "2026-01-01")])
def test_keys_round_trip(key: StatsKey) -> None:
    assert StatsKey.parse(key.encode()) == key
    assert StatsKey("spam", None, "2026-11-22").encode() == "spam/all/2026-11-22"


@pytest.mark.parametrize("text", ["spam/x/2026-11-22", "/1/2026-11-22", "nonsense"])
def test_keys_that_are_not_stats_keys(text: str) -> None:
    with pytest.raises(ValueError):
        StatsKey.parse(text)


def random_stats(rng: random.Random, n: int) -> WindowStats:
    stats = WindowStats()
    for _ in range(n):
        # Latencies in eighths of a ms: their sums are exact, so grouping cannot change them.
        stats.add(rng.choice(["ok", "ok", "ok", "error", "timeout", "rejected"]), rng.randrange(1, 8000) / 8,
                  rng.random() < 0.1)
        if rng.random() < 0.05:
            stats.add_validation(validation(rng.random() < 0.9))
    return stats


def merged(*parts: WindowStats) -> WindowStats:
    total = WindowStats()
    for part in parts:
        total.merge(part)
    return total


@pytest.mark.parametrize("seed", range(5))
def test_merge_is_associative_and_commutative(seed: int) -> None:
    rng = random.Random(seed)
    a, b, c = (random_stats(rng, rng.randrange(0, 300)) for _ in range(3))
    left = merged(merged(a, b), c)
    assert left == merged(a, merged(b, c)) == merged(c, b, a) == merged(b, merged(c, a))
    assert left.executions == a.executions + b.executions + c.executions
    assert merged(a, WindowStats()) == a


def test_partials_in_any_grouping_and_order_give_the_day() -> None:
    rng = random.Random(11)
    batch = [result(rng.choice(["ok", "error", "rejected"]), rng.randrange(1, 800) / 8, sampled=rng.random() < 0.2)
             for _ in range(2_000)]
    [whole] = summarise_results(batch, WINDOWS)
    cuts = sorted(rng.sample(range(1, len(batch)), 30))
    partials = [p for lo, hi in zip([0, *cuts], [*cuts, len(batch)], strict=True)
                for p in summarise_results(batch[lo:hi], WINDOWS)]
    rng.shuffle(partials)
    total = merged(*(WindowStats.from_partial(p, "Europe/Paris") for p in partials))
    assert total == WindowStats.from_partial(whole, "Europe/Paris")


def test_a_partial_from_another_time_zone_is_refused() -> None:
    partial = StatsPartial(task_id="spam", date="2026-11-22", time_zone="UTC", sketch=b"", event_at=NOON)
    with pytest.raises(ValueError, match="dated in UTC, not Europe/Paris"):
        WindowStats.from_partial(partial, "Europe/Paris")


def test_daily_stats_of_a_window() -> None:
    stats = WindowStats()
    for status, latency, sampled in [("ok", 10.0, True), ("ok", 20.0, False), ("ok", 30.0, False),
                                     ("error", 40.0, True), ("rejected", 0.0, False)]:
        stats.add(status, latency, sampled)
    stats.add_validation(validation(True))
    stats.add_validation(validation(False))
    closed = datetime(2026, 11, 22, 23, 5, tzinfo=UTC)
    daily = stats.to_daily_stats(StatsKey("spam", 1, "2026-11-22"), WINDOWS, closed_at=closed)
    assert (daily.executions, daily.ok, daily.error, daily.rejected) == (5, 3, 1, 1)
    assert daily.success_rate == 0.6 and daily.sampling_rate == 0.5  # 2 sampled of the 4 that ran
    assert daily.accuracy == 0.5 and daily.avg_latency_ms == 25.0
    # Of 4 latencies the sketch's p50 is the 2nd and its p99 the 3rd (rank floor(q * (n - 1))), within 1%.
    assert daily.p50_latency_ms == pytest.approx(20.0, rel=0.01) and daily.p99_latency_ms == pytest.approx(30, rel=0.01)
    assert daily.window_start == datetime(2026, 11, 21, 23, tzinfo=UTC) and daily.closed_at == closed
    assert LatencySketch.from_bytes(daily.sketch) == stats.sketch


def test_daily_stats_with_nothing_run_or_validated() -> None:
    stats = WindowStats()
    stats.add("rejected", 0.0, False)
    daily = stats.to_daily_stats(StatsKey("spam", None, "2026-11-22"), WINDOWS)
    assert daily.accuracy is None and daily.avg_latency_ms is None and daily.p99_latency_ms is None
    assert daily.success_rate == 0.0 and daily.sampling_rate == 0.0 and daily.closed_at is None


def test_an_unknown_status_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown result status 'done'"):
        WindowStats().add("done", 1.0, False)


def test_a_batch_with_an_unknown_status_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown result status 'done'"):
        summarise_results([result(), {**result(), "status": "done"}], WINDOWS)
