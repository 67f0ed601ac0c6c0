"""Unrestricted Python in zygote children, locked down exactly as sandbox processes are, as a program that got
past the static check would run: the isolation tests' way in. Every child of a Probed boundary's zygote runs its
probe with its channel as stdin and stdout and its progress page's fd in sys.argv[5]. A Scripted boundary's
sandbox processes run a script in place of the protocol's honest side."""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass, field

from app.sandbox.boundary import Boundary
from app.sandbox.zygote_host import Zygote


@dataclass(frozen=True)
class Probed(Boundary):
    """A boundary whose zygote's children run `probe` instead of serving; `secret` is added to the environment
    the worker starts the zygote with (as a careless worker might)."""

    probe: str = ""
    secret: dict[str, str] = field(default_factory=dict)

    def command(self, control_fd: int, probe: str | None = None) -> list[str]:
        return super().command(control_fd, probe=self.probe)

    def environment(self) -> dict[str, str]:
        return {**super().environment(), **self.secret}


@dataclass(frozen=True)
class Scripted(Boundary):
    """A boundary whose sandbox processes run `script` instead of serving: processes that speak the protocol
    dishonestly, as a program that got past the static check could make its process do. Each runs after the same
    lock-down as a real sandbox process."""

    script: str = ""

    def command(self, control_fd: int, probe: str | None = None) -> list[str]:
        return super().command(control_fd, probe=self.script)


# A scripted process's start: the hello a sandbox process writes, then the number of the first batch it is sent.
HANDSHAKE = (
    "import json, mmap, os, struct, sys, time\n"
    "page = mmap.mmap(int(sys.argv[5]), 24)\n"
    "os.write(1, b'{\"hello\": {\"seccomp\": true}}\\n')\n"
    "number = json.loads(sys.stdin.buffer.readline())['batch']\n"
)


@dataclass
class Child:
    """A child forked for a test, and what the test knows of it from outside."""

    pid: int  # in the zygote's pid namespace
    pidfd: int
    channel: socket.socket  # the worker's end
    channel_inode: int  # of the child's end
    page_inode: int
    exit_code: asyncio.Future[int | None]
    received: bytearray = field(default_factory=bytearray)

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.channel, data)

    async def read_line(self, timeout_s: float = 20.0) -> bytes:
        """The next line the child writes (without its newline)."""
        async with asyncio.timeout(timeout_s):
            while (end := self.received.find(b"\n")) < 0:
                chunk = await asyncio.get_running_loop().sock_recv(self.channel, 1 << 16)
                if not chunk:
                    raise EOFError(f"child {self.pid} closed its channel after {bytes(self.received[-200:])!r}")
                self.received += chunk
        line = bytes(self.received[:end])
        del self.received[:end + 1]
        return line

    async def read_to_end(self, timeout_s: float = 30.0) -> bytes:
        chunks = [bytes(self.received)]
        self.received.clear()
        async with asyncio.timeout(timeout_s):
            while chunk := await asyncio.get_running_loop().sock_recv(self.channel, 1 << 16):
                chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self.channel.close()
        os.close(self.pidfd)


async def fork_child(zygote: Zygote) -> Child:
    """Have the zygote fork a child, given a channel and a page made here."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    page = os.memfd_create("probe-page")
    exit_code: asyncio.Future[int | None] = loop.create_future()

    def on_exit(code: int | None) -> None:
        if not exit_code.done():
            exit_code.set_result(code)

    try:
        os.ftruncate(page, 24)
        channel_inode, page_inode = os.fstat(theirs.fileno()).st_ino, os.fstat(page).st_ino
        pid, pidfd = await zygote.spawn(theirs.fileno(), page, on_exit)
    finally:
        theirs.close()
        os.close(page)
    return Child(pid, pidfd, ours, channel_inode, page_inode, exit_code)
