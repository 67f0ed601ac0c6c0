"""A worker's metrics: consumes each executed batch's result fields (counted once per batch, not per result) and
the worker's own counters, produces Prometheus families on the worker's own registry and the dashboard's live
window (executions per second, error rate, latency percentiles over the last seconds)."""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left, bisect_right
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

# Upper bounds in milliseconds: programs run in tens of microseconds to a few seconds (timeout_ms <= 60 s).
LATENCY_BOUNDS_MS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0,
                     1000.0, 2500.0, 5000.0, 10000.0, 60000.0)
FAILED = frozenset({"error", "timeout"})  # what the dashboard's error rate counts; rejected is the caller's fault


@dataclass
class _Latencies:
    """Counts per latency bucket (the last one is +Inf) and their sum, in milliseconds."""

    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_MS) + 1))
    total_ms: float = 0.0


@dataclass(frozen=True)
class LiveWindow:
    """One task over the last seconds, for the dashboard."""

    task_id: str
    seconds: float
    executions: int
    per_second: float
    error_rate: float | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


class WorkerMetrics(Collector):
    """Counts kept as plain dicts, turned into metric families only when scraped. `count_results` runs once per
    executed batch; the gauges of other parts (sandbox replacements, dead letters, lag, validations) are read at
    scrape time through the callables given to `watch`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.executions: Counter[tuple[str, str, str]] = Counter()  # (task, version, status) -> results
        self.latencies: dict[tuple[str, str], _Latencies] = {}  # (task, version)
        self._sources: list[Callable[[], Iterable[Metric]]] = []
        self._history: deque[tuple[float, dict[str, tuple[int, int, list[int]]]]] = deque(maxlen=120)
        self.registry.register(self)

    def count_results(self, results: list[dict[str, Any]]) -> None:
        """A batch's delivered results (the executor's field dicts). No per-result metric calls (at ~50k
        results/s a Counter.inc per result would cost a tenth of a core): the counts in one C-level pass, the
        latencies of each task version sorted and cut at the bucket bounds."""
        counted = Counter(map(_task_version_status, results))  # one key tuple per result
        for (task, version, status), count in counted.items():
            self.executions[task, "" if version is None else str(version), status] += count
        versions = {key[:2] for key in counted}
        by_version: dict[tuple[str, int | None], list[float]] = {}
        if len(versions) == 1 and not any(key[2] == "rejected" for key in counted):  # the usual batch
            by_version[versions.pop()] = list(map(_latency, results))
        else:
            for fields in results:
                if fields["status"] != "rejected":  # never ran: no latency
                    by_version.setdefault((fields["task_id"], fields["version"]), []).append(fields["latency_ms"])
        for key, latencies in by_version.items():
            seen = self._latencies_of(key)
            latencies.sort()
            buckets, counted_below = seen.buckets, 0
            for i, bound in enumerate(LATENCY_BOUNDS_MS):  # bucket i: bound i-1 < latency <= bound i
                upto = bisect_right(latencies, bound, counted_below)
                buckets[i] += upto - counted_below
                counted_below = upto
            buckets[-1] += len(latencies) - counted_below
            seen.total_ms += sum(latencies)

    def _latencies_of(self, key: tuple[str, int | None]) -> _Latencies:
        labels = (key[0], "" if key[1] is None else str(key[1]))
        seen = self.latencies.get(labels)
        if seen is None:
            seen = self.latencies[labels] = _Latencies()
        return seen

    def watch(self, source: Callable[[], Iterable[Metric]]) -> None:
        """Families made at scrape time by another part of the worker."""
        self._sources.append(source)

    def collect(self) -> Iterator[Metric]:
        executions = CounterMetricFamily("loopai_executions", "Results this worker delivered, by task, program "
                                         "version and status", labels=["task", "version", "status"])
        for (task, version, status), count in sorted(self.executions.items()):
            executions.add_metric([task, version, status], count)
        yield executions
        latency = HistogramMetricFamily("loopai_execution_latency_seconds", "Time a program ran in the sandbox, "
                                        "by task and version (rejected requests never ran)",
                                        labels=["task", "version"])
        for (task, version), seen in sorted(self.latencies.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*LATENCY_BOUNDS_MS, float("inf")), seen.buckets, strict=True):
                cumulative += count
                buckets.append((_seconds_label(bound), cumulative))
            latency.add_metric([task, version], buckets, seen.total_ms / 1000)
        yield latency
        for source in self._sources:
            yield from source()

    def sample(self, now: float | None = None) -> None:
        """Remember the totals per task now; the live window compares two samples (call about once a second)."""
        per_task: dict[str, tuple[int, int, list[int]]] = {}
        for (task, _, status), count in self.executions.items():
            done, failed, buckets = per_task.get(task, (0, 0, [0] * (len(LATENCY_BOUNDS_MS) + 1)))
            per_task[task] = (done + count, failed + (count if status in FAILED else 0), buckets)
        for (task, _), seen in self.latencies.items():
            buckets = per_task.setdefault(task, (0, 0, [0] * (len(LATENCY_BOUNDS_MS) + 1)))[2]
            for i, count in enumerate(seen.buckets):
                buckets[i] += count
        self._history.append((time.monotonic() if now is None else now, per_task))

    def live(self, seconds: float = 10.0) -> dict[str, LiveWindow]:
        """Each task over (about) the last `seconds`: the newest sample against the oldest within reach."""
        if len(self._history) < 2:
            return {}
        newest_at, newest = self._history[-1]
        oldest_at, oldest = next(((at, totals) for at, totals in self._history if newest_at - at <= seconds),
                                 self._history[-2])
        if oldest_at >= newest_at:
            oldest_at, oldest = self._history[-2]
        span = newest_at - oldest_at
        windows = {}
        for task, (done, failed, buckets) in newest.items():
            done_before, failed_before, buckets_before = oldest.get(task, (0, 0, [0] * len(buckets)))
            ran = [now - before for now, before in zip(buckets, buckets_before, strict=True)]
            executions = done - done_before
            windows[task] = LiveWindow(
                task, round(span, 3), executions, executions / span if span > 0 else 0.0,
                (failed - failed_before) / executions if executions else None,
                percentile(ran, 0.50), percentile(ran, 0.95), percentile(ran, 0.99))
        return windows


_task_version_status = itemgetter("task_id", "version", "status")
_latency = itemgetter("latency_ms")


def percentile(buckets: list[int], q: float) -> float | None:
    """The q-quantile of bucketed latencies in ms, interpolated inside its bucket as Prometheus's
    histogram_quantile does; None without observations. Past the last bound it answers the last bound."""
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    cumulative = 0
    for i, count in enumerate(buckets):
        if count and cumulative + count >= rank:
            if i == len(LATENCY_BOUNDS_MS):
                return LATENCY_BOUNDS_MS[-1]
            lower = LATENCY_BOUNDS_MS[i - 1] if i else 0.0
            return lower + (LATENCY_BOUNDS_MS[i] - lower) * (rank - cumulative) / count
        cumulative += count
    return LATENCY_BOUNDS_MS[-1]


def gauge(name: str, documentation: str, labels: list[str], values: Iterable[tuple[list[str], float]]) -> Metric:
    """A gauge family from (label values, value) pairs."""
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for label_values, value in values:
        family.add_metric(label_values, value)
    return family


def counter(name: str, documentation: str, labels: list[str], values: Iterable[tuple[list[str], float]]) -> Metric:
    """A counter family (name without _total) from (label values, value) pairs."""
    family = CounterMetricFamily(name, documentation, labels=labels)
    for label_values, value in values:
        family.add_metric(label_values, value)
    return family


def _seconds_label(bound_ms: float) -> str:
    return "+Inf" if bound_ms == float("inf") else f"{bound_ms / 1000:g}"


LAG_BOUNDS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class EventLoopLag:
    """How late the event loop runs a timer: what any step of the hot path waits for whatever else holds the
    loop (an agent, table recovery, the HTTP server). run() samples every `interval_s`; metrics() is the
    histogram /metrics shows, `worst_s` the largest lag seen."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self._interval_s = interval_s
        self.buckets = [0] * (len(LAG_BOUNDS_S) + 1)
        self.total_s = 0.0
        self.worst_s = 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time() + self._interval_s
            await asyncio.sleep(self._interval_s)
            self.observe(max(0.0, loop.time() - asked))

    def observe(self, lag_s: float) -> None:
        self.buckets[bisect_left(LAG_BOUNDS_S, lag_s)] += 1  # le: a lag equal to a bound counts in its bucket
        self.total_s += lag_s
        self.worst_s = max(self.worst_s, lag_s)

    def metrics(self) -> Iterator[Metric]:
        cumulative, buckets = 0, []
        for bound, count in zip((*LAG_BOUNDS_S, float("inf")), self.buckets, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else f"{bound:g}", cumulative))
        family = HistogramMetricFamily("loopai_event_loop_lag_seconds",
                                       "How late the worker's event loop ran a timer (the hot path's wait)")
        family.add_metric([], buckets, sum_value=self.total_s)
        yield family
