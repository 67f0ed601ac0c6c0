import http.server
import threading
from typing import Any

import pytest

from app.contract.records import ExecutionRequest, ProgramArtifact, TaskSpec, utc_now
from app.domain.resolution import ExecutionPlan, Refused, Resolver, SchemaValidators, resolve

SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}


def _artifact(version: int) -> ProgramArtifact:
    return ProgramArtifact(task_id="spam", version=version, program_id=f"spam-v{version}",
                           source_code="def run(input): return 1", created_at=utc_now())


TASKS = {"spam": TaskSpec(name="spam", input_schema=SCHEMA, active_version=2, sampling_rate=0.3,
                          updated_at=utc_now()),
         "idle": TaskSpec(name="idle", updated_at=utc_now())}
ARTIFACTS = {("spam", 1): _artifact(1), ("spam", 2): _artifact(2)}


def _resolve(**fields: Any) -> ExecutionPlan | Refused:
    request = ExecutionRequest(**{"request_id": "r", "task_id": "spam", "input": {"text": "x"}, **fields})
    return resolve(request, TASKS.get, lambda t, v: ARTIFACTS.get((t, v)), SchemaValidators(), 1000)


def test_active_version_runs() -> None:
    decision = _resolve()
    assert isinstance(decision, ExecutionPlan)
    assert (decision.artifact.version, decision.timeout_ms, decision.task.sampling_rate) == (2, 1000, 0.3)


def test_pinned_version_and_timeout() -> None:
    decision = _resolve(version=1, timeout_ms=25)
    assert isinstance(decision, ExecutionPlan)
    assert (decision.artifact.version, decision.timeout_ms) == (1, 25)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"task_id": "nope"}, "unknown task 'nope'"),
        ({"task_id": "idle"}, "task 'idle' has no active version"),
        ({"version": 9}, "task 'spam' has no version 9"),
        ({"input": {"text": 5}}, 'input_schema at text: 5 is not of type "string"'),
        ({"input": {}}, 'input_schema at (root): "text" is a required property'),
    ],
)
def test_refusals(fields: dict[str, Any], message: str) -> None:
    decision = _resolve(**fields)
    assert isinstance(decision, Refused)
    assert message in decision.message


def test_a_request_may_ask_for_a_timeout_up_to_its_tasks_max_timeout_ms() -> None:
    decision = _resolve(timeout_ms=1000)  # the default bound, 1000, allows exactly it
    assert isinstance(decision, ExecutionPlan) and decision.timeout_ms == 1000
    assert _resolve(timeout_ms=1001) == Refused("timeout_ms 1001 is above task 'spam''s max_timeout_ms 1000", 2)
    assert _resolve(timeout_ms=20_000, version=1) == \
        Refused("timeout_ms 20000 is above task 'spam''s max_timeout_ms 1000", 1)
    patient = {"spam": TASKS["spam"].model_copy(update={"max_timeout_ms": 30_000})}
    request = ExecutionRequest(request_id="r", task_id="spam", input={"text": "x"}, timeout_ms=20_000)
    decision = resolve(request, patient.get, lambda t, v: ARTIFACTS.get((t, v)), SchemaValidators(), 1000)
    assert isinstance(decision, ExecutionPlan) and decision.timeout_ms == 20_000


@pytest.mark.parametrize(("default_timeout_ms", "max_timeout_ms", "expected"),
                         [(1000, 1000, 1000), (1000, 250, 250), (5000, 2000, 2000), (500, 60_000, 500)])
def test_a_request_without_timeout_gets_the_default_within_the_tasks_bound(
        default_timeout_ms: int, max_timeout_ms: int, expected: int) -> None:
    tasks = {"spam": TASKS["spam"].model_copy(update={"max_timeout_ms": max_timeout_ms})}
    request = ExecutionRequest(request_id="r", task_id="spam", input={"text": "x"})
    for decide in (lambda r: resolve(r, tasks.get, lambda t, v: ARTIFACTS.get((t, v)), SchemaValidators(),
                                     default_timeout_ms),
                   Resolver(tasks.get, lambda t, v: ARTIFACTS.get((t, v)), SchemaValidators(), default_timeout_ms)):
        decision = decide(request)
        assert isinstance(decision, ExecutionPlan) and decision.timeout_ms == expected


def test_active_version_that_is_not_published() -> None:
    tasks = {"spam": TASKS["spam"].model_copy(update={"active_version": 5})}
    request = ExecutionRequest(request_id="r", task_id="spam", input={"text": "x"})
    decision = resolve(request, tasks.get, lambda t, v: ARTIFACTS.get((t, v)), SchemaValidators(), 1000)
    assert decision == Refused("active version 5 of task 'spam' is not published", 5)


def test_validator_follows_a_changed_schema() -> None:
    validators = SchemaValidators()
    task = TASKS["spam"]
    assert validators.errors(task, {"n": 1}) is not None
    relaxed = task.model_copy(update={"input_schema": {"type": "object"}})
    assert validators.errors(relaxed, {"n": 1}) is None


