"""HTTP on a worker process, end to end on the embedded broker: /health, /metrics, /execute (results, field
errors, unknown task, timeout), /tasks, stats, the dashboard's data and every path the OpenAPI document lists.
One worker serves the whole module: each test uses its own task, so counts do not mix."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest

from app.contract.codecs import codec_for
from app.contract.records import ImprovementRequest, OracleKind, OracleSpec, TaskSpec, TaskSuspension, utc_now
from app.contract.topics import topics_for
from app.control.plane import ControlPlane
from app.domain.daily_windows import DailyWindows
from app.kafka.clients import apply_topics, make_producer, partition_for
from app.settings import Settings
from devtools.broker import EmbeddedBroker, free_port
from devtools.samples import program_source
from tests.conftest import WorkerProcess, make_settings
from tests.generator.test_service import request_for

SLOW = "def run(input):\n    while True:\n        pass\n"


@dataclass
class Served:
    settings: Settings
    url: str
    worker: WorkerProcess


def call(url: str, method: str = "GET", body: Any = None, raw: bytes | None = None,
         timeout_s: float = 30) -> tuple[int, Any]:
    """(status, JSON body, text, or bytes for an image) of one HTTP call; error statuses are answers, not
    exceptions."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status, content, kind = response.status, response.read(), response.headers.get_content_type()
    except urllib.error.HTTPError as exc:
        status, content, kind = exc.code, exc.read(), exc.headers.get_content_type()
    if kind.startswith("image/"):
        return status, content
    return status, json.loads(content) if kind == "application/json" else content.decode()


def eventually(check: Callable[[], Any], timeout_s: float = 30, what: str = "") -> Any:
    """check()'s first truthy answer; fails with the last one after the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = check()
        if answer:
            return answer
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s}s: {what} (last: {answer!r})")
        time.sleep(0.2)


async def _prepare(settings: Settings) -> None:
    await apply_topics(settings, topics_for(settings.topic_prefix))
    async with ControlPlane(settings) as control:
        for name in ("spam", "metered", "labelled", "listed"):
            await control.put_task(TaskSpec(name=name, updated_at=utc_now(), sampling_rate=0.0,
                                            oracle=OracleSpec(kind=OracleKind.LABEL)))
            await control.publish(name, program_source("spam_v1"), activate=True)
        await control.publish("spam", program_source("spam_v2"))
        await control.publish("listed", program_source("spam_v2"))
        await control.start_canary("listed", 2, 25.0)
        await control.put_task(TaskSpec(name="slow", updated_at=utc_now(), max_timeout_ms=5000))
        await control.publish("slow", SLOW, activate=True)


@pytest.fixture(scope="module")
def served(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    port = free_port()
    settings = make_settings(broker, web_port=port, web_execute_timeout_s=3.0, analytics_close_interval_s=1.0)
    asyncio.run(_prepare(settings))
    worker = WorkerProcess(settings, tmp_path_factory.mktemp("web") / "worker.log", "web-1").start()
    served = Served(settings, f"http://127.0.0.1:{port}", worker)
    eventually(lambda: call(served.url + "/health")[0] == 200, what="/health 200")
    yield served
    worker.stop()


def clear_of_midnight(settings: Settings, margin_s: float) -> None:
    """Sleep into the next day of the analytics time zone if it starts within margin_s: the worker's clock
    cannot be pinned, and executions on both sides of midnight would leave "today" short."""
    now = utc_now()
    left = (DailyWindows(settings.analytics_time_zone).today(now).end - now).total_seconds()
    if left < margin_s:
        time.sleep(left + 1)


def execute(served: Served, body: dict[str, Any]) -> tuple[int, Any]:
    return call(served.url + "/execute", "POST", body)


def test_health_is_ready_once_serving(served: Served) -> None:
    status, body = call(served.url + "/health")
    assert status == 200, body
    assert body["status"] == "ready" and body["reasons"] == []
    assert body["broker"]["reachable"] is True
    assert body["tables"] == {"recovered": True, "tasks": 5, "artifacts": 7}
    assert body["partitions"] == list(range(topics_for(served.settings.topic_prefix).execution_requests.partitions))
    assert body["active_versions"] == {"labelled": 1, "listed": 1, "metered": 1, "slow": 1, "spam": 1}


def test_execute_returns_the_result_of_the_version_asked_for(served: Served) -> None:
    status, result = execute(served, {"task_id": "spam", "input": {"text": "FREE prize"}})
    assert status == 200, result
    assert (result["status"], result["output"], result["version"]) == ("ok", "spam", 1)
    status, result = execute(served, {"task_id": "spam", "input": {"text": "hello"}, "version": 2,
                                      "request_id": "mine-1"})
    assert status == 200, result
    assert (result["request_id"], result["version"], result["status"]) == ("mine-1", 2, "ok")


def test_bad_bodies_get_422_naming_each_field(served: Served) -> None:
    cases: list[tuple[Any, list[list[Any]]]] = [
        ({"input": {"text": "x"}}, [["body", "task_id"]]),
        ({"task_id": "spam", "input": "text"}, [["body", "input"]]),
        ({"task_id": "spam", "input": {}, "version": 0, "timeout_ms": 0}, [["body", "version"],
                                                                            ["body", "timeout_ms"]]),
        ({"task_id": "spam", "input": {}, "colour": "red"}, [["body", "colour"]]),
    ]
    for body, locations in cases:
        status, answer = execute(served, body)
        assert status == 422, (body, answer)
        assert [d["loc"] for d in answer["detail"]] == locations, answer
        assert all(d["msg"] for d in answer["detail"])
    status, answer = call(served.url + "/execute", "POST", raw=b"{not json")
    assert status == 422 and answer["detail"][0]["type"] == "json_invalid"


def _sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text, labels matched exactly."""
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match and dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or "")) == labels:
            return float(match.group(2))
    return None


