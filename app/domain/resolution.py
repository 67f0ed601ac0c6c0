"""Resolution of a request against the task and artifact tables: which program runs it, or why none does."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jsonschema
import jsonschema_rs
import referencing
import referencing.exceptions
from jsonschema.exceptions import best_match

from app.contract.records import ExecutionRequest, ProgramArtifact, TaskSpec
from app.domain.canary import runs_canary


class Runnable(NamedTuple):
    """The request can run: this artifact of this task, with this timeout. (A tuple: one per request.)"""

    artifact: ProgramArtifact
    timeout_ms: int
    task: TaskSpec


@dataclass(frozen=True, slots=True)
class Refused:
    """The request cannot run; the result carries this message with status `rejected`."""

    message: str
    version: int | None = None


class SchemaError(ValueError):
    """A task's schema that no value can be checked against (e.g. a $ref to something outside it)."""


class SchemaValidator:
    """One schema, checked two ways: jsonschema-rs says whether a value is valid (0.14 us for a small object
    schema, against jsonschema's 9 us: it runs on every request), jsonschema words the error of one that is not,
    and has the last word (the two may differ on exotic regexes; a value either accepts is valid).
    Neither ever fetches a $ref: a schema refers only into itself (the control plane refuses others)."""

    def __init__(self, schema: dict[str, Any]) -> None:
        try:
            self._fast: Any = jsonschema_rs.validator_for(schema, offline=True, validate_formats=False)
        except jsonschema_rs.ValidationError as exc:  # a reference it cannot resolve without fetching
            raise SchemaError(str(exc).splitlines()[0]) from None
        except Exception:  # a schema jsonschema-rs cannot take: jsonschema alone judges
            self._fast = None
        self._full = jsonschema.validators.validator_for(schema)(schema, registry=_NO_RETRIEVAL)

    def error(self, value: Any) -> jsonschema.ValidationError | None:
        try:
            if self._fast is not None and self._fast.is_valid(value):
                return None
        except Exception:  # a value it cannot take (an integer past 64 bits, say): jsonschema judges
            pass
        try:
            return best_match(self._full.iter_errors(value))
        except referencing.exceptions.Unresolvable as exc:
            raise SchemaError(f"a $ref cannot be resolved within the schema: {exc}") from None


_NO_RETRIEVAL: referencing.Registry[Any] = referencing.Registry()  # no `retrieve`: nothing is fetched


def check_schema(schema: dict[str, Any]) -> None:
    """Raise jsonschema.SchemaError for a schema that is not one, SchemaError for one that refers outside itself."""
    jsonschema.validators.validator_for(schema).check_schema(schema)
    SchemaValidator(schema).error(None)  # a reference to elsewhere fails here, not on the first request


class SchemaValidators:
    """Validators per task for one of its schemas ("input_schema" or "output_schema"), rebuilt only when the
    task's schema changes."""

    def __init__(self, which: str = "input_schema") -> None:
        self._which = which
        self._what = which.split("_")[0]
        self._cache: dict[str, tuple[object, SchemaValidator | str]] = {}

    def errors(self, task: TaskSpec, value: Any) -> str | None:
        """None if the value satisfies the task's schema, else the most relevant error."""
        schema = getattr(task, self._which)
        if schema is None:
            return None
        cached = self._cache.get(task.name)
        if cached is None or cached[0] is not schema:
            try:
                validator: SchemaValidator | str = SchemaValidator(schema)
            except SchemaError as exc:
                validator = f"the task's {self._which} cannot be used: {exc}"
            cached = self._cache[task.name] = (schema, validator)
        validator = cached[1]
        if isinstance(validator, str):
            return validator
        try:
            error = validator.error(value)
        except SchemaError as exc:
            return f"the task's {self._which} cannot be used: {exc}"
        if error is None:
            return None
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        return f"{self._what} does not match the task's {self._which} at {where}: {error.message}"


def resolve(
    request: ExecutionRequest,
    task_of: Callable[[str], TaskSpec | None],
    artifact_of: Callable[[str, int], ProgramArtifact | None],
    validators: SchemaValidators,
    default_timeout_ms: int,
) -> Runnable | Refused:
    """Decide which artifact version runs a request: the pinned one, else the canary for its share of request
    ids (deterministic, so a redelivered request runs the same version), else the task's active one."""
    task = task_of(request.task_id)
    if task is None:
        return Refused(f"unknown task {request.task_id!r}")
    version = request.version or task.active_version
    if request.version is None and task.canary_version is not None \
            and runs_canary(request.request_id, task.canary_percent):
        version = task.canary_version
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
    return Runnable(artifact, request.timeout_ms or default_timeout_ms, task)
