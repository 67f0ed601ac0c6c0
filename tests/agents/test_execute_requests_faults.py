"""The executor under failure, in-process on the real broker, with what the embedded broker cannot show
simulated around its clients (tests/faults.py). Whatever fails, every request ends as one result or one dead
letter, and offsets never move past a request that has neither."""

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import orjson
import pytest
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    InvalidSessionTimeoutError,
    KafkaError,
    NotCoordinatorForGroupError,
    TopicAuthorizationFailedError,
)

from app.agents import execute_requests
from app.agents.execute_requests import ExecuteRequests
from app.contract.records import ExecutionRequest, ExecutionStatus, TaskSpec, execution_id_for, utc_now
from app.contract.topics import topics_for
from app.control.plane import ControlPlane
from app.kafka.clients import make_consumer, make_producer
from app.kafka.loop_client import RequestSender, request_from
from app.kafka.tables import TableReader
from app.sandbox.boundary import Boundary, Limits
from app.sandbox.pool import SandboxPool
from app.settings import Settings
from tests.conftest import collect, dead_letters, results_for
from tests.faults import FailingCommits, RefusingProducer, committed

ECHO = "def run(input):\n    if input.get('poison'):\n        raise ValueError('poison')\n    return 'x' * input['n']\n"


@dataclass
class Running:
    executor: ExecuteRequests
    producer: RefusingProducer
    consumer: FailingCommits
    pool: SandboxPool


@pytest.fixture
async def start_executor(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Callable[[Settings], Awaitable[Running]]]:
    """Start executors in this process, their clients wrapped so that a test can make them fail."""
    stops: list[Callable[[], Awaitable[None]]] = []

    async def start(settings: Settings) -> Running:
        made: dict[str, object] = {}
        monkeypatch.setattr(execute_requests, "make_producer",
                            lambda *a, **kw: made.setdefault("p", RefusingProducer(make_producer(*a, **kw))))
        monkeypatch.setattr(execute_requests, "make_consumer",
                            lambda *a, **kw: made.setdefault("c", FailingCommits(make_consumer(*a, **kw))))
        topics = topics_for(settings.topic_prefix)
        tables = TableReader(settings, topics.task_specs, topics.program_artifacts)
        await tables.start()
        tables.follow()
        pool = SandboxPool(Boundary(Limits(memory_mb=256)), 2, chunk_size=500)
        await pool.start()
        executor = ExecuteRequests(settings, topics, tables, pool)

        async def stop() -> None:
            await executor.stop()
            await pool.stop()
            await tables.stop()

        stops.append(stop)
        await executor.start()
        return Running(executor, made["p"], made["c"], pool)  # type: ignore[arg-type]

    yield start
    for stop in reversed(stops):
        await stop()


@pytest.fixture
async def echo(settings: Settings) -> Settings:
    async with ControlPlane(settings) as control:
        await control.put_task(TaskSpec(name="echo", updated_at=utc_now()))
        await control.publish("echo", ECHO, activate=True)
    return settings


async def _send(settings: Settings, requests: list[ExecutionRequest]) -> list[str]:
    async with RequestSender(settings) as sender:
        await sender.send(requests)
    return [r.request_id for r in requests]


async def _committed_total(settings: Settings) -> int:
    topic = topics_for(settings.topic_prefix).execution_requests.name
    return sum((await committed(settings, f"{settings.app_id}-executors", topic)).values())


