"""A sandbox process's own side. Its batch loop (child.answer_batches, what runs after lock-down) is driven here in
this process, with no boundary, on the lines the pool sends: answers in frames, in call order; a program's failures
as error answers; each call held to its own deadline by the one interval timer kept armed across a batch's calls;
retiring after a timeout or near its CPU budget. Through a real pool: the timer's re-arming across calls."""

import io
import mmap
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from app.domain.programs import ProgramCompiler
from app.sandbox import child
from app.sandbox.calls import Call
from app.sandbox.child import MAX_ERROR_CHARS, PROGRESS
from app.sandbox.pool import SandboxPool

DOUBLE = "def run(input):\n    return input['n'] * 2\n"
SPIN = "def run(input):\n    while True:\n        pass\n"
COUNTER = "CALLS = []\ndef run(input):\n    CALLS.append(1)\n    return len(CALLS)\n"
RAISES = "def run(input):\n    raise ValueError('x' * input['n'])\n"
Frame = list[list[Any]]  # the answers of one frame, each [status, output, error, latency_ms, memory_mb]


def batch(number: int, key: str, inputs: list[Any], source: str | None = None, timeout_s: float = 1.0) -> dict:
    """One batch line as the pool sends it: the program's source only the first time a process is sent it."""
    return {"batch": number, "load": [[key, source]] if source else [], "key": key,
            "run": [[timeout_s, value] for value in inputs]}


def frames_of(written: bytes) -> list[Frame]:
    """Each frame's answers, outputs parsed back from the bytes that follow its line."""
    frames = []
    while written:
        end = written.index(b"\n")
        answers, written = orjson.loads(written[:end]), written[end + 1:]
        for answer in answers:
            length = answer[1]
            answer[1] = None if length < 0 else orjson.loads(written[:length])
            written = written[max(length, 0):]
        frames.append(answers)
    return frames


@pytest.fixture
def answer(tmp_path: Path) -> Iterator[Callable[..., tuple[list[Frame], tuple[int, int, int]]]]:
    """answer(batches, max_output=..., cpu_s=...): the frames written, and the progress page at the end. The call
    timer is this process's SIGALRM while it runs."""
    previous = signal.signal(signal.SIGALRM, child._on_alarm)
    compiler = ProgramCompiler()

    def run(batches: list[dict], max_output: int = 1 << 20, cpu_s: int = 10**6) -> tuple[list[Frame], Any]:
        lines = io.BytesIO(b"".join(orjson.dumps(b) + b"\n" for b in batches))
        out = tmp_path / "channel"
        out_fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        progress = mmap.mmap(-1, PROGRESS.size)
        try:
            child.answer_batches(lines, out_fd, progress, compiler, cpu_s, max_output)
        finally:
            os.close(out_fd)
        return frames_of(out.read_bytes()), PROGRESS.unpack_from(progress)

    try:
        yield run
    finally:
        child._disarm()  # the idle trim's alarm, armed after each batch
        signal.signal(signal.SIGALRM, previous)


def test_answers_come_in_call_order_and_a_program_is_loaded_once(answer: Callable[..., Any]) -> None:
    frames, progress = answer([batch(1, "count-v1", [{}] * 3, COUNTER), batch(2, "count-v1", [{}] * 2)])
    answers = [a for frame in frames for a in frame]
    assert [(status, output, error) for status, output, error, _, _ in answers] == [
        ("ok", n, None) for n in range(1, 6)]  # its globals live on: one load
    assert all(latency > 0 and memory > 0 for _, _, _, latency, memory in answers)
    assert progress == (2, 1, 0)  # the last batch's last call, no call running


