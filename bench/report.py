"""Runs in, the comparison out: the table printed (min / median / max msg/s per contender, CPU per request, ratios
of medians, lags and latency against their targets) and the --json document."""

from __future__ import annotations

import statistics
from typing import Any

from bench import say
from bench.contenders import CONTENDERS, Run


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def report(runs: dict[str, list[Run]], lat: list[float], floor: list[float], rate: int | None, machine: str,
           rate_given: bool = False) -> dict[str, Any]:
    """Print the table and return the --json document."""
    medians = {name: statistics.median(r.msg_per_s for r in got) for name, got in runs.items() if got}
    rounds = max((len(got) for got in runs.values()), default=0)
    say("")
    say(f"{machine}; {rounds} round(s), interleaved")
    say(f"{'':<44}{'msg/s':^27}")
    say(f"{'contender':<44}{'min':>9}{'median':>9}{'max':>9}{'CPU µs/req':>13}{'vs plain':>10}{'vs Quix':>9}")
    for name, got in runs.items():
        if not got:
            continue
        rates = [r.msg_per_s for r in got]
        cpu = statistics.median(r.cpu_us_per_request for r in got)
        vs_plain = f"{medians[name] / medians['plain']:.2f}" if "plain" in medians else "-"
        vs_quix = f"{medians[name] / medians['quix']:.2f}" if "quix" in medians else "-"
        say(f"{CONTENDERS[name]:<44}{min(rates):>9,.0f}{medians[name]:>9,.0f}{max(rates):>9,.0f}"
            f"{cpu:>13.1f}{vs_plain:>10}{vs_quix:>9}")
    say("targets: pipeline >= 0.50 x plain loop, >= 1.00 x Quix Streams; CPU µs/request <= Quix's")
    for name in ("pipeline_1", "pipeline_2"):
        lags = [r.analytics_lag_s for r in runs.get(name, []) if r.analytics_lag_s is not None]
        if lags:
            say(f"{CONTENDERS[name]}: daily analytics complete {statistics.median(lags):.2f} s after the last "
                f"result (median; max {max(lags):.2f} s; target <= 2 s)")
        lags = [r.validation_lag_s for r in runs.get(name, []) if r.validation_lag_s is not None]
        if lags:
            say(f"{CONTENDERS[name]}: sampled executions all validated {statistics.median(lags):.2f} s after the "
                f"last result (median; max {max(lags):.2f} s; target <= 2 s)")
    latency_doc = None
    if lat and rate:
        p50, p99 = statistics.median(lat), _p99(lat)
        why = "as asked" if rate_given else "half its median capacity"
        say(f"request->result latency, 1 worker at {rate:,} req/s ({why}): p50 {p50:.1f} ms, "
            f"p99 {p99:.1f} ms ({len(lat)} requests; targets p50 <= 5 ms, p99 <= 20 ms)")
        latency_doc = {"rate": rate, "p50_ms": round(p50, 2), "p99_ms": round(p99, 2)}
        if floor:
            floor_p50, floor_p99 = statistics.median(floor), _p99(floor)
            say(f"the same load through the plain loop (no isolation, no guarantee), the broker's floor: "
                f"p50 {floor_p50:.1f} ms, p99 {floor_p99:.1f} ms ({len(floor)} requests)")
            latency_doc["plain"] = {"p50_ms": round(floor_p50, 2), "p99_ms": round(floor_p99, 2)}
    return {
        "contenders": {name: {"msg_per_s": [round(r.msg_per_s, 1) for r in got],
                              "cpu_us_per_request": [round(r.cpu_us_per_request, 2) for r in got]}
                       for name, got in runs.items() if got},
        "latency": latency_doc,
    }
