"""Calls waiting for a program version's sandbox processes: in, the calls of each stream() caller (a Job); out,
chunks of one version's calls (possibly of several callers) whose outcomes go back to each caller in order."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence

from app.sandbox.calls import Call, Outcome

Emit = Callable[[Sequence[int], Sequence[Outcome]], None]  # (indices into the calls, their outcomes)

Segment = tuple["Job", "range | list[int]"]  # calls of one stream() caller, by their indices in its calls


class Job:
    """One stream() call: its calls, where their outcomes go, and how many are still due."""

    __slots__ = ("calls", "done", "due", "emit", "ended")

    def __init__(self, calls: Sequence[Call], emit: Emit, done: asyncio.Future[None]) -> None:
        self.calls = calls
        self.emit = emit
        self.done = done
        self.due = len(calls)
        self.ended = False

    def deliver(self, indices: Sequence[int], outcomes: Sequence[Outcome]) -> None:
        if self.ended:
            return
        try:
            self.emit(indices, outcomes)
        except Exception as exc:
            self.fail(exc)
            return
        self.due -= len(indices)
        if not self.due:
            self.ended = True
            self.done.set_result(None)

    def fail(self, error: BaseException) -> None:
        if not self.ended:
            self.ended = True
            self.done.set_exception(error)


class CallQueue:
    """A version's calls waiting for its processes, oldest first, and the runners taking them."""

    __slots__ = ("calls", "runners", "segments")

    def __init__(self) -> None:
        self.segments: deque[Segment] = deque()
        self.calls = 0
        self.runners = 0

    def take(self, size: int) -> list[Segment]:
        """Up to `size` calls from the front; those of callers that are gone are dropped."""
        taken: list[Segment] = []
        while size > 0 and self.segments:
            job, indices = self.segments[0]
            if job.ended or len(indices) <= size:
                self.segments.popleft()
                self.calls -= len(indices)
                if not job.ended:
                    taken.append((job, indices))
                    size -= len(indices)
            else:
                taken.append((job, indices[:size]))
                self.segments[0] = (job, indices[size:])
                self.calls -= size
                size = 0
        return taken


class Chunk:
    """Calls of one version sent to a process as one batch, possibly of several callers; each outcome goes to its
    caller as it arrives, in order."""

    __slots__ = ("segments", "size")

    def __init__(self, segments: list[Segment]) -> None:
        self.segments = segments
        self.size = sum(len(indices) for _, indices in segments)

    def calls(self) -> list[Call]:
        sent: list[Call] = []
        for job, indices in self.segments:
            if isinstance(indices, range):
                sent += job.calls[indices.start:indices.stop]
            else:
                sent += [job.calls[i] for i in indices]
        return sent

    def emit(self, outcomes: Sequence[Outcome]) -> None:
        """Give the first len(outcomes) calls their outcomes; they leave the chunk."""
        at, count = 0, len(outcomes)
        while at < count:
            job, indices = self.segments[0]
            take = min(len(indices), count - at)
            if take == len(indices):
                del self.segments[0]
                job.deliver(indices, outcomes if take == count else outcomes[at:at + take])
            else:
                self.segments[0] = (job, indices[take:])
                job.deliver(indices[:take], outcomes[at:at + take])
            at += take
        self.size -= count

    def _find(self, position: int) -> tuple[int, int]:
        for number, (_, indices) in enumerate(self.segments):
            if position < len(indices):
                return number, position
            position -= len(indices)
        raise IndexError(position)

    def identity(self, position: int) -> tuple[int, int]:
        """Which call is at this position: (its caller's id, its index there)."""
        number, at = self._find(position)
        job, indices = self.segments[number]
        return id(job), indices[at]

    def emit_one(self, position: int, outcome: Outcome) -> None:
        """Give the call at this position its outcome; it leaves the chunk."""
        number, at = self._find(position)
        job, indices = self.segments[number]
        rest = [*indices[:at], *indices[at + 1:]]
        if rest:
            self.segments[number] = (job, rest)
        else:
            del self.segments[number]
        self.size -= 1
        job.deliver([indices[at]], [outcome])

    def fail(self, error: BaseException) -> None:
        for job, _ in self.segments:
            job.fail(error)
        self.segments, self.size = [], 0
