"""The worker's end of the zygote (app/sandbox/zygote.py runs inside the boundary): starts it, asks it for
sandbox processes (each handed over as a channel and a pidfd), hears when they end, restarts it if it died."""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections import deque
from collections.abc import Callable

from app.sandbox.boundary import Boundary, SandboxUnavailable
from app.sandbox.zygote import MESSAGE, received_fds

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 30.0
_STDERR_KEPT = 4096
_STOP_GRACE_S = 1.0  # for the zygote to exit once asked, before it is killed


def host_pid(pidfd: int) -> int | None:
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
        """Ready, and neither failed to start nor gone since."""
        return self._control is not None and self._ready is not None and self._ready.done() \
            and not self._ready.exception()

    @property
    def pid(self) -> int | None:
        """The zygote's host pid (for measuring its memory)."""
        return None if self._pidfd is None else host_pid(self._pidfd)

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
            fds = received_fds(ancillary)
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
                    pidfd_kill(fds[0])
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
            pidfd_kill(self._pidfd)
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


def pidfd_kill(pidfd: int) -> None:
    """SIGKILL through a pidfd (no pid can be reused under it); a process already ended is no error."""
    with contextlib.suppress(OSError):  # it has ended already
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