def test_metrics_count_executions_latency_validations_and_lag(served: Served) -> None:
    for i in range(5):
        status, _ = execute(served, {"task_id": "metered", "input": {"text": f"FREE {i}"}})
        assert status == 200
    execute(served, {"task_id": "metered", "input": {"wrong": 1}})  # the program raises: an error result
    for expected in ("spam", "spam", "spam", "ham"):  # a label oracle: the last one is judged wrong
        execute(served, {"task_id": "labelled", "input": {"text": "FREE"}, "force_validation": True,
                         "expected_output": expected})

    def scraped() -> str | None:
        status, text = call(served.url + "/metrics")
        assert status == 200
        done = _sample(text, "loopai_validations_total", task="labelled", version="1", outcome="mismatch")
        lags = [_sample(text, "loopai_consumer_lag", partition=str(p)) for p in range(6)]
        # Offsets are committed a moment after the results are acknowledged: the lag drains to 0, it is not
        # 0 at once.
        drained = any(lag is not None for lag in lags) and all(lag in (None, 0) for lag in lags)
        return text if done == 1 and drained else None

    text = eventually(scraped, what="the labelled task's validations in /metrics and no consumer lag")
    assert _sample(text, "loopai_executions_total", task="metered", version="1", status="ok") == 5
    assert _sample(text, "loopai_executions_total", task="metered", version="1", status="error") == 1
    assert _sample(text, "loopai_execution_latency_seconds_count", task="metered", version="1") == 6
    assert _sample(text, "loopai_execution_latency_seconds_bucket", task="metered", version="1", le="+Inf") == 6
    assert _sample(text, "loopai_validations_total", task="labelled", version="1", outcome="match") == 3
    assert _sample(text, "loopai_validation_accuracy", task="labelled", version="1") == 0.75
    assert _sample(text, "loopai_dead_letters_total") == 0
    assert _sample(text, "loopai_sandbox_processes_replaced_total") == 0  # its timer stops a slow program


def test_tasks_a_task_and_its_stats(served: Served) -> None:
    status, tasks = call(served.url + "/tasks")
    assert status == 200
    listed = next(t for t in tasks if t["task_id"] == "listed")
    assert listed == {"task_id": "listed", "active_version": 1, "canary_version": 2, "canary_percent": 25.0,
                      "versions": [1, 2], "oracle": "label", "suspended_until": None, "suspension_reason": None}
    status, task = call(served.url + "/tasks/listed")
    assert status == 200
    assert task["spec"]["name"] == "listed" and task["canary"] == {"version": 2, "percent": 25.0}
    assert task["spec"]["max_timeout_ms"] == 1000 and task["suspended_until"] is None
    assert [v["version"] for v in task["versions"]] == [1, 2]
    assert all("source_code" not in v and v["lines"] > 1 for v in task["versions"])
    assert call(served.url + "/tasks/nope")[0] == 404
    assert call(served.url + "/tasks/nope/stats")[0] == 404
    assert call(served.url + "/tasks/listed/stats?days=0")[0] == 422

    clear_of_midnight(served.settings, margin_s=60)
    for i in range(3):
        assert execute(served, {"task_id": "listed", "input": {"text": f"hi {i}"}})[0] == 200

    def today() -> dict[str, Any] | None:
        status, stats = call(served.url + "/tasks/listed/stats?days=3")
        assert status == 200, stats
        shown = stats["today"]
        return stats if shown and shown["executions"] == 3 else None

    stats = eventually(today, timeout_s=40, what="today's running window of 'listed'")
    assert stats["today"]["closed_at"] is None and stats["today"]["ok"] == 3
    assert stats["days"][-1]["date"] == stats["today"]["date"]
    assert sum(day["executions"] for day in stats["today_by_version"].values()) == 3


