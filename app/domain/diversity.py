"""Diversity-based choice (Loopai's fifth sampling strategy): what a value is made of, how far apart two values
are, a greedy choice of the most different items, and a coarse signature that puts similar inputs together so
that rare kinds of input can be sampled more often."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import orjson

T = TypeVar("T")
_WORD = re.compile(r"\w+")
SIGNATURE_BUCKETS = 16  # per input shape: enough to tell kinds of input apart, few enough that each fills


def features(value: Any) -> frozenset[str]:
    """The words of a value's JSON text (keys and values), lower-cased: what two values share or not."""
    text = orjson.dumps(value, option=orjson.OPT_SORT_KEYS, default=str).decode().lower()
    return frozenset(_WORD.findall(text))


def distance(a: frozenset[str], b: frozenset[str]) -> float:
    """Jaccard distance: 0 for the same words, 1 for none in common."""
    if not a and not b:
        return 0.0
    return 1.0 - len(a & b) / len(a | b)


def choose_diverse(items: Sequence[T], k: int, described: Callable[[T], frozenset[str]]) -> list[T]:
    """Up to k items, each as far as possible from those chosen before it (greedy farthest-point): the first
    item, then repeatedly the one whose nearest chosen item is farthest (the earliest on ties). Items equal to
    one already chosen come last, so k distinct kinds of failure beat k copies of one."""
    if k <= 0 or not items:
        return []
    described_items = [described(item) for item in items]
    chosen = [0]
    nearest = [distance(described_items[0], other) for other in described_items]
    while len(chosen) < min(k, len(items)):
        best = max((i for i in range(len(items)) if i not in chosen), key=lambda i: (nearest[i], -i))
        chosen.append(best)
        nearest = [min(nearest[i], distance(described_items[best], described_items[i])) for i in range(len(items))]
    return [items[i] for i in chosen]


def signature(value: Any, buckets: int = SIGNATURE_BUCKETS) -> str:
    """A coarse kind of input: its keys, and the bucket of its min-hash over its words. Two inputs land in the same
    bucket with a probability equal to the share of words they have in common (Jaccard similarity)."""
    keys = ",".join(sorted(value)) if isinstance(value, dict) else type(value).__name__
    words = features(value.values() if isinstance(value, dict) else value) if value is not None else frozenset()
    if not words:
        return f"{keys}|-"
    smallest = min(int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "big") for word in words)
    return f"{keys}|{smallest % buckets}"