async def _until(condition: Callable[[], Awaitable[bool]], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def test_a_result_too_large_for_its_topic_becomes_a_dead_letter(echo: Settings, start_executor) -> None:
    running = await start_executor(echo)
    running.producer.max_batch_bytes[topics_for(echo.topic_prefix).execution_results.name] = 4000
    requests = [request_from("echo", {"n": 5000 if i in (3, 20, 41) else 10}) for i in range(50)]
    await _send(echo, requests)
    big = {requests[i].request_id for i in (3, 20, 41)}
    results = await results_for(echo, [r.request_id for r in requests if r.request_id not in big])
    assert {r.output for r in results.values()} == {"x" * 10}
    letters = await dead_letters(echo, 3)
    assert {orjson.loads(letter.value)["request_id"] for letter in letters} == big  # the original request
    for letter in letters:
        assert letter.reason.startswith(f"result could not be sent to {echo.topic_prefix}execution-results: "
                                        "MessageSizeTooLargeError")
        assert letter.error_type == "MessageSizeTooLargeError"
    await _until(lambda: _committed(echo, 50))
    assert not running.executor.pipeline.failed.is_set()


async def test_a_dead_letter_too_large_goes_again_without_the_request_bytes(
    echo: Settings, start_executor
) -> None:
    running = await start_executor(echo)
    running.producer.max_batch_bytes[topics_for(echo.topic_prefix).dead_letters.name] = 3000
    producer = make_producer(echo)
    await producer.start()
    await producer.send_and_wait(topics_for(echo.topic_prefix).execution_requests.name, b"\xff" * 4000,
                                 key=b"k", partition=2)
    await producer.stop()
    (letter,) = await dead_letters(echo, 1)
    assert (letter.key, letter.value, letter.source_partition, letter.source_offset) == (None, None, 2, 0)
    assert "original key and value left out, the letter was refused: MessageSizeTooLargeError" in letter.reason
    await _until(lambda: _committed(echo, 1))


async def test_when_not_even_a_dead_letter_can_be_sent_nothing_is_committed(
    echo: Settings, start_executor
) -> None:
    running = await start_executor(echo)
    topics = topics_for(echo.topic_prefix)
    for topic in (topics.execution_results.name, topics.dead_letters.name):
        running.producer.refuse[topic] = lambda t=topic: TopicAuthorizationFailedError(t)
    await _send(echo, [request_from("echo", {"n": 1}) for _ in range(20)])
    await asyncio.wait_for(running.executor.pipeline.failed.wait(), 30)
    assert running.executor.pipeline.failure.startswith("the dead letter for ")
    assert "could not be sent to" in running.executor.pipeline.failure
    assert "TopicAuthorizationFailedError" in running.executor.pipeline.failure
    await _send(echo, [request_from("echo", {"n": 1}) for _ in range(20)])  # later batches: not committed either
    await asyncio.sleep(1)
    assert await _committed_total(echo) == 0


async def test_a_failed_commit_loses_nothing(echo: Settings, start_executor) -> None:
    """Commits fail (as after a rebalance): results are out, so the redelivery only duplicates them, with
    the same execution ids."""
    first = await start_executor(echo)
    first.consumer.fail_next = 10**9
    requests = [request_from("echo", {"n": i % 7}) for i in range(300)]
    ids = await _send(echo, requests)
    await results_for(echo, ids)
    await first.executor.stop()
    assert first.consumer.commits > 0 and await _committed_total(echo) == 0

    await start_executor(echo)  # joins the same group: every request comes again
    seen = await collect(echo, "execution_results", lambda rs: len(rs) >= 2 * len(ids), timeout_s=60)
    variants: dict[str, set[tuple[str, str]]] = {}
    for result in seen:
        variants.setdefault(result.request_id, set()).add((result.execution_id, result.output))
    assert all(variants[r.request_id] == {(execution_id_for("echo", r.request_id), "x" * r.input["n"])}
               for r in requests)
    await _until(lambda: _committed(echo, 300))


async def test_a_commit_refused_for_good_stops_the_executor(echo: Settings, start_executor) -> None:
    running = await start_executor(echo)
    running.consumer.fail_next = 10**9
    running.consumer.error = lambda: GroupAuthorizationFailedError(echo.app_id)
    await _send(echo, [request_from("echo", {"n": 1})])
    await asyncio.wait_for(running.executor.pipeline.failed.wait(), 30)
    assert running.executor.pipeline.failure.startswith("committing offsets failed: GroupAuthorizationFailedError")


async def test_a_coordinator_move_during_a_commit_is_retried(echo: Settings, start_executor) -> None:
    """The coordinator answers NOT_COORDINATOR once, as when it moved to another broker: the commit is
    retried against the rediscovered coordinator, and nothing is redone."""
    running = await start_executor(echo)
    coordinator = running.consumer._consumer._coordinator
    real_commit = coordinator._do_commit_offsets
    moves = []

    async def moved_once(assignment, offsets):
        if not moves:
            moves.append(offsets)
            coordinator.coordinator_dead()
            raise NotCoordinatorForGroupError()
        return await real_commit(assignment, offsets)

    coordinator._do_commit_offsets = moved_once
    ids = await _send(echo, [request_from("echo", {"n": 2}) for _ in range(100)])
    await results_for(echo, ids)
    await _until(lambda: _committed(echo, 100))
    assert moves and not running.executor.pipeline.failed.is_set()
    results = await collect(echo, "execution_results", lambda rs: len(rs) >= 100)
    assert len(results) == 100


async def test_a_sandbox_pool_failing_a_whole_batch_runs_each_call_alone(echo: Settings, start_executor) -> None:
    running = await start_executor(echo)
    real_stream = running.pool.stream

    async def stream(calls, emit):
        if len(calls) > 1 or calls[0].input.get("poison"):
            raise RuntimeError("the pool broke")
        return await real_stream(calls, emit)

    running.pool.stream = stream
    requests = [request_from("echo", {"n": 3, "poison": i == 5}) for i in range(30)]
    await _send(echo, requests)
    fine = [r.request_id for i, r in enumerate(requests) if i != 5]
    assert {r.output for r in (await results_for(echo, fine)).values()} == {"xxx"}
    (letter,) = await dead_letters(echo, 1)
    assert orjson.loads(letter.value)["request_id"] == requests[5].request_id
    assert letter.reason == "the sandbox could not run it: the pool broke"
    await _until(lambda: _committed(echo, 30))


async def test_topic_metadata_that_arrives_late_is_waited_for(
    echo: Settings, start_executor, kafka_like_metadata
) -> None:
    """Apache Kafka answers a client's first metadata request without the topics it has not asked about, and
    a topic created a moment ago may be missing for a while; the embedded broker answers at once. The executor
    must wait for its topics, not fail or guess."""
    kafka_like_metadata.hide(topics_for(echo.topic_prefix).execution_results.name, 1.5)
    await start_executor(echo)
    assert kafka_like_metadata.withheld > 0
    request = request_from("echo", {"n": 1})
    assert (await results_for(echo, await _send(echo, [request])))[request.request_id].status is ExecutionStatus.OK


async def test_a_refused_session_timeout_is_named(echo: Settings, start_executor) -> None:
    """Apache Kafka refuses a session timeout outside group.min/max.session.timeout.ms (the embedded broker
    takes any); aiokafka then fails every getmany with the join error as the cause."""
    running = await start_executor(echo)

    async def refused(*args, **kwargs):
        try:
            raise InvalidSessionTimeoutError()
        except KafkaError as cause:
            raise KafkaError("Unexpected error during coordination") from cause

    running.consumer._consumer.getmany = refused
    await asyncio.wait_for(running.executor.pipeline.failed.wait(), 10)
    assert running.executor.pipeline.failure.startswith(
        f"the group coordinator refused session_timeout_s={echo.session_timeout_s:g}: it must lie within "
        "the broker's group.min.session.timeout.ms")


async def _committed(settings: Settings, total: int) -> bool:
    return await _committed_total(settings) == total
