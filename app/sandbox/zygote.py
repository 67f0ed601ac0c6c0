"""The zygote: one process per pool, started inside the boundary with the interpreter and every module a program
may import already loaded. On the worker's request it forks a child, which locks itself down and serves one
sandbox process's protocol (app/sandbox/child.py). The zygote runs no program code and never sees task data."""

from __future__ import annotations

import array
import ctypes
import gc
import os
import resource
import select
import signal
import socket
import struct
import sys

from app.domain.programs import ProgramCompiler
from app.sandbox import child

# Started with argv: memory_mb cpu_s max_output open_files control_fd seccomp_hex. Control protocol, on a
# SOCK_SEQPACKET socket, every message MESSAGE (tag, pid, value): the zygote says b"R" once ready; the worker asks
# b"S" with two fds attached (SCM_RIGHTS): the child's channel (a stream socket) and its progress page (a memfd);
# the zygote answers b"P" (pid: the child's, in the zygote's pid namespace) with the child's pidfd attached, or b"F"
# (value: errno) if it could not fork. When a child ends, the zygote reaps it and says b"X" (pid, exit code). Its
# b"R" carries its own pidfd.

MESSAGE = struct.Struct("=cii")  # tag, pid, value
_PR_SET_PDEATHSIG = 1
_FDS = struct.Struct("ii")  # the two fds a request carries
_libc = ctypes.CDLL(None, use_errno=True)
_NICENESS = 10


def die_with_parent(parent: int) -> None:
    """Be killed when the process that started this one exits (the worker, for a zygote started without
    bubblewrap; the zygote, for a child); exit now if it already has."""
    if _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(70)
    if os.getppid() != parent:
        os._exit(70)


def main(probe: str | None = None) -> None:
    """The zygote's life: load everything a child needs, then fork children on request until the worker hangs
    up. With `probe` (Python source), every child locks down and then runs it instead of serving (the isolation
    tests run unrestricted code this way, as a program that got past the static check would)."""
    memory_mb, cpu_s, max_output, open_files, control_fd = (int(arg) for arg in sys.argv[1:6])
    seccomp_filter = bytes.fromhex(sys.argv[6])
    die_with_parent(os.getppid())
    zygote = os.getpid()
    control = socket.socket(fileno=control_fd)
    compiler = ProgramCompiler()  # imports every allowed module once, for every child
    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # a handler, so that the wakeup fd is written
    signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    # Every child inherits this: under contention for the cores the worker (its hot path of every task) runs
    # first, and a program that spins takes CPU from the other programs, not from the worker.
    os.nice(_NICENESS)
    gc.collect()
    gc.freeze()  # what is loaded now stays out of the collector: children keep sharing its pages
    _send(control, MESSAGE.pack(b"R", zygote, 0), os.pidfd_open(zygote))  # its own pidfd: the worker measures it
    poller = select.poll()
    poller.register(control, select.POLLIN)
    poller.register(wake_read, select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            if fd == wake_read:
                _drain(wake_read)
                _reap(control)
                continue
            message, ancillary, _, _ = control.recvmsg(MESSAGE.size, socket.CMSG_SPACE(_FDS.size))
            if not message:
                os._exit(0)  # the worker hung up; the children die with this process
            fds = received_fds(ancillary)
            if message[:1] != b"S" or len(fds) != 2:
                for received in fds:
                    os.close(received)
                control.send(MESSAGE.pack(b"F", 0, 22))
                continue
            try:
                pid = os.fork()
            except OSError as exc:
                control.send(MESSAGE.pack(b"F", 0, exc.errno or 0))
                pid = -1
            if pid == 0:
                _become_child(zygote, control, fds, compiler, probe, memory_mb, cpu_s, max_output, open_files,
                              seccomp_filter)
            for received in fds:
                os.close(received)
            if pid > 0:
                try:
                    pidfd = os.pidfd_open(pid)
                except OSError as exc:  # a child the worker could not kill is not handed out
                    os.kill(pid, signal.SIGKILL)
                    control.send(MESSAGE.pack(b"F", 0, exc.errno or 0))
                else:
                    _send(control, MESSAGE.pack(b"P", pid, 0), pidfd)


def _send(control: socket.socket, message: bytes, pidfd: int) -> None:
    """Send a message with a pidfd attached, and close the zygote's copy of it."""
    try:
        control.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [pidfd]))])
    finally:
        os.close(pidfd)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _reap(control: socket.socket) -> None:
    """Reap every child that has ended and tell the worker its exit code (before any later fork could reuse its
    pid: this loop is the only one that forks)."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        control.send(MESSAGE.pack(b"X", pid, os.waitstatus_to_exitcode(status)))


def received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds a control message carried (SCM_RIGHTS), in order; the worker's side reads its answers with it too."""
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return list(fds)


def _become_child(zygote: int, control: socket.socket, fds: list[int], compiler: ProgramCompiler, probe: str | None,
                  memory_mb: int, cpu_s: int, max_output: int, open_files: int, seccomp_filter: bytes) -> None:
    """The forked child: keep only its own two fds, drop everything of the zygote's, lock down, serve. Never
    returns to the zygote's loop, whatever happens."""
    code = 70
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        control.detach()  # closed below with every other fd; its object must not close a reused number later
        die_with_parent(zygote)
        channel, page = fds
        _close_all_but(channel, page)  # the control socket, the wakeup pipe, anything the zygote inherited
        os.environ.clear()
        if probe is None:
            child.serve(channel, page, compiler, memory_mb, cpu_s, max_output, open_files, seccomp_filter)
        else:
            _run_probe(probe, channel, page, memory_mb, cpu_s, open_files, seccomp_filter)
        code = 0
    except SystemExit as exc:  # a probe's own exit
        code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    finally:
        os._exit(code)


def _close_all_but(*kept: int) -> None:
    """Close every fd but `kept` (the zygote's control socket, its wakeup pipe, whatever it inherited)."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limit = limit if 0 < limit < 1 << 30 else 1 << 20
    low = 0
    for fd in sorted(kept):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, limit)


def _run_probe(probe: str, channel: int, page: int, memory_mb: int, cpu_s: int, open_files: int,
               seccomp_filter: bytes) -> None:
    """Lock down as a served child does, then run the probe with its channel as stdin and stdout and its page's
    fd in sys.argv[5]."""
    os.dup2(channel, 0)
    os.dup2(channel, 1)
    os.close(channel)
    devnull = os.open(os.devnull, os.O_RDONLY)
    if devnull != 2:
        os.dup2(devnull, 2)
        os.close(devnull)
    sys.argv[5] = str(page)
    child.lock_down(memory_mb, cpu_s, open_files, seccomp_filter)
    exec(compile(probe, "<probe>", "exec"), {"__name__": "__probe__"})
