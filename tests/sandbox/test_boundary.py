"""The OS boundary on its own: unrestricted Python, in a process forked by the zygote and locked down exactly as a
sandbox process is, tries what a program that got past the static check would try. Every attempt fails, and
nothing outside changes. The weak (development) isolation is probed too: without namespaces, the rlimits and the
seccomp filter alone still deny every attempt."""

import asyncio
import json
import os
import resource
import socket
from pathlib import Path

import pytest

from app.sandbox.boundary import MALLOC_ENVIRONMENT, Boundary, Limits, SandboxUnavailable
from app.sandbox.pool import SandboxPool
from app.sandbox.zygote_host import Zygote
from tests.sandbox.probing import Probed, fork_child

REPO = Path(__file__).resolve().parents[2]
SECRET = "s3cret-broker-password"
LIMITS = (resource.RLIMIT_AS, resource.RLIMIT_FSIZE, resource.RLIMIT_NOFILE, resource.RLIMIT_CPU, resource.RLIMIT_NPROC)

PROBE = r"""
import ctypes, errno, json, os, resource, signal, socket, sys
marker, port, worker_pid, repo = json.loads(sys.stdin.buffer.readline())
libc = ctypes.CDLL(None, use_errno=True)
out = {}
def attempt(name, fn):
    try:
        value = fn()
        out[name] = "allowed" if value is None or value is True or value == 0 else f"allowed: {value!r}"[:200]
    except BaseException as exc:
        out[name] = "denied"
def syscall(number, *args):
    def call():
        if libc.syscall(number, *args) == -1:
            raise OSError(ctypes.get_errno(), "")
    return call
attempt("fork", os.fork)
attempt("exec", lambda: os.execv(sys.executable, [sys.executable, "-c", "1"]))
attempt("socket", lambda: socket.socket())
attempt("socketpair", lambda: socket.socketpair())
attempt("connect loopback", lambda: socket.create_connection(("127.0.0.1", port), timeout=1))
attempt("kill worker", lambda: os.kill(worker_pid, signal.SIGKILL))
attempt("kill pid 1", lambda: os.kill(1, signal.SIGKILL))
attempt("kill process group", lambda: os.kill(0, signal.SIGTERM))
attempt("write marker", lambda: open(marker, "w").write("x"))
attempt("write /tmp", lambda: open("/tmp/escape", "w").write("x"))
attempt("mkdir", lambda: os.mkdir("/sandbox/x"))
attempt("raise memory limit", lambda: resource.setrlimit(resource.RLIMIT_AS, (-1, -1)))
attempt("raise file limit", lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 30, 1 << 30)))
attempt("prlimit worker", lambda: resource.prlimit(worker_pid, resource.RLIMIT_AS))
attempt("ptrace attach", syscall(101, 16, worker_pid, 0, 0))
attempt("process_vm_readv", syscall(310, worker_pid, 0, 0, 0, 0, 0))
attempt("pidfd_open", syscall(434, worker_pid, 0))
attempt("unshare user", lambda: os.unshare(os.CLONE_NEWUSER))
attempt("setns", syscall(308, 0, 0))
attempt("mount", syscall(165, 0, 0, 0, 0, 0))
attempt("keyctl", syscall(250, 0, 0, 0, 0, 0))
attempt("bpf", syscall(321, 0, 0, 0))
attempt("perf_event_open", syscall(298, 0, 0, -1, -1, 0))
attempt("userfaultfd", syscall(323, 0))
attempt("io_uring_setup", syscall(425, 8, 0))
attempt("memfd_create", lambda: os.memfd_create("x"))
attempt("setuid root", lambda: os.setuid(0))
attempt("chroot", lambda: os.chroot("/"))
out["uid"] = os.getuid()
out["environ"] = dict(os.environ)
attempt("list a directory", lambda: os.listdir("/"))
out["visible"] = [path for path in ("/etc/passwd", "/etc", "/tmp", "/home", "/var", "/root/.bashrc", "/run", "/sys")
                  if os.path.exists(path)]
out["repo visible"] = os.path.exists(repo)
out["proc visible"] = os.path.exists("/proc/1")
out["compute"] = sum(range(1000))
os.write(1, json.dumps(out).encode())
"""


