"""Worker processes on the real broker: restart recovery, two workers in one group, the Avro wire."""

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiokafka import TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from app.contract.files import contract_dir
from app.contract.records import ExecutionRequest, TaskSpec, execution_id_for, utc_now
from app.contract.registry import register_schemas
from app.contract.topics import TopicSpec, topics_for
from app.control.plane import ControlPlane
from app.kafka.clients import apply_topics, make_consumer, make_producer
from app.kafka.loop_client import RequestSender, request_from
from app.settings import Settings
from app.worker import RepeatsHeldBack, build_app
from devtools.registry import LocalRegistry
from devtools.samples import program_source
from tests.conftest import WorkerProcess, collect, make_settings, results_for
from tests.kafka.test_tables import _artifact, _publish_in_one_batch


async def test_restarted_worker_recovers_the_tables_exactly(
    settings: Settings, start_worker: Callable[..., WorkerProcess]
) -> None:
    versions = 300
    async with ControlPlane(settings) as control:
        await control.put_task(TaskSpec(name="counter", updated_at=utc_now()))
    await _publish_in_one_batch(settings, [_artifact("counter", v) for v in range(1, versions + 1)])
    async with ControlPlane(settings) as control:
        await control.activate("counter", 217)

    for round_ in range(2):
        worker = start_worker(settings, worker_id=f"restart-{round_}")
        requests = [request_from("counter", {}, version=v) for v in range(1, versions + 1)]
        requests.append(request_from("counter", {}))
        async with RequestSender(settings) as sender:
            await sender.send(requests)
        results = await results_for(settings, [r.request_id for r in requests])
        outputs = [results[r.request_id].output for r in requests]
        assert outputs == [*range(1, versions + 1), 217], f"round {round_}"
        assert worker.stop() == 0


async def test_two_workers_split_partitions_and_lose_nothing_when_one_stops(
    settings: Settings, start_worker: Callable[..., WorkerProcess]
) -> None:
    tasks = await _twelve_tasks(settings, "def run(input):\n    return input['i']\n")
    first = start_worker(settings, worker_id="pair-1")
    second = start_worker(settings, worker_id="pair-2")

    async def stop_first(sent: list[ExecutionRequest]) -> None:
        await results_for(settings, [r.request_id for r in sent])  # both are serving now
        first.process.send_signal(signal.SIGTERM)

    sent = await _send_waves(settings, tasks, waves=20, pause_s=0.1, at_wave=5, action=stop_first)
    results = await results_for(settings, [r.request_id for r in sent], timeout_s=60)
    assert len(results) == len(sent) == 2000
    assert all(results[r.request_id].output == r.input["i"] for r in sent)
    assert {r.worker_id for r in results.values()} == {"pair-1", "pair-2"}
    assert first.process.wait(timeout=30) == 0
    assert second.stop() == 0


async def test_avro_wire_format_end_to_end(broker, start_worker: Callable[..., WorkerProcess]) -> None:
    """A plain Kafka client with confluent-kafka's AvroSerializer and AvroDeserializer talks to a worker through
    a schema registry: its requests are executed, the results and dead letters read with its deserializer.
    The registry is devtools' LocalRegistry over HTTP: a mock:// one cannot be shared with a worker process."""
    with LocalRegistry() as registry:
        settings = make_settings(broker, wire_format="avro", registry_url=registry.url)
        topics = topics_for(settings.topic_prefix)
        await apply_topics(settings, topics)
        register_schemas(settings, topics)  # as `loopai topics apply` does with the Avro wire format
        async with ControlPlane(settings) as control:
            await control.put_task(TaskSpec(name="spam", updated_at=utc_now()))
            await control.publish("spam", program_source("spam_v2"), activate=True)
        start_worker(settings)

        client = SchemaRegistryClient({"url": registry.url})  # the user's own client, not the worker's
        serializer = AvroSerializer(client, (contract_dir("schemas") / "ExecutionRequest.avsc").read_text())
        requests = topics.execution_requests.name
        producer = make_producer(settings)
        await producer.start()
        try:
            value = serializer({"request_id": "plain-1", "task_id": "spam", "input": {"text": "WINNER winner"}},
                               SerializationContext(requests, MessageField.VALUE))
            await producer.send_and_wait(requests, value, key=b"spam")
            await producer.send_and_wait(requests, b"\x01" + value[1:], key=b"spam")  # not the wire format
        finally:
            await producer.stop()

        deserializer = AvroDeserializer(client)
        results = await _read_values(settings, topics.execution_results, 1)
        result = deserializer(results[0], SerializationContext(topics.execution_results.name, MessageField.VALUE))
        assert (result["request_id"], result["status"]) == ("plain-1", "ok")
        assert result["output"] == {"label": "spam", "score": 3}  # winner 3; half capitals is not shouting
        letters = await _read_values(settings, topics.dead_letters, 1)
        letter = deserializer(letters[0], SerializationContext(topics.dead_letters.name, MessageField.VALUE))
        assert "magic byte 0x01, expected 0x00" in letter["reason"]
        assert letter["value"] == b"\x01" + value[1:]


