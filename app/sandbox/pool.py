"""The sandbox pool: sandbox processes (app/sandbox/process.py) started inside the OS boundary, each serving one
program version, called in batches from the worker's event loop.

One program version per process: a process is bound to the first task and version it serves and is never handed
to another one (not even another version of its task: a version on trial would otherwise run in the process
that then runs the version judging it, as a shadow oracle, and could answer for it); when a version needs a
process and the pool is full, the least recently used idle process of another one is stopped and a warm spare
(already started and locked down) takes its place, so switching costs no cold start.

Fair blame: every process writes the index and start time of the call it is running to a shared page. A call
that outlives its timeout (stuck in C code, or swallowing its own timer) is killed once and charged once, as
a timeout. A process that dies by itself is charged to the call it was running, which gets one more try in a
fresh process (it may have been killed from outside); dying twice makes it an error. Every other call of the
batch that had no answer yet runs again in a fresh process: innocent calls are never failed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Sequence
from operator import itemgetter
from typing import Any

from app.sandbox.boundary import Boundary, SandboxUnavailable
from app.sandbox.process import Call, Outcome, SandboxDied, SandboxProcess, Zygote

__all__ = ["Call", "Outcome", "SandboxDied", "SandboxPool", "SandboxProcess", "run_once"]

log = logging.getLogger(__name__)

_MAX_BLAMELESS_DEATHS = 3  # deaths with no call running, per chunk, before its calls are failed
_CORES = os.cpu_count() or 1
Owner = tuple[str, str]  # what a process is bound to: (task_id, program key)
_MIN_CHUNK = 32  # calls: below this, another process costs more in IPC than it saves
_owner = itemgetter(0, 1)  # of a Call: (task_id, key)


class SandboxPool:
    """Up to `processes` sandbox processes bound to program versions, plus `spares` started ahead. run() spreads a
    batch's calls over processes of their own task and version."""

    def __init__(self, boundary: Boundary, processes: int, spares: int = 1, chunk_size: int = 500) -> None:
        self._boundary = boundary
        self._size = processes
        self._spare_target = spares
        self._chunk_size = chunk_size
        self._idle: dict[Owner, list[SandboxProcess]] = {}
        self._bound: dict[Owner, int] = {}  # per owner: processes bound to it, busy or idle
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
        """Outcomes in the order of calls."""
        if not calls:
            return []
        outcomes: list[Outcome | None] = [None] * len(calls)
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
        jobs = []
        # Processes a version may use in this batch: its share of the pool, and no more than there are cores.
        parallel = max(1, min(self._size // len(by_owner), _CORES))
        for owner, indices in by_owner.items():
            size = min(self._chunk_size, max(_MIN_CHUNK, -(-len(indices) // parallel)))
            jobs += [self._run_chunk(owner, indices[i:i + size], calls, outcomes)
                     for i in range(0, len(indices), size)]
        if len(jobs) == 1:
            await jobs[0]
        else:
            await asyncio.gather(*jobs)
        return outcomes  # type: ignore[return-value]  # every slot is filled by its chunk

    async def _run_chunk(self, owner: Owner, indices: Sequence[int], calls: Sequence[Call],
                         outcomes: list[Outcome | None]) -> None:
        pending, retried, blameless = indices, set(), 0
        while pending:
            chunk = calls[pending.start:pending.stop] if isinstance(pending, range) else [calls[i] for i in pending]
            process = await self._acquire(owner)
            try:
                answers = await process.run(next(self._batches), chunk)
                if len(answers) != len(chunk):
                    raise RuntimeError(f"{len(answers)} answers to {len(chunk)} calls")
            except SandboxDied as death:
                await self._release(process)
                for index, outcome in zip(pending, death.answers, strict=False):
                    outcomes[index] = outcome
                unanswered = pending[len(death.answers):]
                pending = unanswered
                if death.running is None or death.running < len(death.answers):
                    blameless += 1
                    if blameless > _MAX_BLAMELESS_DEATHS:
                        for index in pending:
                            outcomes[index] = Outcome("error", error=f"{death}; the sandbox process kept dying")
                        return
                    continue
                culprit = pending[death.running - len(death.answers)]
                if death.timed_out:
                    outcomes[culprit] = Outcome("timeout", error=f"{death}; its sandbox process was killed")
                elif culprit in retried:
                    outcomes[culprit] = Outcome("error", error=f"{death} twice while running this call")
                else:  # perhaps killed from outside: one more try in a fresh process
                    retried.add(culprit)
                    continue
                pending = [index for index in pending if index != culprit]
                continue
            except Exception:  # a bug: the process is given back (dead or alive) before the error goes up
                await self._release(process)
                raise
            if isinstance(pending, range):
                outcomes[pending.start:pending.stop] = answers
            else:
                for index, outcome in zip(pending, answers, strict=True):
                    outcomes[index] = outcome
            await self._release(process)
            return

    async def _acquire(self, owner: Owner) -> SandboxProcess:
        async with self._changed:
            while True:
                idle = self._idle.get(owner)
                if idle:
                    process = idle.pop()
                    if process.alive:
                        return process
                    self._forget(process)
                    continue
                bound = self._bound.get(owner, 0)
                if bound < self._size:
                    # A full pool makes room only for an owner that has no process yet; one that has a process
                    # waits for it, so owners do not take each other's processes in turn.
                    if sum(self._bound.values()) >= self._size and not bound:
                        self._evict_for(owner)
                    if sum(self._bound.values()) < self._size:
                        self._bound[owner] = self._bound.get(owner, 0) + 1
                        break
                await self._changed.wait()
        try:
            process = await self._take_spare()
        except BaseException:
            async with self._changed:
                self._bound[owner] -= 1
                self._changed.notify_all()
            raise
        process.owner = owner
        return process

    def _evict_for(self, owner: Owner) -> None:
        """Stop the least recently used idle process of another owner, freeing its place."""
        candidates = [p for other, idle in self._idle.items() if other != owner for p in idle]
        if not candidates:
            return
        victim = min(candidates, key=lambda p: p.last_used)
        self._idle[victim.owner].remove(victim)  # type: ignore[index]  # an idle process has its owner
        self.evicted += 1
        self._forget(victim, replaced=False)

    async def _release(self, process: SandboxProcess) -> None:
        async with self._changed:
            if process.alive and process.owner is not None:
                process.last_used = asyncio.get_running_loop().time()
                self._idle.setdefault(process.owner, []).append(process)
            else:
                self._forget(process)
            self._changed.notify_all()

    def _forget(self, process: SandboxProcess, replaced: bool = True) -> None:
        """Drop a bound process (dead, or evicted) and stop it in the background."""
        if process.owner is not None:
            self._bound[process.owner] -= 1
            if not self._bound[process.owner]:
                del self._bound[process.owner]
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
        self._bound.clear()
        await self._zygote.stop()


async def run_once(boundary: Boundary, source: str, value: Any, timeout_s: float) -> Outcome:
    """Run a program once in a fresh sandbox process of `boundary` (the worker's layers and limits)."""
    pool = SandboxPool(boundary, processes=1, spares=0)
    await pool.start()
    try:
        return (await pool.run([Call("run", "program", source, timeout_s, value)]))[0]
    finally:
        await pool.stop()
