"""Anomaly signals end to end on the embedded broker: StatsPartials of synthetic minutes (hours in the past, as a
replay) go to stats-partials, a worker's agent judges them, signals come out on anomaly-signals, and a canary
with a signal against it is rolled back; a new task's real traffic breaking its error-rate bound is signalled
within its first minute.

The agent's own logic is also tested fast, at the end: its handlers called directly, without a broker or a worker
(how minutes are judged is app/domain/anomaly_watch.py's, tested in tests/domain/test_anomaly_watch.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import faust
import pytest
from faust.types import TP

from app.agents import detect_anomalies
from app.agents.detect_anomalies import DetectAnomalies
from app.contract.codecs import codec_for, json_codec
from app.contract.records import (
    AnomalyMethod,
    AnomalyMetric,
    AnomalySignal,
    CanaryAction,
    CanaryDecision,
    DeadLetter,
    ExecutionStatus,
    StatsPartial,
    TaskSpec,
)
from app.contract.topics import topics_for
from app.control.plane import ControlPlane
from app.kafka.clients import apply_topics, make_producer
from app.kafka.loop_client import RequestSender, request_from
from app.settings import Settings
from app.worker import build_app
from devtools.broker import EmbeddedBroker
from tests.agents.test_aggregate_daily_stats import Batches
from tests.agents.test_plumbing import Events, Sends
from tests.conftest import WorkerProcess, collect, make_settings, results_for
from tests.synthetic_partials import partials

# Synthetic time starts five hours ago, on a minute: every minute is over before the test starts.
T0 = (datetime.now(UTC) - timedelta(hours=5)).replace(second=0, microsecond=0)
PROGRAM = "def run(input):\n    return input\n"


@pytest.fixture(scope="module")
def served(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    # A quiet task's last minute is judged about idle + lateness seconds after its last partial.
    settings = make_settings(broker, anomaly_lateness_s=1.0, anomaly_idle_s=2.0, anomaly_tick_s=0.5)
    asyncio.run(apply_topics(settings, topics_for(settings.topic_prefix)))
    worker = WorkerProcess(settings, tmp_path_factory.mktemp("anomalies") / "worker.log", "anomaly-1").start()
    yield settings
    assert worker.stop() == 0, worker.log()[-3000:]


async def produce(settings: Settings, stream: Iterable[StatsPartial]) -> None:
    """The partials to stats-partials keyed by task, as the executor sends them."""
    spec = topics_for(settings.topic_prefix).stats_partials
    codec, name = codec_for(StatsPartial, settings, spec), spec.name
    producer = make_producer(settings)
    await producer.start()
    try:
        for partial in stream:
            await producer.send(name, codec.encode(partial), key=partial.task_id.encode())
        await producer.flush()
    finally:
        await producer.stop()


async def signals_of(settings: Settings, task_id: str, until: Callable[[list[AnomalySignal]], bool],
                     timeout_s: float = 60) -> list[AnomalySignal]:
    def of_task(records: list[object]) -> list[AnomalySignal]:
        return [r for r in records if isinstance(r, AnomalySignal) and r.task_id == task_id]

    return of_task(await collect(settings, "anomaly_signals", lambda rs: until(of_task(rs)), timeout_s))


def at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def ends_with_latency_signal(minute_end: datetime) -> Callable[[list[AnomalySignal]], bool]:
    """Done once the marker (a p99 spike in a task's last minute) is signalled: the task's signals before it
    are all out, since a task's minutes are judged in order and its signals share a partition."""
    return lambda signals: any(s.metric == AnomalyMetric.P99_LATENCY and s.detected_at == minute_end
                               for s in signals)


async def test_a_quiet_stream_gives_no_signal(served: Settings) -> None:
    await produce(served, partials("quiet", 1, T0, 241, seed=11, p99_ms=lambda m: 150.0 if m == 240 else 50.0))
    signals = await signals_of(served, "quiet", ends_with_latency_signal(at(241)))
    assert [(s.metric, s.detected_at) for s in signals] == [(AnomalyMetric.P99_LATENCY, at(241))]


async def test_a_spike_is_one_signal_and_one_long_incident_is_one_signal(served: Settings) -> None:
    def error_rate(m: int) -> float:
        return 0.25 if m in (90, 91, 92) or 160 <= m < 200 else 0.01  # a 3-minute spike; a 40-minute incident

    await produce(served, partials("spiky", 1, T0, 231, seed=12, error_rate=error_rate,
                                   p99_ms=lambda m: 150.0 if m == 230 else 50.0))
    signals = await signals_of(served, "spiky", ends_with_latency_signal(at(231)))
    assert [(s.metric, s.method, s.detected_at) for s in signals] == [
        (AnomalyMetric.ERROR_RATE, AnomalyMethod.ZSCORE, at(91)),
        (AnomalyMetric.ERROR_RATE, AnomalyMethod.ZSCORE, at(161)),
        (AnomalyMetric.P99_LATENCY, AnomalyMethod.ZSCORE, at(231)),
    ]
    assert signals[0].hint.startswith("error rate jumped to 2") and signals[0].version == 1


async def test_a_slow_latency_drift_is_detected(served: Settings) -> None:
    # From minute 90 p99 creeps up 0.1% a minute (6% an hour), under 8% noise from minute to minute.
    await produce(served, partials("drifting", 1, T0, 300, seed=13,
                                   p99_ms=lambda m: 50.0 * (1 + 0.001 * max(0, m - 90))))
    [signal, *_] = await signals_of(served, "drifting", bool)
    assert (signal.metric, signal.method) == (AnomalyMetric.P99_LATENCY, AnomalyMethod.EWMA), signal
    assert at(120) < signal.detected_at < at(300) and signal.value > signal.baseline


def interleaved(*streams: Iterator[StatsPartial]) -> Iterator[StatsPartial]:
    """Partials of versions running side by side, in event-time order as one executor would send them."""
    return iter(sorted((p for stream in streams for p in stream), key=lambda p: p.event_at))


async def test_a_canary_with_a_latency_signal_is_rolled_back(served: Settings) -> None:
    async with ControlPlane(served) as control:
        # Its synthetic p99 of 50 ms is its normal: the latency target must not be what rolls the canary back.
        await control.put_task(TaskSpec(name="canaried", latency_target_ms=1000, updated_at=T0))
        await control.publish("canaried", PROGRAM, activate=True)
        await control.publish("canaried", PROGRAM)
        # The canary started 90 synthetic minutes in, when the task had a baseline.
        spec = control.task("canaried").model_copy(update={"canary_version": 2, "canary_percent": 50.0,
                                                           "updated_at": at(90)})
        await control.put_task(spec)
    # v1 all along; v2 from the canary's start, its p99 three times v1's from its fifth minute.
    await produce(served, interleaved(
        partials("canaried", 1, T0, 110, seed=14),
        partials("canaried", 2, at(90), 20, seed=15, p99_ms=lambda m: 150.0 if m >= 4 else 50.0)))
    records = await collect(served, "canary_decisions",
                            lambda rs: any(isinstance(r, CanaryDecision) and r.task_id == "canaried" for r in rs))
    [decision] = [r for r in records if isinstance(r, CanaryDecision) and r.task_id == "canaried"]
    assert (decision.action, decision.candidate_version, decision.active_version) == (
        CanaryAction.ROLLED_BACK, 2, 1)
    assert decision.reason.startswith("1 anomaly signal(s) against the candidate: p99 latency jumped to 1"), decision
    [signal, *_] = await signals_of(served, "canaried", bool)
    assert (signal.version, signal.metric, signal.detected_at) == (2, AnomalyMetric.P99_LATENCY, at(95))

    def rolled_back(specs: list[object]) -> bool:
        last = {s.name: s for s in specs if isinstance(s, TaskSpec)}.get("canaried")
        return last is not None and last.canary_version is None and last.active_version == 1

    await collect(served, "task_specs", rolled_back)


async def test_undecodable_partials_become_dead_letters(served: Settings) -> None:
    name = topics_for(served.topic_prefix).stats_partials.name
    producer = make_producer(served)
    await producer.start()
    try:
        await producer.send_and_wait(name, b"\xff not a partial", key=b"broken")
    finally:
        await producer.stop()
    letters = await collect(served, "dead_letters",
                            lambda rs: any(isinstance(r, DeadLetter) and r.source_topic == name for r in rs))
    [letter] = [r for r in letters if isinstance(r, DeadLetter) and r.source_topic == name]
    assert letter.error_type == "DecodeError" and letter.value == b"\xff not a partial"


async def test_a_new_task_breaking_its_error_bound_is_signalled_within_its_first_minute(served: Settings) -> None:
    """No baseline yet: the task's max_error_rate (5 % by default) is what judges it, as soon as enough results
    say so. Half its inputs make the program raise."""
    async with ControlPlane(served) as control:
        await control.put_task(TaskSpec(name="half-broken", updated_at=datetime.now(UTC)))
        await control.publish("half-broken", "def run(input):\n    return 1 // (input['n'] % 2)\n", activate=True)
    async with RequestSender(served) as sender:
        # The worker follows the task table live: its first request is the one answered by v1.
        deadline = time.monotonic() + 30
        while True:
            probe = request_from("half-broken", {"n": 1})
            await sender.send([probe])
            if (await results_for(served, [probe.request_id]))[probe.request_id].status is ExecutionStatus.OK:
                break
            assert time.monotonic() < deadline, "the worker never ran the task's v1"
        started = time.monotonic()
        first_sent = datetime.now(UTC)
        await sender.send([request_from("half-broken", {"n": n}) for n in range(60)])
    [signal] = await signals_of(served, "half-broken", bool, timeout_s=60)
    waited = time.monotonic() - started
    assert (signal.metric, signal.method, signal.version) == (AnomalyMetric.ERROR_RATE, AnomalyMethod.TARGET, 1)
    assert 0.3 < signal.value < 0.7 and signal.baseline == 0.05, signal
    assert signal.detected_at - first_sent < timedelta(seconds=60) and waited < 60, (signal, waited)


REPLAYED_AT = at(300)  # the wall clock of the fast tests: an hour after their traffic, as in a replay


@dataclass
class Detector:
    """The agent under test, its faust app, the task table it reads, what it sent, and its clock."""

    agent: DetectAnomalies
    app: faust.App
    tasks: dict[str, TaskSpec]
    sends: Sends
    now: datetime = REPLAYED_AT
    events: Events = field(default_factory=lambda: Events({StatsPartial: "p.stats-partials"}))

    async def consume(self, stream: Iterable[StatsPartial | tuple[str, bytes]], partition: int = 0) -> None:
        """The partials (or bytes on the topic named with them) as events of one partition."""
        await self.agent._consume(Batches([self.events(*stream, partition=partition)]))

    def signals(self) -> list[tuple[bytes | None, str, AnomalyMetric, AnomalyMethod, datetime]]:
        """The signals sent: (key, task, metric, method, detected at)."""
        codec = json_codec(AnomalySignal)
        return [(key, s.task_id, s.metric, s.method, s.detected_at)
                for s, key in ((codec.decode(v), k) for topic, k, v in self.sends.sent if topic == "p.anomaly-signals")]


@pytest.fixture
def detector(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Detector:
    settings = Settings(bootstrap_servers="127.0.0.1:9", topic_prefix="p.", data_dir=tmp_path)
    ready = asyncio.Event()
    ready.set()
    tasks: dict[str, TaskSpec] = {}
    app = build_app(settings)
    agent = DetectAnomalies(app, settings, topics_for(settings.topic_prefix),
                            SimpleNamespace(ready=ready, tasks=tasks))  # type: ignore[arg-type]
    detector = Detector(agent, app, tasks, Sends().install(monkeypatch))
    monkeypatch.setattr(detect_anomalies, "utc_now", lambda: detector.now)
    return detector


def spiking_last(task: str, seed: int) -> Iterator[StatsPartial]:
    """80 minutes from T0 whose last has an error-rate spike: judged once the task goes quiet."""
    return partials(task, 1, T0, 80, seed=seed, error_rate=lambda m: 0.3 if m == 79 else 0.01)


async def test_partials_become_signals_keyed_by_task(detector: Detector) -> None:
    await detector.consume(partials("spiky", 1, T0, 100, seed=12, error_rate=lambda m: 0.25 if m == 90 else 0.01))
    assert detector.signals() == [(b"spiky", "spiky", AnomalyMetric.ERROR_RATE, AnomalyMethod.ZSCORE, at(91))]


async def test_a_task_in_the_table_is_judged_against_its_targets_from_its_first_minute(detector: Detector) -> None:
    detector.tasks["targeted"] = TaskSpec(name="targeted", max_error_rate=0.05, latency_target_ms=1000,
                                         updated_at=T0)
    half_broken = {"error_rate": lambda m: 0.5}
    await detector.consume(partials("targeted", 1, T0, 2, seed=1, **half_broken))
    await detector.consume(partials("unknown", 1, T0, 2, seed=2, **half_broken))  # no spec: no targets
    assert [(task, metric, method) for _, task, metric, method, _ in detector.signals()] == [
        ("targeted", AnomalyMetric.ERROR_RATE, AnomalyMethod.TARGET)]


async def test_bad_partials_become_dead_letters_and_the_stream_goes_on(detector: Detector) -> None:
    unreadable = next(partials("spiky", 1, T0, 1, seed=3)).model_copy(update={"sketch": b"not a sketch"})
    await detector.consume([("p.stats-partials", b"\xff not a partial"), unreadable,
                            *partials("spiky", 1, T0, 100, seed=12, error_rate=lambda m: 0.25 if m == 90 else 0.01)])
    letters = detector.sends.to("p.dead-letters", DeadLetter)
    assert [(d.source_offset, d.error_type, d.value) for d in letters] == [
        (0, "DecodeError", b"\xff not a partial"), (1, "SketchError", json_codec(StatsPartial).encode(unreadable))]
    assert letters[1].reason.startswith("anomaly detection failed: not a DDSketch protobuf")
    assert [task for _, task, *_ in detector.signals()] == ["spiky"]


async def test_the_timer_judges_quiet_tasks_but_not_those_of_a_revoked_partition(detector: Detector) -> None:
    await detector.consume(spiking_last("kept", seed=4), partition=0)
    await detector.consume(spiking_last("moved", seed=4), partition=1)
    await detector.agent._tick()
    assert detector.signals() == []  # their last minute is open until they have been quiet a while
    # Partition 1 of stats-partials goes to another worker; partition 1 of another topic says nothing of "kept".
    await detector.agent._forget_revoked(detector.app, {TP("p.stats-partials", 1), TP("p.anomaly-signals", 0)},
                                         signal=None)
    detector.now += timedelta(minutes=5)
    await detector.agent._tick()
    assert detector.signals() == [(b"kept", "kept", AnomalyMetric.ERROR_RATE, AnomalyMethod.ZSCORE, at(80))]


async def test_a_tick_that_fails_is_logged_and_the_timer_goes_on(detector: Detector, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    def broken(now: datetime) -> list[AnomalySignal]:
        raise ValueError("a bug")

    monkeypatch.setattr(detector.agent.watch, "tick", broken)
    with caplog.at_level(logging.ERROR, logger="app.agents.detect_anomalies"):
        await detector.agent._tick()  # does not raise: a timer that raises takes the worker down
    assert "anomaly tick failed" in caplog.text
