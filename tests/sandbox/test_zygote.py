"""Processes forked by one zygote share its pid namespace, uid and pre-fork memory: here one of them, running
unrestricted Python after the same lock-down as a sandbox process (as a program that got past the static check
would), tries to see, signal, trace or read another one and the zygote. It cannot; and it holds no fd but its own.
Also: the pool's processes hold no shared writable memory, each gets its own random state, and the zygote's death
is survived."""

import asyncio
import json
import os
import platform
import signal
import socket
import stat
import time
from pathlib import Path

import pytest

from app.sandbox.boundary import Boundary, Limits
from app.sandbox.calls import Call
from app.sandbox.pool import SandboxPool
from app.sandbox.process import SandboxDied, SandboxProcess
from app.sandbox.zygote_host import Zygote
from tests.sandbox.probing import Child, Probed, fork_child

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="the probe calls syscalls by x86-64 number")

# A victim reports who it is, then echoes every line until its channel ends. An attacker is told the victim's and
# the zygote's pids (in their shared namespace) and a pid nobody has, tries everything against each, reports,
# arms a SIGIO aimed at its target, and waits for the worker's next line (which raises that SIGIO).
PROBE = r"""
import ctypes, json, os, signal, stat, sys, time
libc = ctypes.CDLL(None, use_errno=True)
def open_fds():
    found = []
    for fd in range(1 << 16):
        try:
            info = os.fstat(fd)
        except OSError:
            continue
        found.append([fd, info.st_ino, stat.S_IFMT(info.st_mode)])
    return found
def syscall(number, *args):
    if libc.syscall(number, *args) == -1:
        return os.strerror(ctypes.get_errno())
    return "succeeded"
def outcome(fn):
    try:
        fn()
        return "succeeded"
    except OSError as exc:
        return os.strerror(exc.errno)
order = json.loads(sys.stdin.buffer.readline())
if order["role"] == "victim":
    os.write(1, json.dumps({"pid": os.getpid(), "fds": open_fds()}).encode() + b"\n")
    for line in sys.stdin.buffer:
        os.write(1, line)
    raise SystemExit
buffer = ctypes.create_string_buffer(4096)
def attempts(pid):
    cpu_clock = (~pid << 3) | 2  # the process CPU clock of `pid`
    return {
        "kill 0": syscall(62, pid, 0),
        "kill SIGKILL": syscall(62, pid, 9),
        "kill its group": syscall(62, -pid, 9),
        "tkill": syscall(200, pid, 9),
        "tgkill": syscall(234, pid, pid, 9),
        "rt_sigqueueinfo": syscall(129, pid, 9, buffer),
        "pidfd_open": syscall(434, pid, 0),
        "ptrace attach": syscall(101, 16, pid, 0, 0),
        "ptrace seize": syscall(101, 0x4206, pid, 0, 0),
        "process_vm_readv": syscall(310, pid, buffer, 1, buffer, 1, 0),
        "process_vm_writev": syscall(311, pid, buffer, 1, buffer, 1, 0),
        "kcmp": syscall(312, os.getpid(), pid, 0, 0, 0),
        "prlimit": syscall(302, pid, 7, 0, buffer),
        "sched_getaffinity": syscall(204, pid, 128, buffer),
        "sched_setaffinity": syscall(203, pid, 128, buffer),
        "sched_getparam": syscall(143, pid, buffer),
        "sched_getscheduler": syscall(145, pid),
        "getpriority": syscall(140, 0, pid),
        "setpriority": syscall(141, 0, pid, 19),
        "ioprio_get": syscall(252, 1, pid),
        "get_robust_list": syscall(274, pid, buffer, buffer),
        "getpgid": syscall(121, pid),
        "getsid": syscall(124, pid),
        "setpgid": syscall(109, pid, pid),
        "waitid": syscall(247, 1, pid, buffer, 4, 0),
        "capget": syscall(125, (ctypes.c_uint32 * 2)(0x20080522, pid), buffer),
        "clock_gettime of its CPU clock": outcome(lambda: time.clock_gettime(cpu_clock)),
        "clock_getres of its CPU clock": outcome(lambda: time.clock_getres(cpu_clock)),
        "clock_nanosleep on its CPU clock": syscall(230, cpu_clock, 0, ctypes.create_string_buffer(16), 0),
        "its /proc entry": outcome(lambda: os.stat(f"/proc/{pid}")),
    }
report = {"pid": os.getpid(), "fds": open_fds()}
for name in ("victim", "zygote", "nobody"):
    report[name] = attempts(order[name])
target = {"victim": order["victim"], "zygote": order["zygote"], "zygote's group": -order["zygote"]}[order["aim"]]
F_SETOWN, F_SETSIG, F_SETOWN_EX, F_GETFL, F_SETFL = 8, 10, 15, 3, 4
owner = (ctypes.c_int * 2)(0 if target > 0 else 2, abs(target))  # F_OWNER_TID or F_OWNER_PGRP
report["SIGIO aimed"] = {
    "F_SETOWN": syscall(72, 0, F_SETOWN, target),
    "F_SETOWN_EX": syscall(72, 0, F_SETOWN_EX, owner),
    "F_SETSIG": syscall(72, 0, F_SETSIG, 9),
    "O_ASYNC": syscall(72, 0, F_SETFL, libc.syscall(72, 0, F_GETFL) | 0o20000),
}
os.write(1, json.dumps(report).encode() + b"\n")
# Data arriving on a socket raises SIGIO unless a reader is blocked waiting for it (the reader will get it): so
# wait for the worker's next line without blocking, as a program still busy when its next batch comes would.
libc.syscall(72, 0, F_SETFL, libc.syscall(72, 0, F_GETFL) | os.O_NONBLOCK)
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    try:
        if os.read(0, 100):
            break
    except BlockingIOError:
        pass
os.write(1, b"still here\n")
"""

