import asyncio
import os
import platform
import signal

from app.samples import program_source
from app.sandbox.pool import Call, SandboxPool

SPAM = program_source("spam_v1")


def spam(text: str) -> Call:
    return Call("spam", "spam-v1", SPAM, 1.0, {"text": text})


async def test_results_come_back_in_order(pool: SandboxPool) -> None:
    calls = [spam("free stuff" if i % 3 == 0 else "hello") for i in range(500)]
    outcomes = await pool.run(calls)
    assert [o.output for o in outcomes] == ["spam" if i % 3 == 0 else "ham" for i in range(500)]
    assert all(o.status == "ok" and o.latency_ms >= 0 and o.memory_mb > 0 for o in outcomes)


async def test_processes_are_locked_down(pool: SandboxPool) -> None:
    if platform.system() == "Linux" and platform.machine() in ("x86_64", "aarch64"):
        assert pool.protections["seccomp"] is True
    assert all(pid != os.getpid() for pid in pool.pids)


async def test_program_compiled_once_per_process(pool: SandboxPool) -> None:
    source = "import random\nSTAMP = random.random()\ndef run(input):\n    return STAMP\n"
    outcomes = await pool.run([Call("stamp", "stamp", source, 1.0, {}) for _ in range(200)])
    assert len({o.output for o in outcomes}) <= 2  # one load per process, not per call


async def test_concurrent_batches_share_the_pool(pool: SandboxPool) -> None:
    batches = await asyncio.gather(*(pool.run([spam("free")] * 30) for _ in range(5)))
    assert all(o.output == "spam" for batch in batches for o in batch)


async def test_process_killed_from_outside_is_replaced_and_call_retried(pool: SandboxPool) -> None:
    source = "def run(input):\n    total = 0\n    for i in range(30_000_000):\n        total += i\n    return total\n"
    slow = Call("slow", "slow", source, 20.0, {})
    task = asyncio.ensure_future(pool.run([slow]))
    await asyncio.sleep(0.3)  # it is now running in one of the processes
    for pid in pool.pids:
        os.kill(pid, signal.SIGKILL)  # as an OOM killer would
    outcome = (await task)[0]
    assert outcome.status == "ok" and outcome.output == sum(range(30_000_000))
    assert pool.replaced == 2  # the busy one at once, the idle one when next taken
    assert (await pool.run([spam("free")] * 10))[0].output == "spam"
