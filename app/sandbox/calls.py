"""What the sandbox takes and gives back: a call of one program version on one input, and what it came to."""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson


class Call(NamedTuple):
    """One program call for a task. `key` names a program version; `source` is sent once per process.
    (NamedTuples, this and Outcome: one of each per request, and a tuple costs a third of a frozen dataclass.)"""

    task_id: str
    key: str
    source: str
    timeout_s: float
    input: Any


class Outcome(NamedTuple):
    """What a call came to. The output stays the JSON bytes the sandbox process wrote: the worker passes it on
    without building its objects (a 1 MB output of tiny objects would cost the worker tens of MB)."""

    status: str  # ok | error | timeout
    output_json: bytes | None = None
    error: str | None = None
    latency_ms: float = 0.0
    memory_mb: float | None = None

    @property
    def output(self) -> Any:
        """The output as Python values (parsed on each access: for validation and tests, not the hot path)."""
        return None if self.output_json is None else orjson.loads(self.output_json)
