"""WorkerMetrics without a broker: a batch's results become counters and latency buckets, scraped in
Prometheus text; the live window turns two samples into a rate, an error rate and percentiles."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import generate_latest

from app.web.metrics import LATENCY_BOUNDS_MS, EventLoopLag, WorkerMetrics, percentile


def result(task: str, status: str = "ok", latency_ms: float = 1.0, version: int | None = 1) -> dict[str, object]:
    return {"task_id": task, "version": version, "status": status, "latency_ms": latency_ms}


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
