"""Latency percentiles that merge: consumes latencies in ms (or serialised sketches), produces quantiles and bytes."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from itertools import repeat
from typing import Any

from ddsketch import DDSketch
from ddsketch.ddsketch import BaseDDSketch
from ddsketch.mapping import LogarithmicMapping
from ddsketch.pb.proto import DDSketchProto, KeyMappingProto, pb
from ddsketch.store import DenseStore
from google.protobuf.message import DecodeError as ProtobufDecodeError

# A DDSketch (Datadog's `ddsketch`) with relative accuracy RELATIVE_ACCURACY: every quantile it returns is within
# 1% of the exact order statistic, the value of rank floor(q * (n - 1)) in sorted order, whatever the
# distribution. Merging two sketches gives the sketch of the union. The bytes are the DDSketch protobuf
# (`ddsketch.proto`, shared with the Go and Java libraries); it does not carry min, max or sum, which callers keep
# themselves when they need them.

RELATIVE_ACCURACY = 0.01


_MAPPING = DDSketch(RELATIVE_ACCURACY)._mapping


def _dense_store(first_key: int, counts: list[float]) -> DenseStore:
    """A store holding `counts` for the keys from `first_key` on, built in one go."""
    store = DenseStore()
    nonzero = [index for index, count in enumerate(counts) if count]
    if nonzero:
        store.bins = counts
        store.offset = first_key
        store.min_key = first_key + nonzero[0]
        store.max_key = first_key + nonzero[-1]
        store.count = float(sum(counts))
    return store


_ACCEPTED: set[bytes] = set()  # mapping messages seen to be ours: checking one costs a mapping's construction


def _our_mapping(mapping: Any) -> bool:
    data = mapping.SerializeToString()
    if data not in _ACCEPTED:
        if KeyMappingProto.from_proto(mapping).gamma != _MAPPING.gamma:
            return False
        _ACCEPTED.add(data)
    return True


class SketchError(ValueError):
    """Bytes that are not a sketch this module can merge (corrupt, or another accuracy)."""


class LatencySketch:
    """A mergeable summary of latencies in milliseconds."""

    __slots__ = ("_sketch",)

    def __init__(self, sketch: BaseDDSketch | None = None) -> None:
        self._sketch = sketch if sketch is not None else DDSketch(RELATIVE_ACCURACY)

    def add(self, latency_ms: float) -> None:
        """Record one latency; a negative one (a clock step) counts as 0."""
        self._sketch.add(max(latency_ms, 0.0))

    def add_all(self, latencies_ms: Iterable[float]) -> None:
        """Record many latencies: the same sketch as add() one by one, at about half the cost (the executor
        sketches every result). Each distinct bucket is added once, with its count as the weight."""
        sketch = self._sketch
        mapping = sketch._mapping
        if type(mapping) is not LogarithmicMapping:  # the inlined key below is that mapping's formula
            for latency in latencies_ms:
                self.add(latency)
            return
        values = list(latencies_ms)
        if not values:
            return
        multiplier, offset, smallest = mapping._multiplier, mapping._offset, mapping.min_possible
        # The mapping's key, int(ceil(log(latency, 2) * multiplier) + offset), with the per-value steps mapped
        # in C and the offset added per distinct key. Zero, negative (a clock step) or too small to bucket:
        # add() counts it as zero too.
        bucketed = list(filter(smallest.__lt__, values))
        rounded = Counter(map(math.ceil, map(multiplier.__mul__, map(math.log, bucketed, repeat(2)))))
        if rounded:
            first = min(rounded)
            counts = [0.0] * (max(rounded) - first + 1)
            for key, count in rounded.items():
                counts[key - first] = float(count)
            added = _dense_store(int(first + offset), counts)
            if sketch._store.count:
                sketch._store.merge(added)
            else:
                sketch._store = added
        sketch._zero_count += len(values) - len(bucketed)
        sketch._count += len(values)
        sketch._sum += sum(v for v in values if v > 0)
        sketch._min = min(sketch._min, max(min(values), 0.0))
        sketch._max = max(sketch._max, max(values))

    def merge(self, other: LatencySketch) -> None:
        """Fold `other` into this sketch (in place); `other` is unchanged."""
        self._sketch.merge(other._sketch)

    def copy(self) -> LatencySketch:
        """An independent sketch with the same contents."""
        fresh = LatencySketch()
        fresh.merge(self)
        return fresh

    @property
    def count(self) -> int:
        """How many latencies were recorded (over all merged sketches)."""
        return round(self._sketch.count)

    def count_above(self, threshold_ms: float) -> int:
        """How many recorded latencies surely exceed `threshold_ms`: those in buckets wholly above it (a bucket
        holding the threshold is not counted, so the answer errs low by at most that bucket)."""
        sketch = self._sketch
        store = sketch._store
        if not store.count:
            return 0
        if threshold_ms <= 0:
            return round(store.count)
        first = max(sketch._mapping.key(threshold_ms) + 1 - store.offset, 0)
        return round(sum(store.bins[first:]))

    def quantile(self, q: float) -> float | None:
        """The q-quantile (0 <= q <= 1) within RELATIVE_ACCURACY, or None for an empty sketch."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be within [0, 1], not {q}")
        value = self._sketch.get_quantile_value(q)
        return None if value is None else float(value)

    def to_bytes(self) -> bytes:
        """The DDSketch protobuf, canonical (equal contents give equal bytes); b"" for an empty sketch."""
        sketch = self._sketch
        if sketch.count == 0:
            return b""
        store = sketch._store
        # Only the bins from min to max key: the store's own list carries growth padding that depends on the
        # order values arrived in.
        bins = store.bins[store.min_key - store.offset:store.max_key - store.offset + 1] if store.count else []
        message = pb.DDSketch(
            mapping=KeyMappingProto.to_proto(sketch._mapping),
            positiveValues=pb.Store(contiguousBinCounts=bins, contiguousBinIndexOffset=store.min_key if bins else 0),
            zeroCount=sketch._zero_count,
        )
        data: bytes = message.SerializeToString()
        return data

    @classmethod
    def from_bytes(cls, data: bytes) -> LatencySketch:
        """The sketch that to_bytes() wrote (b"" is the empty sketch). Raises SketchError for anything else."""
        if not data:
            return cls()
        try:
            message = pb.DDSketch.FromString(data)
        except ProtobufDecodeError as exc:
            raise SketchError(f"not a DDSketch protobuf: {exc}") from exc
        expected = _MAPPING
        if not message.HasField("mapping") or not _our_mapping(message.mapping):
            raise SketchError(f"sketch of another accuracy (gamma {message.mapping.gamma}); "
                              f"expected relative accuracy {RELATIVE_ACCURACY}")
        negative, positive = message.negativeValues, message.positiveValues
        if any(negative.contiguousBinCounts) or any(negative.binCounts.values()):
            raise SketchError("sketch holds negative latencies")
        if positive.binCounts:  # the sparse form (other writers): the library's own decoder
            store = DDSketchProto.from_proto(message)._store
        else:  # what to_bytes writes: the bins as they are, in one list (the library adds them one by one)
            store = _dense_store(positive.contiguousBinIndexOffset, list(positive.contiguousBinCounts))
        # Our own mapping, not the decoded one: that one is rebuilt from gamma and its values differ in the last
        # bits, so a restored sketch would not answer exactly as the original did.
        return cls(BaseDDSketch(mapping=expected, store=store, negative_store=DenseStore(),
                                zero_count=message.zeroCount))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LatencySketch) and self.to_bytes() == other.to_bytes()

    def __repr__(self) -> str:
        return f"LatencySketch(count={self.count}, p50={self.quantile(0.5)}, p99={self.quantile(0.99)})"
