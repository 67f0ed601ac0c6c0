"""The record models: pydantic mirrors of schemas/*.avsc, one to one (tests/contract/test_records.py proves it)."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

# Fields typed `JsonValue` are JSON strings on the Avro wire (logicalType "json") and nested JSON in the JSON wire
# format.
JsonValue = Any
TaskName = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_-]+$")]
NonEmpty = Annotated[str, StringConstraints(min_length=1)]
IsoDate = Annotated[str, StringConstraints(pattern=r"^\d{4}-\d{2}-\d{2}$")]
Count = Annotated[int, Field(ge=0)]

EXECUTION_NAMESPACE = uuid.UUID("6f0d6a52-8d0b-4f57-9a55-1f0f5d6c2a11")
_NAMESPACE_BYTES = EXECUTION_NAMESPACE.bytes
_VARIANT = {f"{n:x}": f"{(n & 0x3) | 0x8:x}" for n in range(16)}


def utc_now() -> datetime:
    """Now, in UTC, at millisecond precision (what timestamp-millis keeps)."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def execution_id_for(task_id: str, request_id: str) -> str:
    """Deterministic execution id, uuid5(namespace, "task_id/request_id"): a redelivered request gets the
    same id. Computed directly with hashlib; uuid.uuid5 costs several times more per request."""
    h = hashlib.sha1(_NAMESPACE_BYTES + f"{task_id}/{request_id}".encode()).hexdigest()
    # RFC 4122: version 5 in the 13th hex digit, variant 10xx in the 17th.
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


class Record(BaseModel):
    """Common config: unknown fields are errors, bytes travel as base64 in JSON."""

    # JSON strings are not looked up in pydantic's string cache (only keys are): ids are new each time, and the
    # lookups cost a tenth of decoding a request.
    model_config = ConfigDict(extra="forbid", ser_json_bytes="base64", val_json_bytes="base64", cache_strings="keys")


class ExecutionStatus(StrEnum):
    OK = "ok"
    ERROR = "error"
    TIMEOUT = "timeout"
    REJECTED = "rejected"


class SynthesisStrategy(StrEnum):
    MANUAL = "manual"
    RULE = "rule"
    ML = "ml"
    HYBRID = "hybrid"


class ProgramStatus(StrEnum):
    DRAFT = "draft"
    VALIDATED = "validated"
    DEPRECATED = "deprecated"


class SamplingStrategy(StrEnum):
    RANDOM = "random"
    STRATIFIED = "stratified"
    EDGE_CASES = "edge_cases"
    ADAPTIVE = "adaptive"
    DIVERSE = "diverse"


class OracleKind(StrEnum):
    LABEL = "label"
    SHADOW = "shadow"
    EXTERNAL = "external"


class Comparison(StrEnum):
    EXACT = "exact"
    NORMALISED_TEXT = "normalised_text"
    NUMERIC = "numeric"
    JSON_FIELDS = "json_fields"


class ValidationStatus(StrEnum):
    VALIDATED = "validated"
    EXPIRED = "expired"
    FAILED = "failed"


class CanaryAction(StrEnum):
    STARTED = "started"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"


class ExecutionRequest(Record):
    """A request to run a task's program on one input."""

    request_id: NonEmpty
    task_id: NonEmpty
    version: Annotated[int, Field(gt=0)] | None = None
    input: dict[str, JsonValue]
    force_validation: bool = False
    timeout_ms: Annotated[int, Field(ge=1, le=60_000)] | None = None
    expected_output: JsonValue = None
    requested_at: datetime | None = None


class ExecutionResult(Record):
    """The one result of one request."""

    execution_id: str
    request_id: str
    task_id: str
    program_id: str | None = None
    version: int | None = None
    status: ExecutionStatus
    output: JsonValue = None
    error_message: str | None = None
    latency_ms: float = 0.0
    memory_usage_mb: float | None = None
    sampled_for_validation: bool = False
    executed_at: datetime
    worker_id: str


class ComplexityMetrics(Record):
    """What the static check measured of a program's source (app/domain/programs.py)."""

    lines_of_code: int
    cyclomatic_complexity: int
    estimated_latency_ms: float | None = None


