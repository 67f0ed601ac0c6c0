"""The worker's end of the zygote: each process it starts is paired with its own pidfd however many start at
once, and starts queued behind a stalled zygote all go through."""

import asyncio
import os
import signal
import socket

from app.sandbox.boundary import Boundary, Limits
from app.sandbox.process import SandboxProcess
from app.sandbox.zygote_host import Zygote
from tests.sandbox.test_zygote import _field, wait_for


async def test_processes_started_at_once_are_each_paired_with_their_own_pidfd() -> None:
    """The zygote answers requests in order; a process paired with another's pidfd would have its watchdog kill
    another task's process. Each process's pidfd names the process that said hello on its channel."""
    zygote = Zygote(Boundary(Limits(memory_mb=256)))
    processes = [SandboxProcess(zygote._boundary, zygote) for _ in range(24)]
    try:
        await asyncio.gather(*(p.start() for p in processes))
        for process in processes:
            assert process.pid is not None
            assert _field(f"/proc/{process.pid}/status", "NSpid")[-1] == process.protections["pid"]
        assert len({p.pid for p in processes}) == 24
    finally:
        await asyncio.gather(*(p.stop() for p in processes))
        await zygote.stop()


async def test_starts_queued_behind_a_stalled_zygote_all_go_through() -> None:
    """The zygote's control socket queues what its send buffer holds (278 requests by default; here a dozen or
    so); with the zygote stopped, the rest wait for room. Every one of them must start once it reads again, not
    only the last to wait."""
    zygote = Zygote(Boundary(Limits(memory_mb=256)))
    await zygote.start()
    assert zygote._control is not None
    zygote._control.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    processes = [SandboxProcess(zygote._boundary, zygote) for _ in range(40)]
    assert zygote.pid is not None
    os.kill(zygote.pid, signal.SIGSTOP)
    try:
        starting = asyncio.gather(*(p.start() for p in processes))
        await wait_for(lambda: zygote._writable is not None and not zygote._writable.done(),
                       what="requests waiting for room")
    finally:
        os.kill(zygote.pid, signal.SIGCONT)
    try:
        await asyncio.wait_for(starting, 30)
        assert all(p.alive for p in processes) and len({p.pid for p in processes}) == 40
    finally:
        await asyncio.gather(*(p.stop() for p in processes))
        await zygote.stop()
