"""The consumer-side pipeline with a stand-in consumer: what it commits while records finish out of order, when
fetching pauses, what a revocation waits for, and what a failure stops."""

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from app.kafka import pipeline as pipeline_module
from app.kafka.pipeline import Pipeline
from app.kafka.progress import Mark

P0, P1 = TopicPartition("requests", 0), TopicPartition("requests", 1)


class Consumer:
    """Hands out queued fetches; records commits."""

    def __init__(self, *partitions: TopicPartition) -> None:
        self.assigned = set(partitions)
        self.fetches: asyncio.Queue[dict[TopicPartition, list[Any]]] = asyncio.Queue()
        self.commits: list[dict[TopicPartition, int]] = []
        self.ends: dict[TopicPartition, int] = {}
        self.refuse: Exception | None = None
        self.asked: list[int] = []  # max_records of each getmany

    def assignment(self) -> set[TopicPartition]:
        return self.assigned

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Any]]:
        self.asked.append(max_records)
        try:
            return await asyncio.wait_for(self.fetches.get(), timeout_ms / 1000)
        except TimeoutError:
            return {}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.refuse is not None:
            raise self.refuse
        self.commits.append(dict(offsets))

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.ends.get(tp)

    async def position(self, tp: TopicPartition) -> int:
        return 0


def records(tp: TopicPartition, offsets: range) -> list[ConsumerRecord[bytes, bytes]]:
    return [ConsumerRecord(tp.topic, tp.partition, o, 0, 0, b"k", b"v", None, 0, 0, []) for o in offsets]


class Taken:
    """The `take` of a test: tracks every fetch, keeps its marks by partition and offset."""

    def __init__(self) -> None:
        self.pipeline: Pipeline
        self.marks: dict[tuple[TopicPartition, int], Mark] = {}
        self.fetched = 0

    def __call__(self, batches: dict[TopicPartition, list[Any]]) -> None:
        for tp, messages in batches.items():
            segment = self.pipeline.track(tp, messages)
            for index, message in enumerate(messages):
                self.marks[tp, message.offset] = (segment, index)
            self.fetched += len(messages)

    async def done(self, tp: TopicPartition, *offsets: int) -> None:
        await self.pipeline.done([self.marks[tp, o] for o in offsets])


async def until(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "not within the deadline"
        await asyncio.sleep(0.005)


def started(consumer: Consumer, max_in_flight: int = 1000, blocked: Callable[[], bool] = lambda: False,
            **options: Any) -> tuple[Pipeline, Taken, list[str]]:
    before: list[str] = []

    async def before_commit() -> None:
        before.append("partials")

    pipeline = Pipeline("test", "requests", max_in_flight=max_in_flight, batch_size=500, commit_interval_s=0.01,
                        before_commit=before_commit, blocked=blocked, **options)
    pipeline.consumer = consumer  # type: ignore[assignment]
    taken = Taken()
    taken.pipeline = pipeline
    ready = asyncio.get_running_loop().create_future()
    ready.set_result(None)
    pipeline.start(taken, ready)
    return pipeline, taken, before


async def test_commits_reach_only_the_first_record_not_yet_done() -> None:
    consumer = Consumer(P0, P1)
    pipeline, taken, before = started(consumer)
    await consumer.fetches.put({P0: records(P0, range(0, 4)), P1: records(P1, range(10, 12))})
    await until(lambda: taken.fetched == 6)
    await taken.done(P0, 1, 2)  # out of order: 0 is not done, so nothing of P0 may be committed
    await taken.done(P1, 10)
    await until(lambda: bool(consumer.commits))
    assert consumer.commits[-1][P1] == 11 and consumer.commits[-1].get(P0, 0) == 0
    await taken.done(P0, 0, 3)
    await taken.done(P1, 11)
    await until(lambda: consumer.commits[-1] == {P0: 4, P1: 12})
    assert before and pipeline.committed == {P0: 4, P1: 12}
    consumer.ends = {P0: 9, P1: 12}
    assert await pipeline.lag() == {0: 5, 1: 0}
    await pipeline.stop()


async def test_a_commit_not_yet_due_waits_while_records_are_in_flight_and_no_longer() -> None:
    """commit_due() may hold commits back (the executor: until its stats partials summarise enough results), but
    only while records are in flight and for at most max_commit_interval_s."""
    consumer = Consumer(P0)
    pipeline, taken, _ = started(consumer, commit_due=lambda: False, max_commit_interval_s=1.2)
    await consumer.fetches.put({P0: records(P0, range(0, 4))})
    await until(lambda: taken.fetched == 4)
    loop = asyncio.get_running_loop()
    await taken.done(P0, 0)
    await until(lambda: bool(consumer.commits))  # held too, for max_commit_interval_s from the start
    await taken.done(P0, 1)
    since = loop.time()
    await until(lambda: consumer.commits[-1] == {P0: 2})
    assert loop.time() - since >= 1.1  # held while 2 and 3 were in flight
    await taken.done(P0, 2, 3)  # nothing in flight: committed at once
    await until(lambda: consumer.commits[-1] == {P0: 4}, timeout_s=1.0)
    await pipeline.stop()


async def test_fetching_pauses_while_too_many_records_are_in_flight_or_the_caller_is_full() -> None:
    consumer = Consumer(P0)
    full = False
    pipeline, taken, _ = started(consumer, max_in_flight=3, blocked=lambda: full)
    await consumer.fetches.put({P0: records(P0, range(0, 3))})
    await consumer.fetches.put({P0: records(P0, range(3, 5))})
    await until(lambda: taken.fetched == 3)
    await asyncio.sleep(0.3)  # the second fetch is waiting, not taken: nothing to wait on but time
    assert taken.fetched == 3
    full = True
    await taken.done(P0, 0, 1, 2)  # room in records, but the caller says it is full
    await asyncio.sleep(0.3)
    assert taken.fetched == 3
    full = False
    pipeline.update_room()
    await until(lambda: taken.fetched == 5)
    await taken.done(P0, 3, 4)
    await pipeline.stop()


async def test_a_revocation_waits_for_its_partitions_then_commits_and_forgets_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline_module, "REVOKE_WAIT_S", 0.3)
    consumer = Consumer(P0, P1)
    pipeline, taken, _ = started(consumer)
    await consumer.fetches.put({P0: records(P0, range(0, 2)), P1: records(P1, range(0, 2))})
    await until(lambda: taken.fetched == 4)
    handing_over = asyncio.ensure_future(pipeline.hand_over([P0]))
    await asyncio.sleep(0.05)
    assert not handing_over.done()  # P0 still has records in flight
    await taken.done(P0, 0, 1)
    await asyncio.wait_for(handing_over, 1)
    assert consumer.commits[-1][P0] == 2
    consumer.assigned = {P1}
    started_at = asyncio.get_running_loop().time()
    await pipeline.hand_over([P1])  # never done: it lets them go after REVOKE_WAIT_S
    assert asyncio.get_running_loop().time() - started_at >= 0.3
    assert P1 not in pipeline.committed and pipeline.partitions() == [1]
    await pipeline.stop()


