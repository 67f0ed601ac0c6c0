"""CPU time of process trees from /proc/<pid>/stat: a root and every live descendant, plus the children they
have already reaped (cutime/cstime), sampled against wall-clock time so that the CPU spent within a span of
time (a contender's first to last result) can be read off afterwards."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import time
from pathlib import Path

_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(child) for child in (task / "children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return found


def _own_seconds(pid: int) -> float:
    """utime + stime of the process and of its reaped children. A reaped child is no longer in the tree, so
    nothing is counted twice; a process that dies between two samples keeps its CPU in its parent's cutime."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return sum(int(f) for f in fields[11:15]) * _TICK_S  # utime stime cutime cstime (fields 14-17)


def tree_seconds(roots: list[int]) -> float:
    """CPU seconds used so far by the roots and all their descendants."""
    total, todo, seen = 0.0, list(roots), set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += _own_seconds(pid)
        todo += _children(pid)
    return total


class TreeSampler:
    """Samples the CPU seconds of process trees every `interval_s` (wall clock, time.time()) until stopped."""

    def __init__(self, roots: list[int], interval_s: float = 0.05) -> None:
        self._roots = roots
        self._interval_s = interval_s
        self._times: list[float] = []
        self._seconds: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._sample())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._take()

    def _take(self) -> None:
        self._times.append(time.time())
        self._seconds.append(tree_seconds(self._roots))

    async def _sample(self) -> None:
        while True:
            self._take()
            await asyncio.sleep(self._interval_s)

    def at(self, moment: float) -> float:
        """CPU seconds at a wall-clock moment, interpolated between the samples around it."""
        i = bisect.bisect_left(self._times, moment)
        if i == 0:
            return self._seconds[0]
        if i == len(self._times):
            return self._seconds[-1]
        t0, t1, c0, c1 = self._times[i - 1], self._times[i], self._seconds[i - 1], self._seconds[i]
        return c0 + (c1 - c0) * (moment - t0) / (t1 - t0) if t1 > t0 else c1

    def between(self, start: float, end: float) -> float:
        """CPU seconds spent from `start` to `end` (wall clock)."""
        return self.at(end) - self.at(start)
