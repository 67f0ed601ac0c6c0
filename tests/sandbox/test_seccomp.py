"""The seccomp allow-list on its own: a plain interpreter loads the compiled filter and tries what it allows and what
it does not, the syscalls allowed only with some arguments both ways. (The whole boundary, namespaces and rlimits
included, is probed in test_boundary.py; processes against each other in test_zygote.py.)"""

import json
import os
import platform
import subprocess
import sys

import pytest

from app.sandbox.seccomp import build_filter

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="the probe calls syscalls by x86-64 number")

# Runs after the filter is loaded: each attempt reports "allowed" or the errno's name. It writes its findings to
# stdout, an fd it already holds (allowed).
PROBE = r"""
import ctypes, errno, fcntl, json, os, socket, sys, time
from app.sandbox.seccomp import load_filter
program = sys.stdin.buffer.read()
libc = ctypes.CDLL(None, use_errno=True)
load_filter(program)
found = {}
def attempt(name, fn):
    try:
        fn()
        found[name] = "allowed"
    except OSError as exc:
        found[name] = errno.errorcode.get(exc.errno, str(exc.errno))
def syscall(number, *args):
    def call():
        if libc.syscall(number, *args) == -1:
            raise OSError(ctypes.get_errno(), "")
    return call
timespec = ctypes.create_string_buffer(16)
attempt("compute and allocate", lambda: bytearray(1 << 24))
attempt("read the clock", lambda: time.monotonic())
attempt("its own fd's flags (F_GETFL)", lambda: fcntl.fcntl(1, fcntl.F_GETFL))
attempt("signals from its fd to a process (F_SETOWN)", lambda: fcntl.fcntl(1, fcntl.F_SETOWN, os.getpid()))
attempt("its own affinity", lambda: os.sched_getaffinity(0))
attempt("another process's affinity", lambda: os.sched_getaffinity(1))
attempt("a fixed clock (clock_gettime)", syscall(228, 1, timespec))
attempt("a process's CPU clock (clock_gettime)", syscall(228, (~1 << 3) | 2, timespec))
attempt("open to read", lambda: os.close(os.open("/proc/self/status", os.O_RDONLY)))
attempt("open to write", lambda: os.open("/dev/null", os.O_WRONLY))
attempt("create a file", lambda: os.open("/tmp/loopai-seccomp-probe", os.O_RDONLY | os.O_CREAT))
attempt("socket", lambda: socket.socket())
attempt("fork", lambda: os.fork())
attempt("kill", lambda: os.kill(os.getpid(), 0))
attempt("prctl", syscall(157, 38, 1, 0, 0, 0))
os.write(1, json.dumps(found).encode())
"""
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def found() -> dict[str, str]:
    probe = subprocess.run([sys.executable, "-c", PROBE], input=build_filter(), capture_output=True, timeout=60,
                           cwd=REPO)
    assert probe.returncode == 0, probe.stderr.decode()[-2000:]
    return json.loads(probe.stdout)


@pytest.mark.parametrize("attempt", ["compute and allocate", "read the clock", "its own fd's flags (F_GETFL)",
                                     "its own affinity", "a fixed clock (clock_gettime)", "open to read"])
def test_what_a_running_interpreter_needs_is_allowed(found: dict[str, str], attempt: str) -> None:
    assert found[attempt] == "allowed"


@pytest.mark.parametrize("attempt", ["signals from its fd to a process (F_SETOWN)", "another process's affinity",
                                     "a process's CPU clock (clock_gettime)", "open to write", "create a file",
                                     "socket", "fork", "kill", "prctl"])
def test_everything_else_is_denied_with_eperm(found: dict[str, str], attempt: str) -> None:
    assert found[attempt] == "EPERM"


def test_the_filter_is_a_bpf_program() -> None:
    program = build_filter()
    assert program and len(program) % 8 == 0  # struct sock_filter: 8 bytes an instruction
