"""`loopai oracle serve` answering requests produced to oracle-requests on the real broker until Ctrl-C (the
labels file: tests/devtools/test_oracle.py)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

from app.contract.codecs import codec_for
from app.contract.records import OracleKind, OracleSpec, OracleVerdict, ValidationRequest, execution_id_for, utc_now
from app.contract.topics import topics_for
from app.kafka.clients import apply_topics, make_producer, partition_for
from app.kafka.tables import read_to_end
from devtools.broker import EmbeddedBroker
from tests.conftest import collect, make_settings, wait_for_text


def _request(task_id: str, request_id: str, value: dict) -> ValidationRequest:
    return ValidationRequest(execution_id=execution_id_for(task_id, request_id), request_id=request_id,
                             task_id=task_id, version=1, input=value, output="ham", status="ok",
                             oracle=OracleSpec(kind=OracleKind.EXTERNAL), requested_at=utc_now())


async def test_oracle_serve_answers_labelled_requests_until_ctrl_c(broker: EmbeddedBroker, tmp_path: Path) -> None:
    settings = make_settings(broker)
    topics = topics_for(settings.topic_prefix)
    await apply_topics(settings, topics)
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"input": {"text": "FREE prize", "lang": "en"}, "output": "spam"}\n'
                      '{"input": {"text": "hello"}, "output": "ham"}\n')
    output = tmp_path / "oracle.out"
    with open(output, "wb") as out:
        oracle = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "oracle", "serve", "--labels", str(labels), "--oracle-id", "ref"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **settings.to_env()},
        )
    try:
        wait_for_text(output, "oracle ref serving 2 label(s)", oracle, timeout_s=60)
        unlabelled = _request("spam", "r1", {"text": "no label for me"})
        labelled = _request("spam", "r2", {"lang": "en", "text": "FREE prize"})
        codec = codec_for(ValidationRequest, settings, topics.oracle_requests)
        spec = topics.oracle_requests
        # One partition, in this order: once the labelled one is answered, the two before it were seen.
        partition = partition_for(labelled.execution_id.encode(), spec.partitions)
        producer = make_producer(settings)
        await producer.start()
        try:
            await producer.send_and_wait(spec.name, b"not a request", partition=partition)
            for request in (unlabelled, labelled):
                await producer.send_and_wait(spec.name, codec.encode(request), key=request.execution_id.encode(),
                                             partition=partition)
        finally:
            await producer.stop()

        verdicts = await collect(settings, "oracle_verdicts", lambda rs: len(rs) >= 1, timeout_s=60)
        assert [(v.execution_id, v.task_id, v.output, v.oracle_id) for v in verdicts] == [
            (labelled.execution_id, "spam", "spam", "ref")]
        oracle.send_signal(signal.SIGINT)
        assert oracle.wait(timeout=30) == 0, output.read_text()
    finally:
        if oracle.poll() is None:
            oracle.kill()
            oracle.wait()
    text = output.read_text()
    assert "oracle ref stopped: answered 1 verdict(s)" in text and "Traceback" not in text, text
    everything = await read_to_end(settings, topics.oracle_verdicts)
    assert [v.execution_id for v in everything if isinstance(v, OracleVerdict)] == [labelled.execution_id]
