"""The validator in this process on the embedded broker, its tables and sandbox pool stood in (no worker, no
sandbox): each oracle kind's answer, what it does when it cannot compare, dead letters of what is not a request,
its partials, and the commit once all is answered; at the end, a batch answered without a broker. Through a worker,
with real oracles and the sandbox: tests/agents/test_validation_loop.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition

from app.agents.validate_executions import ValidateExecutions
from app.contract.codecs import codec_for
from app.contract.records import (
    DeadLetter,
    OracleKind,
    OracleSpec,
    ProgramArtifact,
    StatsPartial,
    TaskSpec,
    Validation,
    ValidationRequest,
    ValidationStatus,
    utc_now,
)
from app.contract.topics import topics_for
from app.kafka.clients import make_producer
from app.kafka.outcomes import ResultWriter
from app.sandbox.calls import Call, Outcome
from app.settings import Settings
from tests.conftest import collect
from tests.faults import committed, end_offsets

SHADOW = OracleSpec(kind=OracleKind.SHADOW, shadow_version=1)


class Tables:
    """The worker's tables as the validator reads them: one task with a shadow oracle, its versions 1 and 2."""

    def __init__(self) -> None:
        self.ready = asyncio.Event()
        self.ready.set()
        now = utc_now()
        self.tasks = {"shadowed": TaskSpec(name="shadowed", active_version=2, oracle=SHADOW, max_timeout_ms=300,
                                           updated_at=now)}
        self.artifacts = self
        self._versions = {("shadowed", v): ProgramArtifact(task_id="shadowed", version=v, program_id=f"shadowed-v{v}",
                                                           source_code=f"# v{v}", created_at=now) for v in (1, 2)}

    def version(self, task_id: str, version: int) -> ProgramArtifact | None:
        return self._versions.get((task_id, version))


class Pool:
    """Runs a shadow call as version 1 would: the input's text, lower-cased; `{"fail": ...}` fails the call."""

    def __init__(self, broken: bool = False) -> None:
        self.calls: list[Call] = []
        self._broken = broken

    async def run(self, calls: Sequence[Call]) -> list[Outcome]:
        if self._broken:
            raise RuntimeError("the pool is gone")
        self.calls += calls
        return [Outcome("error", None, c.input["fail"], 1.0, None) if "fail" in c.input
                else Outcome("ok", orjson.dumps(c.input["text"].lower()), None, 1.0, 10.0) for c in calls]


def validation_request(request_id: str, task: str, oracle: OracleSpec, output: Any, version: int = 2,
            **fields: Any) -> ValidationRequest:
    return ValidationRequest(execution_id=f"e-{request_id}", request_id=request_id, task_id=task, version=version,
                             input=fields.pop("input", {"text": "FREE money"}), output=output, status="ok",
                             oracle=oracle, requested_at=utc_now(), **fields)


async def produce(settings: Settings, records: list[ValidationRequest | bytes | None]) -> None:
    """Validation requests as the executor sends them (keyed by task); bytes and None (a tombstone) as they are."""
    spec = topics_for(settings.topic_prefix).validation_requests
    codec = codec_for(ValidationRequest, settings, spec)
    producer = make_producer(settings)
    await producer.start()
    try:
        for record in records:
            if isinstance(record, ValidationRequest):
                await producer.send_and_wait(spec.name, codec.encode(record), key=record.task_id.encode())
            else:
                await producer.send_and_wait(spec.name, record, key=b"junk", partition=0)
    finally:
        await producer.stop()


@pytest.fixture
def pool(request: pytest.FixtureRequest) -> Pool:
    return Pool(broken=getattr(request, "param", False))


@pytest.fixture
async def started(settings: Settings, pool: Pool) -> AsyncIterator[ValidateExecutions]:
    service = ValidateExecutions(settings, topics_for(settings.topic_prefix), Tables(), pool)  # type: ignore[arg-type]
    await service.start()
    try:
        yield service
    finally:
        await service.stop()
    assert service.pipeline.failure is None


async def records_of(settings: Settings, topic: str, model: type, count: int) -> list[Any]:
    found = await collect(settings, topic, lambda rs: sum(isinstance(r, model) for r in rs) >= count)
    return [r for r in found if isinstance(r, model)]


