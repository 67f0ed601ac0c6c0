"""The loop closed, end to end on the embedded broker: a task whose v1 mishandles a class of inputs falls below its
accuracy target on label-validated traffic; the worker's watcher emits one improvement request with diverse failing
examples; the generator (asking a fake OpenAI-compatible endpoint) publishes v2 as a canary; the canary agent
promotes it; accuracy recovers; and no second request is made for the incident."""

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.contract.records import (
    CanaryAction,
    CanaryDecision,
    ImprovementRequest,
    ImprovementStatus,
    ImprovementTrigger,
    TaskExample,
    TaskSpec,
    utc_now,
)
from app.contract.topics import topics_for
from app.control.plane import ControlPlane
from app.generator.providers import ChatCompletions
from app.generator.service import GeneratorService
from app.kafka.loop_client import RequestSender, request_from
from app.kafka.tables import read_to_end
from app.settings import Settings
from devtools.broker import EmbeddedBroker
from devtools.fake_llm import FakeChat, Fixture
from tests.agents.test_validation_loop import validations_of
from tests.conftest import WorkerProcess, make_settings
from tests.generator.test_service import BETTER, V1, fenced

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
