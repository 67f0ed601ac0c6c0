"""Answer lanes with stand-in writers: one delivery per turn of the event loop, a bounded number on their way, large
outputs on the bulk lane, the bound on the output bytes held, and a delivery that fails."""

import asyncio
from collections.abc import Callable
from typing import Any

from app.kafka.lanes import BULK_BYTES, Answers, Lanes
from app.kafka.outcomes import Undeliverable
from app.kafka.progress import Segment


class Writer:
    """Delivers when released (`hold`), or at once; remembers each delivery's results."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.deliveries: list[list[Any]] = []
        self.hold: asyncio.Event | None = None
        self.refuse = False

    async def write(self, results: list[tuple[dict[str, Any], Any]], letters: list[Any]) -> tuple[list[Any], int]:
        if self.hold is not None:
            await self.hold.wait()
        if self.refuse:
            raise Undeliverable("not even a dead letter went out")
        self.deliveries.append([fields["n"] for fields, _ in results])
        return [fields for fields, _ in results], len(letters)

    async def write_validations(self, validations: list[dict[str, Any]]) -> None:
        pass


class Harness:
    def __init__(self, max_deliveries: int = 2, max_output_bytes: int = 1000) -> None:
        self.main, self.bulk = Writer("main"), Writer("bulk")
        self.delivered: list[int] = []
        self.failures: list[str] = []
        self.work: set[asyncio.Future[Any]] = set()
        self.segment = Segment(list(range(1000)))
        self.lanes = Lanes(self.main, self.bulk, max_deliveries=max_deliveries,  # type: ignore[arg-type]
                           max_output_bytes=max_output_bytes, delivered=self._delivered, failed=self._failed,
                           spawn=self._spawn)

    async def _delivered(self, answers: Answers, sent: list[dict[str, Any]], letters: int) -> None:
        self.delivered += [fields["n"] for fields in sent]

    def _failed(self, reason: str, answers: Answers) -> None:
        self.failures.append(reason)

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self.work.add(task)
        task.add_done_callback(self.work.discard)

    def answer(self, n: int, task_id: str = "t", output_bytes: int = 0) -> None:
        answers = self.lanes.add_chunk(task_id, output_bytes)
        answers.results.append(({"n": n}, None))
        answers.marks.append((self.segment, n))
        self.lanes.flush_chunk(answers)


async def until(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "not within the deadline"
        await asyncio.sleep(0.005)


async def test_what_arrives_in_one_turn_goes_as_one_delivery() -> None:
    h = Harness()
    for n in range(5):
        h.answer(n)
    await until(lambda: len(h.delivered) == 5)
    assert h.main.deliveries == [[0, 1, 2, 3, 4]] and h.bulk.deliveries == []


async def test_at_most_max_deliveries_are_on_their_way_and_the_rest_gathers() -> None:
    h = Harness(max_deliveries=2)
    h.main.hold = asyncio.Event()
    h.answer(0)
    await until(lambda: len(h.work) == 1)
    h.answer(1)
    await until(lambda: len(h.work) == 2)
    h.answer(2)
    h.answer(3)  # two on their way: these wait, gathered into one
    await asyncio.sleep(0.05)
    assert len(h.work) == 2
    h.main.hold.set()
    await until(lambda: len(h.delivered) == 4)
    assert h.main.deliveries == [[0], [1], [2, 3]]


async def test_large_outputs_take_the_bulk_lane() -> None:
    h = Harness(max_output_bytes=10 * BULK_BYTES)
    h.answer(0, output_bytes=BULK_BYTES + 1)
    h.answer(1, output_bytes=10)
    await until(lambda: len(h.delivered) == 2)
    assert h.bulk.deliveries == [[0]] and h.main.deliveries == [[1]]


async def test_a_task_over_a_quarter_of_the_bound_waits_for_its_delivery_and_others_do_not() -> None:
    h = Harness(max_output_bytes=1000)
    h.main.hold = asyncio.Event()
    h.answer(0, task_id="big", output_bytes=300)
    waiting = asyncio.ensure_future(h.lanes.wait_for_room("big"))
    await h.lanes.wait_for_room("small")  # another task's chunk has room
    await asyncio.sleep(0.05)
    assert not waiting.done() and not h.lanes.full()
    h.answer(1, task_id="small", output_bytes=800)
    assert h.lanes.full()  # 1100 bytes held: fetching pauses
    h.main.hold.set()
    await asyncio.wait_for(waiting, 5)
    await until(lambda: not h.lanes.full())


async def test_a_delivery_that_fails_is_reported_and_its_bytes_released() -> None:
    h = Harness(max_output_bytes=1000)
    h.main.refuse = True
    h.answer(0, output_bytes=1000)
    assert h.lanes.full()
    await until(lambda: bool(h.failures))
    assert h.failures == ["not even a dead letter went out"] and h.delivered == []
    assert not h.lanes.full()


async def test_stopping_gives_every_waiting_chunk_room() -> None:
    h = Harness(max_output_bytes=100)
    h.main.hold = asyncio.Event()
    h.answer(0, task_id="big", output_bytes=100)
    waiting = asyncio.ensure_future(h.lanes.wait_for_room("big"))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    h.lanes.stop()
    await asyncio.wait_for(waiting, 5)
    h.main.hold.set()
    await until(lambda: h.delivered == [0])
