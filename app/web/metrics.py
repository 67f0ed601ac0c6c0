"""A worker's metrics: consumes each delivered batch's result fields, the timestamps of the requests they answer and the
worker's own counters, produces Prometheus families on the worker's own registry and the dashboard's live window and
last 15 minutes."""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left, bisect_right
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import attrgetter, itemgetter
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

# Upper bounds in milliseconds: programs run in tens of microseconds to a few seconds (timeout_ms <= 60 s).
LATENCY_BOUNDS_MS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0,
                     1000.0, 2500.0, 5000.0, 10000.0, 60000.0)
# Request -> result: a fetch wait, the sandbox round trip and an acknowledged produce, milliseconds to seconds.
WAIT_BOUNDS_MS = (1.0, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 250.0, 500.0, 750.0,
                  1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0)
FAILED = frozenset({"error", "timeout"})  # what the dashboard's error rate counts; rejected is the caller's fault
SERIES_STEP_S = 10.0  # the dashboard's chart: one point per task every this many seconds...
SERIES_POINTS = 90  # ...for the last 15 minutes


@dataclass
class _Latencies:
    """Counts per latency bucket (the last one is +Inf) and their sum, in milliseconds."""

    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_MS) + 1))
    total_ms: float = 0.0


def _wait_buckets() -> list[int]:
    return [0] * (len(WAIT_BOUNDS_MS) + 1)


@dataclass(frozen=True)
class LiveWindow:
    """One task over the last seconds, for the dashboard."""

    task_id: str
    seconds: float
    executions: int
    per_second: float
    error_rate: float | None
    p50_ms: float | None  # execution time: the program's run in the sandbox
    p95_ms: float | None
    p99_ms: float | None
    request_result_p50_ms: float | None  # what a client waits: from its request's timestamp to the result's ack
    request_result_p95_ms: float | None
    request_result_p99_ms: float | None


# One point of a task's chart: wall-clock seconds, executions/s, error rate, request -> result p99, execution p99.
Point = tuple[float, float, float | None, float | None, float | None]
_Totals = tuple[int, int, list[int], list[int]]  # results, failed, execution-time buckets, request -> result buckets


