"""Codecs round-trip every record type in both wire formats and refuse malformed bytes, broker-free (the Avro
wire format against confluent-kafka's in-process mock registry)."""

import io
from datetime import UTC, datetime
from typing import Any

import fastavro
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.contract.codecs import Codec, DecodeError, codec_for, json_codec, parsed_schema
from app.contract.records import (
    AnomalyMethod,
    AnomalyMetric,
    AnomalySignal,
    CanaryAction,
    CanaryDecision,
    Comparison,
    ComplexityMetrics,
    DailyStats,
    DeadLetter,
    ExecutionRequest,
    ExecutionResult,
    ExecutionStatus,
    FailingExample,
    ImprovementRequest,
    ImprovementStatus,
    ImprovementTrigger,
    OracleKind,
    OracleSpec,
    OracleVerdict,
    ProgramArtifact,
    Record,
    RetentionEvent,
    SamplingStrategy,
    StatsPartial,
    SynthesisStrategy,
    TaskExample,
    TaskSpec,
    TaskSuspension,
    Validation,
    ValidationRequest,
    ValidationStatus,
)
from app.contract.registry import register_schemas
from app.contract.topics import topics_for
from app.settings import Settings

WIRES = {"json": Settings(topic_prefix="codecs."),
         "avro": Settings(wire_format="avro", registry_url="mock://codecs", topic_prefix="codecs.")}
register_schemas(WIRES["avro"], topics_for("codecs."))  # a step of its own: codecs only look the ids up


def wire_codec(model: type[Any], wire_format: str) -> Codec[Any]:
    """The codec of a record type on the first topic that carries it."""
    settings = WIRES[wire_format]
    topic = next(t for t in topics_for(settings.topic_prefix).all() if t.record_name == model.__name__)
    return codec_for(model, settings, topic)


WHEN = datetime(2026, 11, 22, 3, 4, 5, 678000, tzinfo=UTC)

