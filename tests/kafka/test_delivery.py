"""deliver() on the real broker, with the refusals Apache Kafka makes simulated around the producer."""

import time
from collections.abc import AsyncIterator

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import NotLeaderForPartitionError, TopicAuthorizationFailedError

from app.contract.topics import topics_for
from app.kafka.clients import make_consumer, make_producer
from app.kafka.delivery import DeliveryFailed, Outbox, deliver, deliver_all
from app.settings import Settings
from tests.faults import RefusingProducer, read_values


@pytest.fixture
async def producer(settings: Settings) -> AsyncIterator[RefusingProducer]:
    real = make_producer(settings)
    await real.start()
    yield RefusingProducer(real)
    await real.stop()


def _outbox(topic: str, values: list[bytes], partitions: int = 6) -> Outbox[int]:
    outbox: Outbox[int] = Outbox()
    for i, value in enumerate(values):
        outbox.add(topic, i % partitions, None, value, i)
    return outbox


async def test_every_record_is_acknowledged_once(settings: Settings, producer: RefusingProducer) -> None:
    topic = topics_for(settings.topic_prefix).execution_results.name
    values = [f"r{i:05d}".encode() * 50 for i in range(20_000)]  # several full batches per partition
    assert await deliver(producer, _outbox(topic, values), timeout_s=10) == []
    assert sorted(await read_values(settings, topic, len(values))) == values


async def test_an_oversized_record_is_singled_out(settings: Settings, producer: RefusingProducer) -> None:
    topic = topics_for(settings.topic_prefix).execution_results.name
    producer.max_batch_bytes[topic] = 4000
    values = [b"x" * 5000 if i in (7, 130) else f"small-{i}".encode() for i in range(200)]
    undelivered = await deliver(producer, _outbox(topic, values), timeout_s=10)
    assert sorted(u.tag for u in undelivered) == [7, 130]
    assert all(u.error_type == "MessageSizeTooLargeError" and "maximum message size" in u.reason
               for u in undelivered)
    delivered = await read_values(settings, topic, 198)
    assert sorted(delivered) == sorted(v for i, v in enumerate(values) if i not in (7, 130))


async def test_batches_over_the_topic_limit_are_split_until_they_fit(
    settings: Settings, producer: RefusingProducer
) -> None:
    """A topic whose max.message.bytes is below the producer's batch size still gets every record."""
    topic = topics_for(settings.topic_prefix).dead_letters.name
    producer.max_batch_bytes[topic] = 3000
    values = [f"record-{i:04d}".encode() * 5 for i in range(1000)]
    assert await deliver(producer, _outbox(topic, values, partitions=1), timeout_s=10) == []
    assert await read_values(settings, topic, 1000) == values  # in order, once each


async def test_retriable_errors_are_retried(settings: Settings, producer: RefusingProducer) -> None:
    topic = topics_for(settings.topic_prefix).dead_letters.name
    producer.transient[topic] = 3
    producer.transient_error = NotLeaderForPartitionError
    values = [f"v{i}".encode() for i in range(50)]
    assert await deliver(producer, _outbox(topic, values, partitions=1), timeout_s=30) == []
    assert producer.batches[topic] == 4
    assert await read_values(settings, topic, 50) == values


async def test_retries_end_at_the_deadline(settings: Settings, producer: RefusingProducer) -> None:
    topic = topics_for(settings.topic_prefix).dead_letters.name
    producer.transient[topic] = 10**9
    started = time.monotonic()
    undelivered = await deliver(producer, _outbox(topic, [b"a", b"b"], partitions=1), timeout_s=1.5)
    elapsed = time.monotonic() - started
    assert [u.tag for u in undelivered] == [0, 1]
    assert undelivered[0].reason.startswith("still failing after 1.5 s of retries: RequestTimedOutError")
    assert 0.5 < elapsed < 3
    assert 3 <= producer.batches[topic] <= 6  # backoff 0.2, 0.4, 0.8 s…, not a busy loop


async def test_a_refusal_of_the_whole_topic_fails_its_records_without_splitting(
    settings: Settings, producer: RefusingProducer
) -> None:
    topic = topics_for(settings.topic_prefix).dead_letters.name
    producer.refuse[topic] = lambda: TopicAuthorizationFailedError(topic)
    undelivered = await deliver(producer, _outbox(topic, [b"a"] * 100, partitions=1), timeout_s=10)
    assert len(undelivered) == 100
    assert undelivered[0].error_type == "TopicAuthorizationFailedError"
    assert producer.batches[topic] == 1


async def test_deliver_all_raises_naming_the_first_refusal(settings: Settings, producer: RefusingProducer) -> None:
    topic = topics_for(settings.topic_prefix).execution_results.name
    assert await deliver_all(producer, _outbox(topic, [b"a", b"b"]), timeout_s=10) == 2
    producer.max_batch_bytes[topic] = 4000
    with pytest.raises(DeliveryFailed, match=rf"1 of 3 record\(s\) not delivered; {topic} partition 1: "
                                             "MessageSizeTooLargeError"):
        await deliver_all(producer, _outbox(topic, [b"ok", b"x" * 5000, b"fine"]), timeout_s=10)


async def test_a_partitions_records_arrive_in_order_over_many_batches(settings: Settings) -> None:
    topic = topics_for(settings.topic_prefix).dead_letters.name
    producer = make_producer(settings, max_batch_size=2048)  # a few records per batch
    await producer.start()
    outbox: Outbox[int] = Outbox()
    for i in range(500):
        outbox.add(topic, 0, None, f"record-{i:04d}".encode() * 10, i)
    assert await deliver(producer, outbox, timeout_s=10) == []
    await producer.stop()
    consumer = make_consumer(settings)
    await consumer.start()
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    values: list[bytes] = []
    while len(values) < 500:
        batches = await consumer.getmany(timeout_ms=2000)
        assert batches, f"only {len(values)} records arrived"
        values += [m.value for m in batches[tp]]
    await consumer.stop()
    assert values == [f"record-{i:04d}".encode() * 10 for i in range(500)]
