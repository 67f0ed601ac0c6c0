"""Results assembled from a request, the version that ran it and the sandbox's outcome: fields in .avsc order that
decode as the records, the output checked against the task's output schema, the sampling decision, and the
validation request of a sampled execution."""

from datetime import UTC, datetime

import orjson
import pytest

from app.contract.codecs import json_codec
from app.contract.records import (
    ExecutionRequest,
    ExecutionResult,
    ExecutionStatus,
    OracleKind,
    OracleSpec,
    ProgramArtifact,
    SamplingStrategy,
    TaskSpec,
    ValidationRequest,
    execution_id_for,
)
from app.domain.resolution import ExecutionPlan
from app.domain.results import ResultAssembler, rejected_fields, result_fields
from app.domain.sampling import fraction_of
from app.sandbox.calls import Outcome

NOW = datetime(2026, 12, 7, 12, tzinfo=UTC)
RESULTS = json_codec(ExecutionResult)
VALIDATION_REQUESTS = json_codec(ValidationRequest)


def plan(**task_fields: object) -> ExecutionPlan:
    task = TaskSpec(name="spam", updated_at=NOW, active_version=3, **task_fields)
    artifact = ProgramArtifact(task_id="spam", version=3, program_id="spam-v3", source_code="def run(i): ...",
                               created_at=NOW)
    return ExecutionPlan(artifact, 1000, task)


def request(request_id: str = "r1", **fields: object) -> ExecutionRequest:
    return ExecutionRequest(request_id=request_id, task_id="spam", input={"text": "hi"}, **fields)


def ok(output: object) -> Outcome:
    return Outcome("ok", orjson.dumps(output), None, 1.5, 20.0)


def request_ids(sampled: bool, count: int = 200, rate: float = 0.5) -> list[str]:
    """Request ids whose executions a random draw at `rate` does (or does not) sample."""
    ids = (f"r{i}" for i in range(count))
    return [i for i in ids if (fraction_of(execution_id_for("spam", i)) < rate) is sampled]


def test_an_executed_result_has_every_field_and_decodes_as_the_record() -> None:
    result, validation = ResultAssembler("w1").executed(request(), plan(sampling_rate=0.0), ok("spam"), NOW)
    assert list(result) == list(ExecutionResult.model_fields)  # .avsc order, every field
    decoded = RESULTS.decode(RESULTS.encode_fields(result))
    assert decoded == ExecutionResult(
        execution_id=execution_id_for("spam", "r1"), request_id="r1", task_id="spam", program_id="spam-v3",
        version=3, status=ExecutionStatus.OK, output="spam", latency_ms=1.5, memory_usage_mb=20.0,
        sampled_for_validation=False, executed_at=NOW, worker_id="w1")
    assert validation is None


def test_the_output_stays_the_sandbox_bytes_unless_something_must_look_inside() -> None:
    outcome = ok({"label": "spam", "score": 0.25})
    result, _ = ResultAssembler("w").executed(request(), plan(sampling_rate=0.0), outcome, NOW)
    assert isinstance(result["output"], orjson.Fragment)
    assert orjson.dumps(result["output"]) == outcome.output_json


def test_an_output_that_breaks_the_output_schema_is_an_error_naming_where() -> None:
    task = plan(output_schema={"type": "object", "properties": {"label": {"type": "string"}}}, sampling_rate=0.0)
    result, _ = ResultAssembler("w").executed(request(), task, ok({"label": 7}), NOW)
    assert result["status"] == "error" and result["output"] is None
    assert result["error_message"].startswith("output does not match the task's output_schema at label")
    fine, _ = ResultAssembler("w").executed(request(), task, ok({"label": "spam"}), NOW)
    assert (fine["status"], fine["error_message"]) == ("ok", None)
    assert orjson.loads(orjson.dumps(fine["output"])) == {"label": "spam"}


def test_failed_outcomes_keep_their_status_and_error() -> None:
    task = plan(output_schema={"type": "string"}, sampling_rate=0.0)
    for status in ("error", "timeout"):
        result, _ = ResultAssembler("w").executed(request(), task, Outcome(status, None, "it broke", 3.0, None), NOW)
        assert (result["status"], result["output"], result["error_message"]) == (status, None, "it broke")


