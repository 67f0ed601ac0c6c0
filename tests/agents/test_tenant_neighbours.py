"""Tenants apart in time and memory, through a real worker on the embedded broker: a victim task's results do
not wait for a neighbour that spins past its timeout, hangs a spinning finaliser on its input, or returns
megabyte outputs; the worker's memory stays bounded; nothing is lost, also across a kill -9."""

import asyncio
import signal
import time
from pathlib import Path

import pytest

from app.contract.records import ExecutionRequest, ExecutionResult, TaskSpec, utc_now
from app.contract.topics import topics_for
from app.control.plane import ControlPlane
from app.kafka.clients import apply_topics
from app.kafka.loop_client import RequestSender, follow, request_from
from app.settings import Settings
from devtools.broker import EmbeddedBroker
from devtools.samples.neighbours import FINALISER, HUGE, SPIN, VICTIM
from tests.conftest import WorkerProcess, collect, make_settings

PROGRAMS = {"victim": VICTIM, "spin": SPIN, "finaliser": FINALISER, "huge": HUGE}


async def _provision(settings: Settings) -> None:
    await apply_topics(settings, topics_for(settings.topic_prefix))
    async with ControlPlane(settings) as control:
        for name, source in PROGRAMS.items():
            await control.put_task(TaskSpec(name=name, updated_at=utc_now()))
            await control.publish(name, source, activate=True)


async def _send_and_time(settings: Settings, requests: list[ExecutionRequest], watched: set[str],
                         timeout_s: float) -> tuple[dict[str, list[ExecutionResult]], float]:
    """Send requests; wait until every one has a result. Returns all results per request id, and the seconds
    from the send until the last result of a `watched` request."""
    wanted = {r.request_id for r in requests}
    results: dict[str, list[ExecutionResult]] = {}
    last_watched = 0.0
    spec = topics_for(settings.topic_prefix).execution_results

    async def read() -> None:
        nonlocal last_watched
        async for _, _, result in follow(settings, spec):
            if result.request_id in wanted:
                results.setdefault(result.request_id, []).append(result)
                if result.request_id in watched:
                    last_watched = time.monotonic()
                if len(results) == len(wanted):
                    return

    reading = asyncio.ensure_future(read())
    started = time.monotonic()
    async with RequestSender(settings) as sender:
        await sender.send(requests)
    try:
        await asyncio.wait_for(reading, timeout_s)
    except TimeoutError:
        pytest.fail(f"{len(wanted) - len(results)} of {len(wanted)} requests without a result after {timeout_s}s")
    return results, last_watched - started


def _peak_rss_mb(worker: WorkerProcess) -> float:
    assert worker.process is not None
    for line in Path(f"/proc/{worker.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def _interleave(hostile: list[ExecutionRequest], victims: list[ExecutionRequest]) -> list[ExecutionRequest]:
    """A victim after every fifth neighbour's request (so in the same fetches), the rest at the end."""
    mixed, left = [], list(victims)
    for index, request in enumerate(hostile):
        mixed.append(request)
        if index % 5 == 4 and left:
            mixed.append(left.pop(0))
    return mixed + left


def _victims(count: int) -> list[ExecutionRequest]:
    return [request_from("victim", {"n": n}) for n in range(count)]


@pytest.mark.timeout(300)
async def test_a_victim_does_not_wait_for_its_neighbours_and_memory_stays_bounded(
        broker: EmbeddedBroker, tmp_path: Path) -> None:
    settings = make_settings(broker, sandbox_memory_mb=256)
    await _provision(settings)
    worker = WorkerProcess(settings, tmp_path / "worker.log", "neighbours").start()
    try:
        await _send_and_time(settings, _victims(5), set(), 60)  # warm: the victim's process is started
        victims = _victims(60)
        _, alone_s = await _send_and_time(settings, victims, {r.request_id for r in victims}, 60)

        spin = [request_from("spin", {"n": n}) for n in range(60)]
        finaliser = [request_from("finaliser", {"n": n}) for n in range(12)]  # 6 timeouts: within its budget
        huge = [request_from("huge", {"n": n}) for n in range(200)]
        victims = _victims(60)
        hostile = [*spin, *finaliser, *huge]
        mixed = _interleave(hostile, victims)
        results, beside_s = await _send_and_time(settings, mixed, {r.request_id for r in victims}, 240)
        peak_mb = _peak_rss_mb(worker)
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]

    # Before tenants were kept apart: 41 s beside the spinning task alone. The bound leaves a busy machine room.
    assert beside_s < alone_s + 10, (beside_s, alone_s)
    assert all(len(answers) == 1 for answers in results.values())  # no redelivery without a failure
    first = {request_id: answers[0] for request_id, answers in results.items()}
    assert [first[r.request_id].output for r in victims] == [r.input["n"] * 2 for r in victims]
    # The spinning task used up its budget (10 timeouts within a minute): the rest of its calls were refused.
    spun = [first[r.request_id] for r in spin]
    assert sum(r.status.value == "timeout" for r in spun) >= 10
    assert {r.status.value for r in spun} == {"timeout", "rejected"}
    assert all("is suspended until" in r.error_message for r in spun if r.status.value == "rejected")
    # Each finaliser is charged to the call that created it: exactly the even inputs time out.
    timed_out = {r.input["n"] for r in finaliser if first[r.request_id].status.value == "timeout"}
    assert timed_out == {n for n in range(12) if n % 2 == 0}
    assert all(first[r.request_id].output == r.input["n"] for r in finaliser if r.input["n"] % 2)
    assert all(first[r.request_id].status.value == "ok" for r in huge)
    # 200 outputs of 1 MB went through; the worker held at most executor_max_output_bytes (64 MB) of them.
    assert peak_mb < 250, peak_mb


