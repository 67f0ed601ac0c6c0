"""examples/plain_client.py, the README's plain Kafka client (confluent-kafka), against a worker on the embedded
broker: its request is executed and it prints the result."""

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from app.contract.records import TaskSpec, utc_now
from app.contract.registry import register_schemas
from app.contract.topics import topics_for
from app.control.plane import ControlPlane
from app.kafka.clients import apply_topics
from devtools.broker import EmbeddedBroker
from devtools.registry import LocalRegistry
from tests.conftest import WorkerProcess, make_settings

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plain_client.py"


@pytest.mark.parametrize("wire_format", ["json", "avro"])
async def test_a_plain_kafka_client_gets_its_result(
    broker: EmbeddedBroker, start_worker: Callable[..., WorkerProcess], wire_format: str
) -> None:
    with LocalRegistry() as registry:
        await _run_the_example(broker, start_worker, wire_format, registry.url)


async def _run_the_example(broker: EmbeddedBroker, start_worker: Callable[..., WorkerProcess], wire_format: str,
                           registry_url: str) -> None:
    avro = {"wire_format": "avro", "registry_url": registry_url} if wire_format == "avro" else {}
    settings = make_settings(broker, **avro)
    await apply_topics(settings, topics_for(settings.topic_prefix))
    if avro:
        register_schemas(settings, topics_for(settings.topic_prefix))  # as `loopai topics apply` does
    async with ControlPlane(settings) as control:
        await control.put_task(TaskSpec(name="shout", updated_at=utc_now()))
        await control.publish("shout", "def run(input):\n    return input['text'].upper()\n", activate=True)
    start_worker(settings)
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--bootstrap", broker.bootstrap_servers, "--prefix", settings.topic_prefix,
         *(["--registry", registry_url] if avro else []), "shout", '{"text": "hello"}'],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert (result["task_id"], result["status"], result["output"]) == ("shout", "ok", "HELLO")
