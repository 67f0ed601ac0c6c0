"""What a run is measured by, read from the broker and the workers' logs: committed offsets, the results'
executed_at span, when the analytics and the validations caught up, a settled group, request->result latency."""

from __future__ import annotations

import asyncio
import math
import re
import time
from datetime import datetime
from pathlib import Path

import orjson
from aiokafka import TopicPartition

from app.contract.records import utc_now
from app.contract.topics import topics_for
from app.domain.daily_windows import DailyWindows
from app.domain.open_windows import OpenWindows
from app.kafka.clients import make_consumer, make_producer, widen_fetch_wait_if_starved
from app.kafka.delivery import Outbox, deliver_all
from app.kafka.partitioned_state import read_state
from app.settings import Settings
from bench.workload import TASKS, encode_requests, request_for


async def wait_for_commits(settings: Settings, group: str, expected: int, timeout_s: float,
                           poll_s: float = 0.5) -> None:
    """Until the group has committed `expected` offsets, looking every `poll_s` (a timing's resolution): cheap to
    poll, unlike reading every result.
    (consumer.committed, not the admin client: aiokafka cannot parse the embedded broker's OffsetFetch
    answer to the admin's request version.)"""
    spec = topics_for(settings.topic_prefix).execution_requests
    probe = make_consumer(settings, group_id=group)
    await probe.start()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            committed = [await probe.committed(TopicPartition(spec.name, p)) for p in range(spec.partitions)]
            if sum(offset or 0 for offset in committed) >= expected:
                return
            await asyncio.sleep(poll_s)
        raise TimeoutError(f"group {group} did not commit {expected} offsets in {timeout_s}s")
    finally:
        await probe.stop()


async def executed_span(settings: Settings, expected: int, timeout_s: float,
                        skipped: frozenset[str] = frozenset()) -> tuple[datetime, datetime]:
    """The first and the last executed_at among `expected` results, leaving out those of `skipped` request ids
    (counted in `expected`)."""
    spec = topics_for(settings.topic_prefix).execution_results
    consumer = make_consumer(settings)
    await consumer.start()
    tps = [TopicPartition(spec.name, p) for p in range(spec.partitions)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    stamps: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(stamps) < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(stamps)} of {expected} results after {timeout_s}s")
            for messages in (await consumer.getmany(timeout_ms=500, max_records=50_000)).values():
                stamps += [(fields["request_id"], fields["executed_at"])
                           for fields in (orjson.loads(m.value) for m in messages)]
    finally:
        await consumer.stop()
    moments = [datetime.fromisoformat(at) for request_id, at in stamps if request_id not in skipped]
    return min(moments), max(moments)


async def analytics_caught_up(settings: Settings, expected: int, timeout_s: float) -> tuple[datetime, int]:
    """When the daily-stats aggregator's open windows (its changelog, read to the end) first hold `expected`
    executions of the bench's tasks, and how many changelog records it took."""
    windows = DailyWindows(settings.analytics_time_zone)
    spec = topics_for(settings.topic_prefix).daily_windows
    records = 0

    def decode(key: bytes, value: bytes) -> OpenWindows:
        nonlocal records
        records += 1
        return OpenWindows.from_json(key.decode(), value, windows)

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        records = 0
        state = await read_state(settings, spec, decode)
        held = sum(d.executions for task in TASKS if (opened := state.get(task.encode())) is not None
                   for d in opened.running() if d.version is None)
        if held >= expected:
            return utc_now(), records
        await asyncio.sleep(0.2)
    raise TimeoutError(f"the daily stats did not reach {expected} executions in {timeout_s}s")


async def validations_caught_up(settings: Settings, expected: int, timeout_s: float) -> datetime:
    """When the validations topic first holds `expected` validations (one per sampled execution)."""
    spec = topics_for(settings.topic_prefix).validations
    consumer = make_consumer(settings)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(spec.name, p) for p in range(spec.partitions)])
        held = 0
        deadline = time.monotonic() + timeout_s
        while held < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{held} of {expected} validations after {timeout_s}s")
            held += sum(len(messages) for messages in (await consumer.getmany(timeout_ms=200)).values())
        return utc_now()
    finally:
        await consumer.stop()


async def wait_for_stable_group(logs: list[Path], partitions: int, timeout_s: float = 120) -> None:
    """Until every worker's latest assignment is non-empty and together they cover every partition."""
    pattern = re.compile(r"executor assigned \[([0-9, ]*)\]")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        latest = [pattern.findall(log.read_text(errors="replace")) for log in logs]
        if all(latest):
            owned = [set(map(int, filter(None, found[-1].split(", ")))) for found in latest]
            if all(owned) and set().union(*owned) == set(range(partitions)):
                return
        await asyncio.sleep(0.5)
    raise TimeoutError("the executor group did not settle")


async def latency(settings: Settings, rate: int, seconds: float, results_topic: str | None = None) -> list[float]:
    """Send at a steady rate; milliseconds from send to result seen (on execution-results, or `results_topic`),
    per request."""
    spec = topics_for(settings.topic_prefix).execution_results
    topic, partitions = results_topic or spec.name, spec.partitions
    sent_at: dict[str, float] = {}
    latencies: list[float] = []
    # as short a poll as the executor's: the embedded broker holds a fetch for its whole max wait
    consumer = make_consumer(settings, fetch_max_wait_ms=settings.executor_fetch_max_wait_ms)
    await consumer.start()
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    await consumer.seek_to_end(*tps)
    for tp in tps:
        await consumer.position(tp)

    async def receive() -> None:
        while True:
            fetched = await consumer.getmany(timeout_ms=100)
            if not fetched:
                await widen_fetch_wait_if_starved(consumer)
            for messages in fetched.values():
                now = time.perf_counter()
                for m in messages:
                    request_id = orjson.loads(m.value)["request_id"]
                    if request_id in sent_at:
                        latencies.append((now - sent_at.pop(request_id)) * 1000)

    # Every request is made and encoded before the clock starts, as for the throughput rounds: building them on
    # the fly cost this process a fifth of a core at half a worker's capacity, taken from the worker and broker.
    per_tick = max(1, rate // 100)
    requests = [request_for(i) for i in range(per_tick * math.ceil(seconds * 100))]
    encoded = encode_requests(settings, requests)
    ticks = [(requests[at:at + per_tick], encoded[at:at + per_tick]) for at in range(0, len(requests), per_tick)]
    requests_topic = topics_for(settings.topic_prefix).execution_requests.name
    receiver = asyncio.ensure_future(receive())
    producer = make_producer(settings)
    await producer.start()
    try:
        started = time.perf_counter()
        for tick, (made, encoded) in enumerate(ticks, 1):
            now = time.perf_counter()
            for r in made:
                sent_at[r.request_id] = now
            outbox: Outbox[None] = Outbox()
            for key, value, partition in encoded:
                outbox.add(requests_topic, partition, key, value, None)
            await deliver_all(producer, outbox, settings.delivery_timeout_s)
            await asyncio.sleep(max(0.0, started + tick * 0.01 - time.perf_counter()))
    finally:
        await producer.stop()
    deadline = time.monotonic() + 30
    while sent_at and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    receiver.cancel()
    await consumer.stop()
    return latencies
