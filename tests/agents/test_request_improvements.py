"""The loop closed, end to end on the embedded broker: a task whose v1 mishandles a class of inputs falls below its
accuracy target on label-validated traffic; the worker's watcher emits one improvement request with diverse failing
examples; the generator (asking a fake OpenAI-compatible endpoint) publishes v2 as a canary; the canary agent
promotes it; accuracy recovers; and no second request is made for the incident.

The watcher's own logic is also tested fast, at the end: its handler called directly, without a broker or a
worker (when a task falls short is app/domain/improvement.py's, tested in tests/domain/test_improvement.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from app.agents import request_improvements
from app.agents.request_improvements import RequestImprovements
from app.contract.codecs import json_codec
from app.contract.records import (
    AnomalyMetric,
    AnomalySignal,
    CanaryAction,
    CanaryDecision,
    DeadLetter,
    ImprovementRequest,
    ImprovementStatus,
    ImprovementTrigger,
    ProgramArtifact,
    TaskExample,
    TaskSpec,
    Validation,
    utc_now,
)
from app.contract.topics import Topics, topics_for
from app.control.plane import ControlPlane
from app.generator.providers import ChatCompletions
from app.generator.service import GeneratorService
from app.kafka.loop_client import RequestSender, request_from
from app.kafka.tables import Table, read_to_end
from app.settings import Settings
from app.worker import build_app
from devtools.broker import EmbeddedBroker
from devtools.fake_llm import FakeChat, Fixture
from tests.agents.test_aggregate_daily_stats import Batches
from tests.agents.test_plumbing import Events, Sends
from tests.agents.test_validation_loop import validations_of
from tests.conftest import WorkerProcess, make_settings
from tests.domain.test_improvement import signal, validation
from tests.generator.test_service import BETTER, V1, fenced, request_for

# Three kinds of input: v1 gets the "prize" kind wrong (a third of the traffic: accuracy near 0.67, target 0.9).
KINDS = ["free {n} money now", "you won a prize number {n}", "lunch at {n} o'clock"]


def truth(text: str) -> str:
    return "spam" if "free" in text or "prize" in text else "ham"


async def send_round(settings: Settings, start: int, count: int = 30) -> list[str]:
    texts = [KINDS[i % 3].format(n=i) for i in range(start, start + count)]
    requests = [request_from("spam", {"text": text}, expected_output=truth(text)) for text in texts]
    async with RequestSender(settings) as sender:
        await sender.send(requests)
    return [r.request_id for r in requests]


async def records_of(settings: Settings, key: str) -> list:
    return await read_to_end(settings, topics_for(settings.topic_prefix).by_name(key))


@pytest.fixture
async def chat() -> AsyncIterator[FakeChat]:
    async with FakeChat([Fixture("Task: spam", fenced(BETTER))]) as served:
        yield served


async def test_a_task_that_falls_short_is_improved_through_a_canary_once(
        broker: EmbeddedBroker, tmp_path: Path, chat: FakeChat) -> None:
    settings = make_settings(broker, improvement_min_validations=20, improvement_window=60,
                             canary_min_validations=20, generator_canary_percent=50.0)
    from app.kafka.clients import apply_topics
    await apply_topics(settings, topics_for(settings.topic_prefix))
    async with ControlPlane(settings) as control:
        await control.put_task(TaskSpec(
            name="spam", description="spam or ham", sampling_rate=1.0, accuracy_target=0.9, updated_at=utc_now(),
            examples=[TaskExample(input={"text": "free money"}, expected_output="spam"),
                      TaskExample(input={"text": "see you at lunch"}, expected_output="ham")]))
        await control.publish("spam", V1, activate=True)
    worker = WorkerProcess(settings, tmp_path / "worker.log", "improver").start()
    stop, ready = asyncio.Event(), asyncio.Event()
    try:
        async with GeneratorService(settings, ChatCompletions(chat.base_url, "tiny-coder", timeout_s=30)) as service:
            serving = asyncio.ensure_future(service.run(stop, on_ready=ready.set))
            await asyncio.wait_for(ready.wait(), 60)
            sent = 0
            deadline = time.monotonic() + 240
            # Labelled traffic until the canary the improvement started has been decided.
            while not [d for d in await records_of(settings, "canary_decisions")
                       if isinstance(d, CanaryDecision) and d.action is not CanaryAction.STARTED]:
                assert time.monotonic() < deadline, worker.log()[-3000:]
                await validations_of(settings, await send_round(settings, sent))
                sent += 30
            # Accuracy recovers: a round of traffic, all on v2 now, all matched.
            recovered = await validations_of(settings, await send_round(settings, sent))
            stop.set()
            await serving
    finally:
        stop.set()
        assert worker.stop() == 0, worker.log()[-3000:]

    decisions = [d for d in await records_of(settings, "canary_decisions") if isinstance(d, CanaryDecision)]
    assert [(d.action, d.candidate_version) for d in decisions] == [(CanaryAction.STARTED, 2),
                                                                   (CanaryAction.PROMOTED, 2)], decisions
    assert {(v.version, v.match) for v in recovered.values()} == {(2, True)}

    records = [r for r in await records_of(settings, "improvement_requests") if isinstance(r, ImprovementRequest)]
    requested = [r for r in records if r.status is ImprovementStatus.REQUESTED]
    assert len(requested) == 1, requested  # one incident, one request
    request = requested[0]
    assert request.trigger is ImprovementTrigger.ACCURACY and request.active_version == 1
    assert request.active_source == V1 and request.accuracy is not None and request.accuracy < 0.9
    assert "binomial" in request.reason and request.validated >= 20
    failing = request.failing_examples
    assert 2 <= len(failing) <= settings.improvement_failing_examples
    assert all("prize" in f.input["text"] and (f.expected, f.got) == ("spam", "ham") for f in failing)
    assert len({f.input["text"] for f in failing}) == len(failing)  # no copies
    outcome = records[-1]
    assert outcome.improvement_id == request.improvement_id and outcome.status is ImprovementStatus.PUBLISHED
    assert outcome.candidate_version == 2 and outcome.candidate_score == 1.0
    assert len(chat.requests) == 1 and "you won a prize" in chat.requests[0]["messages"][1]["content"]


@dataclass
class Watcher:
    """The watcher under test, the task table and artifacts it reads, and what it sent."""

    agent: RequestImprovements
    topics: Topics
    tasks: dict[str, TaskSpec]
    sends: Sends
    events: Events = field(default_factory=lambda: Events({Validation: "p.validations",
                                                          AnomalySignal: "p.anomaly-signals"}))

    async def consume(self, *records: Validation | AnomalySignal | tuple[str, bytes]) -> None:
        """One batch of events (bytes as they are, on the topic named with them)."""
        await self.agent._consume(Batches([self.events(*records)]))

    def requests(self) -> list[ImprovementRequest]:
        return self.sends.to(self.topics.improvement_requests.name, ImprovementRequest)


def failures(count: int, start: int = 0) -> list[Validation]:
    """Wrong answers of task spam's v1, each on an input of its own."""
    return [validation(False, text=f"text {n}") for n in range(start, start + count)]


