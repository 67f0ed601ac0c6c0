"""A sandbox process from the worker's side: it is given one program version at a time, and what it answers is
checked, not trusted: an answer overdue, or one that results could not carry, kills it. Outputs stay bytes. And the
memory of a process, as /proc tells it."""

import os
import subprocess
import time

import pytest

from app.sandbox.boundary import Boundary, Limits
from app.sandbox.calls import Call, Outcome
from app.sandbox.child import MAX_ERROR_CHARS
from app.sandbox.pool import SandboxPool
from app.sandbox.process import SandboxDied, SandboxProcess, measure_memory
from tests.sandbox.probing import HANDSHAKE, Scripted

DOUBLE = "def run(input):\n    return input['n'] * 2\n"


async def test_a_sandbox_process_is_given_the_calls_of_one_program_version_at_a_time() -> None:
    process = SandboxProcess(Boundary(Limits(memory_mb=256)))
    await process.start()
    try:
        with pytest.raises(ValueError, match="one program version"):
            await process.run(1, [Call("t", "k1", DOUBLE, 1.0, {"n": 1}), Call("t", "k2", DOUBLE, 1.0, {"n": 2})])
        assert [o.output for o in await process.run(2, [Call("t", "k1", DOUBLE, 1.0, {"n": n}) for n in (1, 2)])] \
            == [2, 4]
    finally:
        await process.stop()


STALL = HANDSHAKE + (
    "for k in range(400):  # the page keeps changing, says no call runs, and no answer ever comes\n"
    "    struct.pack_into('qqq', page, 0, number, k % 2, 0)\n"
    "    time.sleep(0.05)\n"
)
FORGE = HANDSHAKE + "os.write(1, b'[[\"ok\", 1, null, 1e308, {\"memory\": \"x\"}]]\\n1')\ntime.sleep(20)\n"
# An output that would end its own field in a JSON result and add fields after it (last one wins on reading).
BREAKOUT_OUTPUT = b'"spam", "task_id": "victim", "request_id": "theirs"'
BREAKOUT = HANDSHAKE + (
    f"output = {BREAKOUT_OUTPUT!r}\n"
    "os.write(1, json.dumps([['ok', len(output), None, 1.0, None]]).encode() + b'\\n' + output)\n"
    "time.sleep(20)\n"
)


async def test_a_process_that_only_rewrites_its_page_is_killed_when_its_answer_is_overdue() -> None:
    process = SandboxProcess(Scripted(Limits(memory_mb=256), script=STALL))
    await process.start()
    started = time.monotonic()
    try:
        with pytest.raises(SandboxDied, match="no answer within"):
            await process.run(1, [Call("t", "k", DOUBLE, 0.3, {"n": 1})] * 3)
    finally:
        await process.stop()
    assert time.monotonic() - started < 3  # 0.3 s timeout, loading allowance and grace: about 0.85 s


async def test_forged_answers_that_results_could_not_carry_are_refused() -> None:
    process = SandboxProcess(Scripted(Limits(memory_mb=256), script=FORGE))
    await process.start()
    try:
        with pytest.raises(SandboxDied):
            await process.run(1, [Call("t", "k", DOUBLE, 5.0, {"n": 1})])
        assert "malformed answer" in (process.kill_reason or "")
    finally:
        await process.stop()


async def test_an_output_that_is_not_one_json_value_is_refused() -> None:
    """Outputs go into results as the bytes the process wrote: bytes that are not exactly one JSON value could
    forge another task's fields in a result, so the process that sends them is killed as malformed."""
    process = SandboxProcess(Scripted(Limits(memory_mb=256), script=BREAKOUT))
    await process.start()
    try:
        with pytest.raises(SandboxDied) as died:
            await process.run(1, [Call("t", "k", DOUBLE, 5.0, {"n": 1})])
        assert died.value.answers == [] and "malformed answer" in (process.kill_reason or "")
    finally:
        await process.stop()


async def refused(script: str) -> str:
    """Run one call on a process speaking `script`; the kill reason, which must say it was refused."""
    process = SandboxProcess(Scripted(Limits(memory_mb=256), script=script))
    await process.start()
    try:
        with pytest.raises(SandboxDied) as died:
            await process.run(1, [Call("t", "k", DOUBLE, 5.0, {"n": 1})])
        assert died.value.answers == []
        return process.kill_reason or ""
    finally:
        await process.stop()


def answering(error: str | None, latency_ms: float) -> str:
    return HANDSHAKE + (f"os.write(1, json.dumps([['error', -1, {error!r}, {latency_ms!r}, None]]).encode() + b'\\n')\n"
                        "time.sleep(20)\n")


async def test_an_error_text_longer_than_any_the_sandbox_writes_is_refused() -> None:
    """Error texts go into results as they come: a process could make each of its calls' results megabytes (past
    what the cluster accepts, three times what outputs may hold in the worker's memory)."""
    assert "malformed answer" in await refused(answering("x" * (MAX_ERROR_CHARS + 1), 1.0))


async def test_a_latency_no_clock_gives_is_refused() -> None:
    """A latency of 1e-300 ms files under its own bucket of the task's latency sketch: with one of 1e8 ms, the daily
    partial grows from a few kB to 285 kB and costs the aggregator 80 ms to merge."""
    assert "malformed answer" in await refused(answering("boom", 1e-300))


async def test_outputs_stay_bytes_in_the_worker(pool: SandboxPool) -> None:
    """A 1 MB output of 333,000 tiny objects costs the worker its bytes, not 23 MB of Python objects. Six of them:
    kept as objects they would pass the bound (147 MB), and each costs about a second under tracemalloc, which
    traces every object of the worker's check that an output is one JSON value."""
    import tracemalloc

    many = "def run(input):\n    return [{}] * 330_000\n"
    tracemalloc.start()
    try:
        outcomes = await pool.run([Call("many", "many", many, 2.0, {}) for _ in range(6)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(o.status == "ok" and len(o.output_json) == 990_001 for o in outcomes)
    assert peak < 100 << 20, f"peak {peak >> 20} MB"  # 6 outputs of 1 MB, with room for the frames


def test_an_outcome_parses_its_output_only_when_asked() -> None:
    assert Outcome("ok", b'{"label": "spam"}').output == {"label": "spam"}
    assert Outcome("error", None, "boom").output is None


def test_the_memory_of_a_process_in_bytes_and_none_once_it_is_gone() -> None:
    memory = measure_memory(os.getpid())
    assert memory is not None
    assert 10 << 20 < memory.rss < 10 << 30  # this interpreter: tens of MB, counted in bytes
    assert 0 < memory.uss <= memory.pss <= memory.rss  # its own pages, then its share of the shared ones
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert measure_memory(gone.pid) is None
