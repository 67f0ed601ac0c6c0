"""The true end of a partition, on the real (embedded) broker: where its ListOffsets answer falls short."""

from aiokafka import TopicPartition

from app.contract.topics import topics_for
from app.kafka.clients import make_consumer
from app.kafka.recovery import true_end_offsets
from app.settings import Settings
from tests.kafka.test_tables import _artifact, _publish_in_one_batch


async def test_the_true_end_is_past_the_last_record_batch(settings: Settings) -> None:
    await _publish_in_one_batch(settings, [_artifact("spam", v) for v in range(1, 1001)])
    spec = topics_for(settings.topic_prefix).program_artifacts
    partitions = [TopicPartition(spec.name, p) for p in range(spec.partitions)]
    probe = make_consumer(settings)
    await probe.start()
    try:
        reported = await probe.end_offsets(partitions)
    finally:
        await probe.stop()
    ends = await true_end_offsets(settings, partitions)
    assert sorted(ends.values()) == [0] * (spec.partitions - 1) + [1000]
    assert sum(reported.values()) < 1000  # the broker under-reports: this test exercises the quirk