def spam(**fields: Any) -> TaskSpec:
    return TaskSpec(name="spam", description="spam or ham", accuracy_target=0.9, active_version=1,
                    examples=[TaskExample(input={"text": "free money"}, expected_output="spam")],
                    updated_at=utc_now(), **fields)


@pytest.fixture
async def watcher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Watcher:
    settings = Settings(bootstrap_servers="127.0.0.1:9", topic_prefix="p.", data_dir=tmp_path,
                        improvement_min_validations=5, improvement_window=10, improvement_failing_examples=3)
    topics = topics_for(settings.topic_prefix)
    ready = asyncio.Event()
    ready.set()
    tasks = {"spam": spam()}
    artifact = ProgramArtifact(task_id="spam", version=1, program_id="spam-v1", source_code=V1, created_at=utc_now())
    artifacts = SimpleNamespace(version=lambda task, version: artifact if (task, version) == ("spam", 1) else None)
    tables = SimpleNamespace(ready=ready, tasks=tasks, artifacts=artifacts)
    agent = RequestImprovements(build_app(settings), settings, topics, tables)  # type: ignore[arg-type]

    async def no_requests_yet(settings: Settings, spec: Any) -> Table[Any]:
        return Table(spec, settings)

    monkeypatch.setattr(request_improvements, "read_table", no_requests_yet)
    return Watcher(agent, topics, tasks, Sends().install(monkeypatch))


