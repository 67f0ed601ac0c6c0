"""Per-record completion of consumed partitions: consumes the offsets of fetched records and their completions
(in any order), produces what may be committed: per partition, the offset of the first record not yet done."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

from aiokafka import TopicPartition

# Records complete out of order (each task's calls finish on their own time), so a partition's committed offset
# is its low-water mark, as in Confluent's Parallel Consumer: a crash re-runs every record from there on, so
# nothing is skipped; records after it that were done already are redone (duplicates with equal execution ids).


class Segment:
    """The records of one partition taken in one fetch: their offsets, which are done, and how many are not."""

    __slots__ = ("done", "left", "low", "offsets")

    def __init__(self, offsets: Sequence[int]) -> None:
        self.offsets = offsets
        self.done = bytearray(len(offsets))
        self.left = len(offsets)
        self.low = 0  # every record before this index is done

    def complete(self, index: int) -> None:
        """Mark one record done (again is harmless)."""
        if not self.done[index]:
            self.done[index] = 1
            self.left -= 1

    @property
    def end(self) -> int:
        """The offset just past the segment's last record."""
        return self.offsets[-1] + 1

    def first_undone(self) -> int | None:
        """The offset of the first record not yet done, or None when all are."""
        done, low, size = self.done, self.low, len(self.offsets)
        while low < size and done[low]:
            low += 1
        self.low = low
        return self.offsets[low] if low < size else None


Mark = tuple[Segment, int]  # a record: its segment and its index there


class PartitionProgress:
    """The segments of the records in flight, per partition, oldest first."""

    def __init__(self) -> None:
        self._segments: dict[TopicPartition, deque[Segment]] = {}
        self._committed: dict[TopicPartition, int] = {}  # what was last handed out as committable

    def add(self, tp: TopicPartition, offsets: Sequence[int]) -> Segment:
        """Track a fetch's records of one partition (offsets ascending); complete them through their Segment."""
        segment = Segment(offsets)
        self._segments.setdefault(tp, deque()).append(segment)
        return segment

    def committable(self) -> dict[TopicPartition, int]:
        """Per partition whose low-water mark moved since the last call: the offset to commit (Kafka's
        convention: the next record to read)."""
        moved = {}
        for tp, segments in self._segments.items():
            mark = None
            while segments:
                first = segments[0].first_undone()
                if first is not None:
                    mark = first
                    break
                mark = segments.popleft().end
            if mark is not None and mark > self._committed.get(tp, -1):
                moved[tp] = self._committed[tp] = mark
        return moved

    def pending(self, tps: Iterable[TopicPartition] | None = None) -> int:
        """Records not yet done, of the given partitions (all by default)."""
        keys = self._segments.keys() if tps is None else [tp for tp in tps if tp in self._segments]
        return sum(segment.left for tp in keys for segment in self._segments[tp])

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        """Stop tracking partitions (revoked): completions of their records still arriving change nothing."""
        for tp in tps:
            self._segments.pop(tp, None)
            self._committed.pop(tp, None)