class WorkerMetrics(Collector):
    """Counts kept as plain dicts, turned into metric families only when scraped. `count_results` runs once per
    executed batch; the gauges of other parts (sandbox replacements, dead letters, lag, validations) are read at
    scrape time through the callables given to `watch`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.executions: Counter[tuple[str, str, str]] = Counter()  # (task, version, status) -> results
        self.latencies: dict[tuple[str, str], _Latencies] = {}  # (task, version)
        self.waits: dict[str, list[int]] = {}  # task -> request -> result counts per WAIT_BOUNDS_MS bucket
        self.waited_ms: dict[str, float] = {}  # task -> their sum
        self._sources: list[Callable[[], Iterable[Metric]]] = []
        self._history: deque[tuple[float, dict[str, _Totals]]] = deque(maxlen=120)
        self.series: dict[str, deque[Point]] = {}
        self._series_at = float("-inf")
        self.registry.register(self)

    def count_results(self, results: list[dict[str, Any]], answered: Sequence[tuple[dict[str, Any], Any]] = (),
                      now_ms: float | None = None) -> None:
        """A batch's delivered results (the executor's field dicts) and, in `answered`, each with the request
        message it answers (its `timestamp`: when the request was produced, in ms), delivered at `now_ms`
        (default: now). No per-result metric calls (at ~50k results/s a Counter.inc per result would cost a
        tenth of a core): the counts in one C-level pass, the latencies of each task version sorted and cut at
        the bucket bounds, the request timestamps of each task too (one sort, no per-result subtraction)."""
        counted = Counter(map(_task_version_status, results))  # one key tuple per result
        if answered and results:
            first = next(iter(counted))[0]
            one_task = first if len(counted) == 1 or all(key[0] == first for key in counted) else None
            self._count_waits(results, answered, time.time() * 1000 if now_ms is None else now_ms, one_task)
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

    def _count_waits(self, results: list[dict[str, Any]], answered: Sequence[tuple[dict[str, Any], Any]],
                     now_ms: float, one_task: str | None) -> None:
        if len(answered) != len(results):  # some went out as dead letters instead: only the results count
            sent = set(map(id, results))
            answered = [pair for pair in answered if id(pair[0]) in sent]
        by_task: dict[str, list[int]] = {}
        if one_task is not None:  # the usual batch: the timestamps in one C-level pass
            by_task[one_task] = list(map(_timestamp, map(_message, answered)))
        else:
            for fields, message in answered:
                by_task.setdefault(fields["task_id"], []).append(message.timestamp)
        for task, stamps in by_task.items():
            stamps.sort()  # requests of a fetch come in offset order: nearly sorted already
            buckets = self.waits.get(task)
            if buckets is None:
                buckets = self.waits[task] = _wait_buckets()
            count, within_before = len(stamps), 0
            self.waited_ms[task] = self.waited_ms.get(task, 0.0) + count * now_ms - sum(stamps)
            if count <= 8:  # a bound at a time costs more than a result at a time
                for stamp in stamps:
                    buckets[bisect_left(WAIT_BOUNDS_MS, now_ms - stamp)] += 1  # a wait on a bound counts in its bucket
                continue
            # Waited at most `bound` <=> produced at or after now - bound: counted from the newest backwards, until
            # every one is counted (most within the first few bounds).
            for i, bound in enumerate(WAIT_BOUNDS_MS):
                within = count - bisect_left(stamps, now_ms - bound)
                buckets[i] += within - within_before
                within_before = within
                if within == count:
                    break
            buckets[-1] += count - within_before

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
        waits = HistogramMetricFamily("loopai_request_result_latency_seconds", "From a request's timestamp on "
                                      "the requests topic to its result's acknowledgement, by task",
                                      labels=["task"])
        for task, counts in sorted(self.waits.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*WAIT_BOUNDS_MS, float("inf")), counts, strict=True):
                cumulative += count
                buckets.append((_seconds_label(bound), cumulative))
            waits.add_metric([task], buckets, max(self.waited_ms.get(task, 0.0), 0.0) / 1000)
        yield waits
        for source in self._sources:
            yield from source()

    def sample(self, now: float | None = None, wall: float | None = None) -> None:
        """Remember the totals per task now (monotonic `now`); the live window compares two samples (call about
        once a second). Every SERIES_STEP_S, each task's last SERIES_STEP_S become a point of its chart, stamped
        with the wall clock."""
        per_task: dict[str, _Totals] = {}

        def totals(task: str) -> _Totals:
            found = per_task.get(task)
            if found is None:
                found = per_task[task] = (0, 0, [0] * (len(LATENCY_BOUNDS_MS) + 1), _wait_buckets())
            return found

        for (task, _, status), count in self.executions.items():
            done, failed, buckets, waits = totals(task)
            per_task[task] = (done + count, failed + (count if status in FAILED else 0), buckets, waits)
        for (task, _), seen in self.latencies.items():
            buckets = totals(task)[2]
            for i, count in enumerate(seen.buckets):
                buckets[i] += count
        for task, counts in self.waits.items():
            totals(task)[3][:] = counts
        now = time.monotonic() if now is None else now
        self._history.append((now, per_task))
        if now - self._series_at >= SERIES_STEP_S - 0.5:  # the sampler's ticks drift a little
            self._series_at = now
            self._add_points(time.time() if wall is None else wall)

    def _add_points(self, wall: float) -> None:
        for task, window in self.live(SERIES_STEP_S).items():
            series = self.series.get(task)
            if series is None:
                if not window.executions:
                    continue  # a task seen long ago starts no chart
                series = self.series[task] = deque(maxlen=SERIES_POINTS)
            series.append(_point(wall, window))

    def history(self, task_id: str, wall: float | None = None) -> list[Point]:
        """A task's chart: its points of the last 15 minutes, then its live window now (a point that moves)."""
        points = list(self.series.get(task_id, ()))
        window = self.live().get(task_id)
        if window is not None:
            points.append(_point(time.time() if wall is None else wall, window))
        return points

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
        for task, (done, failed, buckets, waits) in newest.items():
            done_before, failed_before, buckets_before, waits_before = oldest.get(
                task, (0, 0, [0] * len(buckets), [0] * len(waits)))
            ran = [now - before for now, before in zip(buckets, buckets_before, strict=True)]
            waited = [now - before for now, before in zip(waits, waits_before, strict=True)]
            executions = done - done_before
            windows[task] = LiveWindow(
                task, round(span, 3), executions, executions / span if span > 0 else 0.0,
                (failed - failed_before) / executions if executions else None,
                percentile(ran, 0.50), percentile(ran, 0.95), percentile(ran, 0.99),
                percentile(waited, 0.50, WAIT_BOUNDS_MS), percentile(waited, 0.95, WAIT_BOUNDS_MS),
                percentile(waited, 0.99, WAIT_BOUNDS_MS))
        return windows


def _point(wall: float, window: LiveWindow) -> Point:
    return (round(wall, 3), round(window.per_second, 3), window.error_rate, window.request_result_p99_ms,
            window.p99_ms)


_task_version_status = itemgetter("task_id", "version", "status")
_latency = itemgetter("latency_ms")
_message = itemgetter(1)
_timestamp = attrgetter("timestamp")


def percentile(buckets: list[int], q: float, bounds: Sequence[float] = LATENCY_BOUNDS_MS) -> float | None:
    """The q-quantile of bucketed latencies in ms (`bounds`: the buckets' upper bounds, one fewer than the
    buckets), interpolated inside its bucket as Prometheus's histogram_quantile does; None without observations.
    Past the last bound it answers the last bound."""
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    cumulative = 0
    for i, count in enumerate(buckets):
        if count and cumulative + count >= rank:
            if i == len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i else 0.0
            return lower + (bounds[i] - lower) * (rank - cumulative) / count
        cumulative += count
    return bounds[-1]


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
        """Sample forever: sleep `interval_s`, then count how late the loop woke."""
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
        """The lag histogram, as /metrics shows it."""
        cumulative, buckets = 0, []
        for bound, count in zip((*LAG_BOUNDS_S, float("inf")), self.buckets, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else f"{bound:g}", cumulative))
        family = HistogramMetricFamily("loopai_event_loop_lag_seconds",
                                       "How late the worker's event loop ran a timer (the hot path's wait)")
        family.add_metric([], buckets, sum_value=self.total_s)
        yield family