async def test_every_request_ends_as_a_validation_an_oracle_request_or_a_dead_letter(
        settings: Settings, pool: Pool, started: ValidateExecutions) -> None:
    external = OracleSpec(kind=OracleKind.EXTERNAL)
    await produce(settings, [
        validation_request("matched", "labelled", OracleSpec(kind=OracleKind.LABEL), "spam", expected_output="spam"),
        validation_request("mismatched", "labelled", OracleSpec(kind=OracleKind.LABEL), "ham", expected_output="spam"),
        validation_request("asked", "asked", external, "spam"),
        validation_request("shadowed", "shadowed", SHADOW, "free money"),
        validation_request("own-version", "shadowed", SHADOW, "x", version=1),  # the shadow would judge itself
        validation_request("no-artifact", "shadowed", OracleSpec(kind=OracleKind.SHADOW, shadow_version=7), "x"),
        validation_request("shadow-fails", "shadowed", SHADOW, "x", input={"fail": "boom"}),
        b"\xff not a validation request",
        None,
    ])
    found = {v.request_id: v for v in await records_of(settings, "validations", Validation, 6)}
    assert (found["matched"].status, found["matched"].match) == (ValidationStatus.VALIDATED, True)
    assert (found["mismatched"].match, found["mismatched"].oracle_output) == (False, "spam")
    assert (found["shadowed"].match, found["shadowed"].oracle_output) == (True, "free money")
    assert all(found[i].status is ValidationStatus.FAILED and found[i].match is None
               for i in ("own-version", "no-artifact", "shadow-fails"))
    assert found["own-version"].details == "no shadow version to compare with (wanted None)"
    assert found["no-artifact"].details == "no shadow version to compare with (wanted 7)"
    assert found["shadow-fails"].details == "shadow version 1 ended as error: boom"
    # The shadow ran version 1's program, with the task's timeout for a request that pins none.
    assert {(c.task_id, c.key, c.source, c.timeout_s) for c in pool.calls} == {("shadowed", "shadowed-v1", "# v1", 0.3)}

    [forwarded] = await records_of(settings, "oracle_requests", ValidationRequest, 1)
    assert forwarded.request_id == "asked" and forwarded.oracle == external
    letters = await records_of(settings, "dead_letters", DeadLetter, 2)
    assert sorted((d.error_type, d.value) for d in letters) == [("DecodeError", b"\xff not a validation request"),
                                                                 ("EmptyMessage", None)]
    # The analytics and canary agents count validations from the partials: the three compared ones.
    partials = await collect(settings, "stats_partials",
                             lambda rs: sum(p.validated for p in rs if isinstance(p, StatsPartial)) >= 3)
    counted: dict[tuple[str, int | None], list[int]] = {}
    for partial in (p for p in partials if isinstance(p, StatsPartial)):  # a batch's, or more batches' partials
        counts = counted.setdefault((partial.task_id, partial.version), [0, 0])
        counts[0] += partial.validated
        counts[1] += partial.matched
    assert {key: counts for key, counts in counted.items() if counts[0]} == {("labelled", 2): [2, 1],
                                                                            ("shadowed", 2): [1, 1]}
    await committed_to_the_end(settings)
    assert (started.validated, started.forwarded, started.dead_lettered) == (6, 1, 2)


@pytest.mark.parametrize("pool", [True], indirect=True, ids=["the pool fails"])
async def test_shadow_runs_the_pool_cannot_do_are_dead_letters(settings: Settings,
                                                               started: ValidateExecutions) -> None:
    await produce(settings, [validation_request("shadowed", "shadowed", SHADOW, "free money"),
                             validation_request("labelled", "labelled", OracleSpec(kind=OracleKind.LABEL), "spam",
                                                expected_output="spam")])
    [letter] = await records_of(settings, "dead_letters", DeadLetter, 1)
    assert (letter.error_type, letter.reason) == ("RuntimeError", "validation failed: RuntimeError: the pool is gone")
    assert codec_for(ValidationRequest, settings, topics_for(settings.topic_prefix).validation_requests).decode(
        letter.value).request_id == "shadowed"
    [validation] = await records_of(settings, "validations", Validation, 1)
    assert validation.request_id == "labelled" and validation.match is True
    await committed_to_the_end(settings)


