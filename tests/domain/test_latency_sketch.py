import random

import pytest
from ddsketch.pb.proto import DDSketchProto, pb

from app.domain.latency_sketch import RELATIVE_ACCURACY, LatencySketch, SketchError


def lognormal_latencies(n: int, seed: int = 7) -> list[float]:
    rng = random.Random(seed)
    return [rng.lognormvariate(1.0, 0.8) for _ in range(n)]  # median e ms, a long right tail


def exact_quantile(ordered: list[float], q: float) -> float:
    """The order statistic DDSketch estimates: rank floor(q * (n - 1))."""
    return ordered[int(q * (len(ordered) - 1))]


@pytest.mark.parametrize("q", [0.5, 0.95, 0.99, 0.999])
def test_quantiles_are_within_the_stated_relative_error(q: float) -> None:
    latencies = lognormal_latencies(100_000)
    sketch = LatencySketch()
    sketch.add_all(latencies)
    exact = exact_quantile(sorted(latencies), q)
    estimate = sketch.quantile(q)
    assert estimate is not None
    assert abs(estimate - exact) / exact <= RELATIVE_ACCURACY


def test_merging_sketches_is_sketching_the_union() -> None:
    latencies = lognormal_latencies(20_000)
    whole, left, right = LatencySketch(), LatencySketch(), LatencySketch()
    whole.add_all(latencies)
    left.add_all(latencies[:5_000])
    right.add_all(latencies[5_000:])
    right.merge(left)
    assert right == whole and right.count == 20_000
    assert right.to_bytes() == whole.to_bytes()


def test_bytes_round_trip_and_merge_afterwards() -> None:
    sketch = LatencySketch()
    sketch.add_all([0.0, 0.3, 1.5, 1.5, 40.0, 2_000.0])
    restored = LatencySketch.from_bytes(sketch.to_bytes())
    assert restored == sketch and restored.count == 6
    assert [restored.quantile(q) for q in (0, 0.5, 1)] == [sketch.quantile(q) for q in (0, 0.5, 1)]
    restored.merge(sketch)
    assert restored.count == 12


def test_the_empty_sketch() -> None:
    empty = LatencySketch()
    assert empty.to_bytes() == b"" and empty.quantile(0.5) is None and empty.count == 0
    assert LatencySketch.from_bytes(b"") == empty


def test_a_negative_latency_counts_as_zero() -> None:
    sketch = LatencySketch()
    sketch.add(-3.0)
    assert sketch.quantile(0.5) == 0.0 and sketch.count == 1


def test_copy_is_independent() -> None:
    sketch = LatencySketch()
    sketch.add(1.0)
    copy = sketch.copy()
    copy.add(2.0)
    assert sketch.count == 1 and copy.count == 2


def test_bytes_that_are_not_a_sketch() -> None:
    with pytest.raises(SketchError, match="not a DDSketch protobuf"):
        LatencySketch.from_bytes(b"\xff\xff\xff")


def test_a_sketch_of_another_accuracy_is_refused() -> None:
    from ddsketch import DDSketch
    from ddsketch.pb.proto import DDSketchProto

    other = DDSketch(0.05)
    other.add(1.0)
    with pytest.raises(SketchError, match="another accuracy"):
        LatencySketch.from_bytes(DDSketchProto.to_proto(other).SerializeToString())


def test_quantile_out_of_range() -> None:
    with pytest.raises(ValueError, match="quantile"):
        LatencySketch().quantile(1.5)


def test_add_all_is_add_one_by_one() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(0, 2) for _ in range(5000)] + [0.0, -3.0, 1e-300, 250.0, 250.0]
    rng.shuffle(values)
    one_by_one, at_once = LatencySketch(), LatencySketch()
    for value in values:
        one_by_one.add(value)
    at_once.add_all(values)
    at_once.add_all([])
    assert at_once.to_bytes() == one_by_one.to_bytes() and at_once.count == len(values)
    assert [at_once.quantile(q) for q in (0, 0.5, 0.99, 1)] == [one_by_one.quantile(q) for q in (0, 0.5, 0.99, 1)]


@pytest.mark.parametrize("seed", range(20))
def test_adding_many_at_once_is_adding_them_one_by_one(seed: int) -> None:
    rng = random.Random(seed)
    values = [rng.choice([0.0, -1.0, 1e-320, 5e-8, rng.uniform(0.001, 0.05), rng.uniform(1, 60_000),
                          2.0 ** rng.randint(-20, 15)]) for _ in range(rng.randint(0, 300))]
    at_once, one_by_one = LatencySketch(), LatencySketch()
    at_once.add_all(values)
    for value in values:
        one_by_one.add(value)
    assert at_once.to_bytes() == one_by_one.to_bytes() and at_once.count == len(values)


@pytest.mark.parametrize("seed", range(10))
def test_bytes_read_back_as_the_library_reads_them(seed: int) -> None:
    """from_bytes builds the store in one go; the library's decoder, bin by bin, gives the same sketch. add_all
    into a sketch that holds values already is adding them one by one too."""
    rng = random.Random(seed)
    first = [rng.lognormvariate(rng.uniform(-6, 4), 1.5) for _ in range(rng.randint(1, 200))] + [0.0]
    second = [rng.uniform(0.0, 100.0) for _ in range(rng.randint(0, 50))]
    sketch, one_by_one = LatencySketch(), LatencySketch()
    sketch.add_all(first)
    sketch.add_all(second)
    for value in first + second:
        one_by_one.add(value)
    data = sketch.to_bytes()
    assert data == one_by_one.to_bytes()
    library = LatencySketch(DDSketchProto.from_proto(pb.DDSketch.FromString(data)))
    ours = LatencySketch.from_bytes(data)
    assert ours.count == library.count == len(first) + len(second)
    assert [ours.quantile(q) for q in (0, 0.25, 0.5, 0.99, 1)] == \
        pytest.approx([library.quantile(q) for q in (0, 0.25, 0.5, 0.99, 1)], rel=1e-12)
    ours.merge(LatencySketch.from_bytes(data))
    assert ours.count == 2 * sketch.count and ours.to_bytes() != data
