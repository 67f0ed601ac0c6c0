"""The sandbox pool: sandbox processes started inside the OS boundary, each serving one program version, called in
batches from the worker's event loop.

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
import mmap
import os
from collections.abc import Sequence
from operator import itemgetter
from typing import Any, NamedTuple

import orjson

from app.sandbox.boundary import Boundary, SandboxUnavailable
from app.sandbox.child import MAX_ERROR_CHARS, PROGRESS

log = logging.getLogger(__name__)

_GRACE_S = 0.25  # beyond a call's own timeout, before the process is killed from outside
_START_TIMEOUT_S = 30.0
_STATUSES = frozenset({"ok", "error", "timeout"})
_NUMBER = (int, float)
# A latency is 0 (a program that did not load) or a difference of two readings of a nanosecond clock. Anything
# smaller than this would open buckets of its own in the task's latency sketch, one per 2 % down to 1e-308:
# daily-stats partials of 285 kB instead of a few, 80 ms of the aggregator's time each.
_MIN_LATENCY_MS = 1e-7
_MAX_BLAMELESS_DEATHS = 3  # deaths with no call running, per chunk, before its calls are failed
_STDERR_KEPT = 4096
_CORES = os.cpu_count() or 1
Owner = tuple[str, str]  # what a process is bound to: (task_id, program key)
_MIN_CHUNK = 32  # calls: below this, another process costs more in IPC than it saves
_owner = itemgetter(0, 1)  # of a Call: (task_id, key)
_input = itemgetter(4)  # of a Call


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


class SandboxDied(Exception):
    """The process ended before answering every call of its batch."""

    def __init__(self, reason: str, answers: list[Outcome], running: int | None, timed_out: bool) -> None:
        super().__init__(reason)
        self.answers = answers  # answers received, in call order
        self.running = running  # index (in the batch) of the call running when it ended, if any
        self.timed_out = timed_out  # killed by the watchdog for overrunning that call's timeout


class _Protocol(asyncio.SubprocessProtocol):
    def __init__(self, owner: SandboxProcess) -> None:
        self._owner = owner

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 1:
            self._owner._on_data(data)
        else:
            self._owner._on_stderr(data)

    def connection_lost(self, exc: Exception | None) -> None:  # process exited and its pipes are drained
        self._owner._on_lost()


class SandboxProcess:
    """One sandbox process, its pipes and its progress page."""

    def __init__(self, boundary: Boundary) -> None:
        self._boundary = boundary
        # Answers are flushed before a line holds more than max_output bytes of outputs and errors; the last one
        # added may bring up to max_output more.
        self._max_line = 2 * boundary.limits.max_output + (1 << 20)
        self._transport: asyncio.SubprocessTransport | None = None
        self._buffer = bytearray()
        self._stderr = bytearray()
        self._page_fd = os.memfd_create("loopai-progress", os.MFD_CLOEXEC)
        os.ftruncate(self._page_fd, PROGRESS.size)
        self._page = mmap.mmap(self._page_fd, PROGRESS.size)
        self._hello: asyncio.Future[dict[str, Any]] | None = None
        self._done: asyncio.Future[None] | None = None
        self._results: list[Outcome] = []
        self._expected = 0
        self._batch = 0
        self._timeouts: list[float] = []
        self._watchdog: asyncio.TimerHandle | None = None
        self._progress_at = 0.0  # loop time the batch was sent or the last answers arrived
        self._due = 0.0  # by when the next answers must arrive, whatever the process says it is doing
        self._loading = False
        self._last_check = 0.0
        self._started: dict[int, float] = {}  # call index -> when it started, as far as the worker can tell
        self._lost = False
        self.loaded: set[str] = set()
        self.owner: Owner | None = None  # the task and program version it serves, once taken from the spares
        self.last_used = 0.0
        self.kill_reason: str | None = None
        self._killed_running: int | None = None
        self.protections: dict[str, Any] = {}

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._hello = loop.create_future()
        try:
            self._transport, _ = await loop.subprocess_exec(
                lambda: _Protocol(self), *self._boundary.command(self._page_fd),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env=self._boundary.environment(), pass_fds=(self._page_fd,),
            )
            self.protections = await asyncio.wait_for(self._hello, _START_TIMEOUT_S)
        except (SandboxDied, OSError, TimeoutError) as exc:
            await self.stop()
            raise SandboxUnavailable(self._boundary.explain(self._stderr.decode(errors="replace") or str(exc))) from exc

    @property
    def task(self) -> str | None:
        return None if self.owner is None else self.owner[0]

    @property
    def alive(self) -> bool:
        return self._transport is not None and not self._lost and self._transport.get_returncode() is None

    @property
    def pid(self) -> int | None:
        return self._transport.get_pid() if self._transport else None

    async def run(self, batch: int, calls: Sequence[Call]) -> list[Outcome]:
        """Run calls of one program version in order. Raises SandboxDied if the process ends before answering
        all of them."""
        assert self._transport is not None
        if not self.alive:
            raise SandboxDied(self.kill_reason or "sandbox process is not running", [], None, False)
        key, source = calls[0].key, calls[0].source
        if any(call.key != key for call in calls):
            raise ValueError("a sandbox batch runs one program version")
        loop = asyncio.get_running_loop()
        self._results = []
        self._done = loop.create_future()
        self._expected = len(calls)
        self._batch = batch
        self._timeouts = timeouts = [call.timeout_s for call in calls]
        loads = []
        if key not in self.loaded:
            loads.append((key, source))
            self.loaded.add(key)
        line = orjson.dumps(
            {"batch": batch, "load": loads, "key": key, "run": list(zip(timeouts, map(_input, calls), strict=True))},
            option=orjson.OPT_APPEND_NEWLINE,  # not `+ b"\n"`: a copy of the whole line
        )
        self._progress_at = self._last_check = loop.time()
        self._started = {}
        self._loading = bool(loads)
        self._due = self._progress_at + self._next_due()
        self._watchdog = loop.call_at(self._progress_at + _GRACE_S, self._watch)
        stdin = self._transport.get_pipe_transport(0)
        assert isinstance(stdin, asyncio.WriteTransport)
        stdin.write(line)
        try:
            await self._done
        except SandboxDied as death:
            raise SandboxDied(str(death), list(self._results), self._running(), self._killed_running is not None) \
                from None
        finally:
            self._watchdog.cancel()
            self._done = None
        return self._results

    def _running(self) -> int | None:
        """The index of the call running now (or when the process ended), from its progress page. The page is
        written by untrusted code's process: anything out of range reads as "no call running"."""
        if self._killed_running is not None:
            return self._killed_running
        batch, index, started_ns = PROGRESS.unpack_from(self._page, 0)
        if batch != self._batch or not started_ns or not len(self._results) <= index < self._expected:
            return None
        return int(index)

    def _next_due(self) -> float:
        """Seconds the next answers may take. Answers are flushed every few milliseconds, so the next frame can
        wait at most for the longest unanswered call (plus loading its program once, at a batch's start)."""
        remaining = self._timeouts[len(self._results):]
        longest = max(remaining, default=0.0)
        return longest * (2 if self._loading and not self._results else 1) + _GRACE_S

    def _watch(self) -> None:
        """Kill the process when the call it says it runs has overrun its timeout (blame is exact), or when its
        next answers are overdue whatever it says (its own reports are not trusted for time); else look again."""
        if self._done is None or self._done.done():
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        page = PROGRESS.unpack_from(self._page, 0)
        index = self._running()
        check_at = min(self._due, now + _GRACE_S)
        if index is not None:
            if index not in self._started:
                # The page's start time (CLOCK_MONOTONIC, like loop.time()), but only where the worker saw the
                # call begin: between its last look and now. A process cannot move its own deadline later.
                self._started[index] = min(max(page[2] / 1e9, self._last_check), now)
            deadline = self._started[index] + self._timeouts[index] + _GRACE_S
            if now >= deadline:
                self._killed_running = index
                self.kill(f"call exceeded its timeout of {self._timeouts[index] * 1000:.0f} ms")
                return
            check_at = min(deadline, check_at)
        if now >= self._due:
            self._killed_running = index
            self.kill(f"no answer within {self._next_due():.1f} s")
            return
        self._last_check = now
        self._watchdog = loop.call_at(max(check_at, now + 0.01), self._watch)

    def kill(self, reason: str) -> None:
        if self.kill_reason is None:
            self.kill_reason = reason
        if self._transport is not None and self._transport.get_returncode() is None:
            self._transport.kill()

    def _on_stderr(self, data: bytes) -> None:
        if len(self._stderr) < _STDERR_KEPT:
            self._stderr += data[: _STDERR_KEPT - len(self._stderr)]

    def _on_data(self, data: bytes) -> None:
        self._buffer += data
        try:
            while self._take_frame():
                pass
        except (ValueError, TypeError, IndexError, KeyError) as exc:
            self._buffer.clear()
            self.kill(f"malformed answer from sandbox process: {exc}")

    def _take_frame(self) -> bool:
        """Accept one whole frame from the buffer (a header line, then its outputs); False if none is whole."""
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) > self._max_line:
                raise ValueError("answer larger than the output limit")
            return False
        header = orjson.loads(self._buffer[:end])
        if self._hello is not None and not self._hello.done():
            del self._buffer[:end + 1]
            self._hello.set_result(dict(header["hello"]))
            return True
        lengths = [answer[1] for answer in header]
        if not all(type(n) is int and -1 <= n <= self._boundary.limits.max_output for n in lengths):
            raise ValueError("bad output length")
        size = end + 1 + sum(n for n in lengths if n > 0)
        if len(self._buffer) < size:
            if size > self._max_line:
                raise ValueError("answer larger than the output limit")
            return False
        frame = bytes(self._buffer[end + 1:size])
        del self._buffer[:size]
        self._accept(header, frame)
        return True

    def _accept(self, answers: Any, outputs: bytes) -> None:
        results = self._results
        if self._done is None or self._done.done() or len(results) + len(answers) > self._expected:
            raise ValueError("answer without a call")
        if not answers:
            raise ValueError("an empty group of answers")
        at, append, statuses, number, loads, made = 0, results.append, _STATUSES, _NUMBER, orjson.loads, tuple.__new__
        for status, length, error, latency_ms, memory_mb in answers:
            # Checked, not trusted: these go into results, whose encoders must never fail on them.
            if status not in statuses \
                    or not (error is None or (type(error) is str and len(error) <= MAX_ERROR_CHARS)) \
                    or type(latency_ms) not in number \
                    or not (_MIN_LATENCY_MS <= latency_ms < 1e9 or latency_ms == 0) \
                    or not (memory_mb is None or (type(memory_mb) in number and 0 <= memory_mb < 1e9)):
                raise ValueError(f"bad answer {[status, error, latency_ms, memory_mb]!r:.80}")
            if length >= 0:
                output = outputs[at:at + length]
                # Results carry an output as these very bytes: anything but exactly one JSON value could end
                # the output's field and forge others (another task's id) after it. orjson raises a ValueError.
                loads(output)
                at += length
            else:
                output = None
            append(made(Outcome, (status, output, error, float(latency_ms), memory_mb)))  # (Outcome(...): 2x)
        self._progress_at = asyncio.get_running_loop().time()
        self._due = self._progress_at + self._next_due()
        if len(self._results) == self._expected:
            self._done.set_result(None)

    def _on_lost(self) -> None:
        self._lost = True
        if self.kill_reason is None:
            code = self._transport.get_returncode() if self._transport else None
            self.kill_reason = f"sandbox process exited (code {code})"
        if self._hello is not None and not self._hello.done():
            self._hello.set_exception(SandboxDied(self.kill_reason, [], None, False))
        if self._done is not None and not self._done.done():
            self._done.set_exception(SandboxDied(self.kill_reason, [], None, False))

    async def stop(self) -> None:
        if self._transport is not None:
            if self.alive:
                stdin = self._transport.get_pipe_transport(0)
                if stdin is not None:
                    stdin.close()  # EOF: the process leaves its loop and exits
                for _ in range(50):
                    if not self.alive:
                        break
                    await asyncio.sleep(0.02)
                self.kill("stopped")
            self._transport.close()
        if not self._page.closed:
            self._page.close()
            os.close(self._page_fd)


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
        """Host pids of the live processes (bubblewrap's, whose death takes the sandbox process with it)."""
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
        process = SandboxProcess(self._boundary)
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


async def run_once(boundary: Boundary, source: str, value: Any, timeout_s: float) -> Outcome:
    """Run a program once in a fresh sandbox process of `boundary` (the worker's layers and limits)."""
    pool = SandboxPool(boundary, processes=1, spares=0)
    await pool.start()
    try:
        return (await pool.run([Call("run", "program", source, timeout_s, value)]))[0]
    finally:
        await pool.stop()
