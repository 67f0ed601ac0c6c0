"""Codec cost per record, broker-free: in, requests and results made here; out, µs per decode and encode_fields of
each wire format and of schemaless Avro (the Avro codec on confluent-kafka's in-process mock registry), with ratios.
`python -m bench.codecs`."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any

import fastavro

from app.contract.codecs import codec_for, parsed_schema
from app.contract.records import ExecutionRequest, ExecutionResult, ExecutionStatus, utc_now
from app.contract.topics import topics_for
from app.settings import Settings

N = 50_000


def _per_record_us(action: Callable[[Any], Any], items: list[Any]) -> float:
    best = float("inf")
    for _ in range(3):  # best of three: the machine is shared
        started = time.perf_counter()
        for item in items:
            action(item)
        best = min(best, time.perf_counter() - started)
    return best / len(items) * 1e6


def main() -> None:
    wires = {"json": Settings(topic_prefix="bench."),
             "avro": Settings(wire_format="avro", registry_url="mock://bench", topic_prefix="bench.")}
    topics = topics_for("bench.")
    requests = [ExecutionRequest(request_id=f"r{i}", task_id="spam", input={"text": f"free prize {i}", "n": i},
                                 requested_at=utc_now()) for i in range(N)]
    results = [ExecutionResult(execution_id=f"e{i}", request_id=f"r{i}", task_id="spam", program_id="p", version=2,
                               status=ExecutionStatus.OK, output={"label": "spam", "score": i}, latency_ms=0.2,
                               executed_at=utc_now(), worker_id="w").model_dump() for i in range(N)]
    cost: dict[str, dict[str, float]] = {}
    for wire, settings in wires.items():
        request_codec = codec_for(ExecutionRequest, settings, topics.execution_requests)
        result_codec = codec_for(ExecutionResult, settings, topics.execution_results)
        encoded = [request_codec.encode(r) for r in requests]
        cost[wire] = {
            "decode request": _per_record_us(request_codec.decode, encoded),
            "encode_fields result": _per_record_us(result_codec.encode_fields, results),
        }
    request_schema, result_schema = parsed_schema("ExecutionRequest"), parsed_schema("ExecutionResult")
    bodies = [_schemaless_bytes(request_schema, r.model_dump()) for r in requests]
    cost["schemaless"] = {
        "decode request": _per_record_us(
            lambda b: ExecutionRequest.model_validate(fastavro.schemaless_reader(io.BytesIO(b), request_schema, None)),
            bodies),
        "encode_fields result": _per_record_us(lambda f: _schemaless_bytes(result_schema, f), results),
    }
    for step in cost["json"]:
        json_us, avro_us, schemaless_us = cost["json"][step], cost["avro"][step], cost["schemaless"][step]
        print(f"{step:22s} json {json_us:6.2f} us  schemaless {schemaless_us:6.2f} us  avro {avro_us:6.2f} us  "
              f"avro/schemaless {avro_us / schemaless_us:.2f}  avro/json {avro_us / json_us:.2f}")


def _schemaless_bytes(schema: Any, fields: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, schema, fields)
    return buffer.getvalue()


if __name__ == "__main__":
    main()
