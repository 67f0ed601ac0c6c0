"""Kafka plumbing on the real broker: batched sends (including full batches), partitioning, topic apply."""

import asyncio
import contextlib
import itertools
import time

from aiokafka import TopicPartition
from aiokafka.errors import InvalidSessionTimeoutError, KafkaConnectionError, KafkaError

from app.contract.topics import topics_for
from app.kafka.clients import (
    ConnectBackoff,
    apply_topics,
    consumer_failure,
    partition_for,
    widen_fetch_wait_if_starved,
)
from app.settings import Settings

# murmur2 test vectors from Kafka's Java client (UtilsTest.testMurmur2), as signed 32-bit ints.
JAVA_MURMUR2 = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536,
                b"a-little-bit-longer-string": -1486304829, b"abc": 479470107}


def test_partition_for_matches_kafkas_default_partitioner() -> None:
    # Java: Utils.toPositive(murmur2(key)) % partitions, so Java producers and ours agree on partitions.
    for key, java_hash in JAVA_MURMUR2.items():
        for partitions in (1, 3, 6, 7):
            assert partition_for(key, partitions) == (java_hash & 0x7FFFFFFF) % partitions, (key, partitions)


def test_a_consumer_failure_names_its_topic_or_the_session_timeout_the_coordinator_refused() -> None:
    failure = consumer_failure("requests", Settings(bootstrap_servers="kafka:9092", session_timeout_s=45))
    assert failure(KafkaConnectionError("no broker")) == "consuming requests failed: KafkaConnectionError: no broker"
    refused = KafkaError("join failed")
    refused.__cause__ = InvalidSessionTimeoutError()
    assert failure(refused).startswith("the group coordinator refused session_timeout_s=45: it must lie within ")


async def test_apply_topics_reports_what_it_did(settings: Settings) -> None:
    again = await apply_topics(settings, topics_for(settings.topic_prefix))  # the fixture applied them once
    assert [o.created for o in again] == [False] * len(topics_for("").all())


async def test_connection_attempts_to_an_address_that_refuses_them_back_off() -> None:
    """Callers retrying in a tight loop (as aiokafka's do) make a few attempts, then one per backoff; the first
    success ends the backoff. Broker-free: the connection is a function that refuses, then accepts."""
    backoff = ConnectBackoff(initial_s=0.05, max_s=0.2)
    attempts: list[float] = []
    refusing = True

    async def create(host: str, port: int, **kwargs: object) -> str:
        attempts.append(time.monotonic())
        if refusing:
            raise ConnectionRefusedError(f"{host}:{port}")
        return "connection"

    async def retry_for(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, KafkaConnectionError):
                await backoff.connect(create, "broker", 9092)

    await asyncio.gather(*(retry_for(1.0) for _ in range(3)))
    later = attempts[3:]  # after the three callers' first attempts, made at once
    assert 3 <= len(later) <= 8, attempts  # without a backoff: tens of thousands
    assert all(b - a > 0.15 for a, b in itertools.pairwise(later)), later
    refusing = False
    assert await asyncio.wait_for(backoff.connect(create, "broker", 9092), 1) == "connection"
    started = time.monotonic()
    assert await backoff.connect(create, "broker", 9092) == "connection"
    assert time.monotonic() - started < 0.05  # no backoff once it connects


class _Fetcher:
    def __init__(self, wait_ms: int) -> None:
        self._fetch_max_wait_ms = wait_ms


class _Consumer:
    """What widen_fetch_wait_if_starved reads of an aiokafka consumer."""

    def __init__(self, wait_ms: int, end: int | None, position: int) -> None:
        self._fetcher = _Fetcher(wait_ms)
        self.tp = TopicPartition("requests", 0)
        self.end, self.at = end, position

    def assignment(self) -> set[TopicPartition]:
        return {self.tp}

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.end

    async def position(self, tp: TopicPartition) -> int:
        return self.at


async def test_a_fetch_wait_too_short_for_the_broker_to_find_waiting_records_is_doubled_up_to_a_second() -> None:
    """The embedded broker answers a fetch empty when it cannot find the offset within the wait (it scans a
    partition's batches: a long partition of small batches stalled a consumer with a 2 ms wait for good)."""
    starved = _Consumer(2, end=30_000, position=20_000)
    for expected in (4, 8, 16, 32, 64, 128, 256, 512, 1000, 1000):
        await widen_fetch_wait_if_starved(starved)  # type: ignore[arg-type]
        assert starved._fetcher._fetch_max_wait_ms == expected
    for idle in (_Consumer(2, end=20_000, position=20_000), _Consumer(2, end=None, position=0)):
        await widen_fetch_wait_if_starved(idle)  # type: ignore[arg-type]  # nothing waits: an idle poll
        assert idle._fetcher._fetch_max_wait_ms == 2
