"""Sample tasks, programs and traffic for `loopai dev` and the tests."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from app.contract.records import OracleKind, OracleSpec, TaskSpec, utc_now

TEXT_INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"text": {"type": "string", "maxLength": 10000}},
    "required": ["text"],
}

# Each message with its true label: the label oracle of `loopai dev` (v1 gets the last four wrong).
SPAM_TRUTH = {
    "FREE prize waiting, click http://win.example now": "spam",
    "You are a WINNER! Claim your money": "spam",
    "Lunch at noon tomorrow?": "ham",
    "Here are the meeting notes from today": "ham",
    "Urgent offer: free money, click here": "spam",
    "Can you review my pull request?": "ham",
    "Congratulations, you have been selected for a cash reward, click http://x.example": "spam",
    "Limited offer!!! Act now: http://deals.example": "spam",
    "Are you free for lunch?": "ham",
    "The prize-giving ceremony is on Friday": "ham",
}
SPAM_TEXTS = list(SPAM_TRUTH)
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


# The reference oracle's labels for the intent classifier; "What colours…" has none, so its validations expire.
INTENT_LABELS = {
    "I want a refund for my order": "refund",
    "Where is my package? tracking says shipped": "order_status",
    "Please cancel my subscription": "cancel",
    "Hello there": "greeting",
}


def sample_tasks() -> list[TaskSpec]:
    """spam-filter: validated by the labels its requests carry; intent-classifier: by an external oracle. Their new
    versions are published by hand (auto_improve off): `loopai dev` improves a task of its own."""
    now = utc_now()
    return [
        TaskSpec(name="spam-filter", description="Label a message spam or ham.", input_schema=TEXT_INPUT_SCHEMA,
                 sampling_rate=0.5, accuracy_target=0.8, latency_target_ms=10, updated_at=now, auto_improve=False),
        TaskSpec(name="intent-classifier", description="Name the intent of a support message.",
                 input_schema=TEXT_INPUT_SCHEMA, sampling_rate=0.3, updated_at=now,
                 oracle=OracleSpec(kind=OracleKind.EXTERNAL, timeout_s=5), auto_improve=False),
    ]


# (task, program, activate)
SAMPLE_PROGRAMS = [("spam-filter", "spam_v1", True), ("spam-filter", "spam_v2", False),
                   ("spam-filter", "spam_v3", False), ("intent-classifier", "intent_v1", True)]


def sample_traffic(seed: int = 7) -> Iterator[tuple[str, dict[str, Any]]]:
    """An endless mix of (task_id, input) for the sample tasks."""
    rng = random.Random(seed)
    for _ in itertools.count():
        if rng.random() < 0.6:
            yield "spam-filter", {"text": rng.choice(SPAM_TEXTS)}
        else:
            yield "intent-classifier", {"text": rng.choice(INTENT_TEXTS)}
