"""WorkerMetrics without a broker: a batch's results become counters and latency buckets, scraped in
Prometheus text; the live window turns two samples into a rate, an error rate and percentiles."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest

from app.web.metrics import LATENCY_BOUNDS_MS, WAIT_BOUNDS_MS, EventLoopLag, WorkerMetrics, percentile


def result(task: str, status: str = "ok", latency_ms: float = 1.0, version: int | None = 1) -> dict[str, object]:
    return {"task_id": task, "version": version, "status": status, "latency_ms": latency_ms}


def answered(results: list[dict[str, object]], requested_ms: list[int]) -> list[tuple[dict[str, object], object]]:
    """Each result with a stand-in for its request's message: what the executor hands over."""
    return [(r, SimpleNamespace(timestamp=ms)) for r, ms in zip(results, requested_ms, strict=True)]


def test_a_batch_is_counted_by_task_version_and_status() -> None:
    metrics = WorkerMetrics()
    metrics.count_results([result("a"), result("a"), result("a", "error", 3.0), result("b", version=2),
                           result("a", "rejected", 0.0, version=None)])
    text = generate_latest(metrics.registry).decode()
    assert 'loopai_executions_total{status="ok",task="a",version="1"} 2.0' in text
    assert 'loopai_executions_total{status="error",task="a",version="1"} 1.0' in text
    assert 'loopai_executions_total{status="rejected",task="a",version=""} 1.0' in text
    # rejected requests never ran: three latencies for a/1, two of them at most 1 ms
    assert 'loopai_execution_latency_seconds_bucket{le="0.001",task="a",version="1"} 2.0' in text
    assert 'loopai_execution_latency_seconds_count{task="a",version="1"} 3.0' in text
    assert 'loopai_execution_latency_seconds_sum{task="a",version="1"} 0.005' in text
    assert 'task="a",version=""' not in text.split("loopai_execution_latency")[1]


def test_a_latency_on_a_bound_counts_in_that_bucket_whichever_way_the_batch_is_counted() -> None:
    one_version, mixed = WorkerMetrics(), WorkerMetrics()
    latencies = [1.0, 1.0000001, 0.0, 60000.0, 60001.0, 0.01]
    one_version.count_results([result("a", latency_ms=ms) for ms in latencies])
    mixed.count_results([result("a", latency_ms=ms) for ms in latencies] + [result("b", "rejected", 0.0)])
    for metrics in (one_version, mixed):
        assert metrics.latencies["a", "1"].buckets == [2, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1]
        assert metrics.latencies["a", "1"].total_ms == pytest.approx(sum(latencies))
    assert len(LATENCY_BOUNDS_MS) + 1 == 21


def test_other_registries_do_not_see_it() -> None:
    first, second = WorkerMetrics(), WorkerMetrics()
    first.count_results([result("a")])
    assert "task=\"a\"" not in generate_latest(second.registry).decode()


def test_the_live_window_compares_the_newest_sample_with_the_oldest_in_reach() -> None:
    metrics = WorkerMetrics()
    metrics.sample(now=100.0)
    metrics.count_results([result("a", latency_ms=0.2)] * 90 + [result("a", "timeout", 800.0)] * 10)
    metrics.sample(now=102.0)
    metrics.count_results([result("a", latency_ms=0.2)] * 100)
    metrics.sample(now=104.0)
    window = metrics.live(seconds=10)["a"]
    assert (window.seconds, window.executions, window.per_second) == (4.0, 200, 50.0)
    assert window.error_rate == 10 / 200
    assert 0.1 < window.p50_ms <= 0.25 and 500 < window.p99_ms <= 1000
    recent = metrics.live(seconds=2)["a"]  # only the last two seconds: no timeouts in them
    assert (recent.executions, recent.error_rate) == (100, 0.0)


def test_percentile_interpolates_inside_its_bucket() -> None:
    buckets = [0] * (len(LATENCY_BOUNDS_MS) + 1)
    assert percentile(buckets, 0.5) is None
    one_ms = LATENCY_BOUNDS_MS.index(1.0)
    buckets[one_ms] = 10  # ten results between 0.5 and 1 ms
    assert percentile(buckets, 0.5) == 0.75
    buckets[-1] = 10  # ten past the last bound
    assert percentile(buckets, 0.99) == LATENCY_BOUNDS_MS[-1]


def test_event_loop_lag_is_a_histogram_of_how_late_timers_ran() -> None:
    lag = EventLoopLag()
    for seconds in (0.0005, 0.005, 0.005, 0.3, 3.0):
        lag.observe(seconds)
    (family,) = lag.metrics()
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
    assert buckets["0.001"] == 1 and buckets["0.005"] == 3 and buckets["0.25"] == 3 and buckets["0.5"] == 4
    assert buckets["+Inf"] == 5 and lag.worst_s == 3.0