SAMPLES: list[Record] = [
    ExecutionRequest(request_id="r1", task_id="spam", input={"text": "hi", "n": [1, 2.5, None]},
                     expected_output={"label": "ham"}, requested_at=WHEN),
    ExecutionRequest(request_id="r2", task_id="spam", version=3, input={}, force_validation=True, timeout_ms=50),
    ExecutionResult(execution_id="e", request_id="r1", task_id="spam", program_id="p", version=2,
                    status=ExecutionStatus.OK, output=["a", {"b": 1}], latency_ms=0.25, memory_usage_mb=31.5,
                    sampled_for_validation=True, executed_at=WHEN, worker_id="w1"),
    ExecutionResult(execution_id="e", request_id="r1", task_id="spam", status=ExecutionStatus.REJECTED,
                    error_message="unknown task", executed_at=WHEN, worker_id="w1"),
    ProgramArtifact(task_id="spam", version=1, program_id="spam-v1-abc", source_code="def run(input): return 1",
                    confidence=0.8, complexity_metrics=ComplexityMetrics(lines_of_code=1, cyclomatic_complexity=1),
                    llm_provider="acme", llm_model="m1", created_at=WHEN),
    TaskSpec(name="spam", description="d", input_schema={"type": "object"},
             examples=[TaskExample(input={"text": "free"}, expected_output="spam")], active_version=2,
             updated_at=WHEN),
    DeadLetter(reason="bad", error_type="DecodeError", source_topic="t", source_partition=1, source_offset=99,
               key=b"k", value=b"\x00\xffraw", worker_id="w", dead_lettered_at=WHEN),
    TaskSpec(name="spam", updated_at=WHEN, sampling_strategy=SamplingStrategy.STRATIFIED, canary_version=3,
             canary_percent=12.5, oracle=OracleSpec(kind=OracleKind.SHADOW, comparison=Comparison.JSON_FIELDS,
                                                    shadow_version=1, timeout_s=5)),
    ValidationRequest(execution_id="e", request_id="r", task_id="spam", version=2, input={"text": "x"},
                      output={"label": "spam"}, status="ok", expected_output="spam",
                      oracle=OracleSpec(kind=OracleKind.LABEL), requested_at=WHEN),
    OracleVerdict(execution_id="e", task_id="spam", output="ham", oracle_id="labels.jsonl", answered_at=WHEN),
    Validation(execution_id="e", request_id="r", task_id="spam", version=2, input={"text": "x"},
               program_output="spam", oracle_output="ham", oracle_kind=OracleKind.EXTERNAL,
               comparison=Comparison.EXACT, status=ValidationStatus.VALIDATED, match=False,
               details="'spam' != 'ham'", validated_at=WHEN),
    Validation(execution_id="e", request_id="r", task_id="spam", version=2, input={}, oracle_kind=OracleKind.EXTERNAL,
               comparison=Comparison.EXACT, status=ValidationStatus.EXPIRED, validated_at=WHEN),
    CanaryDecision(task_id="spam", candidate_version=3, active_version=2, action=CanaryAction.PROMOTED,
                   reason="better", candidate_accuracy=0.97, active_accuracy=0.9, validations=40, decided_at=WHEN),
    DailyStats(task_id="spam", version=2, date="2026-11-22", time_zone="Europe/Paris", executions=10, ok=6, error=1,
               timeout=1, rejected=2, success_rate=0.6, sampled=2, sampling_rate=0.25, validated=2, matched=1,
               accuracy=0.5, avg_latency_ms=1.5, p50_latency_ms=1.2, p95_latency_ms=4.0, p99_latency_ms=4.5,
               sketch=b"\x0a\x00\xff\x80", window_start=WHEN, window_end=WHEN, closed_at=WHEN),
    DailyStats(task_id="spam", date="2026-11-22", time_zone="UTC", executions=1, ok=0, error=0, timeout=0, rejected=1,
               success_rate=0.0, sampled=0, sampling_rate=0.0, validated=0, matched=0, sketch=b"",
               window_start=WHEN, window_end=WHEN),
    StatsPartial(task_id="spam", version=3, date="2026-11-22", time_zone="UTC", ok=5, error=1, timeout=0, rejected=0,
                 sampled=1, latency_sum_ms=12.5, sketch=b"\x00\x01\xfe", event_at=WHEN),
    StatsPartial(task_id="spam", date="2026-11-22", time_zone="UTC", validated=3, matched=2, sketch=b"",
                 event_at=WHEN),
    AnomalySignal(task_id="spam", version=2, metric=AnomalyMetric.P99_LATENCY, value=40.0, baseline=10.0, score=7.5,
                  method=AnomalyMethod.EWMA, hint="p99 latency drifted up", detected_at=WHEN),
    RetentionEvent(topic="loopai.analytics", key="spam/all/2026-10-01", date_from="2026-10-01",
                   date_to="2026-10-01", reason="older than 30 days", emitted_at=WHEN),
    RetentionEvent(topic="loopai.program-artifacts", key="spam/1", reason="inactive beyond 3 versions",
                   emitted_at=WHEN),
    TaskSpec(name="patient", updated_at=WHEN, max_timeout_ms=20_000),
    TaskSuspension(task_id="spam", suspended=True, until=WHEN, reason="10 calls timed out within 60 s", timeouts=10,
                   window_s=60.0, worker_id="w1", updated_at=WHEN),
    TaskSuspension(task_id="spam", suspended=False, reason="resumed by an operator", updated_at=WHEN),
    ImprovementRequest(improvement_id="i1", task_id="spam", status=ImprovementStatus.PUBLISHED,
                       trigger=ImprovementTrigger.ACCURACY, reason="v3 scored 1.000 offline", description="d",
                       input_schema={"type": "object"},
                       examples=[TaskExample(input={"text": "free"}, expected_output="spam")],
                       active_version=2, active_source="def run(input): return 1", accuracy=0.5, accuracy_target=0.9,
                       validated=60, failing_examples=[FailingExample(input={"text": "x"}, expected="spam", got="ham"),
                                                       FailingExample(input={"text": "y"}, error="boom")],
                       candidate_version=3, candidate_score=1.0, active_score=0.5, llm_provider="openai",
                       llm_model="m", attempts=1, requested_at=WHEN, updated_at=WHEN),
    ProgramArtifact(task_id="spam", version=3, program_id="spam-v3-abc", source_code="def run(input): return 1",
                    synthesis_strategy=SynthesisStrategy.RULE, parent_version=2, improvement_id="i1", created_at=WHEN),
    TaskSpec(name="quiet", updated_at=WHEN, sampling_strategy=SamplingStrategy.DIVERSE, auto_improve=False),
]