TRIES = ["kill 0", "kill SIGKILL", "kill its group", "tkill", "tgkill", "rt_sigqueueinfo", "pidfd_open",
         "ptrace attach", "ptrace seize", "process_vm_readv", "process_vm_writev", "kcmp", "prlimit",
         "sched_getaffinity", "sched_setaffinity", "sched_getparam", "sched_getscheduler", "getpriority",
         "setpriority", "ioprio_get", "get_robust_list", "getpgid", "getsid", "setpgid", "waitid", "capget",
         "clock_gettime of its CPU clock", "clock_getres of its CPU clock", "clock_nanosleep on its CPU clock",
         "its /proc entry"]
NOBODY = 32000  # a pid no process has in the zygote's namespace (a fresh one: a few dozen pids are used)


async def attack(isolation: str, aim: str) -> tuple[dict, dict, Child, Zygote]:
    """A victim and an attacker forked by one zygote; the attacker's report, and the victim, still open."""
    zygote = Zygote(Probed(Limits(memory_mb=256), isolation, probe=PROBE))
    victim = await fork_child(zygote)
    await victim.send(b'{"role": "victim"}\n')
    seen_by_victim = json.loads(await victim.read_line())
    attacker = await fork_child(zygote)
    try:
        zygote_pid = await _ppid_in_namespace(victim)
        order = {"role": "attacker", "victim": victim.pid, "zygote": zygote_pid, "nobody": NOBODY, "aim": aim}
        await attacker.send(json.dumps(order).encode() + b"\n")
        report = json.loads(await attacker.read_line())
        report["victim's own view"] = seen_by_victim
        report["inodes"] = {"channel": attacker.channel_inode, "page": attacker.page_inode}
        await attacker.send(b"go\n")  # raises the SIGIO the attacker aimed, if the kernel let it aim one
        report["attacker after SIGIO"] = (await attacker.read_line()).decode()
        report["attacker exit"] = await asyncio.wait_for(attacker.exit_code, 20)
    finally:
        attacker.close()
    return report, seen_by_victim, victim, zygote


async def _ppid_in_namespace(child: Child) -> int:
    """The zygote's pid as its children see it (the parent's pid in the child's own pid namespace)."""
    host_pid = _field(f"/proc/self/fdinfo/{child.pidfd}", "Pid")[0]
    return _field(f"/proc/{_field(f'/proc/{host_pid}/status', 'PPid')[0]}/status", "NSpid")[-1]


def _field(path: str, name: str) -> list[int]:
    line = next(line for line in Path(path).read_text().splitlines() if line.startswith(f"{name}:"))
    return [int(value) for value in line.split()[1:]]


@pytest.fixture(scope="module", params=[(isolation, aim) for isolation in ("strict", "weak")
                                        for aim in ("victim", "zygote", "zygote's group")],
                ids=lambda p: f"{p[0]}, SIGIO at the {p[1]}")
