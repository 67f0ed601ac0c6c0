from datetime import UTC, datetime

import pytest

from app.contract.records import (
    AnomalyMethod,
    AnomalyMetric,
    AnomalySignal,
    Comparison,
    ImprovementTrigger,
    OracleKind,
    Validation,
    ValidationStatus,
)
from app.domain.improvement import ImprovementWatch, binomial_lower_tail

WHEN = datetime(2026, 12, 7, tzinfo=UTC)


def validation(match: bool | None, version: int = 1, text: str = "x", got: str | None = "ham",
               status: ValidationStatus = ValidationStatus.VALIDATED, details: str = "") -> Validation:
    return Validation(execution_id="e", request_id="r", task_id="spam", version=version, input={"text": text},
                      program_output=got, oracle_output="spam", oracle_kind=OracleKind.LABEL,
                      comparison=Comparison.EXACT, status=status, match=match, details=details, validated_at=WHEN)


def signal(metric: AnomalyMetric, version: int = 1) -> AnomalySignal:
    return AnomalySignal(task_id="spam", version=version, metric=metric, value=0.4, baseline=0.01, score=9.0,
                         method=AnomalyMethod.ZSCORE, hint="error rate spiked", detected_at=WHEN)


def test_binomial_lower_tail_against_known_values() -> None:
    assert binomial_lower_tail(0, 1, 0.5) == pytest.approx(0.5)
    assert binomial_lower_tail(2, 10, 0.5) == pytest.approx(56 / 1024)
    assert binomial_lower_tail(10, 10, 0.9) == 1.0
    assert binomial_lower_tail(800, 1000, 0.9) < 1e-15  # far below, at large n, without overflow
    assert binomial_lower_tail(5, 10, 0.0) == 1.0 and binomial_lower_tail(5, 10, 1.0) == 0.0


def feed(watch: ImprovementWatch, outcomes: list[bool], version: int = 1, target: float = 0.9) -> list:
    return [s for s in (watch.observe_validation(validation(m, version, text=f"t{i}"), version, target)
                        for i, m in enumerate(outcomes)) if s is not None]


def test_a_task_on_target_never_falls_short() -> None:
    watch = ImprovementWatch(min_validations=50, window=200, alpha=0.01)
    assert feed(watch, ([True] * 9 + [False]) * 100) == []  # 90 % exactly: never significantly below


def test_falling_short_needs_enough_validations_then_asks_once() -> None:
    watch = ImprovementWatch(min_validations=30, window=200, alpha=0.01)
    assert feed(watch, [False] * 29) == []  # too few to be sure of anything
    found = feed(watch, [False])
    assert len(found) == 1 and found[0].trigger is ImprovementTrigger.ACCURACY
    assert found[0].accuracy == 0.0 and found[0].validated == 30 and "binomial" in found[0].reason
    watch.open_incident("spam", 1)
    assert feed(watch, [False] * 300) == []  # the same incident: no second request


def test_a_modest_shortfall_is_found_once_the_evidence_is_there() -> None:
    watch = ImprovementWatch(min_validations=50, window=200, alpha=0.01)
    found = feed(watch, ([True] * 7 + [False] * 3) * 20)  # 70 % against a 90 % target
    assert found and 0.6 < found[0].accuracy < 0.8


def test_recovery_re_arms_and_a_new_version_starts_afresh() -> None:
    watch = ImprovementWatch(min_validations=30, window=100, alpha=0.01)
    assert feed(watch, [False] * 30)
    watch.open_incident("spam", 1)
    assert feed(watch, [True] * 29) == [] and watch.in_incident("spam", 1)
    assert feed(watch, [True]) == [] and not watch.in_incident("spam", 1)  # 30 right since: recovered
    assert feed(watch, [False] * 29) == []  # fresh evidence needed: the window was cleared
    assert feed(watch, [False])
    watch.open_incident("spam", 1)
    assert not watch.in_incident("spam", 2)
    assert feed(watch, [False] * 30, version=2)  # v2 went live: its own watch


def test_other_versions_and_unjudged_validations_do_not_count() -> None:
    watch = ImprovementWatch(min_validations=5, window=10, alpha=0.5)
    for _ in range(20):
        assert watch.observe_validation(validation(False, version=2), 1, 0.9) is None  # a canary's
        assert watch.observe_validation(validation(None, status=ValidationStatus.EXPIRED), 1, 0.9) is None
    assert watch.failing_examples("spam", 5) == []


def test_error_rate_signals_on_the_active_version_fall_short_once() -> None:
    watch = ImprovementWatch(min_validations=5, window=10)
    assert watch.observe_signal(signal(AnomalyMetric.P99_LATENCY), 1) is None  # slow is not wrong
    assert watch.observe_signal(signal(AnomalyMetric.ERROR_RATE, version=2), 1) is None  # not the active one
    found = watch.observe_signal(signal(AnomalyMetric.ERROR_RATE), 1)
    assert found is not None and found.trigger is ImprovementTrigger.ANOMALY and "error rate spiked" in found.reason
    watch.open_incident("spam", 1)
    assert watch.observe_signal(signal(AnomalyMetric.TIMEOUTS), 1) is None


def test_failing_examples_are_diverse_and_carry_errors() -> None:
    watch = ImprovementWatch(min_validations=5, window=100)
    for _ in range(10):
        watch.observe_validation(validation(False, text="free money now"), 1, 0.9)
    watch.observe_validation(validation(False, text="claim your prize"), 1, 0.9)
    watch.observe_validation(validation(False, text="urgent", got=None, details="ZeroDivisionError"), 1, 0.9)
    chosen = watch.failing_examples("spam", 3)
    assert {f.input["text"] for f in chosen} == {"free money now", "claim your prize", "urgent"}
    assert [f.error for f in chosen if f.input["text"] == "urgent"] == ["ZeroDivisionError"]
    assert all(f.expected == "spam" for f in chosen)
