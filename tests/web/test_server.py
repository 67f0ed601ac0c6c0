"""The worker's routes over its real tables and metrics, without a broker: the executor, pool and broker watch stood
in, the tables fed their records directly, a call's execution and the daily stats stood in where they would read
topics. Each route's answers and errors. On a running worker: tests/test_web.py; /health: test_health.py; the
token: test_token.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from app.contract.codecs import json_codec
from app.contract.records import (
    AnomalyMethod,
    AnomalyMetric,
    AnomalySignal,
    DailyStats,
    DeadLetter,
    ExecutionResult,
    ExecutionStatus,
    OracleKind,
    OracleSpec,
    ProgramArtifact,
    TaskSpec,
    TaskSuspension,
    utc_now,
)
from app.contract.topics import topics_for
from app.domain.daily_stats import StatsKey
from app.kafka.tables import TableReader
from app.settings import Settings
from app.web import server as server_module
from app.web.execute import ExecuteBody, Executions
from app.web.server import WebServer

SETTINGS = Settings(bootstrap_servers="kafka:9092", topic_prefix="p.", worker_id="w1", web_execute_timeout_s=7)
TOPICS = topics_for(SETTINGS.topic_prefix)


@dataclass
class Served:
    client: TestClient
    web: WebServer
    tables: TableReader

    def put(self, record: TaskSpec | ProgramArtifact | TaskSuspension) -> None:
        """A record as the table reader applies it from its compacted topic."""
        table: Any
        if isinstance(record, TaskSpec):
            table, key = self.tables.tasks, record.name
        elif isinstance(record, ProgramArtifact):
            table, key = self.tables.artifacts, f"{record.task_id}/{record.version}"
        else:
            table, key = self.tables.suspensions, record.task_id
        table.apply(key.encode(), json_codec(type(record)).encode(record), 0)

    async def get(self, path: str) -> tuple[int, Any]:
        answer = await self.client.get(path)
        return answer.status, await answer.json()

    async def execute(self, body: dict[str, Any]) -> tuple[int, Any]:
        answer = await self.client.post("/execute", json=body)
        return answer.status, await answer.json()


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    tables = TableReader(SETTINGS, TOPICS.task_specs, TOPICS.program_artifacts, TOPICS.task_suspensions)
    tables.ready.set()
    joined = asyncio.Event()
    joined.set()

    async def lag() -> dict[int, int]:
        return {0: 3}

    pipeline = SimpleNamespace(joined=joined, failure=None, partitions=lambda: [0, 2], lag=lag)
    executor: Any = SimpleNamespace(pipeline=pipeline, executed=42, dead_lettered=1)
    watch: Any = SimpleNamespace(answered_at=time.monotonic())
    web = WebServer(SETTINGS, TOPICS, tables, executor, SimpleNamespace(replaced=0), watch)  # type: ignore[arg-type]
    async with TestClient(TestServer(web.application())) as client:
        made = Served(client, web, tables)
        now = utc_now()
        made.put(TaskSpec(name="b-task", active_version=1, canary_version=2, canary_percent=25.0, updated_at=now,
                          oracle=OracleSpec(kind=OracleKind.LABEL)))
        made.put(TaskSpec(name="a-task", active_version=1, canary_percent=30.0, updated_at=now))
        for task, version in (("b-task", 1), ("b-task", 2), ("a-task", 1)):
            made.put(ProgramArtifact(task_id=task, version=version, program_id=f"{task}-v{version}",
                                     source_code="def run(input):\n    return 1\n", created_at=now))
        yield made


async def test_tasks_are_listed_by_name_as_the_tables_hold_them(served: Served) -> None:
    status, tasks = await served.get("/tasks")
    assert status == 200 and [t["task_id"] for t in tasks] == ["a-task", "b-task"]
    assert tasks[0]["canary_percent"] == 0.0  # a share without a canary version is no canary
    assert tasks[1] == {"task_id": "b-task", "active_version": 1, "canary_version": 2, "canary_percent": 25.0,
                        "versions": [1, 2], "oracle": "label", "suspended_until": None, "suspension_reason": None}


async def test_a_task_shows_its_spec_versions_without_source_and_canary(served: Served) -> None:
    status, task = await served.get("/tasks/b-task")
    assert status == 200
    assert task["spec"]["name"] == "b-task" and task["canary"] == {"version": 2, "percent": 25.0}
    assert [(v["version"], v["lines"], "source_code" in v) for v in task["versions"]] == [(1, 3, False),
                                                                                       (2, 3, False)]
    assert (await served.get("/tasks/a-task"))[1]["canary"] is None
    assert await served.get("/tasks/nope") == (404, {"detail": "no task 'nope'"})


async def test_a_suspension_in_force_says_until_when_and_why(served: Served) -> None:
    now = utc_now()
    served.put(TaskSuspension(task_id="a-task", suspended=True, until=now + timedelta(minutes=5),
                              reason="10 calls timed out within 60 s", updated_at=now))
    served.put(TaskSuspension(task_id="b-task", suspended=True, until=now - timedelta(seconds=1),
                              reason="over", updated_at=now))  # its cool-down has run
    _, tasks = await served.get("/tasks")
    assert tasks[0]["suspension_reason"] == "10 calls timed out within 60 s"
    assert tasks[0]["suspended_until"] == (now + timedelta(minutes=5)).isoformat().replace("+00:00", "Z")
    assert (tasks[1]["suspended_until"], tasks[1]["suspension_reason"]) == (None, None)
    served.put(TaskSuspension(task_id="a-task", suspended=False, reason="resumed", updated_at=now))
    _, task = await served.get("/tasks/a-task")
    assert (task["suspended_until"], task["suspension_reason"]) == (None, None)


def stats_day(task: str, date: str, version: int | None = None, executions: int = 1) -> DailyStats:
    return DailyStats(task_id=task, version=version, date=date, time_zone="UTC", executions=executions,
                      ok=executions, error=0, timeout=0, rejected=0, success_rate=1.0, sampled=0, sampling_rate=0.0,
                      validated=0, matched=0, sketch=b"", window_start=utc_now(), window_end=utc_now())


async def test_stats_show_today_by_version_and_the_days_asked_for_oldest_first(
        served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    today = utc_now().date()
    dates = [(today - timedelta(days=back)).isoformat() for back in range(4)]  # today first
    reads: list[str] = []

    async def daily_stats(settings: Settings, task_id: str) -> dict[StatsKey, DailyStats]:
        reads.append(task_id)
        days = [stats_day(task_id, dates[0], executions=5), stats_day(task_id, dates[1], executions=4),
                stats_day(task_id, dates[3], executions=2), stats_day(task_id, dates[0], version=1, executions=3),
                stats_day(task_id, dates[0], version=2, executions=2), stats_day(task_id, dates[1], version=1)]
        return {StatsKey(d.task_id, d.version, d.date): d for d in days}

    monkeypatch.setattr(server_module, "daily_stats", daily_stats)
    status, stats = await served.get("/tasks/a-task/stats?days=3")
    assert status == 200 and (stats["task_id"], stats["time_zone"]) == ("a-task", "UTC")
    assert stats["today"]["executions"] == 5 and stats["today"]["date"] == dates[0]
    assert {version: day["executions"] for version, day in stats["today_by_version"].items()} == {"1": 3, "2": 2}
    assert [d["date"] for d in stats["days"]] == [dates[1], dates[0]]  # two days ago had none; three is too far
    status, longer = await served.get("/tasks/a-task/stats")  # 14 days by default
    assert [d["date"] for d in longer["days"]] == [dates[3], dates[1], dates[0]]
    assert reads == ["a-task"]  # the dashboard's polls share one read of the topics


async def test_stats_refuse_an_unknown_task_or_a_bad_number_of_days(served: Served) -> None:
    assert (await served.get("/tasks/nope/stats"))[0] == 404
    for days in ("0", "367", "x"):
        status, answer = await served.get(f"/tasks/a-task/stats?days={days}")
        assert status == 422 and answer["detail"][0]["loc"] == ["query", "days"], days


async def test_execute_answers_the_result_or_says_why_not(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    async def execute(self: Executions, body: ExecuteBody, timeout_s: float) -> ExecutionResult | DeadLetter:
        assert timeout_s == 7
        if body.input.get("slow"):
            raise TimeoutError
        if body.input.get("undecodable"):
            return DeadLetter(reason="bad", error_type="DecodeError", source_topic="p.execution-requests",
                              source_partition=0, source_offset=5, value=b"x", worker_id="w1",
                              dead_lettered_at=utc_now())
        return ExecutionResult(execution_id="e", request_id=body.request_id or "r", task_id=body.task_id,
                               version=body.version or 1, status=ExecutionStatus.OK, output=body.input,
                               executed_at=utc_now(), worker_id="w1")

    monkeypatch.setattr(Executions, "execute", execute)
    status, result = await served.execute({"task_id": "b-task", "input": {"n": 1}, "version": 2})
    assert status == 200 and (result["output"], result["version"]) == ({"n": 1}, 2)
    assert await served.execute({"task_id": "nope", "input": {}}) == (404, {"detail": "no task 'nope'"})
    assert await served.execute({"task_id": "b-task", "input": {}, "version": 9}) == (
        404, {"detail": "task 'b-task' has no version 9"})
    status, answer = await served.execute({"task_id": "b-task", "input": {"slow": True}})
    assert status == 504 and "web_execute_timeout_s" in answer["detail"] and "7 s" in answer["detail"]
    status, letter = await served.execute({"task_id": "b-task", "input": {"undecodable": True}})
    assert status == 502 and letter["source_offset"] == 5
    status, answer = await served.execute({"task_id": "b-task", "input": [], "extra": 1})
    assert status == 422
    assert {tuple(d["loc"]) for d in answer["detail"]} == {("body", "input"), ("body", "extra")}


async def test_only_the_dashboards_own_files_are_served(served: Served) -> None:
    page = await served.client.get("/")
    assert page.status == 200 and page.content_type == "text/html" and "dashboard.js" in await page.text()
    script = await served.client.get("/static/dashboard.js")
    assert script.status == 200 and script.content_type == "text/javascript"
    for name in ("index.html", "..%2F__init__.py", "secrets"):
        assert (await served.client.get(f"/static/{name}")).status == 404, name


async def test_the_dashboard_data_holds_live_figures_accuracy_signals_and_letters_without_bytes(
        served: Served) -> None:
    metrics = served.web.metrics
    metrics.sample(now=100.0)
    metrics.count_results([{"task_id": "b-task", "version": 1, "status": "ok", "latency_ms": 2.0}] * 9
                          + [{"task_id": "b-task", "version": 1, "status": "error", "latency_ms": 2.0}])
    metrics.sample(now=102.0)
    recent = served.web.recent
    for n in range(2):
        signal = AnomalySignal(task_id="b-task", version=2, metric=AnomalyMetric.ERROR_RATE, value=0.5, baseline=0.0,
                               score=9.0, method=AnomalyMethod.ZSCORE, hint=f"signal {n}", detected_at=utc_now())
        recent.signals.append(signal)
    recent.dead_letters.append(DeadLetter(reason="bad", error_type="DecodeError", source_topic="t", source_partition=1,
                                          source_offset=2, key=b"k", value=b"secret payload", worker_id="w1",
                                          dead_lettered_at=utc_now()))
    recent.validations.update({("b-task", "1", "match"): 3, ("b-task", "1", "mismatch"): 1})
    status, data = await served.get("/api/dashboard")
    assert status == 200
    assert (data["worker_id"], data["ready"], data["executed"], data["partitions"]) == ("w1", True, 42, [0, 2])
    a_task, b_task = data["tasks"]
    assert a_task["live"] is None and a_task["accuracy"] == {}
    assert (b_task["live"]["executions"], b_task["live"]["per_second"], b_task["live"]["error_rate"]) == (10, 5.0,
                                                                                                         0.1)
    assert b_task["accuracy"] == {"1": {"validated": 4, "matched": 3, "accuracy": 0.75}}
    assert [s["hint"] for s in data["signals"]] == ["signal 1", "signal 0"]  # newest first
    [letter] = data["dead_letters"]
    assert letter["source_offset"] == 2 and "value" not in letter and "key" not in letter


async def test_metrics_hold_the_workers_figures_and_its_lag(served: Served) -> None:
    answer = await served.client.get("/metrics")
    text = await answer.text()
    assert answer.status == 200
    assert "loopai_dead_letters_total 1.0" in text
    assert 'loopai_consumer_lag{partition="0"} 3.0' in text
    assert "loopai_sandbox_processes_replaced_total 0.0" in text
