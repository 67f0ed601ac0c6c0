import uuid
from datetime import UTC, datetime, timedelta

from app.contract.records import AnomalyMethod, AnomalyMetric, AnomalySignal
from app.domain.canary import Accuracy, decide, runs_canary, signals_against


def test_routing_share_and_determinism() -> None:
    ids = [str(uuid.UUID(int=i * 7919)) for i in range(20_000)]
    share = sum(runs_canary(i, 10) for i in ids) / len(ids)
    assert 0.09 < share < 0.11
    assert [runs_canary(i, 10) for i in ids[:100]] == [runs_canary(i, 10) for i in ids[:100]]
    assert not any(runs_canary(i, 0) for i in ids[:100]) and all(runs_canary(i, 100) for i in ids[:100])


def accuracy(matched: int, validated: int) -> Accuracy:
    return Accuracy(validated, matched)


def test_waits_for_enough_validations() -> None:
    assert decide(accuracy(9, 9), accuracy(50, 100), 0.8, 20, 0.05).action == "wait"


def test_promotes_a_better_candidate() -> None:
    decision = decide(accuracy(19, 20), accuracy(85, 100), 0.8, 20, 0.05)
    assert decision.action == "promote" and "0.950" in decision.reason


def test_needs_the_target_as_well_as_the_active_version() -> None:
    assert decide(accuracy(15, 20), accuracy(50, 100), 0.8, 20, 0.05).action == "wait"


def test_rolls_back_a_worse_candidate_and_on_signals() -> None:
    assert decide(accuracy(10, 20), accuracy(95, 100), 0.8, 20, 0.05).action == "rollback"


T0 = datetime(2026, 11, 22, 12, tzinfo=UTC)


def signal(version: int | None, minutes_after: int, hint: str = "error rate jumped to 30.0% against 1.0%, its "
           "recent level") -> AnomalySignal:
    return AnomalySignal(task_id="spam", version=version, metric=AnomalyMetric.ERROR_RATE, value=0.3,
                         baseline=0.01, score=12.5, method=AnomalyMethod.ZSCORE, hint=hint,
                         detected_at=T0 + timedelta(minutes=minutes_after))


def test_a_signal_rolls_back_the_best_candidate_and_says_why() -> None:
    """Accurate or not, validated enough or not: a canary with a signal against it is rolled back."""
    against = [signal(2, 5)]
    for candidate in (accuracy(20, 20), accuracy(0, 0)):
        decision = decide(candidate, accuracy(95, 100), 0.8, 20, 0.05, against)
        assert decision.action == "rollback"
        assert decision.reason == ("1 anomaly signal(s) against the candidate: error rate jumped to 30.0% against "
                                   "1.0%, its recent level (zscore, score 12.5)")


def test_only_signals_on_the_candidate_since_its_canary_started_count() -> None:
    signals = [signal(1, 5), signal(2, -5), signal(None, 5), signal(2, 0), signal(2, 1)]
    assert signals_against(signals, 2, T0) == [signals[4]]  # a minute that ended after the start
    assert decide(accuracy(20, 20), accuracy(85, 100), 0.8, 20, 0.05,
                  signals_against(signals[:4], 2, T0)).action == "promote"
