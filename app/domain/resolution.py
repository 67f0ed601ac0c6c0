"""Resolution of a request against the task and artifact tables: which program runs it, or why none does."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jsonschema_rs

from app.contract.records import ExecutionRequest, ProgramArtifact, TaskSpec
from app.domain.canary import runs_canary
from app.sandbox.calls import Call


class ExecutionPlan(NamedTuple):
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
    """A task's schema that is not one, or that refers outside itself."""


def schema_validator(schema: dict[str, Any]) -> Any:
    """A validator of the schema (jsonschema-rs: far faster than the Python jsonschema, and its regexes cannot
    backtrack without bound, where Python's `re` can hang a worker on one input). It never fetches a $ref: a
    schema refers only into itself. Raises SchemaError."""
    try:
        jsonschema_rs.meta.validate(schema)
        return jsonschema_rs.validator_for(schema, offline=True, validate_formats=False)
    except (jsonschema_rs.ValidationError, jsonschema_rs.ReferencingError, ValueError) as exc:
        raise SchemaError(str(exc).splitlines()[0]) from None


class SchemaValidators:
    """Validators per task for one of its schemas ("input_schema" or "output_schema"), rebuilt only when the
    task's schema changes."""

    def __init__(self, which: str = "input_schema") -> None:
        self._which = which
        self._what = which.split("_")[0]
        self._cache: dict[str, tuple[object, Any]] = {}

    def errors(self, task: TaskSpec, value: Any) -> str | None:
        """None if the value satisfies the task's schema, else its first error."""
        schema = getattr(task, self._which)
        if schema is None:
            return None
        validator = self._validator(task, schema)
        if isinstance(validator, str):
            return validator
        if validator.is_valid(value):
            return None
        error = next(iter(validator.iter_errors(value)))
        where = "/".join(str(p) for p in error.instance_path) or "(root)"
        return f"{self._what} does not match the task's {self._which} at {where}: {error.message}"

    def is_valid(self, task: TaskSpec) -> Callable[[Any], bool] | None:
        """A test of values against the task's schema (any value passes when it has none); None when its schema
        cannot be used (errors() says why)."""
        schema = getattr(task, self._which)
        if schema is None:
            return _anything
        validator = self._validator(task, schema)
        return None if isinstance(validator, str) else validator.is_valid  # type: ignore[no-any-return]

    def _validator(self, task: TaskSpec, schema: dict[str, Any]) -> Any:
        """The task's validator, or why its schema cannot be used."""
        cached = self._cache.get(task.name)
        if cached is None or cached[0] is not schema:
            try:
                validator = schema_validator(schema)
            except SchemaError as exc:  # the control plane refuses such a schema; one from before it did
                validator = f"the task's {self._which} cannot be used: {exc}"
            cached = self._cache[task.name] = (schema, validator)
        return cached[1]


def _anything(value: Any) -> bool:
    return True


def resolve(
    request: ExecutionRequest,
    task_of: Callable[[str], TaskSpec | None],
    artifact_of: Callable[[str, int], ProgramArtifact | None],
    validators: SchemaValidators,
    default_timeout_ms: int,
) -> ExecutionPlan | Refused:
    """Decide which artifact version runs a request: the pinned one, else the canary for its share of request
    ids (deterministic, so a redelivered request runs the same version), else the task's active one. A request may
    ask for a timeout up to its task's max_timeout_ms; one that gives none gets min(default_timeout_ms, that)."""
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
    if request.timeout_ms is not None and request.timeout_ms > task.max_timeout_ms:
        return Refused(f"timeout_ms {request.timeout_ms} is above task {task.name!r}'s max_timeout_ms "
                       f"{task.max_timeout_ms}", version)
    problem = validators.errors(task, request.input)
    if problem is not None:
        return Refused(problem, version)
    return ExecutionPlan(artifact, request.timeout_ms or unpinned_timeout_ms(task, default_timeout_ms), task)


def unpinned_timeout_ms(task: TaskSpec, default_timeout_ms: int) -> int:
    """The timeout of a call whose request gives none: the setting's default, within the task's bound."""
    return min(default_timeout_ms, task.max_timeout_ms)


class Resolver:
    """resolve() over a batch of requests, the same decisions at a fraction of the cost: a request that pins
    neither a version nor a timeout, for a task without a canary, runs the task's active version, so the task,
    its artifact and its input validator are looked up once per task, and the request's ExecutionPlan is shared.
    Everything else (and every refusal, for its message) goes through resolve(). Holds the tables as they are
    when it is made: make one per batch."""

    def __init__(self, task_of: Callable[[str], TaskSpec | None],
                 artifact_of: Callable[[str, int], ProgramArtifact | None], validators: SchemaValidators,
                 default_timeout_ms: int) -> None:
        self._task_of, self._artifact_of = task_of, artifact_of
        self._validators, self._default_timeout_ms = validators, default_timeout_ms
        self._plans: dict[str, tuple[ExecutionPlan, Callable[[Any], bool]] | None] = {}

    def __call__(self, request: ExecutionRequest) -> ExecutionPlan | Refused:
        if request.version is None and request.timeout_ms is None:
            task_id = request.task_id
            plan = self._plans[task_id] if task_id in self._plans else self._plan(task_id)
            if plan is not None and plan[1](request.input):
                return plan[0]
        return resolve(request, self._task_of, self._artifact_of, self._validators, self._default_timeout_ms)

    def _plan(self, task_id: str) -> tuple[ExecutionPlan, Callable[[Any], bool]] | None:
        """What an unpinned request of the task runs, and the test of its input; None when resolve() decides."""
        plan = None
        task = self._task_of(task_id)
        if task is not None and task.active_version is not None and task.canary_version is None:
            artifact = self._artifact_of(task.name, task.active_version)
            is_valid = self._validators.is_valid(task)
            if artifact is not None and is_valid is not None:
                plan = (ExecutionPlan(artifact, unpinned_timeout_ms(task, self._default_timeout_ms), task), is_valid)
        self._plans[task_id] = plan
        return plan


def calls_of(pending: Iterable[tuple[ExecutionRequest, ExecutionPlan, Any]]) -> list[Call]:
    """The sandbox calls of (request, plan, anything) triples. A batch's plans are mostly one shared object (the
    Resolver's), so a plan's program and timeout are read once; each Call is made as the tuple it is (a
    NamedTuple's own constructor costs twice as much)."""
    calls: list[Call] = []
    runs: dict[int, tuple[str, str, float]] = {}
    made = tuple.__new__
    for q, r, _ in pending:
        run = runs.get(id(r))
        if run is None:
            run = runs[id(r)] = (r.artifact.program_id, r.artifact.source_code, r.timeout_ms / 1000)
        calls.append(made(Call, (q.task_id, *run, q.input)))
    return calls
