"""Resolution of a request against the task and artifact tables: which program runs it, or why none does."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jsonschema
from jsonschema.exceptions import best_match

from app.records import ExecutionRequest, ProgramArtifact, TaskSpec


@dataclass(frozen=True, slots=True)
class Runnable:
    """The request can run: this artifact, with this timeout."""

    artifact: ProgramArtifact
    timeout_ms: int
    sampling_rate: float


@dataclass(frozen=True, slots=True)
class Refused:
    """The request cannot run; the result carries this message with status `rejected`."""

    message: str
    version: int | None = None


class InputValidators:
    """JSON Schema validators per task, rebuilt only when the task's schema changes."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[object, Any]] = {}

    def errors(self, task: TaskSpec, value: dict[str, Any]) -> str | None:
        """None if the value satisfies the task's input_schema, else the most relevant error."""
        schema = task.input_schema
        if schema is None:
            return None
        cached = self._cache.get(task.name)
        if cached is None or cached[0] is not schema:
            cls = jsonschema.validators.validator_for(schema)
            cached = (schema, cls(schema))
            self._cache[task.name] = cached
        error = best_match(cached[1].iter_errors(value))
        if error is None:
            return None
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        return f"input does not match the task's input_schema at {where}: {error.message}"


def resolve(
    request: ExecutionRequest,
    task_of: Callable[[str], TaskSpec | None],
    artifact_of: Callable[[str, int], ProgramArtifact | None],
    validators: InputValidators,
    default_timeout_ms: int,
) -> Runnable | Refused:
    """Decide which artifact version runs a request (pinned, else the task's active one)."""
    task = task_of(request.task_id)
    if task is None:
        return Refused(f"unknown task {request.task_id!r}")
    version = request.version or task.active_version
    if version is None:
        return Refused(f"task {task.name!r} has no active version; publish and activate one")
    artifact = artifact_of(task.name, version)
    if artifact is None:
        if request.version:
            return Refused(f"task {task.name!r} has no version {version}", version)
        return Refused(f"active version {version} of task {task.name!r} is not published", version)
    problem = validators.errors(task, request.input)
    if problem is not None:
        return Refused(problem, version)
    return Runnable(artifact, request.timeout_ms or default_timeout_ms, task.sampling_rate)
