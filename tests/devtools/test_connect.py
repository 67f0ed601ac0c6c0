"""Dataset export through a real Apache Kafka Connect 3.9 standalone worker and connect/file-sink.properties:
a loopai worker executes requests, Connect's FileStreamSink writes every result to a file, byte for byte
(`loopai export` itself: tests/cli/test_export.py)."""

import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
import yaml
from aiokafka import TopicPartition

from app.contract.codecs import json_codec
from app.contract.records import ExecutionResult, ExecutionStatus, TaskSpec, utc_now
from app.contract.topics import topics_for
from app.control.plane import ControlPlane
from app.kafka.clients import make_consumer
from app.kafka.loop_client import RequestSender, request_from
from app.kafka.metadata import topic_partitions
from app.settings import Settings
from devtools.connect import (
    CONNECT_DIR,
    STOPPED_BY_SIGTERM,
    ConnectStandalone,
    ConnectUnavailable,
    file_export,
    java_binary,
)
from tests.conftest import WorkerProcess, results_for

# Values a careless export mangles: newlines, quotes, backslashes, non-ASCII, nested JSON, null.
ECHO = "def run(input):\n    return {'echo': input['text'], 'chars': [c for c in input['text'][:3]], 'none': None}\n"
TEXTS = ["plain", "two\nlines", 'quote " and \\ backslash', "café ☕ 𝄞", "", "tab\there", "{\"json\": 1}"]


async def _raw_values(settings: Settings, topic: str) -> list[bytes]:
    """Every value on the topic, as the bytes the worker produced."""
    consumer = make_consumer(settings)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in await topic_partitions(consumer, topic)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        values: list[bytes] = []
        deadline = time.monotonic() + 30
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            assert time.monotonic() < deadline, "could not read the results topic to its end"
            for messages in (await consumer.getmany(timeout_ms=200)).values():
                values.extend(m.value for m in messages)
        return values
    finally:
        await consumer.stop()


def _lines_when(path: Path, count: int, connect: ConnectStandalone, timeout_s: float) -> list[str]:
    deadline = time.monotonic() + timeout_s
    lines: list[str] = []
    while time.monotonic() < deadline:
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        if len(lines) >= count:
            return lines
        if not connect.running():
            pytest.fail(f"Connect exited:\n{connect.log()[-4000:]}")
        time.sleep(0.2)
    pytest.fail(f"{len(lines)} of {count} results in the sink file after {timeout_s}s:\n{connect.log()[-4000:]}")


async def test_file_sink_exports_every_result_exactly_as_produced(
    settings: Settings, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    if java_binary() is None:
        reason = "NO JAVA ON PATH: the real Kafka Connect export test did not run (install a Java 17 runtime)"
        warnings.warn(reason, stacklevel=1)
        pytest.skip(reason)
    results_topic = topics_for(settings.topic_prefix).execution_results.name
    sink_file = tmp_path / "results.jsonl"
    # The sink's consumer gets the tests' 4 s session: the embedded broker holds a group join for about half
    # the session timeout (Connect's default is 45 s).
    connect = file_export(settings, sink_file, tmp_path / "connect")
    async with ControlPlane(settings) as control:
        await control.put_task(TaskSpec(name="echo", updated_at=utc_now()))
        await control.publish("echo", ECHO, activate=True)
    with connect:
        start_worker(settings)
        requests = [request_from("echo", {"text": text + str(i)}) for i in range(30) for text in TEXTS]
        requests += [request_from("echo", {"no_text": i}) for i in range(20)]  # the program raises: error
        requests += [request_from("no-such-task", {"text": "x"}) for _ in range(20)]  # rejected
        async with RequestSender(settings) as sender:
            await sender.send(requests)
        results = await results_for(settings, [r.request_id for r in requests], timeout_s=60)
        produced = await _raw_values(settings, results_topic)
        assert len(produced) == len(requests) == 250  # one result per request, none redelivered
        _lines_when(sink_file, len(produced), connect, timeout_s=60)
    assert connect.stop() == STOPPED_BY_SIGTERM, connect.log()[-4000:]  # shut down by its hook, not killed

    exported = sink_file.read_text(encoding="utf-8").splitlines()
    assert sorted(exported) == sorted(value.decode() for value in produced)  # same bytes, same count
    decoded = [json_codec(ExecutionResult).decode(line.encode()) for line in exported]
    assert {r.request_id: r for r in decoded} == results
    assert [orjson.loads(line) for line in sorted(exported)] == [orjson.loads(v) for v in sorted(produced)]
    statuses = {r.status for r in decoded}
    assert statuses == {ExecutionStatus.OK, ExecutionStatus.ERROR, ExecutionStatus.REJECTED}
    assert any("\n" in r.output["echo"] for r in decoded if r.status is ExecutionStatus.OK)


def test_file_export_refuses_what_it_cannot_write_as_json_lines(settings: Settings, tmp_path: Path) -> None:
    avro = settings.model_copy(update={"wire_format": "avro"})
    with pytest.raises(ConnectUnavailable, match="wire_format is 'avro'"):
        file_export(avro, tmp_path / "out.jsonl", tmp_path)
    secured = settings.model_copy(update={"security_protocol": "SASL_SSL"})
    with pytest.raises(ConnectUnavailable, match="PLAINTEXT only"):
        file_export(secured, tmp_path / "out.jsonl", tmp_path)


def test_compose_export_service_reads_the_results_topic_with_the_shipped_files() -> None:
    services = yaml.safe_load((CONNECT_DIR.parent / "docker-compose.yml").read_text())["services"]
    export = services["export"]
    prefix = services["worker"]["environment"]["LOOPAI_TOPIC_PREFIX"]
    assert export["environment"]["LOOPAI_EXPORT_TOPIC"] == topics_for(prefix).execution_results.name
    script = export["command"][-1]
    mounted = {volume.split(":")[1]: volume.split(":")[0] for volume in export["volumes"]}
    assert mounted["/connect"] == "./connect"
    for path in re.findall(r"/connect/(\S+)", script):
        assert (CONNECT_DIR / path).is_file(), path
    assert (CONNECT_DIR / export["environment"]["LOOPAI_EXPORT_CONNECTOR"]).is_file()  # run from /connect
    # Every ${env:...} the worker and the file sink read is set.
    needed = set(re.findall(r"\$\{env:(\w+)\}", (CONNECT_DIR / "worker.properties").read_text()
                            + (CONNECT_DIR / "file-sink.properties").read_text()))
    assert needed <= set(export["environment"])