@pytest.mark.parametrize("wire_format", ["json", "avro"])
@pytest.mark.parametrize("record", SAMPLES, ids=lambda r: type(r).__name__)
def test_round_trip(record: Record, wire_format: str) -> None:
    codec = wire_codec(type(record), wire_format)
    assert codec.decode(codec.encode(record)) == record


@pytest.mark.parametrize("record", SAMPLES, ids=lambda r: type(r).__name__)
def test_json_encoding_satisfies_the_avsc(record: Record) -> None:
    """The JSON wire form, read back and given to fastavro, validates against the .avsc."""
    name = type(record).__name__
    decoded = json_codec(type(record)).decode(json_codec(type(record)).encode(record))
    assert fastavro.validation.validate(decoded.model_dump(), parsed_schema(name), raise_errors=True)


def test_json_wire_form_is_snake_case_nested_json() -> None:
    encoded = json_codec(ExecutionRequest).encode(SAMPLES[0])
    assert orjson.loads(encoded) == {
        "request_id": "r1", "task_id": "spam", "version": None, "input": {"text": "hi", "n": [1, 2.5, None]},
        "force_validation": False, "timeout_ms": None, "expected_output": {"label": "ham"},
        "requested_at": "2026-11-22T03:04:05.678000Z",
    }


BODY = b"\x04r2\x08spam\x02\x06\x04{}\x01\x02\x64\x00\x00"  # SAMPLES[1] in Avro binary


def test_avro_bytes_are_confluent_framed_avro() -> None:
    """Magic byte 0, the subject's schema id (4 bytes, big-endian), then Avro binary that any reader with the
    .avsc reads; JSON fields are JSON strings."""
    codec = wire_codec(ExecutionRequest, "avro")
    encoded = codec.encode(SAMPLES[1])
    assert encoded == b"\x00" + codec.schema_id.to_bytes(4, "big") + BODY  # type: ignore[attr-defined]
    raw = fastavro.schemaless_reader(io.BytesIO(encoded[5:]), parsed_schema("ExecutionRequest"), None)
    assert raw["input"] == {} and raw["timeout_ms"] == 50


MALFORMED_JSON: list[tuple[bytes, str]] = [
    (b"", "invalid ExecutionRequest"),
    (b"not json", "invalid ExecutionRequest"),
    (b"[1,2]", "invalid ExecutionRequest"),
    (b'{"request_id": "r", "task_id": "t"}', "input: Field required"),
    (b'{"request_id": "r", "task_id": "t", "input": {}, "timeout_ms": 0}', "timeout_ms"),
    (b'{"request_id": "r", "task_id": "t", "input": {}, "colour": "red"}', "colour: Extra inputs"),
    (b"\xff\xfe\x00", "invalid ExecutionRequest"),
]