async def test_event_loop_lag_sees_a_blocked_loop() -> None:
    lag = EventLoopLag(interval_s=0.01)
    running = asyncio.ensure_future(lag.run())
    await asyncio.sleep(0.05)
    time.sleep(0.2)  # the loop is held, as a stuck agent would hold it
    deadline = time.monotonic() + 5
    while lag.worst_s < 0.15:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    running.cancel()


def test_request_to_result_is_counted_per_task_from_the_requests_timestamps() -> None:
    metrics = WorkerMetrics()
    now_ms = 1_000_000.0
    a = [result("a") for _ in range(4)]
    metrics.count_results(a, answered(a, [999_999, 999_990, 999_900, 999_000]), now_ms=now_ms)  # 1, 10, 100, 1000
    mixed = [result("a"), result("b"), result("b", "rejected", 0.0, version=None)]  # a rejection is waited for too
    metrics.count_results(mixed, answered(mixed, [999_995, 999_980, 999_000]), now_ms=now_ms)  # 5; 20, 1000
    within = dict(zip(WAIT_BOUNDS_MS, metrics.waits["a"], strict=False))
    assert (within[1.0], within[5.0], within[10.0], within[100.0], within[1000.0]) == (1, 1, 1, 1, 1)
    assert sum(metrics.waits["a"]) == 5 and sum(metrics.waits["b"]) == 2
    assert metrics.waits["b"][WAIT_BOUNDS_MS.index(20.0)] == 1
    text = generate_latest(metrics.registry).decode()
    assert 'loopai_request_result_latency_seconds_bucket{le="0.01",task="a"} 3.0' in text
    assert 'loopai_request_result_latency_seconds_count{task="b"} 2.0' in text
    assert 'loopai_request_result_latency_seconds_sum{task="a"} 1.116' in text


def test_a_result_that_went_out_as_a_dead_letter_waits_for_nothing() -> None:
    metrics = WorkerMetrics()
    sent, refused = result("a"), result("a")
    metrics.count_results([sent], answered([sent, refused], [999_990, 999_000]), now_ms=1_000_000.0)
    assert sum(metrics.waits["a"]) == 1
    metrics.count_results([], answered([refused], [999_000]), now_ms=1_000_000.0)  # every one refused
    assert sum(metrics.waits["a"]) == 1


def test_the_live_window_and_the_chart_show_request_to_result_beside_execution_time() -> None:
    metrics = WorkerMetrics()
    metrics.sample(now=100.0, wall=5000.0)  # the first point: no task yet
    batch = [result("a", latency_ms=0.2)] * 100
    metrics.count_results(batch, answered(batch, [999_980] * 95 + [999_700] * 5), now_ms=1_000_000.0)  # 20 ms; 300
    metrics.sample(now=105.0, wall=5005.0)
    window = metrics.live()["a"]
    assert 15 < window.request_result_p50_ms <= 20 and 250 < window.request_result_p99_ms <= 500
    assert window.p99_ms <= 0.25  # execution time, its own buckets
    metrics.sample(now=110.0, wall=5010.0)  # ten seconds on: a point of the chart
    metrics.sample(now=115.0, wall=5015.0)
    [point] = metrics.series["a"]
    assert point[:3] == (5010.0, 10.0, 0.0) and point[3] == window.request_result_p99_ms
    history = metrics.history("a", wall=5016.0)
    assert history[0] == point and history[-1][0] == 5016.0 and history[-1][1] == 0.0  # now: nothing new
    assert metrics.history("unknown") == []


def test_the_chart_keeps_fifteen_minutes() -> None:
    metrics = WorkerMetrics()
    for second in range(0, 20 * 60, 10):
        metrics.count_results([result("a")])
        metrics.sample(now=float(second), wall=float(second))
    assert len(metrics.series["a"]) == 90 and metrics.series["a"][0][0] == 20 * 60 - 900


def test_percentile_of_other_bounds() -> None:
    buckets = [0] * (len(WAIT_BOUNDS_MS) + 1)
    buckets[WAIT_BOUNDS_MS.index(20.0)] = 4  # between 15 and 20 ms
    assert percentile(buckets, 0.5, WAIT_BOUNDS_MS) == 17.5


def test_a_wait_on_a_bound_counts_in_that_bucket_in_small_and_large_batches() -> None:
    waits = [0, 1, 5, 7, 60000, 60001]
    small, large = WorkerMetrics(), WorkerMetrics()
    few = [result("a") for _ in waits]
    small.count_results(few, answered(few, [1_000_000 - w for w in waits]), now_ms=1_000_000.0)
    many = [result("a") for _ in waits * 3]
    large.count_results(many, answered(many, [1_000_000 - w for w in waits * 3]), now_ms=1_000_000.0)
    assert [3 * n for n in small.waits["a"]] == large.waits["a"]
    assert small.waits["a"][:4] == [2, 0, 1, 1] and small.waits["a"][-2:] == [1, 1]