def test_a_programs_failures_are_its_answers(answer: Callable[..., Any]) -> None:
    frames, _ = answer([
        batch(1, "raises", [{"n": 3}, {"n": 5000}], RAISES),
        batch(2, "set", [{}], "def run(input):\n    return {1, 2}\n"),
        batch(3, "deep", [{}], "def run(input):\n    return run(input)\n"),
        batch(4, "big", [{}], "def run(input):\n    return 'x' * 100\n"),
        batch(5, "rejected", [{}, {}], "import os\ndef run(input):\n    return 1\n"),
        batch(6, "never-sent", [{}]),
    ], max_output=50)
    answers = [a for frame in frames for a in frame]
    assert [a[0] for a in answers] == ["error"] * 8 and all(a[1] is None for a in answers)
    errors = [a[2] for a in answers]
    assert errors[0] == "ValueError: xxx"
    assert len(errors[1]) == MAX_ERROR_CHARS  # cut: the pool refuses a longer one
    assert errors[2].startswith("output is not JSON-serialisable")
    assert errors[3] == "program exceeded the maximum recursion depth"
    assert errors[4] == "output is 102 bytes; the limit is 50"
    assert errors[5] == errors[6] and errors[5].startswith("program rejected: ") and "import of 'os'" in errors[5]
    assert errors[7] == "program never-sent was not loaded"


def test_a_call_past_its_timeout_is_stopped_and_the_process_retires(answer: Callable[..., Any]) -> None:
    started = time.monotonic()
    frames, progress = answer([batch(1, "spin", [{}, {}], SPIN, timeout_s=0.05), batch(2, "spin", [{}])])
    assert frames == [[["timeout", None, "program exceeded its timeout of 50 ms", frames[0][0][3], frames[0][0][4]]]]
    assert frames[0][0][3] >= 50
    assert progress == (1, 0, 0)  # the rest of the batch, and the next batch, are left to a fresh process
    assert time.monotonic() - started < 5


def test_a_program_that_does_not_finish_loading_is_an_error_of_its_calls(answer: Callable[..., Any]) -> None:
    frames, _ = answer([batch(1, "loops", [{}, {}], "while True:\n    pass\ndef run(input):\n    return 1\n",
                              timeout_s=0.05), batch(2, "double", [{"n": 2}], DOUBLE)])
    answers = [a for frame in frames for a in frame]
    assert [a[2] for a in answers[:2]] == ["program did not finish loading within 50 ms"] * 2
    assert answers[2][:3] == ["ok", 4, None]  # loading failed the calls, not the process


def test_answers_are_flushed_before_a_frame_outgrows_the_output_limit(answer: Callable[..., Any]) -> None:
    frames, _ = answer([batch(1, "double", [{"n": n} for n in range(10)], DOUBLE)], max_output=4)
    assert len(frames) > 1
    assert [a[1] for frame in frames for a in frame] == [2 * n for n in range(10)]


def test_a_process_near_its_cpu_budget_retires_after_its_batch(answer: Callable[..., Any]) -> None:
    frames, _ = answer([batch(1, "double", [{"n": 1}, {"n": 2}], DOUBLE), batch(2, "double", [{"n": 3}])], cpu_s=0)
    assert [[a[1] for a in frame] for frame in frames] == [[2, 4]]


WAIT = ("import datetime\ndef run(input):\n    end = datetime.datetime.now() + datetime.timedelta(seconds=input['s'])\n"
        "    while datetime.datetime.now() < end:\n        pass\n    return 'done'\n")


async def test_a_call_is_stopped_by_its_own_timer_at_its_own_deadline_after_a_call_with_a_longer_one(
        pool: SandboxPool) -> None:
    """The call timer stays armed across calls; a call whose timeout is shorter than the armed deadline re-arms it,
    so its own timer stops it (the process is not killed by the watchdog), long before the first call's 5 s."""
    started = time.monotonic()
    first, spin = await pool.run([Call("timers", "double", DOUBLE, 5.0, {"n": 1}),
                                  Call("timers", "spin", SPIN, 0.1, {})])
    assert first.output == 2
    assert spin.status == "timeout"
    assert spin.error == "program exceeded its timeout of 100 ms"  # the child's own words: no kill
    assert time.monotonic() - started < 4


async def test_a_call_keeps_its_whole_timeout_when_an_earlier_calls_deadline_passes_during_it(
        pool: SandboxPool) -> None:
    """The timer armed for the first call (50 ms) fires while the second runs (0.2 s of its 2 s): it is re-armed
    for the second call's own deadline, not taken as its timeout."""
    first, waited = await pool.run([Call("timers", "double", DOUBLE, 0.05, {"n": 1}),
                                    Call("timers", "wait", WAIT, 2.0, {"s": 0.2})])
    assert first.output == 2
    assert (waited.status, waited.output, waited.error) == ("ok", "done", None)
    assert waited.latency_ms >= 200
