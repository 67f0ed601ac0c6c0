"""Hostile artifacts: each ends as an error (or timeout) result, nothing escapes, and the pool serves the
next call normally."""

import asyncio
import os
import signal
from pathlib import Path

import pytest

from app.sandbox.pool import Call, SandboxPool

GOOD = Call("good", "good", "def run(input):\n    return input['n'] * 2\n", 1.0, {"n": 21})
CANARY = Path("/tmp/loopai-hostile-canary")

HOSTILE = {
    "infinite loop": ("def run(input):\n    while True:\n        pass\n", "timeout", "exceeded its timeout"),
    "loop that swallows its timeout": (
        "def run(input):\n    while True:\n        try:\n            while True:\n                pass\n"
        "        except BaseException:\n            pass\n",
        "timeout", "timeout"),
    "stuck in C code": (
        "import hashlib\ndef run(input):\n    return hashlib.pbkdf2_hmac('sha256', b'x', b'y', 10 ** 9).hex()\n",
        "timeout", "killed and replaced"),
    "memory bomb": ("def run(input):\n    return len('x' * (10 ** 10))\n", "error", "out of memory"),
    "growing memory bomb": (
        "def run(input):\n    hoard = []\n    while True:\n        hoard.append(bytearray(50_000_000))\n",
        "error", "out of memory"),
    "fork bomb": ("import os\ndef run(input):\n    while True:\n        os.fork()\n", "error", "import of 'os'"),
    "subprocess escape": (
        "import subprocess\ndef run(input):\n    return subprocess.run(['touch', '/tmp/loopai-hostile-canary'])\n",
        "error", "import of 'subprocess'"),
    "socket escape": ("import socket\ndef run(input):\n    return socket.create_connection(('127.0.0.1', 9))\n",
                      "error", "import of 'socket'"),
    "open() escape": ("def run(input):\n    return open('/tmp/loopai-hostile-canary', 'w').write('x')\n",
                      "error", "name 'open'"),
    "__import__ trick": ("def run(input):\n    return __import__('os').system('touch /tmp/loopai-hostile-canary')\n",
                         "error", "name '__import__'"),
    "__subclasses__ trick": (
        "def run(input):\n    return [c for c in ().__class__.__base__.__subclasses__()]\n",
        "error", "attribute '__class__'"),
    "frame walk": ("def run(input):\n    g = (i for i in [1])\n    return g.gi_frame.f_back.f_globals\n",
                   "error", "attribute 'gi_frame'"),
    "module attribute to os": ("import random\ndef run(input):\n    return random.os.getpid()\n",
                               "error", "AttributeError"),
    "huge output": ("def run(input):\n    return 'x' * 5_000_000\n", "error", "the limit is"),
    "unserialisable output": ("def run(input):\n    return {1, 2}\n", "error", "not JSON-serialisable"),
    "deep recursion": ("def run(input):\n    return run(input)\n", "error", "recursion"),
    "exits its process": ("def run(input):\n    raise SystemExit(3)\n", "error", "SystemExit"),
    "loops while loading": ("while True:\n    pass\ndef run(input):\n    return 1\n", "error", "loading"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
async def test_hostile_program_is_contained(name: str, pool: SandboxPool) -> None:
    source, status, message = HOSTILE[name]
    outcomes = await pool.run([Call(name, name, source, 1.0, {}), GOOD])
    assert (outcomes[0].status, outcomes[1].status) == (status, "ok"), outcomes
    assert message in (outcomes[0].error or "")
    assert outcomes[1].output == 42  # the call after it in the same batch is served
    assert (await pool.run([GOOD]))[0].output == 42
    assert not CANARY.exists()


async def test_process_killed_twice_during_one_call_gives_an_error(pool: SandboxPool) -> None:
    """A call whose process dies, and dies again on retry, is an error result; the pool carries on."""
    looping = Call("spin", "spin", "def run(input):\n    while True:\n        pass\n", 20.0, {})
    task = asyncio.ensure_future(pool.run([looping]))
    for _ in range(2):
        await asyncio.sleep(0.5)
        for pid in pool.pids:
            os.kill(pid, signal.SIGKILL)
    outcome = (await task)[0]
    assert outcome.status == "error" and "twice" in (outcome.error or "")
    assert (await pool.run([GOOD]))[0].output == 42
