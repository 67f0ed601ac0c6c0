"""The /execute follower on the embedded broker, with this test standing in for the executor: it reads each
request and writes a result (or a dead letter), so what is proven is which records the follower reads."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

from aiokafka import TopicPartition

from app.contract.codecs import codec_for
from app.contract.records import DeadLetter, ExecutionRequest, ExecutionResult
from app.contract.topics import topics_for
from app.kafka.clients import make_consumer, make_producer, partition_for
from app.settings import Settings
from app.web.execute import ExecuteBody, Executions


def _result(request: ExecutionRequest, output: str) -> ExecutionResult:
    return ExecutionResult(execution_id=f"e-{request.request_id}", request_id=request.request_id,
                           task_id=request.task_id, program_id="p", version=1, status="ok",
                           output=output, executed_at=datetime.now(UTC), worker_id="stand-in")


async def _stand_in_executor(settings: Settings, answered: list[str]) -> None:
    """Answer every request with a result whose output names it; a request whose input says so gets a dead
    letter instead."""
    topics = topics_for(settings.topic_prefix)
    requests = codec_for(ExecutionRequest, settings, topics.execution_requests)
    results = codec_for(ExecutionResult, settings, topics.execution_results)
    letters = codec_for(DeadLetter, settings, topics.dead_letters)
    consumer = make_consumer(settings)
    producer = make_producer(settings)
    await consumer.start()
    await producer.start()
    try:
        tps = [TopicPartition(topics.execution_requests.name, p) for p in range(topics.execution_requests.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while True:
            for messages in (await consumer.getmany(timeout_ms=100)).values():
                for message in messages:
                    request = requests.decode(message.value)
                    answered.append(request.request_id)
                    key = request.task_id.encode()
                    if request.input.get("letter"):
                        letter = DeadLetter(reason="stand-in refused it", error_type="Test", source_topic=message.topic,
                                            source_partition=message.partition, source_offset=message.offset,
                                            key=message.key, value=message.value, worker_id="stand-in",
                                            dead_lettered_at=datetime.now(UTC))
                        await producer.send_and_wait(topics.dead_letters.name, letters.encode(letter), key=key)
                    else:
                        await producer.send_and_wait(
                            topics.execution_results.name, results.encode(_result(request, request.request_id)),
                            key=key, partition=partition_for(key, topics.execution_results.partitions))
    finally:
        await consumer.stop()
        await producer.stop()


async def _alongside(executor: asyncio.Future[None], work: Any) -> Any:
    """The outcome of `work`, or the stand-in executor's failure if it fails first."""
    work = asyncio.ensure_future(work)
    await asyncio.wait({work, executor}, return_when=asyncio.FIRST_COMPLETED)
    if executor.done():
        executor.result()
    return await work


async def test_execute_reads_only_what_a_call_waits_for(settings: Settings) -> None:
    topics = topics_for(settings.topic_prefix)
    executions = Executions(settings, topics)
    await executions.start()
    answered: list[str] = []
    executor = asyncio.ensure_future(_stand_in_executor(settings, answered))
    try:
        consumer = executions._consumer
        assert consumer is not None
        every = consumer.assignment()
        assert consumer.paused() == every  # nobody waits: nothing is fetched

        # Concurrent calls, several on one results partition, and one that ends as a dead letter.
        bodies = [ExecuteBody(task_id=f"task-{n % 3}", input={"n": n}, request_id=f"r{n}") for n in range(9)]
        bodies.append(ExecuteBody(task_id="task-0", input={"letter": True}, request_id="lettered"))
        endings = await _alongside(executor, asyncio.gather(*(executions.execute(body, 20.0) for body in bodies)))
        for body, ending in zip(bodies[:-1], endings[:-1], strict=True):
            assert isinstance(ending, ExecutionResult) and ending.output == body.request_id
        assert isinstance(endings[-1], DeadLetter) and endings[-1].reason == "stand-in refused it"

        assert consumer.paused() == every  # every call ended: paused again
        # A later call on a partition followed before starts from its end again, not from where it paused.
        deadline = time.monotonic() + 20
        while len(answered) < len(bodies):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        later = ExecuteBody(task_id="task-1", input={}, request_id="again")
        again = await _alongside(executor, executions.execute(later, 20.0))
        assert isinstance(again, ExecutionResult) and again.output == "again"
    finally:
        executor.cancel()
        await asyncio.gather(executor, return_exceptions=True)
        await executions.stop()
