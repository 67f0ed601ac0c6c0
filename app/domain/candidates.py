"""A generated candidate program, judged offline: the program taken out of a generator's answer, the cases it is
scored on (the task's examples and the request's failing examples that have an expected output), its score
against the active version's, and how often a task may get a new candidate."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from app.contract.records import ImprovementRequest
from app.domain.comparison import compare

_FENCE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


class MalformedAnswer(ValueError):
    """A generator's answer holds no program."""


def program_from_answer(answer: str) -> str:
    """The program in a generator's answer: the first fenced block that defines run(), else the first fenced
    block, else the whole answer if it defines run()."""
    blocks = _FENCE.findall(answer)
    for block in blocks:
        if re.search(r"^def run\(", block, re.MULTILINE):
            return block.strip() + "\n"
    if blocks:
        return blocks[0].strip() + "\n"
    if re.search(r"^def run\(", answer, re.MULTILINE):
        return answer.strip() + "\n"
    raise MalformedAnswer(f"the answer holds no program (no fenced code, no `def run(`): {answer[:200]!r}")


@dataclass(frozen=True, slots=True)
class Case:
    """One input a candidate program is scored on, with the output it should give."""

    input: Any
    expected: Any


def cases_for(request: ImprovementRequest) -> list[Case]:
    """The task's examples with an expected output, then the failing examples with one; one case per input."""
    seen: set[bytes] = set()
    cases = []
    pairs = [(e.input, e.expected_output) for e in request.examples]
    pairs += [(f.input, f.expected) for f in request.failing_examples]
    for value, expected in pairs:
        key = orjson.dumps(value, option=orjson.OPT_SORT_KEYS, default=str)
        if expected is None or key in seen:
            continue
        seen.add(key)
        cases.append(Case(value, expected))
    return cases


@dataclass(frozen=True, slots=True)
class Score:
    """How many of its cases a program got right."""

    right: int
    total: int

    @property
    def share(self) -> float | None:
        return self.right / self.total if self.total else None

    def __str__(self) -> str:
        return f"{self.right}/{self.total}"


def score(outcomes: Sequence[tuple[str, Any]], cases: Sequence[Case], comparison: str = "exact",
          tolerance: float = 1e-6) -> Score:
    """How many (status, output) outcomes, one per case, match their case's expected output. An error or a
    timeout never matches."""
    right = sum(1 for (status, output), case in zip(outcomes, cases, strict=True)
                if status == "ok" and compare(comparison, output, case.expected, tolerance).match)
    return Score(right, len(cases))


def is_better(candidate: Score, active: Score | None) -> bool:
    """Publish only a candidate that gets more cases right than the active version (any, for a first version:
    at least one)."""
    if active is None:
        return candidate.right > 0 or candidate.total == 0
    return candidate.right > active.right


@dataclass
class RateLimit:
    """At most one candidate per task per `interval_s` (candidates published or refused alike: each costs a
    generator call and, once published, a canary's traffic)."""

    interval_s: float
    last: dict[str, float]

    def __init__(self, interval_s: float) -> None:
        self.interval_s, self.last = interval_s, {}

    def wait_s(self, task_id: str, now: float) -> float:
        """Seconds until the task may get another candidate; 0 when it may now."""
        last = self.last.get(task_id)
        return 0.0 if last is None else max(0.0, last + self.interval_s - now)

    def spend(self, task_id: str, now: float) -> None:
        """Count a candidate for the task at `now`: the next one waits `interval_s`."""
        self.last[task_id] = now
