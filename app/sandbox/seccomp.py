"""The seccomp allow-list of a sandbox process: built by libseccomp (through pyseccomp) in the worker, loaded by
the sandbox process itself once its interpreter has started and before it reads any program."""

from __future__ import annotations

import ctypes
import errno
import os
import tempfile

# Default deny (EPERM). Allowed: what a running CPython needs to compute, allocate memory, read and write the
# fds it already holds, keep time and take its own timer signal. Not allowed, among everything else: process
# creation and exec, ptrace and process_vm_*, pidfd_*, signals to any process, sockets, mount/unshare/setns,
# prlimit, keyctl, bpf, perf_event_open, userfaultfd, io_uring, and any open for writing.
#
# Sandbox processes forked by one zygote share a pid namespace and a uid, so no allowed syscall may take another
# process as its argument: sched_getaffinity only of itself, clocks only the fixed ones (a negative clock id is
# another process's CPU clock, which would tell the process exists and how much CPU its task uses), and fcntl only
# the commands that concern the fd itself (F_SETOWN/F_SETSIG would have the kernel send any signal, SIGKILL
# included, to any process of the uid whenever the worker writes to the channel).

# Syscalls a running interpreter uses (found by running every allowed module under this filter: the tests in
# tests/sandbox exercise them). Lookups of names unknown on an architecture are skipped.
ALLOWED = (
    # its channel, its progress page and the read-only files it opens
    "read readv write writev close fstat newfstatat statx lseek pread64 dup"
    # memory
    " brk mmap munmap mremap mprotect madvise"
    # its own signals and timers (the per-call timeout is SIGALRM from setitimer)
    " rt_sigaction rt_sigprocmask rt_sigreturn sigaltstack setitimer getitimer"
    # time, randomness, identity of itself, accounting
    " gettimeofday nanosleep getrandom getrusage"
    " getpid gettid getppid getuid geteuid getgid getegid"
    " futex sched_yield getcwd"
    " exit exit_group"
).split()

# Allowed only with these arguments (index, value), one rule each: nothing that names another process.
_ALLOWED_WITH = {
    # duplicate, close-on-exec and status flags of its own fds (not F_SETOWN, F_SETOWN_EX, F_SETSIG, leases…)
    "fcntl": [(1, cmd) for cmd in (0, 1, 2, 3, 4, 1030)],  # F_DUPFD F_GETFD F_SETFD F_GETFL F_SETFL F_DUPFD_CLOEXEC
    "sched_getaffinity": [(0, 0)],  # its own
}
# The fixed clocks (REALTIME … TAI are 0-11; the kernel has 16 slots); a negative id names a process's CPU clock.
_CLOCK_SYSCALLS = ("clock_gettime", "clock_getres", "clock_nanosleep")
_FIXED_CLOCKS = 16
# O_WRONLY | O_RDWR | O_CREAT | O_TRUNC | O_APPEND | O_TMPFILE's directory bit: any of these means a write.
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | 0o20000000
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


def build_filter() -> bytes:
    """The compiled BPF program (for this machine's architecture), as bytes to hand to a sandbox process."""
    import pyseccomp as seccomp  # the worker only: it finds libseccomp through the host's library cache

    flt = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM))
    for name in ALLOWED:
        try:
            flt.add_rule(seccomp.ALLOW, name)
        except (OSError, ValueError, RuntimeError):  # not a syscall on this architecture
            continue
    for name, rules in _ALLOWED_WITH.items():
        for arg, value in rules:
            flt.add_rule(seccomp.ALLOW, name, seccomp.Arg(arg, seccomp.EQ, value))
    for name in _CLOCK_SYSCALLS:
        flt.add_rule(seccomp.ALLOW, name, seccomp.Arg(0, seccomp.LT, _FIXED_CLOCKS))
    # Files open read-only (a lazily imported stdlib module); the filesystem is read-only anyway.
    for name, arg in (("openat", 2), ("open", 1)):
        try:
            flt.add_rule(seccomp.ALLOW, name, seccomp.Arg(arg, seccomp.MASKED_EQ, _WRITE_FLAGS, 0))
        except (OSError, ValueError, RuntimeError):
            continue
    with tempfile.TemporaryFile() as compiled:
        flt.export_bpf(compiled)
        compiled.seek(0)
        return compiled.read()


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load_filter(program: bytes) -> None:
    """Load a compiled filter on the calling process (irreversible, and inherited by nothing: it cannot fork).
    Raises OSError if the kernel refuses."""
    libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed")