def run_probe(boundary: Boundary, *args: str | int) -> dict:
    """Run PROBE in a child of a zygote of `boundary`, given args on its channel; what it found."""
    async def probe() -> dict:
        zygote = Zygote(Probed(boundary.limits, boundary.isolation, probe=PROBE,
                               secret={"LOOPAI_SASL_PASSWORD": SECRET}))
        try:
            child = await fork_child(zygote)
            try:
                await child.send(json.dumps(args).encode() + b"\n")
                found = json.loads(await child.read_to_end())
                assert await asyncio.wait_for(child.exit_code, 20) == 0, zygote.stderr.decode()[-2000:]
            finally:
                child.close()
            assert zygote.pid is not None
            found["zygote environ"] = Path(f"/proc/{zygote.pid}/environ").read_bytes().decode().split("\0")[:-1]
            return found
        finally:
            await zygote.stop()

    return asyncio.run(probe())


def probe_outside(tmp_path_factory: pytest.TempPathFactory, isolation: str) -> dict:
    marker = tmp_path_factory.mktemp("outside") / "marker"
    limits = {limit: resource.getrlimit(limit) for limit in LIMITS}
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        outcome = run_probe(Boundary(Limits(memory_mb=256), isolation), str(marker), port, os.getpid(), str(REPO))
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    assert not marker.exists()
    outcome["worker limits kept"] = limits == {limit: resource.getrlimit(limit) for limit in LIMITS}
    return outcome


@pytest.fixture(scope="module", params=["strict", "weak"])
def probe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return probe_outside(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def strict_probe(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return probe_outside(tmp_path_factory, "strict")


ESCAPES = [
    "fork", "exec", "socket", "socketpair", "connect loopback", "kill worker", "kill pid 1", "kill process group",
    "write marker", "write /tmp", "mkdir", "raise memory limit", "raise file limit", "prlimit worker",
    "ptrace attach", "process_vm_readv", "pidfd_open", "unshare user", "setns", "mount", "keyctl", "bpf",
    "perf_event_open", "userfaultfd", "io_uring_setup", "memfd_create", "setuid root", "chroot",
    "list a directory",
]


@pytest.mark.parametrize("attempt", ESCAPES)
def test_escape_is_denied(probe: dict, attempt: str) -> None:
    assert probe[attempt] == "denied"


def test_process_has_nothing_of_the_host(strict_probe: dict) -> None:
    probe = strict_probe
    assert probe["uid"] == 65534
    # The zygote, and so every process it forks, starts with nothing of the worker's environment: only what
    # bubblewrap sets itself and the allocator's tuning (which a forked process then clears).
    assert sorted(probe["zygote environ"]) == sorted(["PWD=/", *(f"{name}={value}" for name, value in
                                                                 MALLOC_ENVIRONMENT.items())])
    assert SECRET not in json.dumps(probe)
    assert probe["visible"] == []  # no /etc, /tmp, /home, /sys, nothing of root's home but the Python install
    assert probe["repo visible"] is False
    assert probe["proc visible"] is False
    assert probe["compute"] == sum(range(1000))
    assert os.getpid() > 0 and not Path("/tmp/escape").exists()


def test_process_has_no_environment(probe: dict) -> None:
    """Nothing of the worker's environment (no credentials), in either isolation: bubblewrap clears the zygote's,
    and a forked process clears what is left (the allocator's tuning, which the zygote's allocator has read)."""
    assert probe["environ"] == {}


def test_worker_keeps_its_limits(probe: dict) -> None:
    assert probe["worker limits kept"] is True  # the probe's limits stayed in its own process


async def test_strict_isolation_refuses_to_start_without_its_tool() -> None:
    boundary = Boundary(Limits(memory_mb=256))
    boundary.__dict__["bwrap"] = "/nonexistent/bwrap"  # as on a host without bubblewrap
    pool = SandboxPool(boundary, 1)
    with pytest.raises(SandboxUnavailable, match="LOOPAI_SANDBOX_ISOLATION=weak"):
        await pool.start()
    await pool.stop()


async def test_weak_isolation_keeps_rlimits_and_seccomp() -> None:
    pool = SandboxPool(Boundary(Limits(memory_mb=256), isolation="weak"), 1)
    await pool.start()
    try:
        assert pool.protections["seccomp"] is True and pool.protections["uid"] == os.getuid()
    finally:
        await pool.stop()
