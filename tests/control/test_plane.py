"""The control plane on the real broker: tasks created and updated, canaries started, promoted and aborted by
hand, each with its decision record, a task's decisions read back in order, and suspended tasks resumed."""

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from app.contract.codecs import codec_for
from app.contract.records import (
    CanaryAction,
    CanaryDecision,
    Comparison,
    OracleKind,
    OracleSpec,
    SamplingStrategy,
    TaskSpec,
    TaskSuspension,
    utc_now,
)
from app.contract.topics import topics_for
from app.control.plane import ControlError, ControlPlane
from app.domain.task_budget import TimeoutBudget
from app.kafka.clients import make_producer, partition_for
from app.kafka.tables import TableReader
from app.settings import Settings
from tests.conftest import KafkaLikeMetadata

PROGRAM = "def run(input):\n    return {version}\n"


async def _task_with_versions(settings: Settings, name: str = "spam", versions: int = 3,
                              active: int | None = 1) -> None:
    async with ControlPlane(settings) as control:
        await control.create_task(TaskSpec(name=name, updated_at=utc_now()))
        for version in range(1, versions + 1):
            await control.publish(name, PROGRAM.format(version=version), activate=version == active)


async def _task(settings: Settings, name: str = "spam") -> TaskSpec:
    """The task as a fresh reader of the topic sees it."""
    async with ControlPlane(settings) as control:
        return control.task(name)


async def _decisions(settings: Settings, name: str = "spam") -> list[CanaryDecision]:
    async with ControlPlane(settings) as control:
        return await control.decisions(name)


async def test_start_promote_and_abort_by_hand(settings: Settings, kafka_like_metadata: KafkaLikeMetadata) -> None:
    await _task_with_versions(settings)
    async with ControlPlane(settings) as control:
        started = await control.start_canary("spam", 2, 10)
    assert (started.action, started.candidate_version, started.active_version) == (CanaryAction.STARTED, 2, 1)
    assert started.reason == "10% of requests run v2, the rest v1" and started.decided_by == "manual"
    task = await _task(settings)
    assert (task.active_version, task.canary_version, task.canary_percent) == (1, 2, 10)

    async with ControlPlane(settings) as control:
        ramped = await control.start_canary("spam", 2, 50)
        promoted = await control.promote_canary("spam")
    assert ramped.reason.endswith("(was 10%)")
    assert (promoted.action, promoted.candidate_version, promoted.active_version) == (CanaryAction.PROMOTED, 2, 1)
    task = await _task(settings)
    assert (task.active_version, task.canary_version, task.canary_percent) == (2, None, 0)

    async with ControlPlane(settings) as control:
        await control.start_canary("spam", 3, 5)
        aborted = await control.abort_canary("spam")
    assert (aborted.action, aborted.candidate_version, aborted.active_version) == (CanaryAction.ABORTED, 3, 2)
    task = await _task(settings)
    assert (task.active_version, task.canary_version, task.canary_percent) == (2, None, 0)

    decisions = await _decisions(settings)
    assert [(d.action, d.candidate_version, d.active_version) for d in decisions] == [
        (CanaryAction.STARTED, 2, 1), (CanaryAction.STARTED, 2, 1), (CanaryAction.PROMOTED, 2, 1),
        (CanaryAction.STARTED, 3, 2), (CanaryAction.ABORTED, 3, 2),
    ]
    assert {d.decided_by for d in decisions} == {"manual"}