class ProgramArtifact(Record):
    """One version of a task's program."""

    task_id: TaskName
    version: Annotated[int, Field(gt=0)]
    program_id: NonEmpty
    language: str = "python"
    source_code: NonEmpty
    synthesis_strategy: SynthesisStrategy = SynthesisStrategy.MANUAL
    confidence: Annotated[float, Field(ge=0, le=1)] | None = None
    complexity_metrics: ComplexityMetrics | None = None
    llm_provider: str | None = None
    llm_model: str | None = None
    created_at: datetime
    status: ProgramStatus = ProgramStatus.DRAFT
    # Provenance of a generated version (app/generator): the version it was written to improve on, and the
    # improvement request it answers.
    parent_version: Annotated[int, Field(gt=0)] | None = None
    improvement_id: str | None = None


class TaskExample(Record):
    """An input of a task and, when known, the output it should give."""

    input: JsonValue
    expected_output: JsonValue = None


class OracleSpec(Record):
    """Who says what the right output was, and how outputs are compared with it."""

    kind: OracleKind
    comparison: Comparison = Comparison.EXACT
    tolerance: float = 1e-6
    shadow_version: Annotated[int, Field(gt=0)] | None = None
    timeout_s: Annotated[float, Field(gt=0)] = 60.0


class TaskSpec(Record):
    """A task: its contract, targets, and which program version serves it."""

    name: TaskName
    description: Annotated[str, StringConstraints(max_length=5000)] = ""
    input_schema: dict[str, JsonValue] | None = None
    output_schema: dict[str, JsonValue] | None = None
    examples: list[TaskExample] = Field(default_factory=list)
    accuracy_target: Annotated[float, Field(ge=0, le=1)] = 0.9
    latency_target_ms: Annotated[float, Field(gt=0)] = 10.0
    sampling_rate: Annotated[float, Field(ge=0, le=1)] = 0.05
    active_version: Annotated[int, Field(gt=0)] | None = None
    updated_at: datetime
    sampling_strategy: SamplingStrategy = SamplingStrategy.RANDOM
    oracle: OracleSpec | None = None
    canary_version: Annotated[int, Field(gt=0)] | None = None
    canary_percent: Annotated[float, Field(ge=0, le=100)] = 0.0
    # An LLM's program that loops on one input holds a sandbox process for as long as its request asks: a task
    # owner raises this deliberately (README: The program contract).
    max_timeout_ms: Annotated[int, Field(ge=1, le=60_000)] = 1000
    # A new task has no baseline for the anomaly detectors to judge it by: its targets are judged from its first
    # minute instead (app/domain/anomaly_targets.py). None: the error rate is not watched against a bound.
    max_error_rate: Annotated[float, Field(ge=0, le=1)] | None = 0.05
    # False: no improvement request is made for this task when its program falls short (docs/improvement.md).
    auto_improve: bool = True


class TaskSuspension(Record):
    """A task suspended because its calls kept timing out (suspended, until), or resumed (suspended False)."""

    task_id: NonEmpty
    suspended: bool
    until: datetime | None = None
    reason: str
    timeouts: Count = 0
    window_s: Annotated[float, Field(ge=0)] = 0.0
    worker_id: str | None = None
    updated_at: datetime


class DeadLetter(Record):
    """A message that could not be decoded or processed."""

    reason: str
    error_type: str
    source_topic: str
    source_partition: int
    source_offset: int
    key: bytes | None = None
    value: bytes | None = None
    worker_id: str
    dead_lettered_at: datetime


class ValidationRequest(Record):
    """A sampled execution to check against an oracle."""

    execution_id: str
    request_id: str
    task_id: str
    version: int
    input: JsonValue
    output: JsonValue = None
    status: str
    expected_output: JsonValue = None
    oracle: OracleSpec
    requested_at: datetime


class OracleVerdict(Record):
    """An oracle service's answer for one execution."""

    execution_id: NonEmpty
    task_id: str
    output: JsonValue = None
    oracle_id: str = ""
    answered_at: datetime


class Validation(Record):
    """One sampled execution compared with an oracle (or expired waiting for one)."""

    execution_id: str
    request_id: str
    task_id: str
    version: int
    input: JsonValue
    program_output: JsonValue = None
    oracle_output: JsonValue = None
    oracle_kind: OracleKind
    comparison: Comparison
    status: ValidationStatus
    match: bool | None = None
    details: str = ""
    validated_at: datetime


class CanaryDecision(Record):
    """A change in a task's canary rollout."""

    task_id: str
    candidate_version: int
    active_version: int | None = None
    action: CanaryAction
    reason: str
    candidate_accuracy: float | None = None
    active_accuracy: float | None = None
    validations: int = 0
    decided_by: str = "auto"
    decided_at: datetime


