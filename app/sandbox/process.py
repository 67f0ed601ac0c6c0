"""One sandbox process from the worker's side (SandboxProcess): calls of one program version go in as a JSON
line, answers come back in frames; a watchdog on the call's progress page kills it when a call overruns its
timeout (exact blame)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import socket
from collections.abc import Sequence
from operator import itemgetter
from typing import Any, NamedTuple

import orjson

from app.sandbox.boundary import Boundary, SandboxUnavailable
from app.sandbox.calls import Call, Outcome
from app.sandbox.child import MAX_ERROR_CHARS, PROGRESS
from app.sandbox.zygote_host import Zygote, host_pid, pidfd_kill

log = logging.getLogger(__name__)

_GRACE_S = 0.25  # beyond a call's own timeout, before the process is killed from outside
_START_TIMEOUT_S = 30.0
_STOP_GRACE_S = 1.0  # for a process to exit once its channel is closed, before it is killed
_STATUSES = frozenset({"ok", "error", "timeout"})
_NUMBER = (int, float)
# A latency is 0 (a program that did not load) or a difference of two readings of a nanosecond clock. Anything
# smaller than this would open buckets of its own in the task's latency sketch, one per 2 % down to 1e-308,
# and every daily-stats partial would carry them all.
_MIN_LATENCY_MS = 1e-7
Owner = tuple[str, str]  # what a process is bound to: (task_id, program key)
_input = itemgetter(4)  # of a Call

class SandboxDied(Exception):
    """The process ended before answering every call of its batch."""

    def __init__(self, reason: str, answers: list[Outcome], running: int | None, timed_out: bool) -> None:
        super().__init__(reason)
        self.answers = answers  # answers received, in call order
        self.running = running  # index (in the batch) of the call running when it ended, if any
        self.timed_out = timed_out  # killed by the watchdog for overrunning that call's timeout


class Memory(NamedTuple):
    """A process's memory in bytes (/proc/PID/smaps_rollup): resident, proportional (shared pages divided among the
    processes sharing them), and its own (unique: pages no other process maps, Private_Clean + Private_Dirty)."""

    rss: int
    pss: int
    uss: int


def measure_memory(pid: int) -> Memory | None:
    """The memory of a host process, or None if it is gone (or /proc cannot be read)."""
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as rollup:
            for line in rollup:
                name, _, rest = line.partition(":")
                value = rest.split()
                if len(value) == 2 and value[1] == "kB":
                    fields[name] = int(value[0]) << 10
    except (OSError, ValueError):
        return None
    if "Rss" not in fields:
        return None
    return Memory(fields["Rss"], fields.get("Pss", 0), fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0))

class _Channel(asyncio.Protocol):
    def __init__(self, owner: SandboxProcess) -> None:
        self._owner = owner

    def data_received(self, data: bytes) -> None:
        self._owner._on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:  # the process's end is closed (it exited) and drained
        self._owner._on_closed()


class SandboxProcess:
    """One sandbox process, forked by a zygote for it alone: its channel, its pidfd and its progress page."""

    def __init__(self, boundary: Boundary, zygote: Zygote | None = None) -> None:
        self._boundary = boundary
        # Without a zygote of the caller's, the process has a zygote of its own, stopped with it.
        self._zygote = zygote if zygote is not None else Zygote(boundary)
        self._own_zygote = zygote is None
        # Answers are flushed before a line holds more than max_output bytes of outputs and errors; the last one
        # added may bring up to max_output more.
        self._max_line = 2 * boundary.limits.max_output + (1 << 20)
        self._transport: asyncio.Transport | None = None
        self._pidfd: int | None = None
        self._host_pid: int | None = None
        self._buffer = bytearray()
        self._page: mmap.mmap | None = None
        self._hello: asyncio.Future[dict[str, Any]] | None = None
        self._gone: asyncio.Future[None] | None = None
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
        self._exited = False  # its zygote reaped it (or died, and it with it)
        self._exit_code: int | None = None
        self._closed = False  # its channel is closed and drained
        self._lost = False
        self.loaded: set[str] = set()
        self.owner: Owner | None = None  # the task and program version it serves, once taken from the spares
        self.last_used = 0.0
        self.kill_reason: str | None = None
        self._killed_running: int | None = None
        self.protections: dict[str, Any] = {}

    async def start(self) -> None:
        """Have the zygote fork the process, and wait for it to say it is locked down."""
        loop = asyncio.get_running_loop()
        self._hello = loop.create_future()
        self._gone = loop.create_future()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            page_fd = os.memfd_create("loopai-progress", os.MFD_CLOEXEC)
            try:
                os.ftruncate(page_fd, PROGRESS.size)
                self._page = mmap.mmap(page_fd, PROGRESS.size)
                _, self._pidfd = await self._zygote.spawn(theirs.fileno(), page_fd, self._on_exit)
            finally:
                os.close(page_fd)
                theirs.close()  # the process holds the only other end now: its end closes when it exits
            self._host_pid = host_pid(self._pidfd)
            self._transport, _ = await loop.create_unix_connection(lambda: _Channel(self), sock=ours)
            self.protections = await asyncio.wait_for(self._hello, _START_TIMEOUT_S)
        except (SandboxDied, OSError, TimeoutError, SandboxUnavailable) as exc:
            if self._transport is None:
                ours.close()
            await self.stop()
            if isinstance(exc, SandboxUnavailable):
                raise
            detail = self._zygote.stderr.decode(errors="replace") or str(exc)
            raise SandboxUnavailable(self._boundary.explain(detail)) from exc
        except BaseException:  # cancelled while starting: nothing may be left running or open
            self.kill("start cancelled")
            if self._transport is None:
                ours.close()
            self._close()
            if self._own_zygote:
                self._zygote.abandon()
            raise

    @property
    def task(self) -> str | None:
        return None if self.owner is None else self.owner[0]

    @property
    def alive(self) -> bool:
        return self._transport is not None and not self._lost and not self._exited

    @property
    def pid(self) -> int | None:
        """Its host pid (the process itself: it has no bubblewrap of its own)."""
        return self._host_pid

    def memory(self) -> Memory | None:
        """Its memory now (None once it has ended)."""
        return None if self._host_pid is None or not self.alive else measure_memory(self._host_pid)

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
        self._transport.write(line)
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
        assert self._page is not None
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
        assert self._page is not None
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
        if self._pidfd is not None and not self._exited:
            pidfd_kill(self._pidfd)

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
        with memoryview(self._buffer) as view:  # one copy of the outputs (a bytearray slice would be a second)
            frame = bytes(view[end + 1:size])
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

    def _on_exit(self, code: int | None) -> None:
        """Its zygote reaped it (code None: the zygote died, which kills it too)."""
        self._exited = True
        self._exit_code = code
        if code is None and self._pidfd is not None:
            pidfd_kill(self._pidfd)
        if self._closed or self._transport is None:
            self._on_lost()

    def _on_closed(self) -> None:
        """Its channel is closed and everything it wrote has been read."""
        self._closed = True
        if self._exited:
            self._on_lost()
        elif self._pidfd is not None:  # exiting, or it closed its end and runs on: it serves nobody any more
            pidfd_kill(self._pidfd)

    def _on_lost(self) -> None:
        if self._lost:
            return
        self._lost = True
        if self.kill_reason is None:
            code = "its zygote died" if self._exit_code is None else f"code {self._exit_code}"
            self.kill_reason = f"sandbox process exited ({code})"
        if self._hello is not None and not self._hello.done():
            self._hello.set_exception(SandboxDied(self.kill_reason, [], None, False))
        if self._done is not None and not self._done.done():
            self._done.set_exception(SandboxDied(self.kill_reason, [], None, False))
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)

    async def stop(self) -> None:
        """End the process: its channel is closed for writing, and it exits; killed if it has not within 1 s."""
        if self._transport is not None and self._gone is not None and self.alive:
            self._transport.write_eof()  # EOF: the process leaves its loop and exits
            with contextlib.suppress(TimeoutError):  # then it is killed
                await asyncio.wait_for(asyncio.shield(self._gone), _STOP_GRACE_S)
        self.kill("stopped")
        self._close()
        if self._own_zygote:
            await self._zygote.stop()

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        if self._page is not None and not self._page.closed:
            self._page.close()
