"""The generator against the embedded broker: each candidate is checked, scored offline in the sandbox against
the active version, and published as a canary only when better; every outcome is a record saying why."""

import asyncio
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.contract.records import (
    CanaryDecision,
    FailingExample,
    ImprovementRequest,
    ImprovementStatus,
    ImprovementTrigger,
    SynthesisStrategy,
    TaskExample,
    TaskSpec,
    utc_now,
)
from app.control.plane import ControlPlane
from app.generator.providers import ChatCompletions, Command, Provider
from app.generator.service import GeneratorService
from app.settings import Settings
from devtools.fake_llm import FakeChat, Fixture
from tests.conftest import collect

V1 = "def run(input):\n    return 'spam' if 'free' in input['text'].lower() else 'ham'\n"
BETTER = ("def run(input):\n    text = input['text'].lower()\n"
          "    return 'spam' if 'free' in text or 'prize' in text else 'ham'\n")
WORSE = "def run(input):\n    return 'ham'\n"
ESCAPES = "import os\n\ndef run(input):\n    return os.getcwd()\n"
EXAMPLES = [TaskExample(input={"text": "free money"}, expected_output="spam"),
            TaskExample(input={"text": "lunch at noon"}, expected_output="ham")]
FAILING = [FailingExample(input={"text": "you won a prize"}, expected="spam", got="ham"),
           FailingExample(input={"text": "claim your PRIZE now"}, expected="spam", got="ham")]


def fenced(source: str) -> str:
    return f"Here is a better version:\n```python\n{source}```\n"


async def make_task(settings: Settings, name: str, **fields) -> None:
    async with ControlPlane(settings) as control:
        await control.put_task(TaskSpec(name=name, description="spam or ham", examples=EXAMPLES,
                                        updated_at=utc_now(), **fields))
        await control.publish(name, V1, activate=True)


def request_for(task: str, **fields) -> ImprovementRequest:
    now = utc_now()
    values = {"improvement_id": f"{task}-v1-1", "task_id": task, "status": ImprovementStatus.REQUESTED,
              "trigger": ImprovementTrigger.ACCURACY, "reason": "accuracy 0.5 below 0.9", "description": "spam or ham",
              "examples": EXAMPLES, "active_version": 1, "active_source": V1, "failing_examples": FAILING,
              "requested_at": now, "updated_at": now, **fields}
    return ImprovementRequest(**values)


@pytest.fixture
async def chat() -> AsyncIterator[FakeChat]:
    async with FakeChat([Fixture("Task: better", fenced(BETTER)), Fixture("Task: worse", fenced(WORSE)),
                         Fixture("Task: escapes", fenced(ESCAPES)), Fixture("Task: slow", "", delay_s=5),
                         Fixture("Task: chatty", "I would rather not.")]) as served:
        yield served


async def generate(settings: Settings, provider: Provider, request: ImprovementRequest) -> ImprovementRequest:
    async with GeneratorService(settings, provider) as service:
        return await service.answer(request)


async def test_a_better_candidate_is_published_as_a_canary_with_its_provenance(settings: Settings,
                                                                                chat: FakeChat) -> None:
    await make_task(settings, "better")
    outcome = await generate(settings, ChatCompletions(chat.base_url, "tiny-coder"), request_for("better"))
    assert outcome.status is ImprovementStatus.PUBLISHED, outcome.reason
    assert outcome.candidate_version == 2 and outcome.candidate_score == 1.0 and outcome.active_score == 0.5
    assert "got 4/4 right offline, v1 2/4" in outcome.reason and "canary on 10%" in outcome.reason
    async with ControlPlane(settings) as control:
        task, artifact = control.task("better"), control.artifact("better", 2)
    assert (task.active_version, task.canary_version, task.canary_percent) == (1, 2, 10.0)
    assert artifact.source_code == BETTER and artifact.synthesis_strategy is SynthesisStrategy.RULE
    assert (artifact.llm_provider, artifact.llm_model) == ("openai-compatible", "tiny-coder")
    assert (artifact.parent_version, artifact.improvement_id, artifact.confidence) == (1, "better-v1-1", 1.0)
    records = await collect(settings, "improvement_requests", lambda rs: len(rs) >= 1)
    assert records[-1] == outcome
    decisions = await collect(settings, "canary_decisions", lambda rs: len(rs) >= 1)
    assert isinstance(decisions[0], CanaryDecision) and decisions[0].candidate_version == 2
    assert decisions[0].decided_by == "generator" and decisions[0].reason.endswith("; improvement better-v1-1")


