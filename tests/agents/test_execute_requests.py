"""The executor end to end: requests produced to the real broker, a worker process, results read back."""

import asyncio
import time
import uuid
from collections.abc import Iterator

import orjson
import pytest

from app.contract.records import ExecutionStatus, TaskSpec, execution_id_for, utc_now
from app.contract.topics import topics_for
from app.control.plane import ControlPlane
from app.domain.sampling import is_sampled
from app.kafka.clients import apply_topics, make_producer
from app.kafka.loop_client import RequestSender, request_from
from app.settings import Settings
from devtools.broker import EmbeddedBroker
from devtools.samples import TEXT_INPUT_SCHEMA, program_source
from tests.conftest import WorkerProcess, collect, dead_letters, make_settings, results_for

HOSTILE_VERSIONS = {
    1: "def run(input):\n    while True:\n        pass\n",
    2: "def run(input):\n    return {'ratio': 1 / input['n']}\n",
    3: "def run(input):\n    return len('x' * (10 ** 10))\n",
    4: "def run(input):\n    return input['n'] * 2\n",
}


async def _provision(settings: Settings) -> None:
    await apply_topics(settings, topics_for(settings.topic_prefix))
    async with ControlPlane(settings) as control:
        await control.put_task(TaskSpec(name="spam", input_schema=TEXT_INPUT_SCHEMA, sampling_rate=0.5,
                                        updated_at=utc_now()))
        await control.publish("spam", program_source("spam_v1"), activate=True)
        await control.publish("spam", program_source("spam_v2"))
        await control.put_task(TaskSpec(name="idle", updated_at=utc_now()))
        await control.put_task(TaskSpec(name="paced", updated_at=utc_now()))
        await control.publish("paced", "def run(input):\n    return input['n']\n", activate=True)
        await control.put_task(TaskSpec(name="hostile", updated_at=utc_now()))
        for version, source in HOSTILE_VERSIONS.items():
            await control.publish("hostile", source, version=version, activate=version == 4)