async def test_decisions_are_the_tasks_own_from_every_partition_in_time_order(settings: Settings) -> None:
    await _task_with_versions(settings)
    async with ControlPlane(settings) as control:
        await control.start_canary("spam", 2, 10)
    started = (await _decisions(settings))[0].decided_at
    spec = topics_for(settings.topic_prefix).canary_decisions
    codec = codec_for(CanaryDecision, settings, spec)

    def decision(task: str, action: CanaryAction, seconds: int) -> bytes:
        return codec.encode(CanaryDecision(task_id=task, candidate_version=2, active_version=1, action=action,
                                           reason="test", candidate_accuracy=0.95, active_accuracy=0.9,
                                           validations=50, decided_at=started + timedelta(seconds=seconds)))

    # An agent's producer may pick another partition than the control plane; the earlier record goes last.
    home = partition_for(b"spam", spec.partitions)
    elsewhere = (home + 1) % spec.partitions
    producer = make_producer(settings)
    await producer.start()
    try:
        await producer.send_and_wait(spec.name, decision("spam", CanaryAction.ROLLED_BACK, 20), key=b"spam",
                                     partition=home)
        await producer.send_and_wait(spec.name, decision("spam", CanaryAction.PROMOTED, 10), key=b"spam",
                                     partition=elsewhere)
        await producer.send_and_wait(spec.name, decision("other", CanaryAction.STARTED, 5), key=b"other",
                                     partition=home)
        await producer.send_and_wait(spec.name, b"not a decision", key=b"spam", partition=home)
    finally:
        await producer.stop()

    decisions = await _decisions(settings)
    assert [(d.action, d.decided_by) for d in decisions] == [
        (CanaryAction.STARTED, "manual"), (CanaryAction.PROMOTED, "auto"), (CanaryAction.ROLLED_BACK, "auto"),
    ]
    assert decisions[1].candidate_accuracy == 0.95 and decisions[1].validations == 50


async def test_a_task_without_decisions_has_none(settings: Settings) -> None:
    await _task_with_versions(settings)
    assert await _decisions(settings) == []


ERRORS: list[tuple[str, Callable[[ControlPlane], Awaitable[Any]], str]] = [
    ("start on an unknown task", lambda c: c.start_canary("ghost", 2, 10), "unknown task 'ghost'"),
    ("promote on an unknown task", lambda c: c.promote_canary("ghost"), "unknown task 'ghost'"),
    ("abort on an unknown task", lambda c: c.abort_canary("ghost"), "unknown task 'ghost'"),
    ("decisions of an unknown task", lambda c: c.decisions("ghost"), "unknown task 'ghost'"),
    ("promote without a canary", lambda c: c.promote_canary("spam"),
     "task 'spam' has no canary running; start one with `loopai artifact canary spam N --percent P`"),
    ("abort without a canary", lambda c: c.abort_canary("spam"), "task 'spam' has no canary running"),
    ("an unpublished version", lambda c: c.start_canary("spam", 7, 10),
     r"task 'spam' has no version 7; published: \[1, 2, 3\]"),
    ("the active version", lambda c: c.start_canary("spam", 1, 10), "task 'spam' v1 is the active version already"),
    ("no percent", lambda c: c.start_canary("spam", 2, 0), "more than 0 and at most 100, not 0"),
    ("a negative percent", lambda c: c.start_canary("spam", 2, -5), "more than 0 and at most 100, not -5"),
    ("over 100 percent", lambda c: c.start_canary("spam", 2, 100.5), "more than 0 and at most 100, not 100.5"),
]