def attacked(request: pytest.FixtureRequest) -> dict:
    """The attacker's report, and what became of the victim and the zygote afterwards."""
    isolation, aim = request.param

    async def run() -> dict:
        report, _, victim, zygote = await attack(isolation, aim)
        report["isolation"] = isolation
        try:
            await victim.send(b"are you there\n")
            report["victim after"] = (await victim.read_line()).decode()
            another = await fork_child(zygote)  # the zygote still forks
            report["zygote forks after"] = another.pid > 0
            another.close()
            victim.channel.shutdown(socket.SHUT_WR)  # its echo loop ends
            report["victim exit"] = await asyncio.wait_for(victim.exit_code, 20)
        finally:
            victim.close()
            await zygote.stop()
        return report

    return asyncio.run(run())


@pytest.mark.parametrize("target", ["victim", "zygote"])
@pytest.mark.parametrize("attempt", TRIES)
def test_a_process_cannot_see_signal_trace_or_read_another_or_the_zygote(attacked: dict, target: str,
                                                                        attempt: str) -> None:
    """Every attempt fails, and fails exactly as it does against a pid nobody has: nothing tells the attacker
    that the other process exists."""
    if attempt == "its /proc entry" and attacked["isolation"] == "weak":
        pytest.skip("weak isolation has no mount namespace: /proc is the host's (docs/security.md)")
    assert attacked[target][attempt] != "succeeded"
    assert attacked[target][attempt] == attacked["nobody"][attempt]


def test_a_process_cannot_aim_sigio_at_another(attacked: dict) -> None:
    """fcntl(F_SETOWN/F_SETSIG) on its own channel would have the kernel signal any process of its uid (with
    SIGKILL) whenever the worker writes to it: denied, and the victim and the zygote live on."""
    assert attacked["SIGIO aimed"]["F_SETOWN"] != "succeeded"
    assert attacked["SIGIO aimed"]["F_SETOWN_EX"] != "succeeded"
    assert attacked["SIGIO aimed"]["F_SETSIG"] != "succeeded"
    assert attacked["attacker after SIGIO"] == "still here" and attacked["attacker exit"] == 0
    assert attacked["victim after"] == "are you there"
    assert attacked["zygote forks after"] is True
    assert attacked["victim exit"] == 0


def test_a_process_holds_only_its_own_fds(attacked: dict) -> None:
    """Its channel (as stdin and stdout), /dev/null (stderr) and its page: not the zygote's control socket or
    wakeup pipe, not another process's channel or page, nothing the zygote inherited from the worker."""
    fds = {fd: (inode, kind) for fd, inode, kind in attacked["fds"]}
    channel, page = attacked["inodes"]["channel"], attacked["inodes"]["page"]
    assert len(fds) == 4 and {0, 1, 2} < set(fds), fds
    assert fds[0] == fds[1] == (channel, stat.S_IFSOCK)
    assert fds[2][1] == stat.S_IFCHR  # /dev/null
    page_fd = max(fds)
    assert fds[page_fd] == (page, stat.S_IFREG)  # a memfd


def test_the_victim_holds_only_its_own_fds_too(attacked: dict) -> None:
    """The victim, forked before the attacker, holds nothing of the attacker's (forked later) either."""
    victim = {inode for _, inode, _ in attacked["victim's own view"]["fds"]}
    assert attacked["inodes"]["channel"] not in victim and attacked["inodes"]["page"] not in victim


