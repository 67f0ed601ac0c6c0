"""The records an executed request ends as, assembled from its request, the program version that ran it and the
sandbox's outcome: its result (status, output checked against the task's output schema, the sampling
decision) and, when sampled and an oracle can judge it, its validation request. Pure: no Kafka."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, TypeVar

import orjson

from app.contract.records import ExecutionRequest, ExecutionResult, ExecutionStatus, SamplingStrategy, execution_id_for
from app.domain.resolution import ExecutionPlan, SchemaValidators
from app.domain.sampling import Sampler, fraction_of
from app.domain.validation import oracle_for
from app.sandbox.calls import Outcome

# Results are built as field dicts in .avsc order (the codecs encode them without a model: the hot path), and
# the program's output stays the JSON bytes the sandbox wrote, unless the task's output schema or sampling
# strategy needs to look inside it.

Origin = TypeVar("Origin")  # where a request came from (its message): carried through, never looked at
RESULT_DEFAULTS: dict[str, Any] = {
    name: info.default for name, info in ExecutionResult.model_fields.items() if not info.is_required()
}
_LOOKS_INSIDE = frozenset({SamplingStrategy.STRATIFIED, SamplingStrategy.EDGE_CASES})


def result_fields(task_id: str, request_id: str, executed_at: datetime, worker_id: str,
                  **fields: Any) -> dict[str, Any]:
    """The fields of one ExecutionResult given only some of them (a rejected request, say)."""
    result = {**RESULT_DEFAULTS, "task_id": task_id, "request_id": request_id, "executed_at": executed_at,
              "worker_id": worker_id, **fields}
    if "execution_id" not in fields:
        result["execution_id"] = execution_id_for(task_id, request_id)
    return result


def rejected_fields(task_id: str, request_id: str, why: str, executed_at: datetime, worker_id: str,
                    version: int | None = None) -> dict[str, Any]:
    """The result of a request that could not run, saying why."""
    return result_fields(task_id, request_id, executed_at, worker_id, status=ExecutionStatus.REJECTED,
                         error_message=why, version=version)


class ResultAssembler:
    """Builds executed results for one worker: its sampling state and output-schema validators."""

    def __init__(self, worker_id: str, sampler: Sampler | None = None) -> None:
        self.worker_id = worker_id
        self.sampler = sampler or Sampler()
        self._outputs = SchemaValidators("output_schema")

    def assemble(
        self, pending: Sequence[tuple[ExecutionRequest, ExecutionPlan, Origin]],
        outcomes: Sequence[Outcome | Exception], executed_at: datetime,
    ) -> tuple[list[tuple[dict[str, Any], Origin]], list[dict[str, Any]], list[tuple[Origin, str, str]]]:
        """For each request (with its origin, e.g. its message) and what the sandbox made of it: its result, or
        a failure (origin, reason, error type) where the sandbox could not run the call; and the validation
        requests of the sampled executions an oracle can judge. Returns (results, validations, failures)."""
        results: list[tuple[dict[str, Any], Origin]] = []
        validations: list[dict[str, Any]] = []
        failures: list[tuple[Origin, str, str]] = []
        for (request, plan, origin), outcome in zip(pending, outcomes, strict=True):
            if isinstance(outcome, Exception):
                failures.append((origin, f"the sandbox could not run it: {outcome}", type(outcome).__name__))
                continue
            if outcome.status == "rejected":  # the pool's gate refused the call (its task was suspended): not sampled
                results.append((rejected_fields(request.task_id, request.request_id, outcome.error or "rejected",
                                                executed_at, self.worker_id, plan.artifact.version), origin))
                continue
            try:
                result, validation = self.executed(request, plan, outcome, executed_at)
            except Exception as exc:  # a bug must not cost the request: it goes to the dead letters
                failures.append((origin, f"internal error: {exc}", type(exc).__name__))
                continue
            results.append((result, origin))
            if validation is not None:
                validations.append(validation)
        return results, validations, failures

    def executed(self, request: ExecutionRequest, plan: ExecutionPlan, outcome: Outcome,
                 executed_at: datetime) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The result's fields, and the validation request's fields if the execution was sampled and an oracle
        can judge it (else None)."""
        task, artifact = plan.task, plan.artifact
        status, output_json, error, latency_ms, memory_mb = outcome
        strategy = task.sampling_strategy
        value: Any = None
        if output_json is not None and (task.output_schema is not None or strategy in _LOOKS_INSIDE):
            value = orjson.loads(output_json)
            problem = self._outputs.errors(task, value) if task.output_schema is not None else None
            if problem is not None:
                status, output_json, error, value = "error", None, problem, None
        execution_id = execution_id_for(request.task_id, request.request_id)
        if strategy is SamplingStrategy.RANDOM and not request.force_validation:  # most tasks: no state to keep
            sampled = fraction_of(execution_id) < task.sampling_rate
        else:
            sampled = self.sampler.decide(
                execution_id, request.task_id, strategy, task.sampling_rate, status=status, output=value,
                latency_ms=latency_ms, latency_target_ms=task.latency_target_ms, forced=request.force_validation,
                input=request.input,
            )
        output = None if output_json is None else orjson.Fragment(output_json)
        result = {  # every ExecutionResult field, in .avsc order
            "execution_id": execution_id, "request_id": request.request_id, "task_id": request.task_id,
            "program_id": artifact.program_id, "version": artifact.version, "status": status, "output": output,
            "error_message": error, "latency_ms": latency_ms, "memory_usage_mb": memory_mb,
            "sampled_for_validation": sampled, "executed_at": executed_at, "worker_id": self.worker_id,
        }
        oracle = oracle_for(task, request.expected_output) if sampled else None
        if oracle is None:
            return result, None
        validation = {  # every ValidationRequest field, in .avsc order
            "execution_id": execution_id, "request_id": request.request_id, "task_id": request.task_id,
            "version": artifact.version, "input": request.input, "output": output, "status": status,
            "expected_output": request.expected_output, "oracle": oracle.model_dump(), "requested_at": executed_at,
        }
        return result, validation
