"""Synthetic traffic for anomaly tests: minutes of results with chosen error rates and p99 latencies, summarised
into StatsPartials by the executor's own code (summarise_results), two batches a minute."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from statistics import NormalDist
from typing import Any

from app.contract.records import StatsPartial
from app.domain.daily_stats import summarise_results
from app.domain.daily_windows import DailyWindows

RAN = 200  # results a minute
SPREAD = 0.5  # lognormal sigma of the latencies within a minute
# Latencies of a minute are these fixed quantiles of a lognormal, scaled: its p99 is the scale times the last
# factor's neighbour, whatever the draw, so a test chooses each minute's p99 exactly.
_FACTORS = [NormalDist(0, SPREAD).inv_cdf((i + 0.5) / RAN) for i in range(RAN)]
_P99_FACTOR = sorted(_FACTORS)[int(0.99 * (RAN - 1))]
_UTC = DailyWindows("UTC")


def minute_results(task_id: str, version: int | None, start: datetime, error_rate: float, p99_ms: float,
                   rng: random.Random) -> list[dict[str, Any]]:
    """One minute of results (their fields), one every 0.3 s, each an error with probability error_rate."""
    scale = p99_ms / math.exp(_P99_FACTOR)
    return [{"task_id": task_id, "version": version, "executed_at": start + timedelta(seconds=60 * (i + 0.99) / RAN),
             "status": "error" if rng.random() < error_rate else "ok",
             "latency_ms": scale * math.exp(factor), "sampled_for_validation": False}
            for i, factor in enumerate(_FACTORS)]


def partials(task_id: str, version: int | None, start: datetime, count: int, seed: int,
             error_rate: Callable[[int], float] = lambda m: 0.01,
             p99_ms: Callable[[int], float] = lambda m: 50.0) -> Iterator[StatsPartial]:
    """`count` minutes from `start` (aligned to a minute); minute m has error_rate(m) and p99 latency p99_ms(m)
    times 8% log-normal noise from minute to minute. The last result of a minute is at its 59.7th second."""
    rng = random.Random(seed)
    for m in range(count):
        results = minute_results(task_id, version, start + timedelta(minutes=m), error_rate(m),
                                 p99_ms(m) * rng.lognormvariate(0, 0.08), rng)
        for batch in (results[: RAN // 2], results[RAN // 2:]):
            yield from summarise_results(batch, _UTC)
