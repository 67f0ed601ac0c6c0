"""Which executions are sampled for validation: deterministic in the execution id, so a redelivered
request makes the same choice."""

from __future__ import annotations


def is_sampled(execution_id: str, sampling_rate: float, forced: bool = False) -> bool:
    """True when forced, else for a `sampling_rate` share of execution ids (by their leading 32 bits)."""
    if forced:
        return True
    if sampling_rate <= 0:
        return False
    return int(execution_id.replace("-", "")[:8], 16) < sampling_rate * 0x1_0000_0000
