"""The sandbox pool: pre-started sandbox processes, called in batches from the worker's event loop.

Each call has a wall deadline. A process that passes it (stuck in C code, or a program swallowing its own
timeout) is killed and replaced; the call is a timeout and the rest of its batch runs elsewhere. A process
that dies on its own gets its call retried once in a fresh process; dying twice makes the call an error.
Answers arrive a few milliseconds apart in groups, so when a process dies with several calls unanswered,
those calls run again one answer at a time ("stream" mode) to find the one at fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

log = logging.getLogger(__name__)

_GRACE_S = 0.25  # beyond a call's own timeout, before the process is killed from outside
_STATUSES = frozenset({"ok", "error", "timeout"})


@dataclass(frozen=True, slots=True)
class Call:
    """One program call for a task. `key` names a program version; `source` is sent once per process."""

    task_id: str
    key: str
    source: str
    timeout_s: float
    input: Any


@dataclass(frozen=True, slots=True)
class Outcome:
    status: str  # ok | error | timeout
    output: Any = None
    error: str | None = None
    latency_ms: float = 0.0
    memory_mb: float | None = None


class SandboxDied(Exception):
    """The process ended before answering every call of its batch."""


class _Protocol(asyncio.SubprocessProtocol):
    def __init__(self, owner: SandboxProcess) -> None:
        self._owner = owner

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 1:
            self._owner._on_data(data)

    def process_exited(self) -> None:
        self._owner._on_exit()


class SandboxProcess:
    """One sandbox process and its pipes."""

    def __init__(self, memory_mb: int, max_output: int) -> None:
        self._memory_mb = memory_mb
        self._max_output = max_output
        self._max_line = max_output + 4096
        self._transport: asyncio.SubprocessTransport | None = None
        self._buffer = bytearray()
        self._hello: asyncio.Future[dict[str, Any]] | None = None
        self._done: asyncio.Future[None] | None = None
        self._results: list[Outcome] = []
        self._expected = 0
        self._deadlines: list[float] = []  # per call: seconds of silence allowed while it is unanswered
        self.streaming = False
        self._last_progress = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self.loaded: set[str] = set()
        self.kill_reason: str | None = None
        self.protections: dict[str, Any] = {}
        self._scratch = tempfile.mkdtemp(prefix="loopai-sandbox-")

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._hello = loop.create_future()
        self._transport, _ = await loop.subprocess_exec(
            lambda: _Protocol(self),
            sys.executable, "-I", "-m", "app.sandbox.child",
            str(self._memory_mb), str(self._max_output), self._scratch,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        )
        self.protections = await asyncio.wait_for(self._hello, 30)

    @property
    def alive(self) -> bool:
        return self._transport is not None and self._transport.get_returncode() is None

    @property
    def pid(self) -> int | None:
        return self._transport.get_pid() if self._transport else None

    async def run(self, calls: Sequence[Call], stream: bool = False) -> list[Outcome]:
        """Run calls in order. Raises SandboxDied with the answers so far if the process ends early."""
        assert self._transport is not None
        self._results = []
        if not self.alive:
            raise SandboxDied(self.kill_reason or "sandbox process is not running")
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        self._expected = len(calls)
        self.streaming = stream
        if stream:
            self._deadlines = [c.timeout_s for c in calls]
        else:  # any unanswered call may be the one running: allow the longest of them
            longest, self._deadlines = 0.0, [0.0] * len(calls)
            for i in range(len(calls) - 1, -1, -1):
                longest = max(longest, calls[i].timeout_s)
                self._deadlines[i] = longest
        loads = []
        for call in calls:
            if call.key not in self.loaded:
                loads.append((call.key, call.source))
                self.loaded.add(call.key)
        message = orjson.dumps(
            {"load": loads, "run": [(c.key, c.timeout_s, c.input) for c in calls], "stream": stream}
        )
        self._last_progress = loop.time()
        self._arm_watchdog()
        stdin = self._transport.get_pipe_transport(0)
        assert isinstance(stdin, asyncio.WriteTransport)
        stdin.write(message + b"\n")
        try:
            await self._done
        finally:
            if self._watchdog:
                self._watchdog.cancel()
        return self._results

    def _arm_watchdog(self) -> None:
        loop = asyncio.get_running_loop()
        index = len(self._results)
        deadline = self._last_progress + self._deadlines[index] + _GRACE_S
        self._watchdog = loop.call_at(deadline, self._check_deadline, index)

    def _check_deadline(self, index: int) -> None:
        if self._done is None or self._done.done():
            return
        if len(self._results) != index:  # progress since: watch the call now running
            self._arm_watchdog()
            return
        self.kill(f"call exceeded its timeout of {self._deadlines[index] * 1000:.0f} ms")

    def kill(self, reason: str) -> None:
        if self.kill_reason is None:
            self.kill_reason = reason
        if self.alive:
            assert self._transport is not None
            self._transport.kill()

    def _on_data(self, data: bytes) -> None:
        self._buffer += data
        if b"\n" not in data:
            if len(self._buffer) > self._max_line:
                self._buffer.clear()
                self.kill("answer larger than the output limit")
            return
        *lines, rest = self._buffer.split(b"\n")
        self._buffer = bytearray(rest)
        for line in lines:
            try:
                self._accept(orjson.loads(line))
            except (ValueError, TypeError, IndexError) as exc:
                self.kill(f"malformed answer from sandbox process: {exc}")
                return

    def _accept(self, message: Any) -> None:
        if self._hello is not None and not self._hello.done():
            self._hello.set_result(dict(message["hello"]))
            return
        if self._done is None or self._done.done() or len(self._results) + len(message) > self._expected:
            raise ValueError("answer without a call")
        for status, output, error, latency_ms, memory_mb in message:
            if status not in _STATUSES or (error is not None and not isinstance(error, str)):
                raise ValueError(f"bad answer {status!r:.50}")
            self._results.append(Outcome(status, output, error, float(latency_ms), memory_mb))
        self._last_progress = asyncio.get_running_loop().time()
        if len(self._results) == self._expected:
            self._done.set_result(None)

    def _on_exit(self) -> None:
        if self.kill_reason is None:
            code = self._transport.get_returncode() if self._transport else None
            self.kill_reason = f"sandbox process exited (code {code})"
        if self._hello is not None and not self._hello.done():
            self._hello.set_exception(SandboxDied(self.kill_reason))
        if self._done is not None and not self._done.done():
            self._done.set_exception(SandboxDied(self.kill_reason))

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
        shutil.rmtree(self._scratch, ignore_errors=True)


class SandboxPool:
    """A fixed number of sandbox processes; run() spreads a batch of calls over the idle ones."""

    def __init__(self, processes: int, memory_mb: int = 512, max_output: int = 1_000_000,
                 chunk_size: int = 200) -> None:
        self._size = processes
        self._memory_mb = memory_mb
        self._max_output = max_output
        self._chunk_size = chunk_size
        self._idle: asyncio.Queue[SandboxProcess] = asyncio.Queue()
        self._all: list[SandboxProcess] = []
        self.replaced = 0

    async def start(self) -> None:
        started = await asyncio.gather(*(self._spawn() for _ in range(self._size)))
        for process in started:
            self._idle.put_nowait(process)
        log.info("sandbox pool: %d processes, protections %s", self._size, started[0].protections)

    @property
    def protections(self) -> dict[str, Any]:
        return self._all[0].protections if self._all else {}

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._all if p.alive and p.pid is not None]

    async def _spawn(self) -> SandboxProcess:
        process = SandboxProcess(self._memory_mb, self._max_output)
        await process.start()
        self._all.append(process)
        return process

    async def run(self, calls: Sequence[Call]) -> list[Outcome]:
        """Outcomes in the order of calls."""
        if not calls:
            return []
        size = max(1, min(self._chunk_size, -(-len(calls) // self._size)))
        chunks = [calls[i:i + size] for i in range(0, len(calls), size)]
        if len(chunks) == 1:
            return await self._run_chunk(chunks[0])
        parts = await asyncio.gather(*(self._run_chunk(chunk) for chunk in chunks))
        return [outcome for part in parts for outcome in part]

    async def _run_chunk(self, calls: Sequence[Call], stream: bool = False, retried: bool = False) -> list[Outcome]:
        process = await self._idle.get()
        while not process.alive:  # died while idle: not the fault of these calls
            await self._replace(process)
            process = await self._idle.get()
        try:
            outcomes = await process.run(calls, stream)
        except SandboxDied as death:
            return await self._after_death(process, calls, str(death), stream, retried)
        self._idle.put_nowait(process)
        return outcomes

    async def _after_death(self, process: SandboxProcess, calls: Sequence[Call], reason: str, stream: bool,
                           retried: bool) -> list[Outcome]:
        done = list(process._results)
        await self._replace(process)
        unanswered = calls[len(done):]
        if not stream and len(unanswered) > 1:
            # Answers since the last flush were lost with the process: find the culprit call by call.
            return [*done, *await self._run_chunk(unanswered, stream=True)]
        failed, rest = unanswered[0], unanswered[1:]
        if reason.startswith("call exceeded"):
            outcome = Outcome("timeout", error=f"{reason}; its sandbox process was killed and replaced")
        elif retried:
            outcome = Outcome("error", error=f"{reason} twice while running this call")
        else:
            # Maybe not this call's fault (killed from outside, say): one more try in a fresh process.
            outcome = (await self._run_chunk([failed], stream=True, retried=True))[0]
        tail = await self._run_chunk(rest) if rest else []
        return [*done, outcome, *tail]

    async def _replace(self, process: SandboxProcess) -> None:
        self.replaced += 1
        log.warning("sandbox process %s replaced: %s", process.pid, process.kill_reason)
        await process.stop()
        self._all.remove(process)
        self._idle.put_nowait(await self._spawn())

    async def stop(self) -> None:
        await asyncio.gather(*(p.stop() for p in self._all), return_exceptions=True)
        self._all.clear()
        with contextlib.suppress(asyncio.QueueEmpty):
            while True:
                self._idle.get_nowait()
