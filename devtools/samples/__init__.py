"""Sample tasks, programs and traffic for `loopai dev` and the tests."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from app.records import TaskSpec, utc_now

TEXT_INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"text": {"type": "string", "maxLength": 10000}},
    "required": ["text"],
}

SPAM_TEXTS = [
    "FREE prize waiting, click http://win.example now",
    "You are a WINNER! Claim your money",
    "Lunch at noon tomorrow?",
    "Here are the meeting notes from today",
    "Urgent offer: free money, click here",
    "Can you review my pull request?",
]
INTENT_TEXTS = [
    "I want a refund for my order",
    "Where is my package? tracking says shipped",
    "Please cancel my subscription",
    "Hello there",
    "What colours does it come in?",
]


def program_source(name: str) -> str:
    """The source of a sample program, e.g. "spam_v1"."""
    return (Path(__file__).parent / "programs" / f"{name}.py").read_text()


def sample_tasks() -> list[TaskSpec]:
    now = utc_now()
    return [
        TaskSpec(name="spam-filter", description="Label a message spam or ham.", input_schema=TEXT_INPUT_SCHEMA,
                 sampling_rate=0.1, latency_target_ms=10, updated_at=now),
        TaskSpec(name="intent-classifier", description="Name the intent of a support message.",
                 input_schema=TEXT_INPUT_SCHEMA, sampling_rate=0.05, updated_at=now),
    ]


# (task, program, activate)
SAMPLE_PROGRAMS = [("spam-filter", "spam_v1", True), ("spam-filter", "spam_v2", False),
                   ("intent-classifier", "intent_v1", True)]


def sample_traffic(seed: int = 7) -> Iterator[tuple[str, dict[str, Any]]]:
    """An endless mix of (task_id, input) for the sample tasks."""
    rng = random.Random(seed)
    for _ in itertools.count():
        if rng.random() < 0.6:
            yield "spam-filter", {"text": rng.choice(SPAM_TEXTS)}
        else:
            yield "intent-classifier", {"text": rng.choice(INTENT_TEXTS)}
