"""Per-partition state read back from its changelog on the real broker: to the true end, even when the last
record batch holds many records (the case the embedded broker's ListOffsets gets wrong)."""

import asyncio

from aiokafka import TopicPartition

from app.contract.topics import topics_for
from app.kafka.clients import make_consumer, make_producer
from app.kafka.partitioned_state import PartitionedState, read_state
from app.settings import Settings


async def _changes_in_one_batch(settings: Settings, partition: int, changes: list[tuple[bytes, bytes | None]]) -> None:
    spec = topics_for(settings.topic_prefix).daily_windows
    producer = make_producer(settings, linger_ms=200)
    await producer.start()
    try:
        futures = [await producer.send(spec.name, value, key=key, partition=partition) for key, value in changes]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def _decode(key: bytes, value: bytes) -> int:
    if not value.isdigit():
        raise ValueError(f"not a count: {value!r}")
    return int(value)


async def test_owned_partitions_are_read_back_to_the_true_end(settings: Settings) -> None:
    spec = topics_for(settings.topic_prefix).daily_windows
    changes: list[tuple[bytes, bytes | None]] = [(f"task{i % 10}".encode(), str(i).encode()) for i in range(500)]
    changes += [(b"task3", None), (b"task4", b"garbage")]  # a tombstone; a value decode refuses
    await _changes_in_one_batch(settings, 2, changes)
    await _changes_in_one_batch(settings, 4, [(b"elsewhere", b"1")])
    tp = TopicPartition(spec.name, 2)
    probe = make_consumer(settings, fetch_max_wait_ms=100)
    await probe.start()
    try:
        probe.assign([tp])
        await probe.seek_to_beginning(tp)
        while probe.highwater(tp) is None:
            await probe.getmany(tp, timeout_ms=100)
        reported_end = (await probe.end_offsets([tp]))[tp]
        # What Kafka guarantees: every acknowledged record (acks=all) is below the high watermark a fetch reports.
        # ListOffsets(latest) says the same on Apache Kafka; the embedded broker says less (the base offset of
        # the last batch + 1), never more. The read-back below must be right either way.
        assert probe.highwater(tp) == len(changes)
        assert reported_end <= len(changes)
    finally:
        await probe.stop()

    sent: list[tuple[str, bytes, bytes | None, int]] = []

    async def send(topic: str, key: bytes, value: bytes | None, partition: int) -> None:
        sent.append((topic, key, value, partition))

    state = PartitionedState(settings, spec, send, _decode, lambda count: str(count).encode() if count else None)
    state.assign([2, 5])
    values = await asyncio.wait_for(state.values_of(2), 10)
    # The last value of each key, task4's last readable one kept, task3 deleted.
    assert values == {f"task{k}".encode(): 490 + k for k in range(10) if k != 3} and state.skipped == 1
    assert await asyncio.wait_for(state.values_of(5), 10) == {}
    assert await read_state(settings, spec, _decode) == {**values, b"elsewhere": 1}

    await state.put(2, b"task0", 0)  # no count left: a tombstone
    assert sent == [(spec.name, b"task0", None, 2)] and b"task0" not in values
    state.revoke([2])
    assert not state.owns(2) and state.owns(5) and [p for p, _ in state.owned()] == [5]


async def test_a_change_made_across_a_revoke_and_assign_is_not_lost(settings: Settings) -> None:
    """A rebalance revokes every partition and may assign one back while a change to it is being sent: the
    read-back may end before that change's record, so the change is applied on top of it."""
    spec = topics_for(settings.topic_prefix).daily_windows
    state: PartitionedState[int] = PartitionedState(settings, spec, lambda *_: asyncio.sleep(0), _decode,
                                                    lambda count: str(count).encode() if count else None)

    async def send_across_a_rebalance(topic: str, key: bytes, value: bytes | None, partition: int) -> None:
        state.revoke([partition])
        state.assign([partition])  # read back from a changelog the record has not reached

    state.assign([1])
    await asyncio.wait_for(state.values_of(1), 10)
    state._send = send_across_a_rebalance
    await state.put(1, b"task", 7)
    assert await asyncio.wait_for(state.values_of(1), 10) == {b"task": 7}