@pytest.mark.parametrize(("data", "message"), MALFORMED_JSON)
def test_malformed_json_is_a_decode_error(data: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        json_codec(ExecutionRequest).decode(data)


def _framed(body: bytes) -> bytes:
    return b"\x00" + wire_codec(ExecutionRequest, "avro").schema_id.to_bytes(4, "big") + body  # type: ignore[attr-defined]


MALFORMED_AVRO: list[tuple[Any, str]] = [
    (lambda: b"", "0 bytes, shorter than the 5-byte header"),
    (lambda: b"\x00\x00\x01", "3 bytes, shorter than the 5-byte header"),
    (lambda: BODY, "magic byte 0x04, expected 0x00"),  # schemaless Avro
    (lambda: b'{"request_id": "r"}', "magic byte 0x7b, expected 0x00"),  # JSON
    (lambda: b"\x00\x00\x0f\x42\x40" + BODY, "schema id 1000000 is unknown to the schema registry"),
    (lambda: _framed(b"\x04r2"), "not a valid Avro ExecutionRequest"),
    (lambda: _framed(b"\xff" * 12), "not a valid Avro ExecutionRequest"),
    (lambda: _framed(BODY + b"extra"), "5 trailing bytes"),
]


@pytest.mark.parametrize(("data", "message"), MALFORMED_AVRO)
def test_malformed_avro_is_a_decode_error(data: Any, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        wire_codec(ExecutionRequest, "avro").decode(data())


def test_avro_that_breaks_a_validation_rule_is_a_decode_error() -> None:
    values: dict[str, Any] = {**SAMPLES[1].model_dump(), "timeout_ms": 0}
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, parsed_schema("ExecutionRequest"), values)
    with pytest.raises(DecodeError, match="timeout_ms"):
        wire_codec(ExecutionRequest, "avro").decode(_framed(buffer.getvalue()))


def test_loose_reading_salvages_ids_of_invalid_requests() -> None:
    codec = json_codec(ExecutionRequest)
    assert codec.loose(b'{"request_id": "r", "task_id": "t", "timeout_ms": 0}') == {
        "request_id": "r", "task_id": "t", "timeout_ms": 0}
    assert codec.loose(b"garbage") is None
    assert codec.loose(b"[1]") is None


def test_a_codec_is_for_a_topic_of_its_record_type() -> None:
    topics = topics_for("codecs.")
    with pytest.raises(ValueError, match="carries ExecutionResult, not ExecutionRequest"):
        codec_for(ExecutionRequest, WIRES["json"], topics.execution_results)


@pytest.mark.parametrize("wire_format", ["json", "avro"])
@pytest.mark.parametrize("record", SAMPLES, ids=lambda r: type(r).__name__)
def test_encode_fields_matches_encode(record: Record, wire_format: str) -> None:
    """The executor's hot path (fields, no model) decodes to the same record as encode()."""
    codec = wire_codec(type(record), wire_format)
    assert codec.decode(codec.encode_fields(record.model_dump())) == record


@pytest.mark.parametrize("wire_format", ["json", "avro"])
@pytest.mark.parametrize("record", SAMPLES, ids=lambda r: type(r).__name__)
def test_one_encoding_per_wire_format(record: Record, wire_format: str) -> None:
    """A record and its fields encode to the same bytes: consumers never see two spellings of one record."""
    codec = wire_codec(type(record), wire_format)
    assert codec.encode(record) == codec.encode_fields(record.model_dump())


def test_json_times_end_in_z_and_bytes_are_urlsafe_base64() -> None:
    letter = DeadLetter(reason="r", error_type="E", source_topic="t", source_partition=0, source_offset=1,
                        key=b"\xfb\xff", value=None, worker_id="w", dead_lettered_at=datetime(2026, 1, 2, tzinfo=UTC))
    encoded = orjson.loads(json_codec(DeadLetter).encode(letter))
    assert encoded["dead_lettered_at"] == "2026-01-02T00:00:00Z"
    assert encoded["key"] == "-_8="


@pytest.mark.parametrize("wire_format", ["json", "avro"])
@settings(max_examples=400, derandomize=True)
@given(data=st.one_of(
    st.binary(max_size=300),
    st.builds(lambda prefix, tail: prefix + tail,  # a valid record of either wire format, then garbage
              st.sampled_from([wire_codec(ExecutionRequest, w).encode(SAMPLES[1]) for w in ("json", "avro")]),
              st.binary(max_size=20)),
    st.binary(min_size=1, max_size=200).map(lambda b: b"\x02" + b),  # Avro-like: a string length first
    st.binary(max_size=200).map(lambda b: _framed(b)),  # framed right, then anything
))
def test_any_bytes_decode_or_raise_decode_error(wire_format: str, data: bytes) -> None:
    """Whatever arrives on the requests topic, the codec answers with a record or a DecodeError (which the
    executor turns into a rejected result or a dead letter), and loose() with a dict or None."""
    codec = wire_codec(ExecutionRequest, wire_format)
    try:
        assert isinstance(codec.decode(data), ExecutionRequest)
    except DecodeError as exc:
        assert str(exc)
    assert codec.loose(data) is None or isinstance(codec.loose(data), dict)
