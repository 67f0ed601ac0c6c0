"""RequestTriage without a broker: a fetch's messages in; the requests to run out, and every other request's
rejected result or dead letter, each with the mark of its record."""

from types import SimpleNamespace
from typing import Any

import orjson
from aiokafka import ConsumerRecord, TopicPartition

from app.contract.codecs import codec_for
from app.contract.records import ExecutionRequest, ProgramArtifact, TaskSpec, utc_now
from app.contract.topics import topics_for
from app.kafka.lanes import Answers
from app.kafka.progress import Segment
from app.kafka.triage import RequestTriage
from app.settings import Settings

SETTINGS = Settings(bootstrap_servers="kafka:9092", worker_id="w")
TOPICS = topics_for(SETTINGS.topic_prefix)
CODEC = codec_for(ExecutionRequest, SETTINGS, TOPICS.execution_requests)
TP = TopicPartition(TOPICS.execution_requests.name, 3)
ARTIFACT = ProgramArtifact(task_id="spam", version=1, program_id="spam-v1", source_code="def run(input): return 1",
                           created_at=utc_now())
TABLES: Any = SimpleNamespace(tasks={"spam": TaskSpec(name="spam", active_version=1, updated_at=utc_now()),
                                     "held": TaskSpec(name="held", active_version=1, updated_at=utc_now())},
                              artifacts=SimpleNamespace(version=lambda task, version: ARTIFACT))


def request(task_id: str) -> bytes:
    return CODEC.encode(ExecutionRequest(request_id=f"r-{task_id}", task_id=task_id, input={"text": "x"}))


def triage(values: list[bytes | None], refusal: Any) -> tuple[list[Any], list[int], Answers, list[int]]:
    """Triage one fetch of these values: what runs, its offsets, the answers at once, and their offsets."""
    messages = [ConsumerRecord(TP.topic, TP.partition, offset, 0, 0, b"k", value, None, 0, 0, [])
                for offset, value in enumerate(values)]
    tracked: list[Segment] = []

    def track(tp: TopicPartition, records: list[Any]) -> Segment:
        tracked.append(Segment([r.offset for r in records]))
        return tracked[-1]

    out = Answers()
    pending, marks = RequestTriage(SETTINGS, TOPICS, TABLES, refusal)({TP: messages}, track, out)
    assert {segment for segment, _ in [*marks, *out.marks]} == set(tracked) and len(tracked) == 1
    return pending, [index for _, index in marks], out, [index for _, index in out.marks]


def test_what_runs_is_planned_and_the_rest_is_answered_at_once() -> None:
    named_but_invalid = orjson.dumps({"request_id": "r-bad", "task_id": "spam", "input": {}, "timeout_ms": 0})
    values = [request("spam"), request("nope"), named_but_invalid, b"not a request", None, request("held")]
    pending, ran, out, answered = triage(values, {"held": "task 'held' is suspended"}.get)
    assert [(r.request_id, plan.artifact.program_id, m.offset) for r, plan, m in pending] == [("r-spam", "spam-v1", 0)]
    assert ran == [0] and answered == [1, 2, 3, 4, 5]
    assert [(f["request_id"], f["status"], m.offset) for f, m in out.results] == [
        ("r-nope", "rejected", 1), ("r-bad", "rejected", 2), ("r-held", "rejected", 5)]
    nope, bad, held = (f["error_message"] for f, _ in out.results)
    assert (nope, held) == ("unknown task 'nope'", "task 'held' is suspended") and "timeout_ms" in bad
    assert [(letter.error_type, letter.source_offset, letter.value) for letter in out.letters] == [
        ("DecodeError", 3, b"not a request"), ("EmptyMessage", 4, None)]


def test_an_error_while_triaging_dead_letters_its_request_and_nothing_else() -> None:
    def refusal(task_id: str) -> str | None:
        if task_id == "held":
            raise RuntimeError("budget broken")
        return None

    pending, ran, out, answered = triage([request("held"), request("spam")], refusal)
    assert ran == [1] and [r.request_id for r, _, _ in pending] == ["r-spam"]
    assert answered == [0] and out.results == []
    assert [(letter.reason, letter.error_type, letter.source_offset) for letter in out.letters] == [
        ("internal error: budget broken", "RuntimeError", 0)]