def test_random_sampling_follows_the_execution_id_and_forced_requests_are_always_sampled() -> None:
    assembler = ResultAssembler("w")
    task = plan(sampling_rate=0.5)
    for request_id in request_ids(sampled=True)[:5]:
        assert assembler.executed(request(request_id), task, ok("ham"), NOW)[0]["sampled_for_validation"] is True
    unsampled = request_ids(sampled=False)[:5]
    for request_id in unsampled:
        assert assembler.executed(request(request_id), task, ok("ham"), NOW)[0]["sampled_for_validation"] is False
    forced = request(unsampled[0], force_validation=True)
    assert assembler.executed(forced, task, ok("ham"), NOW)[0]["sampled_for_validation"] is True


def test_edge_case_sampling_sees_the_status_of_the_outcome() -> None:
    task = plan(sampling_strategy=SamplingStrategy.EDGE_CASES, sampling_rate=0.0)
    assembler = ResultAssembler("w")
    failed, _ = assembler.executed(request(), task, Outcome("error", None, "boom", 1.0, None), NOW)
    fine, _ = assembler.executed(request(), task, ok("ham"), NOW)
    assert (failed["sampled_for_validation"], fine["sampled_for_validation"]) == (True, False)


def test_a_sampled_execution_with_a_label_gets_a_validation_request() -> None:
    request_id = request_ids(sampled=True)[0]
    result, validation = ResultAssembler("w").executed(request(request_id, expected_output="spam"),
                                                       plan(sampling_rate=0.5), ok("ham"), NOW)
    assert result["sampled_for_validation"] is True and validation is not None
    assert list(validation) == list(ValidationRequest.model_fields)
    decoded = VALIDATION_REQUESTS.decode(VALIDATION_REQUESTS.encode_fields(validation))
    assert (decoded.execution_id, decoded.version, decoded.output, decoded.expected_output) == (
        result["execution_id"], 3, "ham", "spam")
    assert decoded.oracle.kind is OracleKind.LABEL and decoded.input == {"text": "hi"}


@pytest.mark.parametrize(("oracle", "expected_output", "asks"), [
    (None, None, False),  # sampled, but nothing can judge it
    (OracleSpec(kind=OracleKind.LABEL), None, False),
    (OracleSpec(kind=OracleKind.EXTERNAL), None, True),
    (OracleSpec(kind=OracleKind.SHADOW, shadow_version=1), None, True),
])
def test_a_validation_request_only_where_an_oracle_can_judge(oracle: OracleSpec | None, expected_output: object,
                                                             asks: bool) -> None:
    request_id = request_ids(sampled=True)[0]
    _, validation = ResultAssembler("w").executed(request(request_id, expected_output=expected_output),
                                                  plan(sampling_rate=0.5, oracle=oracle), ok("ham"), NOW)
    assert (validation is not None) is asks
    _, unsampled = ResultAssembler("w").executed(request(request_ids(sampled=False)[0], expected_output="spam"),
                                                 plan(sampling_rate=0.5, oracle=oracle), ok("ham"), NOW)
    assert unsampled is None


def test_rejected_fields_decode_as_a_rejected_result() -> None:
    fields = rejected_fields("spam", "r9", "no active version", NOW, "w", version=2)
    decoded = RESULTS.decode(RESULTS.encode_fields(fields))
    assert (decoded.status, decoded.error_message, decoded.version) == (ExecutionStatus.REJECTED,
                                                                        "no active version", 2)
    assert decoded.execution_id == execution_id_for("spam", "r9") and decoded.output is None


def test_result_fields_fill_the_defaults_and_keep_a_given_execution_id() -> None:
    fields = result_fields("spam", "r1", NOW, "w", status=ExecutionStatus.OK, execution_id="given", latency_ms=2.0)
    assert fields["execution_id"] == "given" and fields["latency_ms"] == 2.0
    assert fields["sampled_for_validation"] is False and fields["output"] is None  # the records' defaults
    assert set(fields) == set(ExecutionResult.model_fields)
