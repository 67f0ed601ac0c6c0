"""The canary agent's logic through faust's test_context, without a broker: the validators' partials count per task
version, a better canary is promoted and a worse one rolled back (once each), an anomaly signal against the
candidate rolls it back, and bad bytes become dead letters. The end-to-end test through a worker is in
tests/agents/test_validation_loop.py (test_a_better_canary_is_promoted_and_a_worse_one_rolled_back)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import faust
import pytest

from app.agents.decide_canaries import DecideCanaries
from app.contract.codecs import json_codec
from app.contract.records import (
    AnomalyMethod,
    AnomalyMetric,
    AnomalySignal,
    CanaryAction,
    CanaryDecision,
    DeadLetter,
    StatsPartial,
    TaskSpec,
    utc_now,
)
from app.contract.topics import Topics, topics_for
from app.domain.sampling import Sampler
from app.settings import Settings
from app.worker import build_app

STARTED = utc_now() - timedelta(minutes=5)  # when the canaries were started


@dataclass
class Canaries:
    """The agent under test, what it sent (topic name, key, value), and a way to feed it."""

    agent: DecideCanaries
    tested: Any  # faust's test wrapper of the agent
    topics: Topics
    tasks: dict[str, TaskSpec]
    sampler: Sampler
    sent: list[tuple[str, bytes | None, bytes]]
    offset: int = 0

    async def put(self, topic: str, key: str, value: bytes) -> None:
        """An event of `topic` (the agent reads two topics; test_context's put() names neither)."""
        message = self.tested.to_message(key.encode(), value, offset=self.offset)
        message.topic = topic
        self.offset += 1
        channel = self.tested.stream().channel
        await channel.put(await channel.decode(message))

    async def partial(self, task: str, version: int, validated: int, matched: int) -> None:
        record = StatsPartial(task_id=task, version=version, date=utc_now().date().isoformat(), time_zone="UTC",
                              validated=validated, matched=matched, sketch=b"", event_at=utc_now())
        await self.put(self.topics.stats_partials.name, task, json_codec(StatsPartial).encode(record))

    async def signal(self, task: str, version: int | None, detected_after_start_s: float = 60) -> None:
        record = AnomalySignal(task_id=task, version=version, metric=AnomalyMetric.ERROR_RATE, value=0.5,
                               baseline=0.01, score=9.5, method=AnomalyMethod.ZSCORE, hint="error rate 50%",
                               detected_at=STARTED + timedelta(seconds=detected_after_start_s))
        await self.put(self.topics.anomaly_signals.name, task, json_codec(AnomalySignal).encode(record))

    def sent_to(self, topic: str, model: type) -> list[Any]:
        codec = json_codec(model)
        return [codec.decode(value) for name, _, value in self.sent if name == topic]

    async def settled(self) -> None:
        """Until every event put so far has been processed: a partial of a task of its own is put last, and
        counted once the ones before it are done (the agent takes one event at a time)."""
        marker = f"marker-{self.offset}"
        await self.partial(marker, 1, 1, 1)
        await eventually(lambda: self.agent.accuracy_of(marker, 1).validated > 0, "the marker counted")


async def eventually(condition: Callable[[], object], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        await asyncio.sleep(0.005)


def canary(name: str, accuracy_target: float = 0.6) -> TaskSpec:
    return TaskSpec(name=name, accuracy_target=accuracy_target, active_version=1, canary_version=2,
                    canary_percent=50.0, updated_at=STARTED)


@pytest.fixture
async def canaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Canaries]:
    settings = Settings(bootstrap_servers="127.0.0.1:9", topic_prefix="p.", data_dir=tmp_path,
                        canary_min_validations=10, canary_margin=0.05)
    topics = topics_for(settings.topic_prefix)
    ready = asyncio.Event()
    ready.set()
    tasks: dict[str, TaskSpec] = {}
    sampler = Sampler()
    app = build_app(settings)
    agent = DecideCanaries(app, settings, topics, SimpleNamespace(ready=ready, tasks=tasks), sampler)  # type: ignore[arg-type]
    sent: list[tuple[str, bytes | None, bytes]] = []

    async def send(topic: Any, key: bytes | None = None, value: bytes = b"", **_: Any) -> None:
        sent.append((topic.get_topic_name(), key, value))

    monkeypatch.setattr(faust.topics.Topic, "send", send)  # decisions, specs and dead letters: recorded
    async with app.agents["decide_canaries"].test_context() as tested:
        yield Canaries(agent, tested, topics, tasks, sampler, sent)


async def test_validations_count_per_task_version_and_executor_partials_do_not(canaries: Canaries) -> None:
    await canaries.partial("spam", 1, validated=4, matched=3)
    await canaries.partial("spam", 1, validated=0, matched=0)  # an executor's partial: results only
    await canaries.partial("spam", 2, validated=2, matched=2)
    await canaries.partial("spam", 1, validated=6, matched=1)
    await canaries.settled()
    assert canaries.agent.accuracy_of("spam", 1).counts() == [10, 4]
    assert canaries.agent.accuracy_of("spam", 2).counts() == [2, 2]
    assert canaries.agent.accuracy_of("spam", None).counts() == [0, 0]
    assert canaries.sampler.disagreement["spam"] > 0  # adaptive sampling learns from them
    assert canaries.sent == []  # no canary: nothing decided


async def test_a_better_canary_is_promoted_once(canaries: Canaries) -> None:
    canaries.tasks["better"] = canary("better")
    await canaries.partial("better", 1, validated=10, matched=5)
    await canaries.partial("better", 2, validated=9, matched=9)  # one short of canary_min_validations
    await canaries.settled()
    assert canaries.sent == []
    await canaries.partial("better", 2, validated=1, matched=1)
    await canaries.partial("better", 2, validated=5, matched=5)  # still before the new spec comes back
    await canaries.settled()
    [decision] = canaries.sent_to("p.canary-decisions", CanaryDecision)
    assert (decision.action, decision.candidate_version, decision.active_version) == (CanaryAction.PROMOTED, 2, 1)
    assert (decision.candidate_accuracy, decision.active_accuracy, decision.validations) == (1.0, 0.5, 10)
    assert decision.reason.startswith("candidate accuracy 1.000 over 10 validations")
    [spec] = canaries.sent_to("p.task-specs", TaskSpec)
    assert (spec.name, spec.active_version, spec.canary_version, spec.canary_percent) == ("better", 2, None, 0.0)
    assert spec.updated_at > STARTED


async def test_a_worse_canary_is_rolled_back(canaries: Canaries) -> None:
    canaries.tasks["worse"] = canary("worse")
    await canaries.partial("worse", 1, validated=10, matched=10)
    await canaries.partial("worse", 2, validated=10, matched=2)
    await canaries.settled()
    [decision] = canaries.sent_to("p.canary-decisions", CanaryDecision)
    assert decision.action is CanaryAction.ROLLED_BACK and decision.candidate_accuracy == 0.2
    [spec] = canaries.sent_to("p.task-specs", TaskSpec)
    assert (spec.active_version, spec.canary_version) == (1, None)


async def test_a_signal_against_the_candidate_rolls_it_back_however_accurate(canaries: Canaries) -> None:
    canaries.tasks["signalled"] = canary("signalled")
    await canaries.partial("signalled", 2, validated=3, matched=3)
    await canaries.signal("signalled", None)  # results of no version: no canary to count it against
    await canaries.signal("signalled", 1)  # against the active version
    await canaries.signal("signalled", 2, detected_after_start_s=-60)  # from before this canary started
    await canaries.settled()
    assert canaries.sent == []
    assert len(canaries.agent.signals_of("signalled", 1)) == 1
    await canaries.signal("signalled", 2)
    await eventually(lambda: canaries.sent_to("p.canary-decisions", CanaryDecision), "the rollback")
    [decision] = canaries.sent_to("p.canary-decisions", CanaryDecision)
    assert decision.action is CanaryAction.ROLLED_BACK
    assert decision.reason == "1 anomaly signal(s) against the candidate: error rate 50% (zscore, score 9.5)"


async def test_only_the_newest_signals_of_a_version_are_kept(canaries: Canaries) -> None:
    for n in range(25):
        await canaries.signal("kept", 1, detected_after_start_s=n)
    await canaries.settled()
    kept = canaries.agent.signals_of("kept", 1)
    assert [s.detected_at for s in kept] == [STARTED + timedelta(seconds=n) for n in range(5, 25)]


async def test_bad_bytes_become_dead_letters_and_the_stream_goes_on(canaries: Canaries) -> None:
    await canaries.put("p.stats-partials", "spam", b"\xff not a partial")
    await canaries.put("p.anomaly-signals", "spam", b'{"task_id": "spam"}')
    await canaries.settled()
    letters = canaries.sent_to("p.dead-letters", DeadLetter)
    assert [(d.source_topic, d.error_type, d.value) for d in letters] == [
        ("p.stats-partials", "DecodeError", b"\xff not a partial"),
        ("p.anomaly-signals", "DecodeError", b'{"task_id": "spam"}')]
