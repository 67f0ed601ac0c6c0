from app.domain.sampling import is_sampled
from app.records import execution_id_for


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
