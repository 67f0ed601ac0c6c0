"""Validation of sampled executions: consumes a sampled execution and its task, produces which oracle checks it and the
validation record of a comparison. Pure: the agents decode, call these, and send."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from app.contract.records import (
    OracleKind,
    OracleSpec,
    TaskSpec,
    ValidationRequest,
    ValidationStatus,
)
from app.domain.comparison import compare

# Validation records are built as field dicts in .avsc order, as results are (app/domain/results.py): the codecs
# encode them without a model, which costs a third of building and dumping a Validation (the validator's hot path:
# every sampled execution).

LABEL_ORACLE = OracleSpec(kind=OracleKind.LABEL)


def oracle_for(task: TaskSpec, expected_output: Any) -> OracleSpec | None:
    """The oracle of an execution: the task's, else a label oracle when the request carries an expected output,
    else none (the execution is sampled but nothing can validate it)."""
    if task.oracle is not None:
        if task.oracle.kind is OracleKind.LABEL and expected_output is None:
            return None
        return task.oracle
    return LABEL_ORACLE if expected_output is not None else None


def shadow_version_for(request: ValidationRequest, task: TaskSpec | None) -> int | None:
    """The version a shadow oracle runs: the configured one, else the task's active version when the execution
    ran another one (a canary or a pinned version). None when there is nothing to compare with."""
    configured = request.oracle.shadow_version
    if configured is not None:
        return configured if configured != request.version else None
    if task is not None and task.active_version is not None and task.active_version != request.version:
        return task.active_version
    return None


ValidationFields = dict[str, Any]  # every Validation field, in .avsc order


def validated(request: ValidationRequest, oracle_output: Any, at: datetime) -> ValidationFields:
    """The validation record of comparing the program's output with the oracle's."""
    oracle = request.oracle
    if request.status != "ok":
        # An execution that failed is wrong whenever the oracle had an answer.
        match, details = False, f"the execution ended as {request.status}"
    else:
        verdict = compare(oracle.comparison.value, request.output, oracle_output, oracle.tolerance)
        match, details = verdict.match, verdict.details
    return _record(request, at, ValidationStatus.VALIDATED, oracle_output=oracle_output, match=match,
                   details=details)


def unvalidated(request: ValidationRequest, status: ValidationStatus, details: str,
                at: datetime) -> ValidationFields:
    """A validation that could not compare: expired waiting for an oracle, or the oracle itself failed."""
    return _record(request, at, status, details=details)


def _record(request: ValidationRequest, at: datetime, status: ValidationStatus, oracle_output: Any = None,
            match: bool | None = None, details: str = "") -> ValidationFields:
    oracle = request.oracle
    return {
        "execution_id": request.execution_id, "request_id": request.request_id, "task_id": request.task_id,
        "version": request.version, "input": request.input, "program_output": request.output,
        "oracle_output": oracle_output, "oracle_kind": oracle.kind, "comparison": oracle.comparison,
        "status": status, "match": match, "details": details, "validated_at": at,
    }