def test_dashboard_data_shows_tasks_live_rates_dead_letters_and_improvements(served: Served) -> None:
    async def garbage() -> None:
        producer = make_producer(served.settings)
        await producer.start()
        try:
            await producer.send_and_wait(topics_for(served.settings.topic_prefix).execution_requests.name,
                                         b"not a request at all", key=b"x")
            spec = topics_for(served.settings.topic_prefix).improvement_requests
            await producer.send_and_wait(spec.name, codec_for(ImprovementRequest, served.settings, spec).encode(
                request_for("spam")), key=b"spam")
        finally:
            await producer.stop()

    asyncio.run(garbage())
    execute(served, {"task_id": "spam", "input": {"text": "winner"}})

    def shown() -> dict[str, Any] | None:
        status, data = call(served.url + "/api/dashboard")
        assert status == 200
        spam = next(t for t in data["tasks"] if t["task_id"] == "spam")
        live = spam["live"]
        letters = [d for d in data["dead_letters"] if d["error_type"] == "DecodeError"]
        return data if live and live["executions"] >= 1 and letters and data["improvements"] else None

    data = eventually(shown, what="spam's live window and the dead letter")
    spam = next(t for t in data["tasks"] if t["task_id"] == "spam")
    assert spam["active_version"] == 1 and spam["versions"] == [1, 2]
    assert spam["live"]["per_second"] > 0 and spam["live"]["p50_ms"] is not None
    assert data["ready"] is True and data["worker_id"] == "web-1"
    shown_request = data["improvements"][0]  # without the sources and examples it carries
    assert shown_request["improvement_id"] == "spam-v1-1" and "active_source" not in shown_request


def test_every_path_of_the_openapi_document_answers(served: Served) -> None:
    status, document = call(served.url + "/openapi.json")
    assert status == 200 and document["openapi"].startswith("3.")
    assert {"/health", "/metrics", "/execute", "/tasks", "/tasks/{task_id}", "/tasks/{task_id}/stats"} \
        <= set(document["paths"])
    for path, operations in document["paths"].items():
        for method in operations:
            url = served.url + path.replace("{task_id}", "spam")
            body = {"task_id": "spam", "input": {"text": "FREE"}} if method == "post" else None
            status, answer = call(url, method.upper(), body)
            assert status == 200, (method, path, answer)
            assert "200" in operations[method]["responses"]
    schema = document["components"]["schemas"]["ExecuteBody"]
    assert set(schema["required"]) == {"task_id", "input"}


def test_unknown_task_or_version_is_404_and_a_slow_program_504(served: Served) -> None:
    status, answer = execute(served, {"task_id": "nope", "input": {}})
    assert status == 404 and "nope" in answer["detail"]
    status, answer = execute(served, {"task_id": "spam", "input": {}, "version": 9})
    assert status == 404 and "version 9" in answer["detail"]
    # Last in the module: batches complete in order, so the slow call holds the worker's results back until
    # its own timeout_ms, a little past the web's 3 s.
    started = time.monotonic()
    status, answer = execute(served, {"task_id": "slow", "input": {}, "timeout_ms": 3500})
    assert status == 504 and "web_execute_timeout_s" in answer["detail"]
    assert 3.0 <= time.monotonic() - started < 10


async def suspend_task(settings: Settings, name: str) -> TaskSuspension:
    """A new task, suspended as a worker suspends one whose calls keep timing out (the record it writes)."""
    async with ControlPlane(settings) as control:
        await control.put_task(TaskSpec(name=name, updated_at=utc_now()))
    now = utc_now()
    record = TaskSuspension(task_id=name, suspended=True, until=now + timedelta(minutes=5),
                            reason="10 calls timed out within 60 s; suspended until then", timeouts=10,
                            window_s=60.0, worker_id="w9", updated_at=now)
    spec = topics_for(settings.topic_prefix).task_suspensions
    producer = make_producer(settings)
    await producer.start()
    try:
        await producer.send_and_wait(spec.name, codec_for(TaskSuspension, settings, spec).encode(record),
                                     key=name.encode(), partition=partition_for(name.encode(), spec.partitions))
    finally:
        await producer.stop()
    return record


def test_a_suspended_task_shows_until_when_and_why_until_resumed(served: Served) -> None:
    """The suspension a worker writes reaches /tasks, /tasks/{id} and the dashboard's data through the worker's
    table; an operator's resume clears it."""
    async def resume() -> None:
        async with ControlPlane(served.settings) as control:
            assert await control.resume("paused") is not None

    def summary() -> dict[str, Any] | None:
        status, tasks = call(served.url + "/tasks")
        assert status == 200
        return next((t for t in tasks if t["task_id"] == "paused"), None)

    suspension = asyncio.run(suspend_task(served.settings, "paused"))
    assert suspension.until is not None
    until = suspension.until.isoformat().replace("+00:00", "Z")
    shown = eventually(lambda: (s := summary()) and s["suspended_until"] and s, what="paused shown suspended")
    assert (shown["suspended_until"], shown["suspension_reason"]) == (until, suspension.reason)
    status, task = call(served.url + "/tasks/paused")
    assert status == 200 and (task["suspended_until"], task["suspension_reason"]) == (until, suspension.reason)
    dashboard = call(served.url + "/api/dashboard")[1]
    assert next(t for t in dashboard["tasks"] if t["task_id"] == "paused")["suspended_until"] == until

    asyncio.run(resume())
    eventually(lambda: (s := summary()) and s["suspended_until"] is None, what="paused running again")
    status, task = call(served.url + "/tasks/paused")
    assert (task["suspended_until"], task["suspension_reason"]) == (None, None)
