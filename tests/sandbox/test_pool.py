"""The pool: order of outcomes, one task per process, warm spares, replacement and fair blame."""

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence

import pytest

from app.sandbox.boundary import Boundary, Limits
from app.sandbox.calls import Call, Outcome
from app.sandbox.pool import SandboxPool
from devtools.samples import program_source
from tests.sandbox.probing import HANDSHAKE, Scripted

SPAM = program_source("spam_v1")
SPIN = "def run(input):\n    while True:\n        pass\n"
STUCK_IN_C = "import hashlib\ndef run(input):\n    return hashlib.pbkdf2_hmac('sha256', b'x', b'y', 10 ** 9).hex()\n"
COUNTER = "CALLS = []\ndef run(input):\n    CALLS.append(1)\n    return len(CALLS)\n"
DOUBLE = "def run(input):\n    return input['n'] * 2\n"


def spam(text: str, task: str = "spam") -> Call:
    return Call(task, "spam-v1", SPAM, 1.0, {"text": text})


async def wait_for(condition, timeout_s: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        await asyncio.sleep(0.01)
    raise AssertionError(f"{what} not reached within {timeout_s}s")


@pytest.mark.parametrize("task_of", [lambda i: f"t{i % 4}", lambda i: f"t{i // 70 % 3}"],
                         ids=["interleaved", "in runs that come back"])
async def test_results_come_back_in_order(pool: SandboxPool, task_of: Callable[[int], str]) -> None:
    calls = [spam("free stuff" if i % 3 == 0 else "hello", task=task_of(i)) for i in range(500)]
    outcomes = await pool.run(calls)
    assert [o.output for o in outcomes] == ["spam" if i % 3 == 0 else "ham" for i in range(500)]
    assert all(o.status == "ok" and o.latency_ms >= 0 and o.memory_mb > 0 for o in outcomes)


async def test_each_process_serves_one_task_only(pool: SandboxPool) -> None:
    """Tasks a, b, c take turns on a pool of two: a process never moves to another task, it is replaced."""
    served: dict[int, set[str]] = {}
    for round_ in range(6):
        task = "abc"[round_ % 3]
        outcomes = await pool.run([Call(task, f"{task}-v1", DOUBLE, 1.0, {"n": i}) for i in range(20)])
        assert [o.output for o in outcomes] == [2 * i for i in range(20)]
        for pid in pool.pids_of(task):
            served.setdefault(pid, set()).add(task)
    assert all(len(tasks) == 1 for tasks in served.values()), served
    assert pool.evicted > 0 and pool.replaced == 0


async def test_globals_persist_between_calls_of_a_task_in_one_process(pool: SandboxPool) -> None:
    """Documented: a program's globals live as long as its process (a small batch of a task runs in one)."""
    outcomes = await pool.run([Call("count", "count-v1", COUNTER, 1.0, {}) for _ in range(10)])
    assert [o.output for o in outcomes] == list(range(1, 11))
    again = await pool.run([Call("count", "count-v1", COUNTER, 1.0, {}) for _ in range(2)])
    assert [o.output for o in again] == [11, 12]


async def test_concurrent_batches_share_the_pool(pool: SandboxPool) -> None:
    batches = await asyncio.gather(*(pool.run([spam("free", task=f"t{n % 3}")] * 30) for n in range(5)))
    assert all(o.output == "spam" for batch in batches for o in batch)


async def test_stuck_calls_are_killed_once_and_charged_once(pool: SandboxPool) -> None:
    """Ten calls stuck in C next to ten good ones of the same task: ten timeouts, ten oks, ten replacements."""
    stuck = Call("mixed", "stuck", STUCK_IN_C, 0.2, {})
    calls = [c for i in range(10) for c in (stuck, Call("mixed", "double", DOUBLE, 5.0, {"n": i}))]
    started = time.monotonic()
    outcomes = await pool.run(calls)
    elapsed = time.monotonic() - started
    assert [o.status for o in outcomes[0::2]] == ["timeout"] * 10
    assert all("killed" in (o.error or "") for o in outcomes[0::2])
    assert [o.output for o in outcomes[1::2]] == [2 * i for i in range(10)]
    assert pool.replaced == 10
    print(f"10 stuck + 10 good calls: {elapsed:.1f}s, {pool.replaced} processes replaced")


async def test_process_killed_from_outside_gets_its_call_retried(pool: SandboxPool) -> None:
    source = "def run(input):\n    total = 0\n    for i in range(30_000_000):\n        total += i\n    return total\n"
    task = asyncio.ensure_future(pool.run([Call("slow", "slow", source, 20.0, {})]))
    victim = await wait_for(lambda: pool.pids_running("slow"), what="the call running")
    os.kill(victim[0], signal.SIGKILL)  # as an OOM killer would
    outcome = (await task)[0]
    assert outcome.status == "ok" and outcome.output == sum(range(30_000_000))
    assert pool.replaced == 1
    assert (await pool.run([spam("free")] * 10))[0].output == "spam"


async def test_process_killed_twice_during_one_call_gives_an_error(pool: SandboxPool) -> None:
    task = asyncio.ensure_future(pool.run([Call("spin", "spin", SPIN, 20.0, {})]))
    killed: set[int] = set()
    for _ in range(2):
        pids = await wait_for(lambda done=frozenset(killed): set(pool.pids_running("spin")) - done,
                              what="the call running")
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        killed |= pids
    outcome = (await task)[0]
    assert outcome.status == "error" and "twice" in (outcome.error or "")
    assert (await pool.run([spam("free")]))[0].output == "spam"


async def test_a_process_dying_while_idle_costs_no_call(pool: SandboxPool) -> None:
    assert (await pool.run([spam("free")]))[0].output == "spam"
    for pid in pool.pids_of("spam"):
        os.kill(pid, signal.SIGKILL)
    await wait_for(lambda: not pool.pids_of("spam"), what="the process gone")
    assert [o.output for o in await pool.run([spam("free")] * 5)] == ["spam"] * 5


FINALISER = (
    "def spin():\n    try:\n        yield 1\n    finally:\n        while True:\n            try:\n"
    "                while True:\n                    pass\n            except BaseException:\n                pass\n"
    "def run(input):\n    keep = spin()\n    next(keep)\n    input['keep'] = keep\n    return input['n']\n"
)


async def test_a_finaliser_spinning_after_its_call_is_bounded_and_stays_in_its_task(pool: SandboxPool) -> None:
    """A program hangs a spinning finaliser on its input, which is freed after the call answered. The worker's
    watchdog still bounds it (charged within the task), and another task's calls in the batch are served."""
    started = time.monotonic()
    for _ in range(2):
        outcomes = await pool.run([Call("hang", "hang", FINALISER, 0.3, {"n": 1}),
                                   *(Call("other", "double", DOUBLE, 0.3, {"n": i}) for i in range(3))])
        assert [o.output for o in outcomes[1:]] == [0, 2, 4]
        assert outcomes[0].status in ("ok", "timeout")
    elapsed = time.monotonic() - started
    print(f"finaliser: {elapsed:.1f}s, {pool.replaced} replaced, last outcome {outcomes[0].status}")
    assert elapsed < 10
    assert pool.replaced >= 1


async def test_large_outputs_in_one_batch_all_arrive(pool: SandboxPool) -> None:
    """Outputs near the limit come back whole however many finish within one flush interval."""
    big = "def run(input):\n    return 'x' * 600_000\n"
    outcomes = await pool.run([Call("big", "big", big, 1.0, {}) for _ in range(40)])
    assert [o.status for o in outcomes] == ["ok"] * 40 and all(len(o.output) == 600_000 for o in outcomes)
    assert pool.replaced == 0


# Answers every call with the program keys it was asked to load: which versions ran in the process.
LOADED_KEYS = HANDSHAKE.replace("number = json.loads(sys.stdin.buffer.readline())['batch']\n", "") + (
    "loaded = []\n"
    "for line in sys.stdin.buffer:\n"
    "    batch = json.loads(line)\n"
    "    loaded += [key for key, _ in batch['load']]\n"
    "    output = json.dumps(loaded).encode()\n"
    "    answers = [['ok', len(output), None, 1.0, None] for _ in batch['run']]\n"
    "    os.write(1, json.dumps(answers).encode() + b'\\n' + output * len(answers))\n"
)


async def test_a_process_never_runs_a_second_version_of_its_task() -> None:
    """A shadow oracle runs the active version on the input of a canary's execution, for the same task: in the
    canary's process, the canary (owning it) could answer for its own judge. So a process runs one version only."""
    pool = SandboxPool(Scripted(Limits(memory_mb=256), script=LOADED_KEYS), 2, spares=1)
    await pool.start()
    try:
        judged = await pool.run([Call("t", "t-v2", DOUBLE, 1.0, {"n": 1})])
        judge, again = await pool.run([Call("t", "t-v1", DOUBLE, 1.0, {"n": 1}),
                                       Call("t", "t-v2", DOUBLE, 1.0, {"n": 1})])
    finally:
        await pool.stop()
    assert (judged[0].output, judge.output, again.output) == (["t-v2"], ["t-v1"], ["t-v2"])


async def test_hundreds_of_processes_start_at_once() -> None:
    """Many tasks' first calls in one batch: their processes are forked by the zygote concurrently, each its own."""
    tasks = 400
    pool = SandboxPool(Boundary(Limits(memory_mb=256)), tasks + 8, spares=0)
    await pool.start()
    try:
        calls = [Call(f"t{i}", "v1", "def run(input):\n    return input['i']\n", 1.0, {"i": i}) for i in range(tasks)]
        outcomes = await asyncio.wait_for(pool.run(calls), 60)
        assert [o.output for o in outcomes] == list(range(tasks))
        assert len(set(pool.pids)) >= tasks
    finally:
        await pool.stop()


# Answers every call of a batch with the batch's size, after sleeping as long as its first input asks (saying on
# its progress page that it runs that call).
BATCH_SIZES = HANDSHAKE.replace("number = json.loads(sys.stdin.buffer.readline())['batch']\n", "") + (
    "for line in sys.stdin.buffer:\n"
    "    batch = json.loads(line)\n"
    "    struct.pack_into('qqq', page, 0, batch['batch'], 0, time.monotonic_ns())\n"
    "    time.sleep(batch['run'][0][1].get('sleep', 0))\n"
    "    output = str(len(batch['run'])).encode()\n"
    "    answers = [['ok', len(output), None, 1.0, None] for _ in batch['run']]\n"
    "    os.write(1, json.dumps(answers).encode() + b'\\n' + output * len(answers))\n"
)


def sized(n: int, sleep: float = 0.0, task: str = "t") -> Call:
    return Call(task, "v1", DOUBLE, 5.0, {"n": n, "sleep": sleep})


@pytest.fixture
async def batch_sizes() -> AsyncIterator[SandboxPool]:
    started = SandboxPool(Scripted(Limits(memory_mb=256), script=BATCH_SIZES), 1, spares=1)
    await started.start()
    yield started
    await started.stop()


async def test_calls_that_arrive_while_their_process_is_busy_go_as_one_batch(batch_sizes: SandboxPool) -> None:
    """Three fetches' calls of a task queue behind its busy process and then run together: with many tasks, a
    fetch holds few calls of each, and a round trip per call would cost more than the calls."""
    pool = batch_sizes
    await pool.run([sized(0)])  # the version's output size is known: no small first chunk
    first = asyncio.ensure_future(pool.run([sized(0, sleep=0.5)]))
    await wait_for(lambda: pool.pids_running("t"), what="the first call running")
    later = await asyncio.gather(*(pool.run([sized(n), sized(n)]) for n in range(3)))
    assert [o.output for o in await first] == [1]
    assert [o.output for batch in later for o in batch] == [6] * 6


async def test_a_caller_that_goes_away_leaves_the_others_their_outcomes(batch_sizes: SandboxPool) -> None:
    """A cancelled caller's queued calls are dropped (they never run), and a caller whose emit raises gets its
    error; the callers that share their batch get every outcome."""
    pool = batch_sizes
    await pool.run([sized(0)])
    first = asyncio.ensure_future(pool.run([sized(0, sleep=0.5)]))
    await wait_for(lambda: pool.pids_running("t"), what="the first call running")
    gone = asyncio.ensure_future(pool.run([sized(1)] * 5))
    seen: list[int] = []

    def broken(indices: Sequence[int], outcomes: Sequence[Outcome]) -> None:
        raise RuntimeError("a bug in the caller")

    def keep(indices: Sequence[int], outcomes: Sequence[Outcome]) -> None:
        seen.extend(int(o.output) for o in outcomes)

    failing = asyncio.ensure_future(pool.stream([sized(2)] * 2, broken))
    kept = asyncio.ensure_future(pool.stream([sized(3)] * 3, keep))
    await asyncio.sleep(0)
    gone.cancel()
    await first
    with pytest.raises(RuntimeError, match="a bug in the caller"):
        await failing
    await kept
    assert seen == [5, 5, 5]  # ran with the failing caller's two calls, not the cancelled one's five
    assert gone.cancelled()