async def test_a_task_that_falls_short_is_asked_about_once_per_incident(watcher: Watcher) -> None:
    await watcher.consume(*failures(4))
    assert watcher.requests() == []  # too few validations to be sure
    await watcher.consume(*failures(1, start=4))
    [request] = watcher.requests()
    assert watcher.sends.sent[0][1] == b"spam"  # keyed by task
    assert (request.task_id, request.status, request.trigger) == ("spam", ImprovementStatus.REQUESTED,
                                                                  ImprovementTrigger.ACCURACY)
    # What the generator needs: the task's spec, the active version and its source, the figures, the failures.
    assert (request.description, request.examples, request.active_version, request.active_source) == (
        "spam or ham", watcher.tasks["spam"].examples, 1, V1)
    assert (request.accuracy, request.accuracy_target, request.validated) == (0.0, 0.9, 5)
    assert len(request.failing_examples) == 3  # improvement_failing_examples
    assert {f.input["text"] for f in request.failing_examples} <= {f"text {n}" for n in range(5)}
    assert request.improvement_id.startswith("spam-v1-")
    # The same incident: more failures and an error-rate signal ask nothing more.
    await watcher.consume(*failures(10, start=5), signal(AnomalyMetric.ERROR_RATE))
    assert len(watcher.requests()) == 1 and watcher.agent.requested == 1


async def test_a_task_whose_canary_is_being_judged_is_asked_about_once_it_is_decided(watcher: Watcher) -> None:
    watcher.tasks["spam"] = spam(canary_version=2, canary_percent=10.0)
    await watcher.consume(signal(AnomalyMetric.ERROR_RATE))
    await watcher.consume(signal(AnomalyMetric.ERROR_RATE).model_copy(update={"task_id": "unknown"}))
    assert watcher.sends.sent == []  # the canary's decision comes first; a task not in the table is not watched
    watcher.tasks["spam"] = spam()  # the canary rolled back
    await watcher.consume(signal(AnomalyMetric.ERROR_RATE))
    [request] = watcher.requests()
    assert (request.trigger, request.validated, request.accuracy) == (ImprovementTrigger.ANOMALY, 0, None)
    assert "error rate spiked" in request.reason


async def test_a_task_with_auto_improve_off_is_told_skipped_once(watcher: Watcher) -> None:
    watcher.tasks["spam"] = spam(auto_improve=False)
    await watcher.consume(*failures(5), signal(AnomalyMetric.ERROR_RATE))
    [request] = watcher.requests()
    assert request.status is ImprovementStatus.SKIPPED
    assert request.reason.endswith("; auto_improve is off for this task")


async def test_a_request_that_cannot_be_sent_is_a_dead_letter_and_asked_again(watcher: Watcher) -> None:
    watcher.sends.refusing.add("p.improvement-requests")
    await watcher.consume(*failures(5))
    [letter] = watcher.sends.to("p.dead-letters", DeadLetter)
    assert (letter.error_type, letter.reason) == ("ConnectionError", "improvement watch failed: broker gone")
    assert (letter.source_topic, letter.source_offset) == ("p.validations", 4)
    watcher.sends.refusing.clear()
    await watcher.consume(*failures(1, start=5))  # no incident was opened: the next failure asks
    assert [r.validated for r in watcher.requests()] == [6]


async def test_undecodable_events_become_dead_letters_and_the_batch_goes_on(watcher: Watcher) -> None:
    await watcher.consume(*failures(2), ("p.validations", b"\xff not a validation"),
                          ("p.anomaly-signals", b'{"task_id": "spam"}'), *failures(3, start=2))
    letters = watcher.sends.to("p.dead-letters", DeadLetter)
    assert [(d.source_topic, d.source_offset, d.error_type, d.value) for d in letters] == [
        ("p.validations", 2, "DecodeError", b"\xff not a validation"),
        ("p.anomaly-signals", 3, "DecodeError", b'{"task_id": "spam"}')]
    assert [r.validated for r in watcher.requests()] == [5]


async def test_an_incident_asked_about_before_the_start_stays_quiet(watcher: Watcher,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    async def asked_before(settings: Settings, spec: Any) -> Table[Any]:
        table: Table[Any] = Table(spec, settings)
        table.apply(b"spam", json_codec(ImprovementRequest).encode(request_for("spam", active_version=1)), 0)
        return table

    monkeypatch.setattr(request_improvements, "read_table", asked_before)
    await watcher.consume(*failures(5))
    assert watcher.requests() == []  # v1 is still active: its incident is open


async def test_requests_not_read_back_at_the_start_do_not_stop_the_watch(
        watcher: Watcher, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    async def timed_out(settings: Settings, spec: Any) -> Table[Any]:
        raise TimeoutError("not read within 30 s")

    monkeypatch.setattr(request_improvements, "read_table", timed_out)
    with caplog.at_level(logging.WARNING, logger="app.agents.request_improvements"):
        await watcher.consume(*failures(5))
    assert "improvement requests not read back: not read within 30 s" in caplog.text
    assert len(watcher.requests()) == 1