async def wait_for(condition, timeout_s: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        await asyncio.sleep(0.01)
    raise AssertionError(f"{what} not reached within {timeout_s}s")


def shared_writable_mappings(pid: int) -> list[str]:
    """The writable MAP_SHARED mappings of a host process: the only memory it could share with another."""
    found = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if fields[1].startswith("rw") and fields[1][3] == "s":
            found.append(fields[5] if len(fields) > 5 else "")
    return found


DOUBLE = "def run(input):\n    return input['n'] * 2\n"
RANDOM = "import random\ndef run(input):\n    return random.getrandbits(64)\n"


@pytest.fixture(params=["strict", "weak"])
async def pool(request: pytest.FixtureRequest):
    started = SandboxPool(Boundary(Limits(memory_mb=256), isolation=request.param), 4, spares=1)
    await started.start()
    yield started
    await started.stop()


async def test_processes_share_no_writable_memory_but_their_own_page_with_the_worker(pool: SandboxPool) -> None:
    """Copy-on-write shares the zygote's pages read-only; the zygote maps nothing shared and writable, so after
    the fork a process's only shared writable memory is its progress page (shared with the worker alone)."""
    await pool.run([Call(task, "double", DOUBLE, 1.0, {"n": 1}) for task in ("a", "b")])
    zygote = pool._zygote.pid
    assert zygote is not None and shared_writable_mappings(zygote) == []
    for pid in pool.pids_of("a") + pool.pids_of("b"):
        assert [name.split()[0] for name in shared_writable_mappings(pid)] == ["/memfd:loopai-progress"]


async def test_each_process_has_its_own_random_state(pool: SandboxPool) -> None:
    """Forked from one zygote, two tasks' processes would draw the same numbers unless each reseeds after the
    fork (random does, through os.register_at_fork): one task's draws tell nothing of another's."""
    outcomes = await pool.run([Call(task, "random", RANDOM, 1.0, {}) for task in ("a", "b", "c")])
    assert len({o.output for o in outcomes}) == 3, outcomes


async def test_a_dead_zygote_takes_its_processes_with_it_and_the_pool_starts_another(pool: SandboxPool) -> None:
    assert (await pool.run([Call("a", "double", DOUBLE, 1.0, {"n": 2})]))[0].output == 4
    before = pool.pids_of("a")
    zygote = pool._zygote.pid
    assert zygote is not None and before
    os.kill(zygote, signal.SIGKILL)
    await wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in before), what="its processes gone")
    assert [o.output for o in await pool.run([Call("a", "double", DOUBLE, 1.0, {"n": n}) for n in range(5)])] \
        == [0, 2, 4, 6, 8]
    assert pool._zygote.started == 2 and pool._zygote.pid != zygote


CLOSES_ITS_CHANNEL = (
    "import os, time\n"
    "os.write(1, b'{\"hello\": {\"seccomp\": true}}\\n')\n"
    "os.close(0)\nos.close(1)\n"
    "while True:\n    pass\n"
)


async def test_a_process_that_closes_its_channel_and_runs_on_is_killed() -> None:
    process = SandboxProcess(Probed(Limits(memory_mb=256), probe=CLOSES_ITS_CHANNEL))
    await process.start()
    try:
        await wait_for(lambda: not process.alive, what="the process killed")
        assert process.kill_reason == "sandbox process exited (code -9)"
        with pytest.raises(SandboxDied):
            await process.run(1, [Call("t", "k", DOUBLE, 1.0, {"n": 1})])
    finally:
        await process.stop()


HOARD = "def run(input):\n    return len(bytearray(input['n']))\n"


async def test_an_idle_process_gives_its_freed_heap_back() -> None:
    """A process keeps freed memory for its next batch (glibc's trim threshold), but not once idle: its heap is
    trimmed a second after its last batch."""
    process = SandboxProcess(Boundary(Limits(memory_mb=256)))
    await process.start()
    try:
        before = process.memory()
        assert before is not None
        assert (await process.run(1, [Call("t", "hoard", HOARD, 1.0, {"n": 3 << 20})]))[0].output == 3 << 20
        kept = process.memory()
        assert kept is not None and kept.uss > before.uss + (2 << 20)  # the 3 MB freed, kept for the next batch
        trimmed = await wait_for(lambda: (m := process.memory()) is not None and m.uss < kept.uss - (2 << 20) and m,
                                 what="the heap trimmed")
        print(f"own memory: {before.uss >> 10} kB, {kept.uss >> 10} kB after the call, {trimmed.uss >> 10} kB idle")
    finally:
        await process.stop()


async def test_a_start_cancelled_leaves_no_process_behind() -> None:
    zygote = Zygote(Probed(Limits(memory_mb=256), probe="while True:\n    pass\n"))  # never says hello
    process = SandboxProcess(zygote._boundary, zygote)
    try:
        starting = asyncio.ensure_future(process.start())
        pid = await wait_for(lambda: process.pid, what="the process forked")
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        await wait_for(lambda: not Path(f"/proc/{pid}").exists(), what="the process killed and reaped")
        assert process.kill_reason == "start cancelled" and not process.alive
    finally:
        await zygote.stop()


