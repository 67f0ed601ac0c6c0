import pytest

from app.contract.records import execution_id_for
from app.domain.sampling import ADAPTIVE_MAX, STRATEGIES, Sampler, is_sampled


def test_rate_is_respected_over_many_ids() -> None:
    ids = [execution_id_for("t", str(i)) for i in range(20_000)]
    share = sum(is_sampled(i, 0.1) for i in ids) / len(ids)
    assert 0.09 < share < 0.11


def test_edges_and_forcing() -> None:
    eid = execution_id_for("t", "r")
    assert not is_sampled(eid, 0.0)
    assert is_sampled(eid, 1.0)
    assert is_sampled(eid, 0.0, forced=True)


def test_same_id_same_choice() -> None:
    eid = execution_id_for("t", "r42")
    assert {is_sampled(eid, 0.5) for _ in range(10)} == {is_sampled(eid, 0.5)}


# Strategies: over 10,000 executions the achieved rate is within TOLERANCE of the configured one (uuid5 ids
# are uniform; the binomial standard deviation at 10k and rate 0.1 is 0.003).
TOLERANCE = 0.015
IDS = [execution_id_for("task", str(i)) for i in range(10_000)]


def decide(sampler: Sampler, eid: str, strategy: str, rate: float = 0.1, **kwargs) -> bool:
    fields = {"status": "ok", "output": "ham", "latency_ms": 1.0, "latency_target_ms": 10.0, **kwargs}
    return sampler.decide(eid, "task", strategy, rate, **fields)


def test_random_strategy_rate() -> None:
    sampler = Sampler()
    share = sum(decide(sampler, eid, "random") for eid in IDS) / len(IDS)
    assert abs(share - 0.1) < TOLERANCE


def test_stratified_sees_rare_classes_at_the_same_overall_rate() -> None:
    sampler = Sampler()
    labels = ["rare" if i % 50 == 0 else "common" for i in range(len(IDS))]  # 2 % rare
    picked = [label for eid, label in zip(IDS, labels, strict=True) if decide(sampler, eid, "stratified",
                                                                               output={"label": label})]
    assert abs(len(picked) / len(IDS) - 0.1) < TOLERANCE
    rare = picked.count("rare")
    # Its equal share (half the sample) is more than it has: every rare execution is taken.
    assert rare >= 0.95 * labels.count("rare")
    random_rare = sum(1 for eid, label in zip(IDS, labels, strict=True) if label == "rare" and is_sampled(eid, 0.1))
    assert rare > 10 * random_rare


def test_edge_cases_are_always_sampled() -> None:
    sampler = Sampler()
    assert all(decide(sampler, eid, "edge_cases", status="error", output=None) for eid in IDS[:200])
    assert all(decide(sampler, eid, "edge_cases", status="timeout", output=None) for eid in IDS[:200])
    assert all(decide(sampler, eid, "edge_cases", latency_ms=25.0) for eid in IDS[:200])
    assert all(decide(sampler, eid, "edge_cases", output={"label": "x", "confidence": 0.3}) for eid in IDS[:200])
    share = sum(decide(sampler, eid, "edge_cases", output={"label": "x", "confidence": 0.9}) for eid in IDS)
    assert abs(share / len(IDS) - 0.1) < TOLERANCE


def test_adaptive_rate_rises_with_disagreement_and_falls_back_within_bounds() -> None:
    sampler = Sampler()
    assert sampler.adaptive_rate("task", 0.1) == 0.1
    for _ in range(100):
        sampler.observe_validations("task", validated=1, matched=0)
    high = sampler.adaptive_rate("task", 0.1)
    assert 0.3 < high <= ADAPTIVE_MAX
    share = sum(decide(sampler, eid, "adaptive") for eid in IDS) / len(IDS)
    assert abs(share - high) < TOLERANCE * 2
    for _ in range(200):
        sampler.observe_validations("task", validated=1, matched=1)
    assert 0.1 <= sampler.adaptive_rate("task", 0.1) < 0.11


def test_a_batch_of_validations_weighs_as_much_as_the_same_validations_one_by_one() -> None:
    one_by_one, at_once = Sampler(), Sampler()
    for sampler in (one_by_one, at_once):
        sampler.observe_validations("task", validated=10, matched=10)
    for _ in range(20):
        one_by_one.observe_validations("task", validated=1, matched=0)
    at_once.observe_validations("task", validated=20, matched=0)
    assert at_once.disagreement["task"] == pytest.approx(one_by_one.disagreement["task"])
    at_once.observe_validations("task", validated=0, matched=0)  # an executor's partial: nothing to fold
    assert at_once.disagreement["task"] == pytest.approx(one_by_one.disagreement["task"])


def test_decisions_are_deterministic_and_forced_always_samples() -> None:
    for strategy in STRATEGIES:
        first = [decide(Sampler(), eid, strategy) for eid in IDS[:500]]
        again = [decide(Sampler(), eid, strategy) for eid in IDS[:500]]
        assert first == again
        assert all(decide(Sampler(), eid, strategy, rate=0.0, forced=True) for eid in IDS[:50])


def test_diverse_samples_rare_kinds_of_input_more_at_the_same_overall_rate() -> None:
    from app.domain.diversity import signature

    common, rare = {"text": "lunch at noon"}, {"text": "invoice overdue pay now"}
    assert signature(common) != signature(rare)  # two kinds of input
    sampler = Sampler()
    inputs = [rare if i % 50 == 0 else common for i in range(len(IDS))]  # 2 % rare
    picked = [value for eid, value in zip(IDS, inputs, strict=True) if decide(sampler, eid, "diverse", input=value)]
    assert abs(len(picked) / len(IDS) - 0.1) < TOLERANCE
    assert picked.count(rare) >= 0.95 * inputs.count(rare)  # half the budget is more than the rare kind has
