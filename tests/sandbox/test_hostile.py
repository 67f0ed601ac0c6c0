"""Hostile artifacts: each ends as an error (or timeout) result, nothing escapes, and the pool serves the
next call normally."""

from pathlib import Path

import pytest

from app.sandbox.calls import Call
from app.sandbox.pool import SandboxPool

GOOD_SOURCE = "def run(input):\n    return input['n'] * 2\n"
CANARY = Path("/tmp/loopai-hostile-canary")

HOSTILE = {
    "infinite loop": ("def run(input):\n    while True:\n        pass\n", "timeout", "exceeded its timeout"),
    "loop that swallows its timeout": (
        "def run(input):\n    while True:\n        try:\n            while True:\n                pass\n"
        "        except BaseException:\n            pass\n",
        "timeout", "timeout"),
    "stuck in C code": (
        "import hashlib\ndef run(input):\n    return hashlib.pbkdf2_hmac('sha256', b'x', b'y', 10 ** 9).hex()\n",
        "timeout", "was killed"),
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
    "class pattern reaching __globals__": (
        "def run(input):\n    match run:\n        case object(__globals__=g):\n            return g\n",
        "error", "class pattern"),
    "update_wrapper copying __globals__": (
        "import functools\ndef run(input):\n    class X: pass\n"
        "    functools.update_wrapper(X, run, assigned=('__globals__',))\n    return 1\n",
        "error", "update_wrapper"),
    "format string walking attributes": (
        "def run(input):\n    return '{0.__globals__}'.format(run)\n", "error", "attribute 'format'"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
async def test_hostile_program_is_contained(name: str, pool: SandboxPool) -> None:
    source, status, message = HOSTILE[name]
    hostile = Call(name, "hostile", source, 1.0, {})
    good = Call(name, "good", GOOD_SOURCE, 1.0, {"n": 21})  # same task: it shares the hostile call's process
    other_task = Call("other", "good", GOOD_SOURCE, 1.0, {"n": 21})
    outcomes = await pool.run([hostile, hostile, good, other_task])
    assert [o.status for o in outcomes] == [status, status, "ok", "ok"], outcomes
    assert message in (outcomes[0].error or "")
    assert outcomes[2].output == outcomes[3].output == 42  # the calls after it in the same batch are served
    assert (await pool.run([good, other_task]))[0].output == 42
    assert not CANARY.exists()
