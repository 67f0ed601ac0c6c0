"""Tables read from the compacted topics on the real broker: exact after catch-up, current while following."""

import asyncio
from datetime import timedelta

from aiokafka import TopicPartition

from app.contract.codecs import codec_for, json_codec
from app.contract.records import ProgramArtifact, TaskSpec, TaskSuspension, utc_now
from app.contract.topics import topics_for
from app.kafka.clients import make_consumer, make_producer, partition_for
from app.kafka.tables import TableReader, artifact_key
from app.settings import Settings


def _artifact(task: str, version: int) -> ProgramArtifact:
    return ProgramArtifact(task_id=task, version=version, program_id=f"{task}-v{version}",
                           source_code=f"def run(input): return {version}", created_at=utc_now())


async def _publish_in_one_batch(settings: Settings, artifacts: list[ProgramArtifact]) -> None:
    """All records in as few record batches as possible: the case ListOffsets gets wrong."""
    spec = topics_for(settings.topic_prefix).program_artifacts
    codec = codec_for(ProgramArtifact, settings, spec)
    producer = make_producer(settings, linger_ms=200)
    await producer.start()
    try:
        futures = [
            await producer.send(spec.name, codec.encode(a), key=artifact_key(a.task_id, a.version).encode(),
                                partition=partition_for(a.task_id.encode(), spec.partitions))
            for a in artifacts
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def test_catch_up_reads_to_the_true_end(settings: Settings) -> None:
    await _publish_in_one_batch(settings, [_artifact("spam", v) for v in range(1, 1001)])
    spec = topics_for(settings.topic_prefix).program_artifacts
    probe = make_consumer(settings)
    await probe.start()
    partition = TopicPartition(spec.name, partition_for(b"spam", spec.partitions))
    reported_end = (await probe.end_offsets([partition]))[partition]
    await probe.stop()
    assert reported_end < 1000  # the broker under-reports: this test exercises the quirk

    reader = TableReader(settings, topics_for(settings.topic_prefix).task_specs, spec)
    await reader.start()
    try:
        assert sorted(reader.artifacts.versions_of("spam")) == list(range(1, 1001))
        assert reader.artifacts.version("spam", 1000).source_code == "def run(input): return 1000"
    finally:
        await reader.stop()


async def test_a_second_reader_rebuilds_the_same_table(settings: Settings) -> None:
    """What a restarted worker does: read the topics again and get exactly the same rows."""
    await _publish_in_one_batch(settings, [_artifact(f"task{t}", v) for t in range(5) for v in range(1, 41)])
    await _publish_in_one_batch(settings, [_artifact("task0", 1).model_copy(update={"program_id": "newer"})])
    topics = topics_for(settings.topic_prefix)
    tables = []
    for _ in range(2):
        reader = TableReader(settings, topics.task_specs, topics.program_artifacts)
        await reader.start()
        tables.append({(a.task_id, a.version): a for a in reader.artifacts.values()})
        await reader.stop()
    assert tables[0] == tables[1]
    assert len(tables[0]) == 200
    assert tables[0][("task0", 1)].program_id == "newer"  # latest value per key wins


async def test_follow_applies_updates_and_tombstones(settings: Settings) -> None:
    topics = topics_for(settings.topic_prefix)
    reader = TableReader(settings, topics.task_specs, topics.program_artifacts)
    await reader.start()
    reader.follow()
    producer = make_producer(settings)
    await producer.start()
    try:
        spec = topics.task_specs
        task = TaskSpec(name="spam", active_version=1, updated_at=utc_now())
        key = b"spam"
        part = partition_for(key, spec.partitions)
        await producer.send_and_wait(spec.name, json_codec(TaskSpec).encode(task), key=key, partition=part)
        await _eventually(lambda: reader.tasks.get("spam") == task)
        await producer.send_and_wait(spec.name, None, key=key, partition=part)
        await _eventually(lambda: reader.tasks.get("spam") is None)
        await producer.send_and_wait(spec.name, b"not a task", key=b"bad", partition=part)
        await _eventually(lambda: reader.tasks.skipped == 1)
    finally:
        await producer.stop()
        await reader.stop()


async def test_suspensions_are_a_table_whose_listener_hears_every_record_in_order(settings: Settings) -> None:
    """Read to the end at start (a worker learns the suspensions in force before serving), then followed; the
    listener is told of each record, also of the ones the catch-up reads, and a failing listener stops nothing."""
    topics = topics_for(settings.topic_prefix)
    spec = topics.task_suspensions
    codec = codec_for(TaskSuspension, settings, spec)
    now = utc_now()
    suspended = TaskSuspension(task_id="loopy", suspended=True, until=now, reason="10 calls timed out within 60 s",
                               timeouts=10, window_s=60.0, worker_id="w1", updated_at=now)
    resumed = TaskSuspension(task_id="loopy", suspended=False, reason="resumed by an operator", updated_at=now)
    producer = make_producer(settings)
    await producer.start()

    async def send(record: TaskSuspension) -> None:
        key = record.task_id.encode()
        await producer.send_and_wait(spec.name, codec.encode(record), key=key,
                                     partition=partition_for(key, spec.partitions))

    heard: list[TaskSuspension] = []

    def listen(record: TaskSuspension) -> None:
        heard.append(record)
        if record.task_id == "fragile":
            raise RuntimeError("a listener's bug")

    reader = TableReader(settings, topics.task_specs, topics.program_artifacts, on_suspension=listen)
    try:
        await send(suspended)
        await reader.start()
        assert heard == [suspended] and reader.suspensions.get("loopy") == suspended
        reader.follow()
        await send(suspended.model_copy(update={"task_id": "fragile"}))
        await send(resumed)
        await _eventually(lambda: reader.suspensions.get("loopy") == resumed)
        assert [(r.task_id, r.suspended) for r in heard] == [("loopy", True), ("fragile", True), ("loopy", False)]
        assert reader.suspensions.get("fragile") is not None and len(reader.suspensions) == 2
    finally:
        await producer.stop()
        await reader.stop()


def test_the_suspension_listener_can_be_set_after_construction(settings: Settings) -> None:
    """How the executor hooks its budget in: the worker builds the reader first."""
    topics = topics_for(settings.topic_prefix)
    reader = TableReader(settings, topics.task_specs, topics.program_artifacts)
    heard: list[TaskSuspension] = []
    reader.on_suspension = heard.append
    record = TaskSuspension(task_id="t", suspended=False, reason="resumed by an operator", updated_at=utc_now())
    reader.suspensions.apply(b"t", json_codec(TaskSuspension).encode(record), 0)
    assert heard == [record] and reader.on_suspension == heard.append


def test_a_suspension_made_before_a_resume_does_not_replace_it(settings: Settings) -> None:
    """Records of one task keep their topic order, not the order they were made in: a worker's suspension written
    after an operator's later resume leaves the task resumed, as the workers' budgets leave it."""
    topics = topics_for(settings.topic_prefix)
    table = TableReader(settings, topics.task_specs, topics.program_artifacts).suspensions
    codec = json_codec(TaskSuspension)
    now = utc_now()
    resumed = TaskSuspension(task_id="t", suspended=False, reason="resumed by an operator", updated_at=now)
    late = TaskSuspension(task_id="t", suspended=True, until=now + timedelta(minutes=5), reason="timeouts",
                          timeouts=10, window_s=60.0, updated_at=now - timedelta(seconds=1))
    table.apply(b"t", codec.encode(resumed), 0)
    table.apply(b"t", codec.encode(late), 1)
    assert table.get("t") == resumed
    later = late.model_copy(update={"updated_at": now + timedelta(seconds=1)})
    table.apply(b"t", codec.encode(later), 2)
    assert table.get("t") == later
    table.apply(b"t", None, 3)
    assert table.get("t") is None


async def _eventually(condition, timeout_s: float = 10) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")