def artifact_key(task_id: str, version: int) -> str:
    """The key of one artifact version on the artifacts topic."""
    return f"{task_id}/{version}"


class AnomalyMetric(StrEnum):
    ERROR_RATE = "error_rate"
    P99_LATENCY = "p99_latency"
    TIMEOUTS = "timeouts"
    ACCURACY = "accuracy"


class AnomalyMethod(StrEnum):
    ZSCORE = "zscore"
    EWMA = "ewma"
    BUDGET = "budget"
    TARGET = "target"


class DailyStats(Record):
    """One task's (or task version's, `version` None for all) executions over one local day."""

    task_id: str
    version: int | None = None
    date: IsoDate
    time_zone: str
    executions: Count
    ok: Count
    error: Count
    timeout: Count
    rejected: Count
    success_rate: float
    sampled: Count
    sampling_rate: float
    validated: Count
    matched: Count
    accuracy: float | None = None
    avg_latency_ms: float | None = None
    p50_latency_ms: float | None = None
    p95_latency_ms: float | None = None
    p99_latency_ms: float | None = None
    sketch: bytes
    window_start: datetime
    window_end: datetime
    closed_at: datetime | None = None


class StatsPartial(Record):
    """What one commit of the executor (its batches since the last) adds to one task/version/day: counts, latency
    sum and sketch (internal)."""

    task_id: str
    version: int | None = None
    date: IsoDate
    time_zone: str
    ok: Count = 0
    error: Count = 0
    timeout: Count = 0
    rejected: Count = 0
    sampled: Count = 0
    validated: Count = 0
    matched: Count = 0
    latency_sum_ms: float = 0.0
    sketch: bytes
    event_at: datetime


class AnomalySignal(Record):
    """A task version's error rate or p99 latency left its normal range, or broke one of its task's targets
    (error rate, latency, accuracy), or a task used up its timeout budget and was suspended (one per incident)."""

    task_id: str
    version: int | None = None
    metric: AnomalyMetric
    value: float
    baseline: float
    score: float
    method: AnomalyMethod
    hint: str
    detected_at: datetime


class RetentionEvent(Record):
    """What expired and why: a tombstoned key, or a range of days of a topic."""

    topic: str
    key: str | None = None
    date_from: IsoDate | None = None
    date_to: IsoDate | None = None
    reason: str
    emitted_at: datetime


class ImprovementStatus(StrEnum):
    REQUESTED = "requested"
    PUBLISHED = "published"
    REFUSED = "refused"
    FAILED = "failed"
    SKIPPED = "skipped"


class ImprovementTrigger(StrEnum):
    ACCURACY = "accuracy"
    ANOMALY = "anomaly"
    FIRST_VERSION = "first_version"


class FailingExample(Record):
    """One execution the active version got wrong: its input, what the oracle said, what the program said (or
    the error it ended in)."""

    input: JsonValue
    expected: JsonValue = None
    got: JsonValue = None
    error: str | None = None


class ImprovementRequest(Record):
    """A task's program falls short (or the task has none yet): a request for a better version, and what came of
    it. The watcher writes it `requested`; the generator writes the same id again with the outcome."""

    improvement_id: NonEmpty
    task_id: TaskName
    status: ImprovementStatus
    trigger: ImprovementTrigger
    reason: str
    description: str = ""
    input_schema: dict[str, JsonValue] | None = None
    output_schema: dict[str, JsonValue] | None = None
    examples: list[TaskExample] = Field(default_factory=list)
    active_version: Annotated[int, Field(gt=0)] | None = None
    active_source: str | None = None
    accuracy: float | None = None
    accuracy_target: float | None = None
    validated: Count = 0
    failing_examples: list[FailingExample] = Field(default_factory=list)
    candidate_version: Annotated[int, Field(gt=0)] | None = None
    candidate_score: float | None = None
    active_score: float | None = None
    llm_provider: str | None = None
    llm_model: str | None = None
    attempts: Count = 0
    requested_at: datetime
    updated_at: datetime


RECORD_TYPES: dict[str, type[Record]] = {
    cls.__name__: cls
    for cls in (ExecutionRequest, ExecutionResult, ProgramArtifact, TaskSpec, DeadLetter, ValidationRequest,
                OracleVerdict, Validation, CanaryDecision, DailyStats, StatsPartial, AnomalySignal,
                RetentionEvent, TaskSuspension, ImprovementRequest)
}