@pytest.mark.parametrize(("task", "status", "complaint"), [
    ("worse", ImprovementStatus.REFUSED, "the candidate got 1/4 right offline, v1 2/4: not better"),
    ("escapes", ImprovementStatus.REFUSED, "fails the static check: .*os"),
    ("slow", ImprovementStatus.FAILED, "no candidate after 2 attempt.*did not answer within 0.5 s"),
    ("chatty", ImprovementStatus.FAILED, "no candidate after 2 attempt.*holds no program"),
])
async def test_a_candidate_that_is_not_better_or_not_there_is_a_record_saying_why(
        settings: Settings, chat: FakeChat, task: str, status: ImprovementStatus, complaint: str) -> None:
    await make_task(settings, task)
    tight = settings.model_copy(update={"generator_attempts": 2, "generator_retry_backoff_s": 0.0})
    outcome = await generate(tight, ChatCompletions(chat.base_url, "m", timeout_s=0.5), request_for(task))
    assert outcome.status is status
    assert re.search(complaint, outcome.reason), outcome.reason
    async with ControlPlane(settings) as control:
        assert sorted(control.tables.artifacts.versions_of(task)) == [1]  # nothing published
        assert control.task(task).canary_version is None


async def test_rate_limit_running_canaries_and_auto_improve_off_are_skipped(settings: Settings,
                                                                             chat: FakeChat) -> None:
    await make_task(settings, "worse")
    await make_task(settings, "better")
    await make_task(settings, "quiet", auto_improve=False)
    async with GeneratorService(settings, ChatCompletions(chat.base_url, "m")) as service:
        refused = await service.answer(request_for("worse"))
        again = await service.answer(request_for("worse", improvement_id="worse-v1-2"))
        off = await service.answer(request_for("quiet"))
    assert refused.status is ImprovementStatus.REFUSED  # a refused candidate spends the task's allowance too
    assert again.status is ImprovementStatus.SKIPPED and "rate limit" in again.reason
    assert off.status is ImprovementStatus.SKIPPED and "auto_improve is off" in off.reason
    async with GeneratorService(settings.model_copy(update={"generator_min_interval_s": 0}),
                                ChatCompletions(chat.base_url, "m")) as service:
        published = await service.answer(request_for("better"))
        waiting = await service.answer(request_for("better", improvement_id="better-v1-2"))
    assert published.status is ImprovementStatus.PUBLISHED
    assert waiting.status is ImprovementStatus.SKIPPED and "on canary already" in waiting.reason
    assert len(chat.requests) == 2  # nothing skipped reached the endpoint


async def test_serve_answers_requests_from_the_topic_with_a_command(settings: Settings, tmp_path: Path) -> None:
    """`--command`: the request as JSON on stdin, the program on stdout; run() takes requests off the topic and
    answers each once (its own outcome records are not requests)."""
    await make_task(settings, "commanded")
    script = tmp_path / "write_program.py"
    script.write_text(f"import json, sys\nasked = json.load(sys.stdin)\nassert asked['request']['task_id']\n"
                      f"print({BETTER!r})\n")
    printer = f"{sys.executable} {script}"
    stop, ready = asyncio.Event(), asyncio.Event()
    async with GeneratorService(settings, Command(printer, timeout_s=30)) as service:
        serving = asyncio.ensure_future(service.run(stop, on_ready=ready.set))
        await asyncio.wait_for(ready.wait(), 30)
        await service.send(request_for("commanded"))
        records = await collect(settings, "improvement_requests",
                                lambda rs: any(r.status is not ImprovementStatus.REQUESTED for r in rs), 60)
        stop.set()
        await serving
    outcome = records[-1]
    assert outcome.status is ImprovementStatus.PUBLISHED and outcome.llm_provider == "command", outcome.reason
    assert len(service.answered) == 1
