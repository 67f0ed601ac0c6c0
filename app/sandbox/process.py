"""Sandbox processes from the worker's side: the zygote that forks them inside the boundary (Zygote), and one
process and its protocol (SandboxProcess): calls of one program version go in as a JSON line, answers come back in
frames; a watchdog on the call's progress page kills it when a call overruns its timeout (exact blame).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import mmap
import os
import signal
import socket
from collections import deque
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any, NamedTuple

import orjson

from app.sandbox.boundary import Boundary, SandboxUnavailable
from app.sandbox.child import MAX_ERROR_CHARS, PROGRESS
from app.sandbox.zygote import MESSAGE

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
_STDERR_KEPT = 4096
Owner = tuple[str, str]  # what a process is bound to: (task_id, program key)
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


def _host_pid(pidfd: int) -> int | None:
    """The pid, in the worker's pid namespace, of the process a pidfd refers to (None once it has ended)."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}", encoding="ascii") as info:
            for line in info:
                if line.startswith("Pid:"):
                    pid = int(line.split()[1])
                    return pid if pid > 0 else None
    except (OSError, ValueError, IndexError):
        return None
    return None


def _fds_of(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return list(fds)


class _ZygoteProtocol(asyncio.SubprocessProtocol):
    def __init__(self, zygote: Zygote) -> None:
        self._zygote = zygote
        self.exited = asyncio.get_running_loop().create_future()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if len(self._zygote.stderr) < _STDERR_KEPT:
            self._zygote.stderr += data[: _STDERR_KEPT - len(self._zygote.stderr)]

    def process_exited(self) -> None:
        self.exited.set_result(None)
        if self._zygote._protocol is self:  # not a zygote already replaced
            self._zygote._on_gone("the sandbox zygote exited")


class Zygote:
    """The worker's end of a zygote (app/sandbox/zygote.py), one per pool: starts it inside the boundary, asks it
    for sandbox processes, hears when they end, and starts it again if it died (its processes die with it)."""

    def __init__(self, boundary: Boundary) -> None:
        self._boundary = boundary
        self._transport: asyncio.SubprocessTransport | None = None
        self._protocol: _ZygoteProtocol | None = None
        self._control: socket.socket | None = None
        self._ready: asyncio.Future[None] | None = None
        self._pending: deque[tuple[asyncio.Future[tuple[int, int]], Callable[[int | None], None]]] = deque()
        self._children: dict[int, Callable[[int | None], None]] = {}  # pid in the zygote's namespace -> on_exit
        self._writable: asyncio.Future[None] | None = None
        self._starting = asyncio.Lock()
        self._pidfd: int | None = None
        self.stderr = bytearray()
        self.started = 0  # zygotes started, the first one included

    @property
    def alive(self) -> bool:
        return self._control is not None and self._ready is not None and self._ready.done() \
            and not self._ready.exception()

    @property
    def pid(self) -> int | None:
        """The zygote's host pid (for measuring its memory)."""
        return None if self._pidfd is None else _host_pid(self._pidfd)

    async def start(self) -> None:
        """Start the zygote unless it runs. Raises SandboxUnavailable (with what to do) if it cannot start."""
        async with self._starting:
            if self.alive:
                return
            await self._stop()
            loop = asyncio.get_running_loop()
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                argv = self._boundary.command(theirs.fileno())
            except SandboxUnavailable:
                ours.close()
                theirs.close()
                raise
            self.stderr.clear()
            self._ready = ready = loop.create_future()
            try:
                ours.setblocking(False)
                self._control = ours
                loop.add_reader(ours.fileno(), self._on_control)
                self._transport, self._protocol = await loop.subprocess_exec(
                    lambda: _ZygoteProtocol(self), *argv,
                    stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE, env=self._boundary.environment(), pass_fds=(theirs.fileno(),),
                )
                theirs.close()
                self.started += 1
                await asyncio.wait_for(asyncio.shield(ready), _START_TIMEOUT_S)
            except (OSError, TimeoutError, SandboxUnavailable) as exc:  # it could not start, or died starting
                theirs.close()
                await self._stop()
                detail = self.stderr.decode(errors="replace") or str(exc)
                raise SandboxUnavailable(self._boundary.explain(detail)) from exc

    async def spawn(self, channel_fd: int, page_fd: int, on_exit: Callable[[int | None], None]) -> tuple[int, int]:
        """Fork a sandbox process holding `channel_fd` and `page_fd` (the caller closes its copies). Returns its
        pid in the zygote's namespace and its pidfd (the caller's to close); on_exit(code) is called when it ends
        (code None: its zygote died, and it with it)."""
        await self.start()
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[tuple[int, int]] = loop.create_future()
        request = [MESSAGE.pack(b"S", 0, 0)]
        fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [channel_fd, page_fd]))]
        while True:
            control = self._control
            if control is None:
                raise SandboxUnavailable("the sandbox zygote exited")
            try:
                control.sendmsg(request, fds)
                break
            except BlockingIOError:  # the zygote is behind (it queues 10 requests at most): wait for room
                await asyncio.shield(self._room(control))
            except OSError as exc:
                self._on_gone(f"the sandbox zygote's control socket failed: {exc}")
        self._pending.append((answer, on_exit))
        return await answer

    def _room(self, control: socket.socket) -> asyncio.Future[None]:
        """Done when the control socket takes a message again (or is gone). One future for every request that
        waits: the loop keeps one writer callback per fd, so each waiter adding its own would drop the others'."""
        if self._writable is None or self._writable.done():
            loop = asyncio.get_running_loop()
            self._writable = writable = loop.create_future()

            def ready() -> None:
                loop.remove_writer(control.fileno())
                if not writable.done():
                    writable.set_result(None)

            loop.add_writer(control.fileno(), ready)
        return self._writable

    def _on_control(self) -> None:
        """Messages from the zygote: ready, a forked child's pid and pidfd (in request order), a child's end."""
        while self._control is not None:
            try:
                message, ancillary, _, _ = self._control.recvmsg(MESSAGE.size, socket.CMSG_SPACE(4))
            except BlockingIOError:
                return
            except OSError as exc:
                self._on_gone(f"the sandbox zygote's control socket failed: {exc}")
                return
            fds = _fds_of(ancillary)
            if len(message) != MESSAGE.size:
                for fd in fds:
                    os.close(fd)
                self._on_gone("the sandbox zygote exited" if not message else "malformed message from the zygote")
                return
            tag, pid, value = MESSAGE.unpack(message)
            if tag == b"X":
                on_exit = self._children.pop(pid, None)
                if on_exit is not None:
                    on_exit(value)
            elif tag == b"P" and len(fds) == 1 and self._pending:
                answer, on_exit = self._pending.popleft()
                self._children[pid] = on_exit
                if answer.done():  # its spawn was cancelled: nobody will use it
                    _pidfd_kill(fds[0])
                    os.close(fds[0])
                else:
                    answer.set_result((pid, fds[0]))
            elif tag == b"F" and not fds and self._pending:
                answer, _ = self._pending.popleft()
                if not answer.done():
                    answer.set_exception(SandboxUnavailable(f"the sandbox zygote cannot fork: {os.strerror(value)}"))
            elif tag == b"R" and len(fds) == 1 and self._ready is not None and not self._ready.done():
                self._pidfd = fds[0]
                self._ready.set_result(None)
            else:
                for fd in fds:
                    os.close(fd)
                self._on_gone(f"unexpected message from the zygote: {tag!r}")
                return

    def _on_gone(self, reason: str) -> None:
        """The zygote died (or must be taken as dead): every process it forked goes with it."""
        if self._control is not None:
            asyncio.get_running_loop().remove_reader(self._control.fileno())
            asyncio.get_running_loop().remove_writer(self._control.fileno())
            self._control.close()
            self._control = None
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)  # its waiters find the control socket gone
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(SandboxUnavailable(reason))
            self._ready.exception()  # retrieved: start() reports it
        while self._pending:
            answer, _ = self._pending.popleft()
            if not answer.done():
                answer.set_exception(SandboxUnavailable(reason))
        children, self._children = self._children, {}
        for on_exit in children.values():
            on_exit(None)
        # Killed through its pidfd: bubblewrap's init exits with it, and everything in its pid namespace. (Not
        # through the transport: Popen.kill() polls, which can reap the process before asyncio's child watcher.)
        if self._pidfd is not None:
            _pidfd_kill(self._pidfd)
        elif self._transport is not None and self._transport.get_returncode() is None:
            self._transport.kill()  # it never said it was ready

    async def _stop(self) -> None:
        self._on_gone("the sandbox zygote was stopped")
        if self._transport is not None and self._protocol is not None:
            transport, self._transport = self._transport, None
            with contextlib.suppress(TimeoutError):  # reaped by asyncio's child watcher, not by close()
                await asyncio.wait_for(asyncio.shield(self._protocol.exited), _STOP_GRACE_S)
            transport.close()
            self._protocol = None
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def abandon(self) -> None:
        """Kill the zygote, and with it every process it forked, without waiting (when nothing may be awaited)."""
        self._on_gone("the sandbox zygote was abandoned")

    async def stop(self) -> None:
        """Stop the zygote and, with it, every process it forked."""
        async with self._starting:
            await self._stop()


def _pidfd_kill(pidfd: int) -> None:
    with contextlib.suppress(OSError):  # it has ended already
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)


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
            self._host_pid = _host_pid(self._pidfd)
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
            _pidfd_kill(self._pidfd)

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

    def _on_exit(self, code: int | None) -> None:
        """Its zygote reaped it (code None: the zygote died, which kills it too)."""
        self._exited = True
        self._exit_code = code
        if code is None and self._pidfd is not None:
            _pidfd_kill(self._pidfd)
        if self._closed or self._transport is None:
            self._on_lost()

    def _on_closed(self) -> None:
        """Its channel is closed and everything it wrote has been read."""
        self._closed = True
        if self._exited:
            self._on_lost()
        elif self._pidfd is not None:  # exiting, or it closed its end and runs on: it serves nobody any more
            _pidfd_kill(self._pidfd)

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
