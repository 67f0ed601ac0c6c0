"""A task's timeout budget: consumes the timeouts of a worker's calls and the records of the task-suspensions table,
produces suspensions (a task whose calls keep timing out is refused for a cool-down) and the refusals they cause."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from app.contract.records import AnomalyMethod, AnomalyMetric, AnomalySignal, TaskSuspension

# Pure: no Kafka, no event loop; the clock (epoch seconds) is injected.


@dataclass(frozen=True, slots=True)
class _Suspension:
    started: float  # epoch seconds: a resume made no earlier lifts it
    until: float  # epoch seconds (inf: until resumed)
    refusal: str  # computed once: refusal() is on the hot path
    record: TaskSuspension


class TimeoutBudget:
    """Counts each task's timed-out calls; `max_timeouts` of them within `window_s` suspend the task for
    `cooldown_s` (max_timeouts 0: never). One per worker: it suspends on this worker's own timeouts at once, and
    adopts the suspensions and resumes the other workers and the operators write to the table (apply())."""

    def __init__(self, max_timeouts: int = 10, window_s: float = 60.0, cooldown_s: float = 300.0,
                 worker_id: str = "", now: Callable[[], float] = time.time) -> None:
        if max_timeouts < 0 or not window_s > 0 or not cooldown_s > 0:
            raise ValueError(f"a timeout budget needs max_timeouts >= 0 (0: never suspend), window_s > 0 and "
                             f"cooldown_s > 0, not {max_timeouts}, {window_s:g}, {cooldown_s:g}")
        self.max_timeouts, self.window_s, self.cooldown_s = max_timeouts, window_s, cooldown_s
        self._worker_id = worker_id
        self._now = now
        self._timeouts: dict[str, deque[float]] = {}  # task -> the times of its latest max_timeouts timeouts
        self._suspended: dict[str, _Suspension] = {}
        self._resumed_at: dict[str, float] = {}  # task -> its latest resume: older suspensions are not adopted

    def charge(self, task_id: str) -> TaskSuspension | None:
        """Record one timed-out call of the task. The call that makes it max_timeouts within window_s suspends the
        task here for cooldown_s and returns the suspension (to write to the table); otherwise None, also for a
        task that is suspended already (its calls in flight do not extend or repeat the suspension)."""
        if self.max_timeouts == 0:
            return None
        now = self._now()
        if self._in_force(task_id, now):
            return None
        times = self._timeouts.get(task_id)
        if times is None:
            times = self._timeouts[task_id] = deque(maxlen=self.max_timeouts)
        times.append(now)
        if len(times) < self.max_timeouts or now - times[0] > self.window_s:
            return None
        until = _at(now + self.cooldown_s)
        record = TaskSuspension(
            task_id=task_id, suspended=True, until=until, timeouts=self.max_timeouts, window_s=self.window_s,
            reason=f"{self.max_timeouts} calls timed out within {self.window_s:g} s; suspended until "
                   f"{_clock(until, now)}; `loopai task resume {task_id}` lifts it",
            worker_id=self._worker_id or None, updated_at=_at(now))
        self._adopt(record, now)
        return record

    def refusal(self, task_id: str) -> str | None:
        """None when the task's calls may run; else why not, for their `rejected` results. A dict lookup, and a
        clock read only for a task that has a suspension."""
        suspension = self._suspended.get(task_id)
        if suspension is None:
            return None
        if suspension.until > self._now():
            return suspension.refusal
        self._expire(task_id)
        return None

    def apply(self, record: TaskSuspension) -> None:
        """A record of the task-suspensions table. A resume lifts a suspension that started no later than it and
        forgets the timeouts before it; a suspension (another worker's, or this one's own coming back) is adopted,
        unless a resume or a suspension here is newer, or it has ended already."""
        task_id, at = record.task_id, record.updated_at.timestamp()
        current = self._suspended.get(task_id)
        if not record.suspended:
            self._resumed_at[task_id] = max(at, self._resumed_at.get(task_id, -math.inf))
            if current is not None and current.started <= at:
                del self._suspended[task_id]
            times = self._timeouts.get(task_id)
            if times is not None:
                kept = [t for t in times if t > at]
                times.clear()
                times.extend(kept)
            return
        if at <= self._resumed_at.get(task_id, -math.inf) or (current is not None and current.started > at):
            return
        now = self._now()
        if record.until is not None and record.until.timestamp() <= now:
            return
        self._adopt(record, now)

    def suspended(self) -> dict[str, TaskSuspension]:
        """The suspensions in force, by task."""
        now = self._now()
        for task_id in [t for t, s in self._suspended.items() if s.until <= now]:
            self._expire(task_id)
        return {task_id: s.record for task_id, s in self._suspended.items()}

    def _in_force(self, task_id: str, now: float) -> bool:
        suspension = self._suspended.get(task_id)
        if suspension is None:
            return False
        if suspension.until > now:
            return True
        self._expire(task_id)
        return False

    def _adopt(self, record: TaskSuspension, now: float) -> None:
        until = math.inf if record.until is None else record.until.timestamp()
        self._suspended[record.task_id] = _Suspension(record.updated_at.timestamp(), until,
                                                      refusal_of(record, now), record)
        self._timeouts.pop(record.task_id, None)  # a suspension ends with a clean slate

    def _expire(self, task_id: str) -> None:
        del self._suspended[task_id]
        self._timeouts.pop(task_id, None)


def refusal_of(suspension: TaskSuspension, now: float | None = None) -> str:
    """What a suspended task's rejected results say."""
    task_id = suspension.task_id
    until = "" if suspension.until is None else f" until {_clock(suspension.until, now)}"
    return f"task {task_id!r} is suspended{until}: {cause_of(suspension)}; `loopai task resume {task_id}` lifts it"


def cause_of(suspension: TaskSuspension) -> str:
    """Why the task was suspended, in a few words ("10 calls timed out within 60 s")."""
    if suspension.timeouts:
        return f"{suspension.timeouts} calls timed out within {suspension.window_s:g} s"
    return suspension.reason


def in_force(record: TaskSuspension | None, now: datetime) -> TaskSuspension | None:
    """The record if it is a suspension that has not ended by now (what the views show), else None."""
    if record is None or not record.suspended or (record.until is not None and record.until <= now):
        return None
    return record


def _at(epoch_s: float) -> datetime:
    """An epoch time as the records keep it: UTC, whole milliseconds."""
    return datetime.fromtimestamp(math.floor(epoch_s * 1000) / 1000, UTC)


def _clock(when: datetime, now: float | None = None) -> str:
    """HH:MM:SS UTC, with the date when it is not within a day of now."""
    if now is not None and abs(when.timestamp() - now) < 86_400:
        return when.astimezone(UTC).strftime("%H:%M:%S UTC")
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def signal_of(suspension: TaskSuspension) -> AnomalySignal:
    """The anomaly signal that names a task this worker suspended (a canary of it is rolled back on it)."""
    return AnomalySignal(
        task_id=suspension.task_id, metric=AnomalyMetric.TIMEOUTS, value=float(suspension.timeouts),
        baseline=float(suspension.timeouts), score=1.0, method=AnomalyMethod.BUDGET,
        hint=f"task {suspension.task_id!r} suspended: {suspension.reason}", detected_at=suspension.updated_at)
