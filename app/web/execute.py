"""Synchronous execution over HTTP: consumes the body of POST /execute, produces its request on execution-requests and
returns what it ended as, read from execution-results (or dead-letters)."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import BaseModel, ConfigDict, Field, JsonValue, StringConstraints

from app.contract.codecs import codec_for
from app.contract.records import DeadLetter, ExecutionRequest, ExecutionResult
from app.contract.topics import Topics
from app.kafka.clients import cancel_and_wait, make_consumer, partition_for, widen_fetch_wait_if_starved
from app.kafka.loop_client import (
    RequestSender,
    ending_of,  # the same test send --wait uses
    request_from,
)
from app.kafka.metadata import topic_partitions
from app.settings import Settings

# One producer and one results consumer serve every call. The consumer fetches only what somebody waits for: the
# results partition of each awaited task (results are keyed by task) and the dead letters while any call waits. A
# partition is followed from its end, fixed before the request is sent, so a result cannot be produced before the
# consumer could see it; with nobody waiting on it, it is paused (a worker does not read the results stream it
# writes).

log = logging.getLogger(__name__)


class ExecuteBody(BaseModel):
    """The body of POST /execute."""

    model_config = ConfigDict(extra="forbid")

    task_id: Annotated[str, StringConstraints(min_length=1)]
    input: dict[str, JsonValue]
    version: Annotated[int, Field(gt=0)] | None = None
    timeout_ms: Annotated[int, Field(ge=1, le=60_000)] | None = None
    request_id: Annotated[str, StringConstraints(min_length=1)] | None = None
    force_validation: bool = False
    expected_output: JsonValue = None  # what a label oracle compares with


class Executions:
    """Sends requests and hands each its ending. start() before the first call, stop() at the end."""

    def __init__(self, settings: Settings, topics: Topics) -> None:
        self._settings = settings
        self._topics = topics
        self._results = codec_for(ExecutionResult, settings, topics.execution_results)
        self._letters = codec_for(DeadLetter, settings, topics.dead_letters)
        self._requests = codec_for(ExecutionRequest, settings, topics.execution_requests)
        self._sender = RequestSender(settings)
        self._consumer: AIOKafkaConsumer | None = None
        self._waiting: dict[tuple[str, str], asyncio.Future[ExecutionResult | DeadLetter]] = {}
        self._task: asyncio.Task[None] | None = None
        self._results_partitions: list[TopicPartition] = []
        self._letters_partitions: list[TopicPartition] = []
        self._followers: dict[TopicPartition, int] = {}  # calls waiting on a partition
        self._followed: dict[TopicPartition, asyncio.Future[None]] = {}  # done once its position is fixed

    async def start(self) -> None:
        await self._sender.__aenter__()
        consumer = self._consumer = make_consumer(self._settings, fetch_max_wait_ms=20)
        await consumer.start()
        self._results_partitions, self._letters_partitions = [
            [TopicPartition(spec.name, p) for p in await topic_partitions(consumer, spec.name)]
            for spec in (self._topics.execution_results, self._topics.dead_letters)]
        partitions = self._results_partitions + self._letters_partitions
        consumer.assign(partitions)
        consumer.pause(*partitions)
        self._task = asyncio.ensure_future(self._follow())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        if self._consumer is not None:
            await self._consumer.stop()
        await self._sender.__aexit__(None, None, None)

    async def execute(self, body: ExecuteBody, timeout_s: float) -> ExecutionResult | DeadLetter:
        """Send the request and wait for its result (or the dead letter carrying it). Raises TimeoutError."""
        fields = body.model_dump(exclude_none=True)
        request = request_from(fields.pop("task_id"), fields.pop("input"), **fields)
        key = (request.task_id, request.request_id)
        ending = self._waiting[key] = asyncio.get_running_loop().create_future()
        results = self._results_partitions[partition_for(request.task_id.encode(), len(self._results_partitions))]
        followed = [results, *self._letters_partitions]
        try:
            await asyncio.wait_for(self._follow_from_end(followed), timeout_s)
            await self._sender.send([request])
            return await asyncio.wait_for(ending, timeout_s)
        finally:
            self._waiting.pop(key, None)
            self._unfollow(followed)

    async def _follow_from_end(self, partitions: list[TopicPartition]) -> None:
        """Count a call among each partition's followers; the first one resumes it from its end. Returns once
        every position is fixed (also when it was fixed for an earlier call still waiting)."""
        assert self._consumer is not None
        consumer = self._consumer
        for tp in partitions:
            self._followers[tp] = self._followers.get(tp, 0) + 1
            following = self._followed.get(tp)
            if following is None or (following.done() and following.exception() is not None):
                self._followed[tp] = asyncio.ensure_future(self._resume_at_end(consumer, tp))
        await asyncio.gather(*(asyncio.shield(self._followed[tp]) for tp in partitions))

    @staticmethod
    async def _resume_at_end(consumer: AIOKafkaConsumer, tp: TopicPartition) -> None:
        await consumer.seek_to_end(tp)
        await consumer.position(tp)  # fixed now: every record produced after this is read
        consumer.resume(tp)

    def _unfollow(self, partitions: list[TopicPartition]) -> None:
        assert self._consumer is not None
        for tp in partitions:
            self._followers[tp] -= 1
            if not self._followers[tp]:
                del self._followers[tp]
                self._followed.pop(tp).cancel()
                self._consumer.pause(tp)

    async def _follow(self) -> None:
        assert self._consumer is not None
        results_topic = self._topics.execution_results.name
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=200)
                if not batches:
                    await widen_fetch_wait_if_starved(self._consumer)
            except KafkaError as exc:
                log.warning("execute: reading results: %s; retrying", exc)
                await asyncio.sleep(0.5)
                continue
            if not self._waiting:
                continue  # nobody waits: skip decoding the whole results stream
            tasks = {task.encode() for task, _ in self._waiting}
            for tp, messages in batches.items():
                is_result = tp.topic == results_topic
                for message in messages:
                    if is_result and message.key not in tasks:  # results are keyed by task: decode only those
                        continue
                    ended = ending_of(is_result, message.value, self._results, self._letters, self._requests)
                    if ended is not None:
                        waiter = self._waiting.get(ended[0])
                        if waiter is not None and not waiter.done():
                            waiter.set_result(ended[1])
