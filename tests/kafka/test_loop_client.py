"""The client side of the loop on the embedded broker, with this test answering in place of a worker: requests go
to their task's partition, a topic is followed decoded (garbage as its DecodeError), and send_and_wait yields what
each request ended as, or says how many are unanswered."""

import asyncio
import re
from datetime import UTC, datetime

import pytest

from app.contract.codecs import DecodeError, codec_for, json_codec
from app.contract.records import (
    DeadLetter,
    ExecutionRequest,
    ExecutionResult,
    ExecutionStatus,
    execution_id_for,
    utc_now,
)
from app.contract.topics import topics_for
from app.kafka.clients import make_producer, partition_for
from app.kafka.loop_client import RequestSender, ending_of, follow, request_from, send_and_wait
from app.settings import Settings

RESULTS, LETTERS, REQUESTS = json_codec(ExecutionResult), json_codec(DeadLetter), json_codec(ExecutionRequest)


def result_of(request: ExecutionRequest) -> ExecutionResult:
    return ExecutionResult(execution_id=execution_id_for(request.task_id, request.request_id),
                           request_id=request.request_id, task_id=request.task_id, status=ExecutionStatus.OK,
                           output=request.input, executed_at=utc_now(), worker_id="test")


def letter_of(value: bytes, source_topic: str = "requests") -> DeadLetter:
    return DeadLetter(reason="bad", error_type="DecodeError", source_topic=source_topic, source_partition=0,
                      source_offset=0, key=None, value=value, worker_id="test", dead_lettered_at=utc_now())


def test_a_request_gets_a_fresh_id_and_a_stamp_unless_given() -> None:
    before = utc_now()
    first, second = request_from("spam", {"text": "hi"}), request_from("spam", {"text": "hi"})
    assert first.request_id != second.request_id and before <= first.requested_at <= utc_now()
    given = request_from("spam", {}, request_id="mine", requested_at=datetime(2026, 1, 1, tzinfo=UTC), version=2)
    assert (given.request_id, given.requested_at.year, given.version) == ("mine", 2026, 2)


def test_what_a_request_ended_as_is_read_from_a_result_or_a_dead_letter_carrying_it() -> None:
    request = request_from("spam", {"text": "hi"}, request_id="r1")
    result = result_of(request)
    assert ending_of(True, RESULTS.encode(result), RESULTS, LETTERS, REQUESTS) == (("spam", "r1"), result)
    letter = letter_of(REQUESTS.encode(request))
    assert ending_of(False, LETTERS.encode(letter), RESULTS, LETTERS, REQUESTS) == (("spam", "r1"), letter)
    # Another writer's garbage, and a dead letter of something that was never a request: not an ending.
    assert ending_of(True, b"not json", RESULTS, LETTERS, REQUESTS) is None
    assert ending_of(False, LETTERS.encode(letter_of(b"\xff")), RESULTS, LETTERS, REQUESTS) is None


async def test_requests_go_to_their_tasks_partition_and_garbage_is_followed_as_its_error(settings: Settings) -> None:
    spec = topics_for(settings.topic_prefix).execution_requests
    requests = [request_from(f"task-{i % 5}", {"i": i}) for i in range(20)]
    async with RequestSender(settings) as sender:
        assert await sender.send(requests) == 20
    producer = make_producer(settings)
    await producer.start()
    try:
        await producer.send_and_wait(spec.name, b"garbage", key=b"x", partition=0)
    finally:
        await producer.stop()
    seen: dict[str, int] = {}
    errors = []
    async for tp, _, record in follow(settings, spec, idle_timeout_s=1.0):
        if isinstance(record, DecodeError):
            errors.append(tp.partition)
        else:
            seen[record.request_id] = tp.partition
    assert errors == [0]
    assert seen == {r.request_id: partition_for(r.task_id.encode(), spec.partitions) for r in requests}


async def answer(settings: Settings, count: int) -> None:
    """Stand in for a worker: the first request read gets a result, the next a dead letter carrying its bytes,
    until `count` are answered."""
    topics = topics_for(settings.topic_prefix)
    results = codec_for(ExecutionResult, settings, topics.execution_results)
    letters = codec_for(DeadLetter, settings, topics.dead_letters)
    producer = make_producer(settings)
    await producer.start()
    try:
        answered = 0
        async for _, _, request in follow(settings, topics.execution_requests):
            assert isinstance(request, ExecutionRequest)
            if answered % 2 == 0:
                await producer.send_and_wait(topics.execution_results.name, results.encode(result_of(request)))
            else:
                value = codec_for(ExecutionRequest, settings, topics.execution_requests).encode(request)
                await producer.send_and_wait(topics.dead_letters.name, letters.encode(letter_of(value)))
            answered += 1
            if answered == count:
                return
    finally:
        await producer.stop()


async def test_send_and_wait_yields_each_requests_result_or_dead_letter(settings: Settings) -> None:
    requests = [request_from("spam", {"i": 1}), request_from("spam", {"i": 2})]
    answering = asyncio.ensure_future(answer(settings, len(requests)))
    try:
        ended = [record async for record in send_and_wait(settings, requests, timeout_s=60)]
    finally:
        await asyncio.wait_for(answering, 30)
    # Results and dead letters are two topics: they arrive in either order.
    assert sorted(type(record).__name__ for record in ended) == ["DeadLetter", "ExecutionResult"]
    result = next(record for record in ended if isinstance(record, ExecutionResult))
    letter = next(record for record in ended if isinstance(record, DeadLetter))
    assert result.request_id == requests[0].request_id and result.output == {"i": 1}
    assert REQUESTS.decode(letter.value).request_id == requests[1].request_id


async def test_send_and_wait_says_how_many_are_unanswered(settings: Settings) -> None:
    requests = [request_from("spam", {"i": i}) for i in range(3)]
    with pytest.raises(TimeoutError, match=re.escape("3 of 3 request(s) unanswered after 0.5 s")):
        async for _ in send_and_wait(settings, requests, timeout_s=0.5):
            pass
