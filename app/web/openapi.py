"""The OpenAPI 3.1 description of the worker's HTTP API: consumes the pydantic models of bodies and records,
produces the document GET /openapi.json serves (tests/test_web.py calls every path it lists)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from app.contract.records import DailyStats, DeadLetter, ExecutionResult, ProgramArtifact, TaskSpec
from app.web.execute import ExecuteBody

_REF = "#/components/schemas/{model}"


def _schemas(*models: type[BaseModel]) -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template=_REF)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return schemas


def _json(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema or {"type": "object"}}}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": _REF.format(model=name)}


_TASK = [{"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}}]
_FIELD_ERRORS = _json("the body is not valid: one entry per field, with its location", {
    "type": "object", "properties": {"detail": {"type": "array", "items": {
        "type": "object", "properties": {"loc": {"type": "array"}, "msg": {"type": "string"},
                                         "type": {"type": "string"}}}}}})


# A task suspended because its calls kept timing out (app/domain/task_budget.py): both null while it runs.
_SUSPENSION: dict[str, Any] = {
    "suspended_until": {"type": ["string", "null"], "format": "date-time",
                        "description": "when the suspension ends (`loopai task resume` ends it sooner)"},
    "suspension_reason": {"type": ["string", "null"]},
}


def openapi_document() -> dict[str, Any]:
    """The API as served; paths in the order a reader meets them."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "loopai-stream worker", "version": "1",
                 "description": "Health, metrics, synchronous execution, tasks and their daily stats, and the "
                                "dashboard, served by each worker (settings web_host, web_port)."},
        "paths": {
            "/health": {"get": {"summary": "Ready to serve: the broker answers, tables are recovered, the executor "
                                           "has joined its group and has not failed",
                                "responses": {"200": _json("ready"), "503": _json("not ready; `reasons` says why")}}},
            "/metrics": {"get": {"summary": "Prometheus text format (executions, execution time, request -> "
                                            "result latency, sandbox replacements, dead letters, validations and "
                                            "accuracy, consumer lag)",
                                 "responses": {"200": {"description": "metrics",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/execute": {"post": {
                "summary": "Produce one request and wait for its result (web_execute_timeout_s)",
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("ExecuteBody")}}},
                "responses": {"200": _json("the request's result (its status may be error, timeout or rejected)",
                                           _ref("ExecutionResult")),
                              "404": _json("no such task, or no such pinned version"),
                              "422": _FIELD_ERRORS,
                              "502": _json("the request went to the dead letters", _ref("DeadLetter")),
                              "504": _json("no result within the timeout")}}},
            "/tasks": {"get": {"summary": "Every task: active version, canary, published versions, and whether it is "
                                          "suspended (suspended_until, suspension_reason: null while it runs)",
                               "responses": {"200": _json("tasks", {"type": "array", "items": {"type": "object"}})}}},
            "/tasks/{task_id}": {"get": {
                "summary": "One task: its spec, its versions (without source), its canary, its suspension",
                "parameters": _TASK,
                "responses": {"200": _json("the task", {"type": "object", "properties": {
                    "spec": _ref("TaskSpec"), "versions": {"type": "array", "items": {"type": "object"}},
                    **_SUSPENSION}}),
                    "404": _json("no such task")}}},
            "/tasks/{task_id}/stats": {"get": {
                "summary": "Today's running window and the recent closed days (as `loopai stats` shows them)",
                "parameters": [*_TASK, {"name": "days", "in": "query", "required": False,
                                        "schema": {"type": "integer", "minimum": 1, "maximum": 366}}],
                "responses": {"200": _json("days, oldest first", {"type": "object", "properties": {
                    "today": _ref("DailyStats"), "days": {"type": "array", "items": _ref("DailyStats")}}}),
                    "404": _json("no such task"), "422": _FIELD_ERRORS}}},
            "/api/dashboard": {"get": {
                "summary": "What the dashboard page shows, refreshed by its polling: every task with its live window "
                           "(executions/s, error rate, execution time and request -> result p50/p95/p99), signals, "
                           "dead letters, improvements; with `chart`, that task's last 15 minutes",
                "parameters": [{"name": "chart", "in": "query", "required": False, "schema": {"type": "string"},
                                "description": "a task id: `chart.points` is its last 15 minutes, a point every "
                                               "`chart.step_s` s: [unix s, executions/s, error rate, request -> "
                                               "result p99 ms, execution p99 ms]"}],
                "responses": {"200": _json("tasks with live figures, signals, dead letters, improvements, the "
                                                  "chart")}}},
            "/": {"get": {"summary": "The dashboard page",
                          "responses": {"200": {"description": "HTML",
                                                "content": {"text/html": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": _json("OpenAPI 3.1")}}},
            "/favicon.ico": {"get": {"summary": "The dashboard's icon, open like /health",
                                     "responses": {"200": {"description": "an .ico holding one PNG",
                                                           "content": {"image/x-icon": {"schema": {
                                                               "type": "string", "format": "binary"}}}}}}},
        },
        "components": {"schemas": _schemas(ExecuteBody, ExecutionResult, DeadLetter, TaskSpec, ProgramArtifact,
                                           DailyStats)},
    }