def test_a_schema_that_refers_elsewhere_refuses_its_requests_and_nothing_is_fetched() -> None:
    fetched: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            fetched.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"type": "string"}')

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ref = {"$ref": f"http://127.0.0.1:{server.server_address[1]}/s.json"}
        for schema in (ref, {"type": "object", "properties": {"text": ref}}):
            task = TASKS["spam"].model_copy(update={"input_schema": schema})
            problem = SchemaValidators().errors(task, {"text": "x"})
            assert problem is not None and "the task's input_schema cannot be used" in problem
            assert "s.json" in problem
    finally:
        server.shutdown()
    assert fetched == []


def test_big_integers_patterns_and_extra_fields_are_checked() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}, "tags": {
        "type": "array", "items": {"type": "string", "pattern": "^[a-z]+$"}, "maxItems": 2}},
        "required": ["n"], "additionalProperties": False}
    task = TASKS["spam"].model_copy(update={"input_schema": schema})
    validators = SchemaValidators()
    valid = [{"n": 0}, {"n": 2**70}, {"n": 3, "tags": ["ab", "c"]}]
    invalid = [{"n": -1}, {"n": -(2**70)}, {"n": 1.5}, {"n": 1, "x": 0}, {"n": 1, "tags": ["A"]},
               {"n": 1, "tags": ["a"] * 3}, {}]
    assert [validators.errors(task, value) for value in valid] == [None] * len(valid)
    assert all(validators.errors(task, value) for value in invalid)


def test_an_input_crafted_against_a_backtracking_pattern_cannot_hang_the_worker() -> None:
    """^(a+)+$ takes Python's re 2^n steps on "a" * n + "b"; the worker's validator answers at once."""
    schema = {"type": "object", "properties": {"text": {"type": "string", "pattern": "^(a+)+$"}}}
    task = TASKS["spam"].model_copy(update={"input_schema": schema})
    answer: list[str | None] = []
    checking = threading.Thread(target=lambda: answer.append(SchemaValidators().errors(task, {"text": "a" * 60 + "b"})),
                                daemon=True)
    checking.start()
    checking.join(timeout=30)  # a hang guard only: the check itself takes microseconds
    assert answer and answer[0] is not None and "does not match" in answer[0]


def test_a_canary_runs_its_share_of_requests_and_pins_win() -> None:
    canary = {"spam": TASKS["spam"].model_copy(update={"canary_version": 1, "canary_percent": 30.0})}
    versions = []
    for i in range(2000):
        request = ExecutionRequest(request_id=f"r{i}", task_id="spam", input={"text": "x"})
        decision = resolve(request, canary.get, lambda t, v: ARTIFACTS.get((t, v)), SchemaValidators(), 1000)
        assert isinstance(decision, ExecutionPlan)
        versions.append(decision.artifact.version)
    assert 0.26 < versions.count(1) / len(versions) < 0.34
    pinned = ExecutionRequest(request_id="r1", task_id="spam", version=2, input={"text": "x"})
    decision = resolve(pinned, canary.get, lambda t, v: ARTIFACTS.get((t, v)), SchemaValidators(), 1000)
    assert isinstance(decision, ExecutionPlan) and decision.artifact.version == 2


def test_a_batch_resolver_decides_as_resolve_does_for_every_kind_of_request_and_table() -> None:
    broken = {"$ref": "https://example.com/schema.json"}  # refers elsewhere: no validator can be built
    tasks = {**TASKS,
             "canary": TASKS["spam"].model_copy(update={"name": "canary", "canary_version": 1, "canary_percent": 50}),
             "unpublished": TASKS["spam"].model_copy(update={"name": "unpublished", "active_version": 5}),
             "unchecked": TASKS["spam"].model_copy(update={"name": "unchecked", "input_schema": None}),
             "broken": TASKS["spam"].model_copy(update={"name": "broken", "input_schema": broken}),
             "bounded": TASKS["spam"].model_copy(update={"name": "bounded", "max_timeout_ms": 20})}
    artifacts = {(task, version): _artifact(version).model_copy(update={"task_id": task})
                 for task in tasks for version in (1, 2)}

    def artifact_of(task: str, version: int) -> ProgramArtifact | None:
        return artifacts.get((task, version))

    requests = [ExecutionRequest(request_id=f"r{i}", task_id=task, input=value, **pins)
                for task in [*tasks, "nope"]
                for value in ({"text": "x"}, {"text": 5}, {})
                for pins in ({}, {"version": 1}, {"version": 9}, {"timeout_ms": 25})
                for i in range(4)]
    batch = Resolver(tasks.get, artifact_of, SchemaValidators(), 1000)
    for request in requests:
        assert batch(request) == resolve(request, tasks.get, artifact_of, SchemaValidators(), 1000), request
    shared = {id(batch(request)) for request in requests[:4]}  # one task, unpinned, valid: one ExecutionPlan
    assert len(shared) == 1
