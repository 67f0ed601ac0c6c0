"""Which executions are sampled for validation: consumes an execution (id, status, latency, output) with its task's
sampling strategy and rate, produces the decision, deterministic given the id and the sampler's state."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from app.domain.diversity import signature

# Every decision compares a fraction drawn from the execution id with a probability, so a redelivered request makes
# the same choice. Strategies (a task's `sampling_strategy`, its `sampling_rate`):
# - random: each execution with probability `rate`.
# - stratified: equal share per output class, so rare classes are seen. The budget rate * n (n executions seen
#   recently) is split equally among the classes; a class too rare to fill its share is sampled whole and what it
#   leaves goes to the others (water-filling). The overall rate stays `rate`.
# - edge_cases: every error and timeout, every execution slower than the task's latency target, every output whose
#   `confidence` (or `score` in [0, 1]) is below LOW_CONFIDENCE; others at `rate`.
# - adaptive: the rate rises with the recent disagreement of validations (rate * (1 + ADAPTIVE_GAIN * disagreement)),
#   within [rate, ADAPTIVE_MAX]; it falls back as agreement returns.
# - diverse: like stratified, but over kinds of input (app/domain/diversity.py signature: its keys and a min-hash
#   bucket of its words) rather than output classes: inputs unlike the recent ones are sampled more often.
# `force_validation` on a request always samples.

STRATEGIES = ("random", "stratified", "edge_cases", "adaptive", "diverse")
LOW_CONFIDENCE = 0.6
ADAPTIVE_GAIN = 4.0
ADAPTIVE_MAX = 0.5
_CLASS_WINDOW = 10_000  # outputs remembered per task for stratified sampling


def fraction_of(execution_id: str) -> float:
    """A number in [0, 1) from the id's leading 32 bits, its first eight hex digits (uuid5 ids are uniformly
    spread)."""
    return int(execution_id[:8], 16) / 0x1_0000_0000


def is_sampled(execution_id: str, sampling_rate: float, forced: bool = False) -> bool:
    """True when forced, else for a `sampling_rate` share of execution ids."""
    return forced or fraction_of(execution_id) < sampling_rate


def output_class(output: Any) -> str:
    """The class of an output for stratification: the label of a labelled output, else its JSON-ish text."""
    if isinstance(output, dict):
        for key in ("label", "class", "intent", "category"):
            if key in output:
                return str(output[key])
    return str(output)[:100]


def confidence_of(output: Any) -> float | None:
    """An output's own confidence, if it states one (`confidence`, or a `score` in [0, 1])."""
    if isinstance(output, dict):
        for key in ("confidence", "score"):
            value = output.get(key)
            if isinstance(value, int | float) and 0 <= value <= 1:
                return float(value)
    return None


@dataclass
class Sampler:
    """Per-task state for the strategies that need it: recent output classes and validation disagreement."""

    classes: dict[str, Counter[str]] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)
    disagreement: dict[str, float] = field(default_factory=dict)  # recent share of mismatches, per task

    def decide(self, execution_id: str, task_id: str, strategy: str, rate: float, *, status: str,
               output: Any, latency_ms: float, latency_target_ms: float, forced: bool = False,
               input: Any = None) -> bool:
        """Whether this execution is sampled (`input` is looked at by the diverse strategy only)."""
        if forced:
            return True
        draw = fraction_of(execution_id)
        if strategy == "stratified":
            return draw < self._stratified_rate(task_id, output_class(output) if status == "ok" else status, rate)
        if strategy == "edge_cases":
            confidence = confidence_of(output)
            edge = (status in ("error", "timeout") or latency_ms > latency_target_ms
                    or (confidence is not None and confidence < LOW_CONFIDENCE))
            return edge or draw < rate
        if strategy == "adaptive":
            return draw < self.adaptive_rate(task_id, rate)
        if strategy == "diverse":
            return draw < self._stratified_rate(task_id, "input:" + signature(input), rate)
        return draw < rate

    def _stratified_rate(self, task_id: str, label: str, rate: float) -> float:
        counts = self.classes.setdefault(task_id, Counter())
        counts[label] += 1
        total = self.seen[task_id] = self.seen.get(task_id, 0) + 1
        if total > _CLASS_WINDOW:  # forget slowly: halve every count, keep proportions
            for key in list(counts):
                counts[key] //= 2
                if not counts[key]:
                    del counts[key]
            self.seen[task_id] = sum(counts.values())
            total = self.seen[task_id]
        budget = rate * total
        larger = sorted(counts.items(), key=lambda item: item[1])
        while larger and larger[0][1] <= budget / len(larger):  # too rare to fill its share: sample it whole
            small, count = larger.pop(0)
            budget -= count
            if small == label:
                return 1.0
        return min(1.0, budget / len(larger) / counts[label]) if larger else 1.0

    def adaptive_rate(self, task_id: str, rate: float) -> float:
        """The current rate of an adaptive task: `rate` while validations agree, up to ADAPTIVE_MAX."""
        if rate <= 0:
            return 0.0
        raised = rate * (1 + ADAPTIVE_GAIN * self.disagreement.get(task_id, 0.0))
        return max(rate, min(max(ADAPTIVE_MAX, rate), raised))

    def observe_validations(self, task_id: str, validated: int, matched: int, weight: float = 0.05) -> None:
        """Fold `validated` validation outcomes, `matched` of them matched, into the task's recent disagreement
        (an EWMA of one step per validation, the batch's steps taken as if its mismatches were spread evenly)."""
        if validated <= 0:
            return
        kept = (1 - weight) ** validated
        previous = self.disagreement.get(task_id, 0.0)
        self.disagreement[task_id] = kept * previous + (1 - kept) * (validated - matched) / validated
