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
from app.sandbox.zygote_host import Zygote

__all__ = ["Call", "Emit", "Outcome", "SandboxDied", "SandboxPool", "SandboxProcess", "run_once"]

log = logging.getLogger(__name__)

# One program version per process: a process is bound to the first task and version it serves and is never
# handed to another (not even another version of its task: a canary would otherwise run in the process that
# then runs the shadow version judging it). Fair blame: a call that outlives its timeout is killed once and
# charged once (process.py's watchdog); a process that dies by itself is charged to the call it was running,
# which gets one more try in a fresh process; every other unanswered call runs again: innocent calls are never
# failed. Tenants apart: each version's calls run in its own chunks, at most _PER_OWNER processes at once, and
# each chunk's outcomes are emitted when it ends, so one task's slow calls never hold another's.
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
Emit = Callable[[Sequence[int], Sequence[Outcome]], None]  # (indices into the calls, their outcomes)
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
        self._background_work: set[asyncio.Task[None]] = set()
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
        when every call has been emitted once. A version's chunks run at once on up to _PER_OWNER processes."""
        if not calls:
            return
        # Each version's calls, as ranges while they are contiguous (a batch is fetched partition by partition,
        # and a partition's requests are often one task's): no per-call index lists to build or walk.
        by_owner: dict[Owner, range | list[int]] = {}
        at = 0
        for owner, run in itertools.groupby(map(_owner, calls)):
            end = at + len(list(run))
            seen = by_owner.get(owner)
            if seen is None:
                by_owner[owner] = range(at, end)
            elif isinstance(seen, range):
                by_owner[owner] = [*seen, *range(at, end)]
            else:
                seen.extend(range(at, end))
            at = end
        jobs = [self._run_owner(owner, indices, calls, emit) for owner, indices in by_owner.items()]
        if len(jobs) == 1:
            await jobs[0]
        else:
            await asyncio.gather(*jobs)

    async def _run_owner(self, owner: Owner, indices: Sequence[int], calls: Sequence[Call], emit: Emit) -> None:
        """One version's calls, in chunks at once. A version whose output size is not known yet runs a first small
        chunk alone, and the rest in chunks sized by what it returned."""
        if owner not in self._output_per_call and len(indices) > _FIRST_CHUNK:
            await self._run_chunk(owner, indices[:_FIRST_CHUNK], calls, emit)
            indices = indices[_FIRST_CHUNK:]
        size = self._chunk_for(owner, len(indices))
        chunks = [self._run_chunk(owner, indices[i:i + size], calls, emit) for i in range(0, len(indices), size)]
        if len(chunks) == 1:
            await chunks[0]
        else:
            await asyncio.gather(*chunks)

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

    def _refused(self, owner: Owner, pending: Sequence[int], emit: Emit) -> bool:
        """Emit `rejected` outcomes for the pending calls if the gate refuses their task now."""
        why = self.gate(owner[0]) if self.gate is not None and pending else None
        if why is None:
            return False
        emit(pending, [Outcome("rejected", error=why)] * len(pending))
        return True

    async def _run_chunk(self, owner: Owner, indices: Sequence[int], calls: Sequence[Call], emit: Emit) -> None:
        pending, retried, blameless = indices, set(), 0
        while pending:
            if self.room is not None:
                await self.room(owner[0])
            if self._refused(owner, pending, emit):
                return
            chunk = calls[pending.start:pending.stop] if isinstance(pending, range) else [calls[i] for i in pending]
            process = await self._acquire(owner)
            if self._refused(owner, pending, emit):  # suspended while this chunk waited for a process
                await self._release(process)
                return
            try:
                answers = await process.run(next(self._batches), chunk)
                if len(answers) != len(chunk):
                    raise RuntimeError(f"{len(answers)} answers to {len(chunk)} calls")
            except SandboxDied as death:
                await self._release(process)
                answered = len(death.answers)
                if answered:
                    self._charge(owner, death.answers)
                    emit(pending[:answered], death.answers)
                    blameless = 0  # progress: a process that retires after a timeout is not a crash loop
                pending = pending[answered:]
                if death.running is None or death.running < answered:
                    blameless += 1 if not answered else 0
                    if blameless > _MAX_BLAMELESS_DEATHS:
                        emit(pending, [Outcome("error", error=f"{death}; the sandbox process kept dying")]
                             * len(pending))
                        return
                    continue
                culprit = death.running - answered
                index = pending[culprit]
                if death.timed_out:
                    outcome = Outcome("timeout", error=f"{death}; its sandbox process was killed")
                elif index in retried:
                    outcome = Outcome("error", error=f"{death} twice while running this call")
                else:  # perhaps killed from outside: one more try in a fresh process
                    retried.add(index)
                    continue
                self._charge(owner, [outcome])
                emit([index], [outcome])
                pending = [i for i in pending if i != index]
                continue
            except Exception:  # a bug: the process is given back (dead or alive) before the error goes up
                await self._release(process)
                raise
            await self._release(process)
            self._charge(owner, answers)
            emit(pending, answers)
            return

    async def _acquire(self, owner: Owner) -> SandboxProcess:
        async with self._changed:
            while True:
                idle = self._idle.get(owner)
                if idle:
                    process = idle.pop()
                    self._lru.pop(process, None)
                    if process.alive:
                        return process
                    self._forget(process)
                    continue
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
                await self._changed.wait()
        try:
            process = await self._take_spare()
        except BaseException:
            async with self._changed:
                self._unbind(owner)
                self._changed.notify_all()
            raise
        process.owner = owner
        return process

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
        async with self._changed:
            if process.alive and process.owner is not None:
                process.last_used = asyncio.get_running_loop().time()
                self._idle.setdefault(process.owner, []).append(process)
                self._lru[process] = None
            else:
                self._forget(process)
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
        await asyncio.gather(*self._background_work, return_exceptions=True)
        await asyncio.gather(*(p.stop() for p in list(self._all)), return_exceptions=True)
        self._all.clear()
        self._spares.clear()
        self._idle.clear()
        self._lru.clear()
        self._bound.clear()
        self._bound_total = 0
        await self._zygote.stop()


async def run_once(boundary: Boundary, source: str, value: Any, timeout_s: float) -> Outcome:
    """Run a program once in a fresh sandbox process of `boundary` (the worker's layers and limits)."""
    pool = SandboxPool(boundary, processes=1, spares=0)
    await pool.start()
    try:
        return (await pool.run([Call("run", "program", source, timeout_s, value)]))[0]
    finally:
        await pool.stop()
