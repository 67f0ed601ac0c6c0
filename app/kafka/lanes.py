"""Answers on their way out: results, dead letters and validation requests gathered over one turn of the event
loop go out together as one delivery, a few deliveries at a time per lane; a chunk whose outputs are large takes
the bulk lane. Also the bound on the output bytes held until their delivery is acknowledged."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from app.contract.records import DeadLetter
from app.kafka.delivery import describe_error
from app.kafka.outcomes import Message, ResultWriter, Undeliverable
from app.kafka.progress import Mark

log = logging.getLogger(__name__)

BULK_BYTES = 256 << 10  # a chunk's outputs (counted three times) past this go out through the bulk lane


class Answers:
    """Records ready to send, and the request records they answer (`marks`)."""

    __slots__ = ("by_task", "letters", "marks", "output_bytes", "results", "validations")

    def __init__(self) -> None:
        self.results: list[tuple[dict[str, Any], Message]] = []
        self.letters: list[DeadLetter] = []
        self.validations: list[dict[str, Any]] = []
        self.marks: list[Mark] = []
        self.output_bytes = 0
        self.by_task: dict[str, int] = {}


class _Lane:
    """One way out: a writer on its own producer (its own broker connections) and the deliveries on it. Large
    outputs take their own lane, so a task's megabytes never queue ahead of another task's small results in the
    one produce request a connection has in flight."""

    __slots__ = ("delivering", "flush_due", "gathering", "writer")

    def __init__(self, writer: ResultWriter) -> None:
        self.writer = writer
        self.gathering = Answers()
        self.delivering = 0  # deliveries on their way
        self.flush_due = False


Delivered = Callable[[Answers, list[dict[str, Any]], int], Awaitable[None]]


class Lanes:
    """The main lane and the bulk lane of one executor. `delivered(answers, sent_results, sent_letters)` is
    awaited after each delivery is acknowledged; `failed(reason, answers)` is called when one cannot be."""

    def __init__(self, main: ResultWriter, bulk: ResultWriter, *, max_deliveries: int, max_output_bytes: int,
                 delivered: Delivered, failed: Callable[[str, Answers], None],
                 spawn: Callable[[Awaitable[Any]], None]) -> None:
        self._main = _Lane(main)
        self._bulk = _Lane(bulk)
        self._max_deliveries = max_deliveries
        self._max_output_bytes = max_output_bytes
        self._delivered = delivered
        self._failed = failed
        self._spawn = spawn
        self._held_bytes = 0  # outputs received from the sandbox and not yet acknowledged
        self._held_by_task: dict[str, int] = {}
        self._waiters: list[asyncio.Future[None]] = []  # chunks waiting for outputs to be delivered
        self.stopping = False

    @property
    def main(self) -> Answers:
        """What the main lane is gathering now: add to it, then call flush_soon()."""
        return self._main.gathering

    def flush_soon(self) -> None:
        self._flush_soon(self._main)

    def add_chunk(self, task_id: str, output_bytes: int) -> Answers:
        """Where one sandbox chunk's answers go (the bulk lane if its outputs pass BULK_BYTES), holding their
        output bytes until delivered; call flush_chunk() once they are added."""
        lane = self._bulk if output_bytes > BULK_BYTES else self._main
        answers = lane.gathering
        if output_bytes:
            answers.output_bytes += output_bytes
            answers.by_task[task_id] = answers.by_task.get(task_id, 0) + output_bytes
            self._held_by_task[task_id] = self._held_by_task.get(task_id, 0) + output_bytes
            self._held_bytes += output_bytes
        return answers

    def flush_chunk(self, answers: Answers) -> None:
        self._flush_soon(self._bulk if answers is self._bulk.gathering else self._main)

    def full(self) -> bool:
        """Whether the outputs held pass their bound: fetching pauses."""
        return not self.stopping and self._held_bytes >= self._max_output_bytes

    async def wait_for_room(self, task_id: str) -> None:
        """Return once the outputs held are within their bound, and the task's own within a quarter of it (the
        sandbox pool awaits this before each chunk): a task of huge outputs waits for their delivery without
        filling the bound that would pause fetching for every task."""
        while not self._fits(task_id):
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter

    def stop(self) -> None:
        """From now on every chunk has room: what is in flight finishes."""
        self.stopping = True
        self._wake()

    def _fits(self, task_id: str) -> bool:
        return self.stopping or (self._held_bytes < self._max_output_bytes
                                 and self._held_by_task.get(task_id, 0) < self._max_output_bytes // 4)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:  # each checks its own bound again
            if not waiter.done():
                waiter.set_result(None)

    def _flush_soon(self, lane: _Lane) -> None:
        if not lane.flush_due and lane.gathering.marks:
            lane.flush_due = True
            asyncio.get_running_loop().call_soon(self._flush, lane)

    def _flush(self, lane: _Lane) -> None:
        """Send what was gathered, as one delivery, unless max_deliveries are on their way: then it goes with
        the next one that ends (aiokafka holds one batch per partition; hundreds of small deliveries would queue
        there one round trip each)."""
        lane.flush_due = False
        if lane.gathering.marks and lane.delivering < self._max_deliveries:
            answers, lane.gathering = lane.gathering, Answers()
            lane.delivering += 1
            self._spawn(self._deliver(lane, answers))

    async def _deliver(self, lane: _Lane, answers: Answers) -> None:
        """Deliver answers (validation requests need not wait for the results' acks), then report them."""
        try:
            (sent_results, sent_letters), _ = await asyncio.gather(
                lane.writer.write(answers.results, answers.letters),
                lane.writer.write_validations(answers.validations))
        except Undeliverable as exc:
            self._failed(str(exc), answers)
            return
        except Exception as exc:  # a bug: stop rather than commit past requests without an outcome
            log.error("delivering results failed: %s", describe_error(exc), exc_info=exc)
            self._failed(f"delivering results failed ({describe_error(exc)}); they stay uncommitted", answers)
            return
        finally:
            self._held_bytes -= answers.output_bytes
            for task_id, size in answers.by_task.items():
                left = self._held_by_task[task_id] - size
                if left:
                    self._held_by_task[task_id] = left
                else:
                    del self._held_by_task[task_id]
            lane.delivering -= 1
            self._flush_soon(lane)
            self._wake()
        await self._delivered(answers, sent_results, sent_letters)