@pytest.fixture(scope="module")
def served(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """One worker serving this module's tests (each test uses its own request ids)."""
    settings = make_settings(broker, sandbox_memory_mb=256)
    asyncio.run(_provision(settings))
    worker = WorkerProcess(settings, tmp_path_factory.mktemp("executor") / "worker.log", "exec-1").start()
    yield settings
    assert worker.stop() == 0, worker.log()[-2000:]


async def _send(settings: Settings, *requests) -> list[str]:
    async with RequestSender(settings) as sender:
        await sender.send(requests)
    return [r.request_id for r in requests]


async def test_request_result_round_trip(served: Settings) -> None:
    request = request_from("spam", {"text": "FREE prize inside"})
    results = await results_for(served, await _send(served, request))
    result = results[request.request_id]
    assert result.status is ExecutionStatus.OK
    assert (result.output, result.version, result.task_id) == ("spam", 1, "spam")
    assert result.program_id.startswith("spam-v1-")
    assert result.execution_id == execution_id_for("spam", request.request_id)
    assert result.sampled_for_validation == is_sampled(result.execution_id, 0.5)
    assert result.worker_id == "exec-1"
    assert 0 <= result.latency_ms < 1000 and result.memory_usage_mb > 0


async def test_every_error_path_gives_exactly_one_result(served: Settings) -> None:
    cases = {
        "unknown task": (request_from("nope", {"text": "x"}), ExecutionStatus.REJECTED, "unknown task 'nope'"),
        "no active version": (request_from("idle", {"text": "x"}), ExecutionStatus.REJECTED, "no active version"),
        "unknown pinned version": (request_from("spam", {"text": "x"}, version=9), ExecutionStatus.REJECTED,
                                   "has no version 9"),
        "input against schema": (request_from("spam", {"txt": "x"}), ExecutionStatus.REJECTED,
                                 '"text" is a required property'),
        "program exception": (request_from("hostile", {"n": 0}, version=2), ExecutionStatus.ERROR,
                              "ZeroDivisionError: division by zero"),
        "timeout": (request_from("hostile", {}, version=1, timeout_ms=200), ExecutionStatus.TIMEOUT,
                    "exceeded its timeout of 200 ms"),
        "memory bomb": (request_from("hostile", {}, version=3), ExecutionStatus.ERROR, "out of memory"),
        "after all that, still serving": (request_from("hostile", {"n": 21}), ExecutionStatus.OK, None),
    }
    ids = await _send(served, *(request for request, _, _ in cases.values()))
    results = await results_for(served, ids)
    for name, (request, status, message) in cases.items():
        result = results[request.request_id]
        assert result.status is status, (name, result)
        if message:
            assert message in result.error_message, (name, result.error_message)
    assert results[cases["after all that, still serving"][0].request_id].output == 42


async def test_invalid_request_with_readable_ids_is_rejected_not_lost(served: Settings) -> None:
    spec = topics_for(served.topic_prefix).execution_requests
    request_id = str(uuid.uuid4())
    raw = orjson.dumps({"request_id": request_id, "task_id": "spam", "input": {"text": "x"}, "timeout_ms": 0})
    producer = make_producer(served)
    await producer.start()
    await producer.send_and_wait(spec.name, raw, key=b"spam", partition=0)
    await producer.stop()
    result = (await results_for(served, [request_id]))[request_id]
    assert result.status is ExecutionStatus.REJECTED
    assert "timeout_ms: Input should be greater than or equal to 1" in result.error_message


async def test_undecodable_bytes_go_to_dead_letters_with_their_origin(served: Settings) -> None:
    spec = topics_for(served.topic_prefix).execution_requests
    garbage = [b"\x00\x01 not json", b'{"task_id": "spam"}', b"[]"]
    producer = make_producer(served)
    await producer.start()
    sent = [await producer.send_and_wait(spec.name, value, key=b"k", partition=3) for value in garbage]
    await producer.stop()
    letters = await dead_letters(served, len(garbage))
    by_value = {letter.value: letter for letter in letters}
    for value, metadata in zip(garbage, sent, strict=True):
        letter = by_value[value]
        assert (letter.source_topic, letter.source_partition, letter.source_offset) == (
            spec.name, 3, metadata.offset)
        assert letter.key == b"k" and letter.error_type == "DecodeError"
        assert letter.reason.startswith("invalid ExecutionRequest")
    follow_up = request_from("spam", {"text": "hello"})
    assert (await results_for(served, await _send(served, follow_up)))[follow_up.request_id].output == "ham"


async def test_live_switch_and_pinned_versions(served: Settings) -> None:
    async with ControlPlane(served) as control:
        await control.activate("spam", 2)
    started = time.monotonic()
    switched_after = None
    try:
        while time.monotonic() - started < 60:  # a table update reaches a busy worker in seconds, not 15
            probe = request_from("spam", {"text": "free money"})
            result = (await results_for(served, await _send(served, probe)))[probe.request_id]
            if result.version == 2:
                switched_after = time.monotonic() - started
                assert result.output == {"label": "spam", "score": 3}
                break
        assert switched_after is not None, "version 2 never took effect"
        pinned = request_from("spam", {"text": "free money"}, version=1)
        result = (await results_for(served, await _send(served, pinned)))[pinned.request_id]
        assert (result.version, result.output) == (1, "spam")
    finally:
        async with ControlPlane(served) as control:
            await control.activate("spam", 1)  # roll back, for the other tests


async def test_force_validation_marks_the_result_sampled(served: Settings) -> None:
    requests = [request_from("spam", {"text": f"m{i}"}, force_validation=True) for i in range(10)]
    results = await results_for(served, await _send(served, *requests))
    assert all(r.sampled_for_validation for r in results.values())


async def test_a_burst_of_requests_each_gets_one_result(served: Settings) -> None:
    requests = [request_from("spam" if i % 2 else "hostile", {"text": "free"} if i % 2 else {"n": i})
                for i in range(3000)]
    results = await results_for(served, await _send(served, *requests), timeout_s=60)
    assert len(results) == 3000
    assert {r.status for r in results.values()} == {ExecutionStatus.OK}
    assert all(results[r.request_id].output == r.input["n"] * 2 for r in requests if r.task_id == "hostile")


async def test_daily_stats_partials_go_out_per_commit_not_per_batch(served: Settings) -> None:
    """Requests sent one by one are as many batches; their partials go out once per commit interval."""
    interval_s = served.executor_commit_interval_ms / 1000
    started = time.monotonic()
    ids = []
    async with RequestSender(served) as sender:
        for n in range(30):
            request = request_from("paced", {"n": n})
            await sender.send([request])
            ids.append(request.request_id)
            await asyncio.sleep(0.01)
    results = await results_for(served, ids)
    elapsed = time.monotonic() - started
    assert {r.output for r in results.values()} == set(range(30))
    batches = len({r.executed_at for r in results.values()})  # a result carries when its batch finished
    partials = await collect(served, "stats_partials", lambda ps: sum(
        p.ok for p in ps if p.task_id == "paced") >= 30)
    paced = [p for p in partials if p.task_id == "paced"]  # one version: one partial per commit
    assert sum(p.ok for p in paced) == 30
    assert len(paced) <= elapsed / interval_s + 2, (len(paced), elapsed)
    # Fewer partials than batches, however long a busy machine took to send and read them back (the bound above
    # passes per-batch partials once that took more than 30 commit intervals).
    assert len(paced) < batches, (len(paced), batches)
