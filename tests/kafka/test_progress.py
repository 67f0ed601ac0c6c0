"""Per-record completion: the committable offset is each partition's first record not yet done."""

from aiokafka import TopicPartition

from app.kafka.progress import PartitionProgress

P0, P1 = TopicPartition("t", 0), TopicPartition("t", 1)


def test_nothing_is_committable_until_the_first_record_is_done() -> None:
    progress = PartitionProgress()
    segment = progress.add(P0, [10, 11, 12])
    segment.complete(1)
    segment.complete(2)
    assert progress.committable() == {P0: 10}
    segment.complete(0)
    assert progress.committable() == {P0: 13}
    assert progress.committable() == {}  # only what moved


def test_a_slow_record_holds_its_partition_only() -> None:
    progress = PartitionProgress()
    slow, fast = progress.add(P0, [0, 1, 2]), progress.add(P1, [5, 6])
    later = progress.add(P0, [3, 4])
    for index in (1, 2):
        slow.complete(index)
    later.complete(0)
    later.complete(1)
    fast.complete(0)
    fast.complete(1)
    assert progress.committable() == {P0: 0, P1: 7}
    assert progress.pending() == 1 and progress.pending([P1]) == 0
    slow.complete(0)
    assert progress.committable() == {P0: 5}


def test_offsets_with_gaps_commit_at_the_first_undone_record() -> None:
    progress = PartitionProgress()
    segment = progress.add(P0, [3, 7, 9])  # e.g. transaction markers between them
    segment.complete(0)
    assert progress.committable() == {P0: 7}
    segment.complete(1)
    segment.complete(1)  # twice is harmless
    assert progress.pending() == 1
    segment.complete(2)
    assert progress.committable() == {P0: 10}


def test_a_forgotten_partition_is_never_committed() -> None:
    progress = PartitionProgress()
    segment = progress.add(P0, [0, 1])
    progress.forget([P0])
    segment.complete(0)
    segment.complete(1)
    assert progress.committable() == {}
    assert progress.pending() == 0
