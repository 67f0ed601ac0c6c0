"""The sandbox pool: sandbox processes (app/sandbox/process.py) started inside the OS boundary, each serving one
program version. Consumes calls; hands back each task's outcomes as soon as its own calls are done.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from operator import itemgetter
from typing import Any

from app.sandbox.boundary import Boundary, SandboxUnavailable
from app.sandbox.calls import Call, Outcome
from app.sandbox.process import SandboxDied, SandboxProcess
from app.sandbox.queues import CallQueue, Chunk, Emit, Job
from app.sandbox.zygote_host import Zygote

__all__ = ["Call", "Emit", "Outcome", "SandboxDied", "SandboxPool", "SandboxProcess", "run_once"]

log = logging.getLogger(__name__)

# One program version per process: a process is bound to the first task and version it serves and is never
# handed to another (not even another version of its task: a canary would otherwise run in the process that
# then runs the shadow version judging it). Fair blame: a call that outlives its timeout is killed once and
# charged once (process.py's watchdog); a process that dies by itself is charged to the call it was running,
# which gets one more try in a fresh process; every other unanswered call runs again: innocent calls are never
# failed. Tenants apart: each version's calls run in its own chunks, at most _PER_OWNER processes at once, and
# each chunk's outcomes are emitted when it ends, so one task's slow calls never hold another's. A version's calls
# wait in its own queue while its processes are busy, and go as one chunk when one is free: with many tasks, a
# fetch holds few calls of each, and a round trip to a process per call would cost more than the calls.
_MAX_BLAMELESS_DEATHS = 3  # deaths in a row with no call running and no answer, per chunk, before it fails
_CORES = os.cpu_count() or 1
# Processes one version may use at once: half the cores, so a version whose calls spin leaves the worker and the
# other tasks the rest (a sandbox process costs a few µs a call: one keeps up with a worker's whole throughput).
_PER_OWNER = max(1, _CORES // 2)
Owner = tuple[str, str]  # what a process is bound to: (task_id, program key)
_MIN_CHUNK = 32  # calls: below this, another process costs more in IPC than it saves
_FIRST_CHUNK = 8  # calls of a version whose output size is not known yet
_CHUNK_OUTPUT_BYTES = 4 << 20  # a chunk's expected outputs: a task of large outputs runs in small chunks
_owner = itemgetter(0, 1)  # of a Call: (task_id, key)
Gate = Callable[[str], "str | None"]  # task_id -> why its calls may not run now (suspended), or None


class SandboxPool:
    """Up to `processes` sandbox processes bound to program versions, plus `spares` started ahead. stream() runs
    calls on processes of their own task and version and emits each chunk's outcomes as it ends.

    `gate` (optional) is asked before each chunk starts: a task it refuses gets `rejected` outcomes for the calls
    not yet run. `on_timeout` (optional) is told of every call that timed out, with its task. `room` (optional)
    is awaited with the task before each of its chunks starts: the caller's bound on the outputs it holds."""

    def __init__(self, boundary: Boundary, processes: int, spares: int = 1, chunk_size: int = 500,
                 gate: Gate | None = None, on_timeout: Callable[[str], None] | None = None,
                 room: Callable[[str], Awaitable[None]] | None = None) -> None:
        self._boundary = boundary
        self._size = processes
        self._spare_target = spares
        self._chunk_size = chunk_size
        self.gate = gate
        self.on_timeout = on_timeout
        self.room = room
        self._idle: dict[Owner, list[SandboxProcess]] = {}
        self._lru: OrderedDict[SandboxProcess, None] = OrderedDict()  # idle processes, least recently used first
        self._bound: dict[Owner, int] = {}  # per owner: processes bound to it, busy or idle
        self._bound_total = 0
        self._output_per_call: dict[Owner, float] = {}  # bytes, a moving average: sizes the owner's chunks
        self._spares: list[SandboxProcess] = []
        self._all: set[SandboxProcess] = set()
        self._changed = asyncio.Condition()
        self._waiting = 0  # runners waiting on _changed
        self._background_work: set[asyncio.Task[None]] = set()
        self._queues: dict[Owner, CallQueue] = {}  # per version: calls waiting for its processes
        self._runners: set[asyncio.Task[None]] = set()
        self._starting = 0  # spares being started
        self._batches = itertools.count(1)
        self._zygote = Zygote(boundary)  # forks every process of the pool (restarted if it dies)
        self.protections: dict[str, Any] = {}
        self.replaced = 0  # processes that died or were killed
        self.evicted = 0  # idle processes stopped to make room for another task

    async def start(self) -> None:
        """Start the spares. Raises SandboxUnavailable (with what to do) if the boundary cannot be set up."""
        first = await self._spawn()
        self.protections = first.protections
        self._spares.append(first)
        self._refill()
        log.info("sandbox pool: %d processes + %d spares, protections %s", self._size, self._spare_target,
                 self.protections)

    @property
    def pids(self) -> list[int]:
        """Host pids of the live processes."""
        return [p.pid for p in self._all if p.alive and p.pid is not None]

    def pids_of(self, task_id: str) -> list[int]:
        """Host pids of the live processes bound to a task."""
        return [p.pid for p in self._all if p.task == task_id and p.alive and p.pid is not None]

    def pids_running(self, task_id: str) -> list[int]:
        """Host pids of the task's processes that are running one of its calls right now."""
        return [p.pid for p in self._all if p.task == task_id and p.alive and p.pid is not None
                and p._done is not None and p._running() is not None]

    async def run(self, calls: Sequence[Call]) -> list[Outcome]:
        """Outcomes in the order of calls, once every call has one."""
        outcomes: list[Outcome | None] = [None] * len(calls)

        def keep(indices: Sequence[int], answers: Sequence[Outcome]) -> None:
            for index, outcome in zip(indices, answers, strict=True):
                outcomes[index] = outcome

        await self.stream(calls, keep)
        return outcomes  # type: ignore[return-value]  # every slot is filled by its chunk

    async def stream(self, calls: Sequence[Call], emit: Emit) -> None:
        """Run every call, emitting outcomes (with their indices in `calls`) chunk by chunk as each ends; returns
        when every call has been emitted once. Raises what a bug raised in one of its chunks (then nothing more
        of it is emitted), or what cancels the caller."""
        if not calls:
            return
        job = Job(calls, emit, asyncio.get_running_loop().create_future())
        # Each version's calls: a range when the batch is all one version's (no index list to build or walk).
        owners = list(map(_owner, calls))
        by_owner: dict[Owner, range | list[int]] = {}
        if owners.count(owners[0]) == len(owners):
            by_owner[owners[0]] = range(len(owners))
        else:
            for index, owner in enumerate(owners):
                seen = by_owner.get(owner)
                if seen is None:
                    by_owner[owner] = [index]
                else:
                    seen.append(index)  # type: ignore[union-attr]  # only the one-version case is a range
        for owner, indices in by_owner.items():
            self._enqueue(owner, job, indices)
        try:
            await job.done
        finally:
            job.ended = True  # cancelled or failed: its calls still queued are dropped, its outcomes not emitted

    def _enqueue(self, owner: Owner, job: Job, indices: range | list[int]) -> None:
        """Queue a version's calls behind those already waiting for its processes, and start a runner for them
        unless enough run already: a version's calls that arrive while its processes are busy go as one chunk."""
        queue = self._queues.get(owner)
        if queue is None:
            queue = self._queues[owner] = CallQueue()
        queue.segments.append((job, indices))
        queue.calls += len(indices)
        limit = min(_PER_OWNER, self._size)
        while queue.runners < limit and queue.calls > queue.runners * _MIN_CHUNK:
            queue.runners += 1
            runner = asyncio.ensure_future(self._serve(owner, queue))
            self._runners.add(runner)
            runner.add_done_callback(self._runners.discard)

    async def _serve(self, owner: Owner, queue: CallQueue) -> None:
        """A runner of one version: takes its queued calls chunk by chunk until none are left. A version whose
        output size is not known yet runs a small first chunk."""
        try:
            while queue.calls:
                if self.room is not None:
                    await self.room(owner[0])  # while it waits, more of the version's calls gather
                size = self._chunk_for(owner, queue.calls) if owner in self._output_per_call else _FIRST_CHUNK
                chunk = Chunk(queue.take(size))
                try:
                    await self._run_chunk(owner, chunk)
                except Exception as exc:  # a bug: it fails its calls' callers, not the version's other calls
                    log.exception("a sandbox chunk of %s failed", owner[0])
                    chunk.fail(exc)
                except BaseException:
                    chunk.fail(_stopped())
                    raise
        finally:
            queue.runners -= 1
            if not queue.runners:
                del self._queues[owner]
                Chunk(queue.take(queue.calls)).fail(_stopped())  # cancelled: what is left fails its callers

    def _chunk_for(self, owner: Owner, calls: int) -> int:
        """Calls per chunk: spread over the processes a version may use, at least _MIN_CHUNK (IPC costs), at
        most chunk_size, and few enough that a chunk's outputs stay near _CHUNK_OUTPUT_BYTES."""
        size = min(self._chunk_size, max(_MIN_CHUNK, -(-calls // min(_PER_OWNER, self._size))))
        per_call = self._output_per_call.get(owner)
        if per_call:
            size = min(size, max(1, int(_CHUNK_OUTPUT_BYTES // per_call)))
        return size

    def _learn_output(self, owner: Owner, answers: Sequence[Outcome]) -> None:
        if answers:
            size = sum(len(o.output_json) for o in answers if o.output_json is not None) / len(answers)
            before = self._output_per_call.get(owner)
            self._output_per_call[owner] = size if before is None else 0.5 * before + 0.5 * size

    def _charge(self, owner: Owner, answers: Sequence[Outcome]) -> None:
        """Learn the version's output size, and tell on_timeout of each call that timed out."""
        self._learn_output(owner, answers)
        if self.on_timeout is not None:
            for outcome in answers:
                if outcome.status == "timeout":
                    self.on_timeout(owner[0])

    def _refused(self, owner: Owner, chunk: Chunk) -> bool:
        """Emit `rejected` outcomes for the chunk's calls and every queued call of the version if the gate refuses
        their task now."""
        why = self.gate(owner[0]) if self.gate is not None else None
        if why is None:
            return False
        queue = self._queues.get(owner)
        for part in (chunk, Chunk(queue.take(queue.calls)) if queue is not None else None):
            if part is not None and part.size:
                part.emit([Outcome("rejected", error=why)] * part.size)
        return True

    async def _run_chunk(self, owner: Owner, chunk: Chunk) -> None:
        retried: set[tuple[int, int]] = set()
        blameless = 0
        while chunk.size:
            if self._refused(owner, chunk):
                return
            process = await self._acquire(owner)
            if self._refused(owner, chunk):  # suspended while this chunk waited for a process
                await self._release(process)
                return
            sent = chunk.calls()
            try:
                answers = await process.run(next(self._batches), sent)
                if len(answers) != len(sent):
                    raise RuntimeError(f"{len(answers)} answers to {len(sent)} calls")
            except SandboxDied as death:
                await self._release(process)
                answered = len(death.answers)
                if answered:
                    self._charge(owner, death.answers)
                    chunk.emit(death.answers)
                    blameless = 0  # progress: a process that retires after a timeout is not a crash loop
                if death.running is None or death.running < answered:
                    blameless += 1 if not answered else 0
                    if blameless > _MAX_BLAMELESS_DEATHS:
                        chunk.emit([Outcome("error", error=f"{death}; the sandbox process kept dying")] * chunk.size)
                        return
                    continue
                culprit = death.running - answered
                if death.timed_out:
                    outcome = Outcome("timeout", error=f"{death}; its sandbox process was killed")
                elif chunk.identity(culprit) in retried:
                    outcome = Outcome("error", error=f"{death} twice while running this call")
                else:  # perhaps killed from outside: one more try in a fresh process
                    retried.add(chunk.identity(culprit))
                    continue
                self._charge(owner, [outcome])
                chunk.emit_one(culprit, outcome)
                continue
            except Exception:  # a bug: the process is given back (dead or alive) before the error goes up
                await self._release(process)
                raise
            await self._release(process)
            self._charge(owner, answers)
            chunk.emit(answers)

    async def _acquire(self, owner: Owner) -> SandboxProcess:
        process = self._take_idle(owner)  # the common case needs no lock: nothing holds it across an await
        if process is not None:
            return process
        async with self._changed:
            while True:
                process = self._take_idle(owner)
                if process is not None:
                    return process
                bound = self._bound.get(owner, 0)
                if bound < min(self._size, _PER_OWNER):
                    # A full pool makes room only for an owner that has no process yet; one that has a process
                    # waits for it, so owners do not take each other's processes in turn.
                    if self._bound_total >= self._size and not bound:
                        self._evict_for(owner)
                    if self._bound_total < self._size:
                        self._bound[owner] = bound + 1
                        self._bound_total += 1
                        break
                self._waiting += 1
                try:
                    await self._changed.wait()
                finally:
                    self._waiting -= 1
        try:
            process = await self._take_spare()
        except BaseException:
            async with self._changed:
                self._unbind(owner)
                self._changed.notify_all()
            raise
        process.owner = owner
        return process

    def _take_idle(self, owner: Owner) -> SandboxProcess | None:
        """An idle live process of the owner, if it has one (dead ones found on the way are dropped)."""
        idle = self._idle.get(owner)
        while idle:
            process = idle.pop()
            self._lru.pop(process, None)
            if process.alive:
                return process
            self._forget(process)
            idle = self._idle.get(owner)
        return None

    def _evict_for(self, owner: Owner) -> None:
        """Stop the least recently used idle process of another owner, freeing its place."""
        for victim in self._lru:
            if victim.owner != owner:
                break
        else:
            return
        del self._lru[victim]
        self._idle[victim.owner].remove(victim)  # type: ignore[index]  # an idle process has its owner
        self.evicted += 1
        self._forget(victim, replaced=False)

    async def _release(self, process: SandboxProcess) -> None:
        if process.alive and process.owner is not None:
            process.last_used = asyncio.get_running_loop().time()
            self._idle.setdefault(process.owner, []).append(process)
            self._lru[process] = None
        else:
            self._forget(process)
        if self._waiting:  # runners wait for a process or for room: they look again
            async with self._changed:
                self._changed.notify_all()

    def _unbind(self, owner: Owner) -> None:
        self._bound_total -= 1
        self._bound[owner] -= 1
        if not self._bound[owner]:
            del self._bound[owner]
            self._idle.pop(owner, None)

    def _forget(self, process: SandboxProcess, replaced: bool = True) -> None:
        """Drop a bound process (dead, or evicted) and stop it in the background."""
        if process.owner is not None:
            self._unbind(process.owner)
        if replaced:
            self.replaced += 1
            log.warning("sandbox process %s of %s replaced: %s", process.pid, process.owner, process.kill_reason)
        self._all.discard(process)
        self._background(process.stop())

    async def _take_spare(self) -> SandboxProcess:
        while self._spares:
            process = self._spares.pop()
            if process.alive:
                self._refill()
                return process
            self._all.discard(process)
            self._background(process.stop())
        self._refill()
        return await self._spawn()  # no warm spare left: a cold start

    def _refill(self) -> None:
        for _ in range(self._spare_target - len(self._spares) - self._starting):
            self._starting += 1
            self._background(self._add_spare())

    async def _add_spare(self) -> None:
        try:
            self._spares.append(await self._spawn())
        except SandboxUnavailable as exc:
            log.error("could not start a spare sandbox process: %s", exc)
        finally:
            self._starting -= 1

    def _background(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._background_work.add(task)
        task.add_done_callback(self._background_work.discard)

    async def _spawn(self) -> SandboxProcess:
        process = SandboxProcess(self._boundary, self._zygote)
        await process.start()
        self._all.add(process)
        return process

    async def stop(self) -> None:
        for runner in self._runners:  # their callers' calls not yet emitted fail
            runner.cancel()
        await asyncio.gather(*self._runners, *self._background_work, return_exceptions=True)
        await asyncio.gather(*(p.stop() for p in list(self._all)), return_exceptions=True)
        self._all.clear()
        self._spares.clear()
        self._idle.clear()
        self._lru.clear()
        self._bound.clear()
        self._bound_total = 0
        await self._zygote.stop()


def _stopped() -> RuntimeError:
    return RuntimeError("the sandbox pool stopped")


async def run_once(boundary: Boundary, source: str, value: Any, timeout_s: float) -> Outcome:
    """Run a program once in a fresh sandbox process of `boundary` (the worker's layers and limits)."""
    pool = SandboxPool(boundary, processes=1, spares=0)
    await pool.start()
    try:
        return (await pool.run([Call("run", "program", source, timeout_s, value)]))[0]
    finally:
        await pool.stop()