async def _read_values(settings: Settings, spec: TopicSpec, count: int, timeout_s: float = 30) -> list[bytes]:
    """The first `count` raw values of a topic, as a plain client reads them."""
    consumer = make_consumer(settings)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(spec.name, p) for p in range(spec.partitions)])
        await consumer.seek_to_beginning()
        values: list[bytes] = []
        deadline = time.monotonic() + timeout_s
        while len(values) < count:
            assert time.monotonic() < deadline, f"{len(values)} of {count} values on {spec.name}"
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                values += [m.value for m in batch]
        return values
    finally:
        await consumer.stop()


async def test_a_worker_killed_mid_stream_loses_nothing(
    settings: Settings, start_worker: Callable[..., WorkerProcess]
) -> None:
    """SIGKILL: no drain, no commit. The survivor redoes the uncommitted batches; a duplicate carries the
    same execution_id and output."""
    tasks = await _twelve_tasks(settings, "def run(input):\n    return input['i'] * 3\n")
    doomed = start_worker(settings, worker_id="doomed")
    start_worker(settings, worker_id="survivor")

    async def kill_doomed(sent: list[ExecutionRequest]) -> None:
        doomed.process.send_signal(signal.SIGKILL)

    sent = await _send_waves(settings, tasks, waves=15, pause_s=0.05, at_wave=4, action=kill_doomed)
    wanted = {r.request_id for r in sent}
    records = await collect(settings, "execution_results",
                            lambda rs: wanted <= {r.request_id for r in rs}, timeout_s=60)
    by_request: dict[str, set[tuple[str, int]]] = {}
    for result in records:
        by_request.setdefault(result.request_id, set()).add((result.execution_id, result.output))
    assert all(len(variants) == 1 for variants in by_request.values())  # duplicates agree
    assert all(by_request[r.request_id] == {(execution_id_for(r.task_id, r.request_id), r.input["i"] * 3)}
               for r in sent)


async def _twelve_tasks(settings: Settings, source: str) -> list[str]:
    """Twelve tasks running `source`: their keys spread over the 6 request partitions."""
    tasks = [f"t{i}" for i in range(12)]
    async with ControlPlane(settings) as control:
        for name in tasks:
            await control.put_task(TaskSpec(name=name, updated_at=utc_now()))
            await control.publish(name, source, activate=True)
    return tasks


async def _send_waves(
    settings: Settings, tasks: list[str], waves: int, pause_s: float, at_wave: int,
    action: Callable[[list[ExecutionRequest]], Awaitable[None]],
) -> list[ExecutionRequest]:
    """Waves of 100 requests (input i unique), with `action` after wave `at_wave`; returns all sent."""
    sent: list[ExecutionRequest] = []
    async with RequestSender(settings) as sender:
        for wave in range(waves):
            wave_requests = [request_from(tasks[i % 12], {"i": wave * 100 + i}) for i in range(100)]
            await sender.send(wave_requests)
            sent += wave_requests
            if wave == at_wave:
                await action(sent)
            await asyncio.sleep(pause_s)
    return sent


def test_repeated_warnings_are_held_back_and_counted() -> None:
    """A lost broker makes aiokafka log the same lines hundreds of times a second: the first of a kind
    passes, then one per window, saying how many were held back."""
    held_back = RepeatsHeldBack(window_s=10.0)
    records = [logging.LogRecord("aiokafka.conn", logging.ERROR, __file__, 1, "Unable connect to %s", ("n1",), None)
               for _ in range(500)]
    assert [held_back.filter(r) for r in records[:3]] == [True, False, False]
    assert held_back.filter(logging.LogRecord("aiokafka.conn", logging.ERROR, __file__, 1, "other", (), None))
    assert held_back.filter(logging.LogRecord("app", logging.INFO, __file__, 1, "Unable connect to %s", (), None))
    for record in records[3:]:
        held_back.filter(record)
    held_back._window_s = 0.0  # the window has passed
    assert held_back.filter(records[0])
    assert records[0].getMessage() == "Unable connect to n1 [and 499 more like it in the last 0 s]"


async def test_the_agents_consumer_waits_for_records_as_long_as_the_settings_say(tmp_path: Path) -> None:
    """faust fixes its consumer's fetch wait at 1500 ms; the embedded broker holds every fetch that long."""
    app = build_app(Settings(bootstrap_servers="127.0.0.1:9", agent_fetch_max_wait_ms=123, data_dir=tmp_path))
    consumer = app.consumer._thread._create_worker_consumer(app.transport)
    assert consumer._fetch_max_wait_ms == 123
    await consumer.stop()  # never started: this only marks it closed