@pytest.mark.timeout(300)
async def test_nothing_is_lost_when_the_worker_is_killed_among_hostile_neighbours(
        broker: EmbeddedBroker, tmp_path: Path) -> None:
    settings = make_settings(broker, sandbox_memory_mb=256)
    await _provision(settings)
    first = WorkerProcess(settings, tmp_path / "first.log", "first").start()
    second = None
    try:
        victims = _victims(100)
        spin = [request_from("spin", {"n": n}) for n in range(10)]
        mixed = [*spin[:5], *victims[:50], *spin[5:], *victims[50:]]
        sending = asyncio.ensure_future(_send_and_time(settings, mixed, set(), 240))
        deadline = time.monotonic() + 60
        spec = topics_for(settings.topic_prefix).execution_results
        seen = 0
        async for _, _, _ in follow(settings, spec):  # kill it once some results are out, the spinners still running
            seen += 1
            if seen >= 20 or time.monotonic() > deadline:
                break
        first.stop(signal.SIGKILL)
        second = WorkerProcess(settings, tmp_path / "second.log", "second").start()
        results, _ = await sending
    finally:
        for worker in (first, second):
            if worker is not None:
                worker.stop(signal.SIGKILL if worker is first else signal.SIGTERM)

    assert set(results) == {r.request_id for r in mixed}  # nothing lost
    for request in victims:
        answers = results[request.request_id]
        assert {a.output for a in answers} == {request.input["n"] * 2}
        assert len({a.execution_id for a in answers}) == 1  # a duplicate carries the same execution id
    assert {a.status.value for r in spin for a in results[r.request_id]} <= {"timeout", "rejected"}


@pytest.mark.timeout(300)
async def test_a_task_whose_calls_keep_timing_out_is_suspended_until_resumed(
        broker: EmbeddedBroker, tmp_path: Path) -> None:
    settings = make_settings(broker, sandbox_memory_mb=256, task_suspend_timeouts=3)
    await _provision(settings)
    worker = WorkerProcess(settings, tmp_path / "worker.log", "budget").start()
    try:
        spin = [request_from("spin", {"n": n}) for n in range(12)]
        results, _ = await _send_and_time(settings, spin, set(), 120)
        statuses = [results[r.request_id][0].status.value for r in spin]
        assert statuses.count("timeout") >= 3 and "rejected" in statuses, statuses
        signals = await collect(settings, "anomaly_signals", lambda ss: any(s.task_id == "spin" for s in ss))
        (signal_,) = [s for s in signals if s.task_id == "spin"]
        assert signal_.metric.value == "timeouts" and signal_.method.value == "budget"
        assert "3 calls timed out within 60 s" in signal_.hint
        async with ControlPlane(settings) as control:
            assert control.suspension("spin") is not None
            await control.resume("spin")
        # Resumed: its next call runs again (and times out) rather than being refused.
        deadline = time.monotonic() + 60
        while True:
            again = request_from("spin", {"n": 99})
            answer = (await _send_and_time(settings, [again], set(), 60))[0][again.request_id][0]
            if answer.status.value == "timeout":
                break
            assert time.monotonic() < deadline, answer
            await asyncio.sleep(0.2)  # the resume is on its way through the suspensions table
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