async def test_a_commit_refused_after_a_rebalance_is_survived_and_other_errors_fail_it() -> None:
    consumer = Consumer(P0)
    pipeline, taken, _ = started(consumer)
    await consumer.fetches.put({P0: records(P0, range(0, 2))})
    await until(lambda: taken.fetched == 2)
    consumer.refuse = CommitFailedError("rebalanced")
    await taken.done(P0, 0)
    await pipeline.commit()
    assert not pipeline.failed.is_set() and consumer.commits == []
    consumer.refuse = KafkaError("GroupAuthorizationFailedError")
    await taken.done(P0, 1)  # something new to commit
    await pipeline.commit()
    assert pipeline.failed.is_set() and pipeline.failure is not None
    assert pipeline.failure.startswith("committing offsets failed")
    consumer.refuse = None
    await pipeline.commit()
    assert consumer.commits == []  # a failed pipeline commits nothing more
    await pipeline.stop()


async def test_stop_lets_the_records_in_flight_finish_and_commits_them() -> None:
    consumer = Consumer(P0)
    pipeline, taken, _ = started(consumer)
    await consumer.fetches.put({P0: records(P0, range(0, 3))})
    await until(lambda: taken.fetched == 3)

    async def finish_later() -> None:
        await asyncio.sleep(0.1)
        await taken.done(P0, 0, 1, 2)

    finishing = asyncio.ensure_future(finish_later())
    await pipeline.stop()
    await finishing
    assert consumer.commits[-1] == {P0: 3}


async def test_full_fetches_of_few_records_per_key_grow_and_fetches_of_many_per_key_shrink_back() -> None:
    consumer = Consumer(P0)
    pipeline, taken, _ = started(consumer, max_in_flight=1000)  # batches of 500, two in flight
    pipeline.spread(500, 100)  # full, 5 records a key: twice as many at once, and twice as many in flight
    pipeline.spread(1000, 200)
    pipeline.spread(2000, 400)  # at most 4 times the batch size given
    await consumer.fetches.put({P0: records(P0, range(0, 3))})
    await until(lambda: taken.fetched == 3)
    assert consumer.asked[-1] == 2000
    pipeline.spread(100, 100)  # not full: no backlog to fetch in larger groups, nothing changes
    pipeline.spread(1000, 4)  # 250 records a key: halved, not below the size given
    pipeline.spread(500, 2)
    pipeline.spread(500, 2)
    await consumer.fetches.put({P0: records(P0, range(3, 1000 + 3))})  # more than 1,000 in flight: it pauses
    await until(lambda: taken.fetched == 1003)
    asked = len(consumer.asked)
    await asyncio.sleep(0.3)  # a fetch would be asked for now if there were room: nothing to wait on but time
    assert len(consumer.asked) == asked
    await taken.done(P0, *range(0, 1003))
    await until(lambda: len(consumer.asked) > asked)
    assert consumer.asked[asked:] and set(consumer.asked[asked:]) == {500}
    await pipeline.stop()
