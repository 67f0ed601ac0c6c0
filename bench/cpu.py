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


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """utime + stime of the process, and of its reaped children. A reaped child is no longer in the tree, so
    nothing is counted twice; a process that dies between two samples keeps its CPU in its parent's cutime."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0, 0.0
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    utime, stime, cutime, cstime = (int(f) * _TICK_S for f in fields[11:15])  # fields 14-17 of stat
    # stat counts whole clock ticks: a process that runs a few ms between samples (an idle task's sandbox process)
    # shows none of it. schedstat has the main thread's run time in ns; both only grow, so their larger is kept.
    try:
        leader = int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        leader = 0.0
    return max(utime + stime, leader), cutime + cstime


def tree_seconds(roots: list[int]) -> tuple[float, float]:
    """CPU seconds used so far by the roots and all their descendants, and by the roots themselves."""
    total, own, todo, seen = 0.0, 0.0, list(roots), set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        itself, reaped = _cpu_seconds(pid)
        total += itself + reaped
        if pid in roots:
            own += itself
        todo += _children(pid)
    return total, own


class TreeSampler:
    """Samples the CPU seconds of process trees (and of their roots alone) every `interval_s` (wall clock,
    time.time()) until stopped."""

    def __init__(self, roots: list[int], interval_s: float = 0.05) -> None:
        self._roots = roots
        self._interval_s = interval_s
        self._times: list[float] = []
        self._seconds: list[float] = []
        self._roots_seconds: list[float] = []
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
        total, own = tree_seconds(self._roots)
        self._times.append(time.time())
        self._seconds.append(total)
        self._roots_seconds.append(own)

    async def _sample(self) -> None:
        while True:
            self._take()
            await asyncio.sleep(self._interval_s)

    def at(self, moment: float, roots_only: bool = False) -> float:
        """CPU seconds at a wall-clock moment, interpolated between the samples around it."""
        seconds = self._roots_seconds if roots_only else self._seconds
        i = bisect.bisect_left(self._times, moment)
        if i == 0:
            return seconds[0]
        if i == len(self._times):
            return seconds[-1]
        t0, t1, c0, c1 = self._times[i - 1], self._times[i], seconds[i - 1], seconds[i]
        return c0 + (c1 - c0) * (moment - t0) / (t1 - t0) if t1 > t0 else c1

    def between(self, start: float, end: float, roots_only: bool = False) -> float:
        """CPU seconds spent from `start` to `end` (wall clock), by the trees or by their roots alone."""
        return self.at(end, roots_only) - self.at(start, roots_only)