async def committed_to_the_end(settings: Settings, timeout_s: float = 30) -> None:
    spec = topics_for(settings.topic_prefix).validation_requests
    wanted = await end_offsets(settings, spec)
    deadline = time.monotonic() + timeout_s
    while (done := await committed(settings, f"{settings.app_id}-validators", spec.name)) != wanted:
        assert time.monotonic() < deadline, f"committed {done}, the log ends at {wanted}"
        await asyncio.sleep(0.1)


# Its logic without a broker: a batch handed to it as the fetch loop would, its answers kept by a stand-in producer.


class _Kept:
    """A record batch that keeps what is appended."""

    def __init__(self) -> None:
        self.records: list[tuple[bytes | None, bytes]] = []

    def append(self, key: bytes | None, value: bytes, timestamp: None) -> object:
        self.records.append((key, value))
        return self

    def close(self) -> None:
        pass


class KeptProducer:
    """Stands in for a started producer: every topic has 3 partitions, and every batch is acknowledged and kept as
    (topic, partition, key, value)."""

    def __init__(self) -> None:
        self.client = SimpleNamespace(cluster=SimpleNamespace(partitions_for_topic=lambda topic: {0, 1, 2}))
        self.sent: list[tuple[str, int, bytes | None, bytes]] = []

    def create_batch(self) -> _Kept:
        return _Kept()

    async def send_batch(self, batch: _Kept, topic: str, *, partition: int) -> asyncio.Future[None]:
        self.sent += [(topic, partition, key, value) for key, value in batch.records]
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ack.set_result(None)
        return ack


async def test_a_batch_is_answered_by_kind_without_a_broker() -> None:
    settings, topics, pool = Settings.load(None), topics_for("t-"), Pool()
    service = ValidateExecutions(settings, topics, Tables(), pool)  # type: ignore[arg-type]
    producer = KeptProducer()
    writer = ResultWriter(settings, topics, producer)  # type: ignore[arg-type]
    await writer.start()
    service.answer_with(writer, {topics.validations.name: 3, topics.oracle_requests.name: 3})
    encode = codec_for(ValidationRequest, settings, topics.validation_requests).encode
    values = [encode(validation_request("matched", "labelled", OracleSpec(kind=OracleKind.LABEL), "spam",
                                        expected_output="spam")),
              encode(validation_request("asked", "asked", OracleSpec(kind=OracleKind.EXTERNAL), "spam")),
              encode(validation_request("shadowed", "shadowed", SHADOW, "free money")),
              encode(validation_request("shadow-fails", "shadowed", SHADOW, "x", input={"fail": "boom"})),
              b"\xff not a validation request", None]
    tp = TopicPartition(topics.validation_requests.name, 4)
    messages = [SimpleNamespace(topic=tp.topic, partition=tp.partition, offset=10 + i, key=b"k", value=value)
                for i, value in enumerate(values)]
    service._take({tp: messages})  # type: ignore[dict-item]
    deadline = time.monotonic() + 10
    while service.validated + service.forwarded + service.dead_lettered < len(values):
        assert time.monotonic() < deadline, producer.sent
        await asyncio.sleep(0.01)

    def sent_on(topic: str, model: type) -> list[Any]:
        decode = codec_for(model, settings, topics.by_name(topic)).decode
        return [decode(value) for name, _, _, value in producer.sent if name == topic]

    validations = {v.request_id: v for v in sent_on(topics.validations.name, Validation)}
    assert (validations["matched"].match, validations["shadowed"].match) == (True, True)
    assert validations["shadow-fails"].details == "shadow version 1 ended as error: boom"
    [forwarded] = sent_on(topics.oracle_requests.name, ValidationRequest)
    assert forwarded.request_id == "asked"
    letters = sent_on(topics.dead_letters.name, DeadLetter)
    assert sorted((d.error_type, d.source_offset) for d in letters) == [("DecodeError", 14), ("EmptyMessage", 15)]
    assert [c.key for c in pool.calls] == ["shadowed-v1", "shadowed-v1"]
    assert (service.validated, service.forwarded, service.dead_lettered) == (3, 1, 2)
    assert all(partition in range(3) for _, partition, _, _ in producer.sent)
