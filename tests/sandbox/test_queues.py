"""A version's queued calls and the chunks taken from them: calls leave the queue oldest first, a gone caller's
calls are dropped, and each outcome reaches its own caller, in order, whichever chunk carried it."""

import asyncio
from collections.abc import Sequence

import pytest

from app.sandbox.calls import Call, Outcome
from app.sandbox.queues import CallQueue, Chunk, Job


def _job(count: int, name: str) -> tuple[Job, list[tuple[int, str]]]:
    """A caller of `count` calls whose emitted (index, status) pairs are kept."""
    emitted: list[tuple[int, str]] = []

    def emit(indices: Sequence[int], outcomes: Sequence[Outcome]) -> None:
        emitted.extend((i, o.status) for i, o in zip(indices, outcomes, strict=True))

    calls = [Call(name, "v1", "", 1.0, {"n": i}) for i in range(count)]
    return Job(calls, emit, asyncio.get_running_loop().create_future()), emitted


async def test_calls_leave_the_queue_oldest_first_and_a_segment_is_split_where_a_chunk_ends() -> None:
    first, _ = _job(5, "a")
    second, _ = _job(3, "a")
    queue = CallQueue()
    queue.segments.extend([(first, range(5)), (second, [0, 1, 2])])
    queue.calls = 8
    taken = queue.take(6)
    assert [(job is first, list(indices)) for job, indices in taken] == [(True, [0, 1, 2, 3, 4]), (False, [0])]
    assert queue.calls == 2 and list(queue.segments[0][1]) == [1, 2]


async def test_the_calls_of_a_caller_that_is_gone_are_dropped() -> None:
    gone, _ = _job(4, "a")
    staying, _ = _job(2, "a")
    gone.ended = True
    queue = CallQueue()
    queue.segments.extend([(gone, range(4)), (staying, range(2))])
    queue.calls = 6
    taken = queue.take(3)
    assert [(job is staying, list(indices)) for job, indices in taken] == [(True, [0, 1])]
    assert queue.calls == 0


async def test_a_chunk_of_two_callers_sends_their_calls_in_order_and_answers_each_its_own() -> None:
    one, one_got = _job(3, "a")
    two, two_got = _job(2, "a")
    chunk = Chunk([(one, range(1, 3)), (two, [1, 0])])
    assert [c.input["n"] for c in chunk.calls()] == [1, 2, 1, 0]
    chunk.emit([Outcome("ok"), Outcome("error")])
    assert one_got == [(1, "ok"), (2, "error")] and chunk.size == 2
    chunk.emit_one(1, Outcome("timeout"))  # the second of what is left: caller two's call 0
    assert two_got == [(0, "timeout")] and chunk.identity(0) == (id(two), 1)
    chunk.emit([Outcome("ok")])
    assert two_got == [(0, "timeout"), (1, "ok")] and chunk.size == 0


async def test_a_caller_is_done_once_every_call_has_its_outcome_and_a_failed_chunk_fails_its_callers() -> None:
    done, _ = _job(2, "a")
    Chunk([(done, range(2))]).emit([Outcome("ok"), Outcome("ok")])
    assert done.done.done() and done.done.result() is None
    failed, got = _job(2, "a")
    Chunk([(failed, range(2))]).fail(RuntimeError("the sandbox pool stopped"))
    with pytest.raises(RuntimeError, match="stopped"):
        failed.done.result()
    assert got == []