@pytest.mark.parametrize(("call", "message"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
async def test_a_canary_that_cannot_be_is_a_clear_error_and_writes_nothing(
    settings: Settings, call: Callable[[ControlPlane], Awaitable[Any]], message: str
) -> None:
    await _task_with_versions(settings)
    before = await _task(settings)
    async with ControlPlane(settings) as control:
        with pytest.raises(ControlError, match=message):
            await call(control)
    assert await _task(settings) == before
    assert await _decisions(settings) == []


async def test_a_second_canary_waits_for_the_first_to_end(settings: Settings) -> None:
    await _task_with_versions(settings)
    async with ControlPlane(settings) as control:
        await control.start_canary("spam", 2, 10)
        with pytest.raises(ControlError, match=r"has a canary running already \(v2 at 10%\); promote or abort"):
            await control.start_canary("spam", 3, 10)
    assert (await _task(settings)).canary_version == 2
    assert len(await _decisions(settings)) == 1


async def test_a_canary_needs_an_active_version_to_compare_with(settings: Settings) -> None:
    await _task_with_versions(settings, active=None)
    async with ControlPlane(settings) as control:
        with pytest.raises(ControlError, match="no active version to compare a canary with"):
            await control.start_canary("spam", 2, 10)


async def test_create_refuses_an_existing_task(settings: Settings) -> None:
    await _task_with_versions(settings)
    async with ControlPlane(settings) as control:
        with pytest.raises(ControlError, match=r"task 'spam' already exists; change it with `loopai task update spam`"):
            await control.create_task(TaskSpec(name="spam", updated_at=utc_now()))
    assert (await _task(settings)).active_version == 1


async def test_a_new_task_may_name_a_shadow_version_to_come_but_only_for_a_shadow_oracle(settings: Settings) -> None:
    async with ControlPlane(settings) as control:
        with pytest.raises(ControlError, match="a shadow version is for a shadow oracle, not a label one"):
            await control.create_task(TaskSpec(name="spam", updated_at=utc_now(),
                                               oracle=OracleSpec(kind=OracleKind.LABEL, shadow_version=1)))
        await control.create_task(TaskSpec(name="spam", updated_at=utc_now(),
                                           oracle=OracleSpec(kind=OracleKind.SHADOW, shadow_version=1)))
    assert (await _task(settings)).oracle == OracleSpec(kind=OracleKind.SHADOW, shadow_version=1)


async def test_update_changes_only_what_it_is_given(settings: Settings) -> None:
    await _task_with_versions(settings)
    async with ControlPlane(settings) as control:
        await control.update_task("spam", input_schema={"type": "object"}, description="spam or ham")
        await control.start_canary("spam", 2, 10)
        await control.update_task("spam", sampling_strategy="stratified",
                                  oracle={"kind": "shadow", "shadow_version": 3})
        await control.update_task("spam", oracle={"comparison": "numeric", "tolerance": 0.5})
    task = await _task(settings)
    assert task.input_schema == {"type": "object"} and task.description == "spam or ham"
    assert (task.active_version, task.canary_version, task.canary_percent) == (1, 2, 10)
    assert task.sampling_strategy is SamplingStrategy.STRATIFIED
    assert task.oracle == OracleSpec(kind=OracleKind.SHADOW, shadow_version=3, comparison=Comparison.NUMERIC,
                                     tolerance=0.5)

    async with ControlPlane(settings) as control:
        await control.update_task("spam", oracle={"kind": "external"})  # another kind: no shadow version
    assert (await _task(settings)).oracle == OracleSpec(kind=OracleKind.EXTERNAL, comparison=Comparison.NUMERIC,
                                                        tolerance=0.5)
    async with ControlPlane(settings) as control:
        await control.update_task("spam", oracle=None)
    assert (await _task(settings)).oracle is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"oracle": {"comparison": "numeric"}}, "task 'spam' has no oracle; give its kind"),
        ({"oracle": {"kind": "shadow", "shadow_version": 9}}, "task 'spam' has no version 9"),
        ({"oracle": {"kind": "label", "shadow_version": 2}}, "a shadow version is for a shadow oracle"),
        ({"output_schema": {"type": "nonsense"}}, "output_schema is not a valid JSON Schema"),
        ({"input_schema": {"$ref": "http://127.0.0.1:9/s.json"}}, "or refers outside itself"),
        ({"active_version": 2}, "update_task does not change active_version"),
    ],
)
async def test_an_update_that_cannot_be_is_refused_and_writes_nothing(
    settings: Settings, changes: dict[str, Any], message: str
) -> None:
    await _task_with_versions(settings)
    before = await _task(settings)
    async with ControlPlane(settings) as control:
        with pytest.raises(ControlError, match=message):
            await control.update_task("spam", **changes)
        with pytest.raises(ControlError, match="unknown task 'ghost'"):
            await control.update_task("ghost", description="x")
    assert await _task(settings) == before


