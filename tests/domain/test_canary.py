import uuid

from app.domain.canary import Accuracy, decide, runs_canary


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
    assert decide(accuracy(20, 20), accuracy(95, 100), 0.8, 20, 0.05, signals=1).action == "rollback"