async def test_max_timeout_ms_is_set_on_create_changed_by_update_and_bounded(settings: Settings) -> None:
    async with ControlPlane(settings) as control:
        await control.create_task(TaskSpec(name="spam", updated_at=utc_now()))
    assert (await _task(settings)).max_timeout_ms == 1000
    async with ControlPlane(settings) as control:
        await control.update_task("spam", max_timeout_ms=20_000)
    assert (await _task(settings)).max_timeout_ms == 20_000
    async with ControlPlane(settings) as control:
        for wrong in (0, 60_001):
            with pytest.raises(ValidationError, match="max_timeout_ms"):
                await control.update_task("spam", max_timeout_ms=wrong)
    assert (await _task(settings)).max_timeout_ms == 20_000


async def _suspend(settings: Settings, task: str, until_s: float = 300) -> TaskSuspension:
    """What a worker's executor writes when the task's calls keep timing out."""
    now = utc_now()
    record = TaskSuspension(task_id=task, suspended=True, until=now + timedelta(seconds=until_s),
                            reason="10 calls timed out within 60 s", timeouts=10, window_s=60.0, worker_id="w1",
                            updated_at=now)
    spec = topics_for(settings.topic_prefix).task_suspensions
    producer = make_producer(settings)
    await producer.start()
    try:
        await producer.send_and_wait(spec.name, codec_for(TaskSuspension, settings, spec).encode(record),
                                     key=task.encode(), partition=partition_for(task.encode(), spec.partitions))
    finally:
        await producer.stop()
    return record


async def _until(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s")
        await asyncio.sleep(0.05)


async def test_resume_lifts_a_suspension_on_every_reader_of_the_table(settings: Settings) -> None:
    """A worker's budget, fed by its table reader, adopts the suspension, then lifts it on the operator's resume."""
    await _task_with_versions(settings, versions=1)
    topics = topics_for(settings.topic_prefix)
    budget = TimeoutBudget()
    reader = TableReader(settings, topics.task_specs, topics.program_artifacts, on_suspension=budget.apply)
    await reader.start()
    reader.follow()
    try:
        suspension = await _suspend(settings, "spam")
        await _until(lambda: budget.refusal("spam") is not None)
        assert str(budget.refusal("spam")).startswith("task 'spam' is suspended until ")
        async with ControlPlane(settings) as control:
            assert control.suspension("spam") == suspension
            lifted = await control.resume("spam")
            assert lifted == suspension and control.suspension("spam") is None
        await _until(lambda: budget.refusal("spam") is None)
        resumed = reader.suspensions.get("spam")
        assert resumed is not None and not resumed.suspended and resumed.reason == "resumed by an operator"
        assert resumed.updated_at >= suspension.updated_at and resumed.until is None
    finally:
        await reader.stop()
    async with ControlPlane(settings) as control:  # a fresh reader: the resume is the latest record
        assert control.suspension("spam") is None
        assert control.tables.suspensions.get("spam") == resumed


async def test_resume_of_a_task_that_is_not_suspended_says_so_and_of_an_unknown_task_is_refused(
    settings: Settings,
) -> None:
    await _task_with_versions(settings, versions=1)
    await _suspend(settings, "spam", until_s=-1)  # a suspension that has ended
    async with ControlPlane(settings) as control:
        assert control.suspension("spam") is None
        assert await control.resume("spam") is None
        with pytest.raises(ControlError, match="unknown task 'ghost'"):
            await control.resume("ghost")
    async with ControlPlane(settings) as control:
        assert control.tables.suspensions.get("ghost") is None
        record = control.tables.suspensions.get("spam")
        assert record is not None and not record.suspended
