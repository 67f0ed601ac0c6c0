"""The worker's HTTP server (aiohttp, on the worker's event loop): consumes requests on web_host:web_port and the
worker's parts (tables, executor, sandbox pool, broker watch), produces /health, /metrics, /execute, /tasks,
/tasks/{id}, /tasks/{id}/stats, /api/dashboard, /openapi.json, the dashboard page and its icon."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict
from datetime import timedelta
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import Metric
from pydantic import ValidationError

from app.agents.execute_requests import ExecuteRequests
from app.contract.records import DailyStats, DeadLetter, ImprovementRequest, Record, utc_now
from app.contract.topics import Topics
from app.domain.daily_stats import StatsKey
from app.domain.task_budget import in_force
from app.kafka.clients import BrokerWatch, cancel_and_wait
from app.kafka.loop_client import daily_stats
from app.kafka.tables import TableReader
from app.sandbox.pool import SandboxPool
from app.settings import Settings
from app.web.execute import ExecuteBody, Executions
from app.web.metrics import SERIES_STEP_S, WorkerMetrics, counter, gauge
from app.web.openapi import openapi_document
from app.web.recent import RecentEvents

log = logging.getLogger(__name__)

_BROKER_SILENT_S = 5.0  # the watch probes every second: this long without an answer means unreachable
_STATS_CACHE_S = 5.0  # /tasks/{id}/stats reads two topics to their end: the dashboard's polls share one read
_STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}


class WebServer:
    """start() binds and serves; stop() closes. Binding a port in use fails the worker's start, naming the
    setting, rather than leaving a worker nobody can probe."""

    def __init__(self, settings: Settings, topics: Topics, tables: TableReader, executor: ExecuteRequests,
                 pool: SandboxPool, watch: BrokerWatch) -> None:
        self._settings = settings
        self._tables = tables
        self._executor = executor
        self._pool = pool
        self._watch = watch
        self.metrics = WorkerMetrics()
        executor.on_results = self.metrics.count_results
        self.recent = RecentEvents(settings, topics)
        self.metrics.watch(self.recent.metrics)
        self.metrics.watch(self._worker_metrics)
        self._executions = Executions(settings, topics)
        self._windows = settings.daily_windows()
        self._stats_cache: dict[str, tuple[float, dict[StatsKey, DailyStats]]] = {}
        self._lag: dict[int, int] = {}
        self._runner: web.AppRunner | None = None
        self._sampler: asyncio.Task[None] | None = None
        self.port: int | None = None

    async def start(self) -> None:
        await self.recent.start()
        await self._executions.start()
        self._runner = web.AppRunner(self.application(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._settings.web_host, self._settings.web_port)
        try:
            await site.start()
        except OSError as exc:
            raise RuntimeError(f"cannot serve HTTP on {self._settings.web_host}:{self._settings.web_port}: "
                               f"{exc.strerror} (settings web_host, web_port; web_port 0 turns HTTP off)") from exc
        self._sampler = asyncio.ensure_future(self._sample())
        log.info("HTTP on http://%s:%d/ (dashboard), /health, /metrics%s", self._settings.web_host,
                 self._settings.web_port, "; web_token required" if self._settings.web_token else "")

    def application(self) -> web.Application:
        """The routes, behind the web_token check when one is set."""
        token = self._settings.web_token
        app = web.Application(middlewares=[] if token is None else [require_token(token.get_secret_value())])
        app.add_routes([
            web.get("/", self._dashboard), web.get("/static/{name}", self._static),
            web.get("/health", self._health), web.get("/metrics", self._metrics),
            web.post("/execute", self._execute), web.get("/tasks", self._tasks),
            web.get("/tasks/{task_id}", self._task), web.get("/tasks/{task_id}/stats", self._task_stats),
            web.get("/api/dashboard", self._dashboard_data), web.get("/openapi.json", self._openapi),
            web.get("/favicon.ico", self._favicon),
        ])
        return app

    async def stop(self) -> None:
        await cancel_and_wait(self._sampler)
        if self._runner is not None:
            await self._runner.cleanup()
        await self._executions.stop()
        await self.recent.stop()

    async def _sample(self) -> None:
        while True:
            self.metrics.sample()
            await asyncio.sleep(1.0)

    # --- health and metrics

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Ready or not, and what it was judged on."""
        reasons = []
        answered = self._watch.answered_at
        silent_s = None if answered is None else time.monotonic() - answered
        reachable = silent_s is not None and silent_s < _BROKER_SILENT_S
        if not reachable:
            reasons.append(f"the broker at {self._settings.bootstrap_servers} has not answered lately")
        if not self._tables.ready.is_set():
            reasons.append("task and artifact tables not recovered yet")
        if not self._executor.pipeline.joined.is_set():
            reasons.append("the executor has not joined its group yet")
        if self._executor.pipeline.failure is not None:
            reasons.append(f"the executor failed: {self._executor.pipeline.failure}")
        tasks = list(self._tables.tasks.values())
        return not reasons, {
            "status": "ready" if not reasons else "not ready",
            "reasons": reasons,
            "worker_id": self._settings.worker_id,
            "broker": {"reachable": reachable, "last_answer_s_ago": None if silent_s is None else round(silent_s, 3)},
            "tables": {"recovered": self._tables.ready.is_set(), "tasks": len(tasks),
                       "artifacts": len(self._tables.artifacts)},
            "partitions": self._executor.pipeline.partitions(),
            "active_versions": {t.name: t.active_version for t in sorted(tasks, key=lambda t: t.name)},
        }

    async def _health(self, request: web.Request) -> web.Response:
        ready, body = self.health()
        return web.json_response(body, status=200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        try:
            self._lag = await self._executor.pipeline.lag()
        except Exception as exc:  # a scrape during a rebalance: report the rest, without lag
            log.debug("lag not known: %s", exc)
            self._lag = {}
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _worker_metrics(self) -> Iterator[Metric]:
        yield counter("loopai_sandbox_processes_replaced", "Sandbox processes that died or were killed and "
                      "were replaced", [], [([], self._pool.replaced)])
        yield counter("loopai_dead_letters", "Dead letters this worker's executor sent", [],
                      [([], self._executor.dead_lettered)])
        yield gauge("loopai_consumer_lag", "Requests not yet committed, per assigned partition of the requests "
                    "topic (log end seen by the last fetch minus the committed offset)", ["partition"],
                    (([str(p)], lag) for p, lag in sorted(self._lag.items())))

    # --- execute and tasks

    async def _execute(self, request: web.Request) -> web.Response:
        try:
            body = ExecuteBody.model_validate_json(await request.read())
        except ValidationError as exc:
            return _field_errors(exc)
        if self._tables.tasks.get(body.task_id) is None:
            return _error(404, f"no task {body.task_id!r}")
        if body.version is not None and self._tables.artifacts.version(body.task_id, body.version) is None:
            return _error(404, f"task {body.task_id!r} has no version {body.version}")
        timeout_s = self._settings.web_execute_timeout_s
        try:
            ended = await self._executions.execute(body, timeout_s)
        except TimeoutError:
            return _error(504, f"no result within {timeout_s:g} s (setting web_execute_timeout_s)")
        if isinstance(ended, DeadLetter):
            return _record(ended, status=502)
        return _record(ended)

    async def _tasks(self, request: web.Request) -> web.Response:
        return web.json_response([self._task_summary(t.name) for t in
                                  sorted(self._tables.tasks.values(), key=lambda t: t.name)])

    def _task_summary(self, task_id: str) -> dict[str, Any]:
        spec = self._tables.tasks.get(task_id)
        assert spec is not None
        return {"task_id": task_id, "active_version": spec.active_version, "canary_version": spec.canary_version,
                "canary_percent": spec.canary_percent if spec.canary_version else 0.0,
                "versions": sorted(self._tables.artifacts.versions_of(task_id)),
                "oracle": None if spec.oracle is None else spec.oracle.kind.value, **self._suspension(task_id)}

    def _suspension(self, task_id: str) -> dict[str, Any]:
        """suspended_until (null: until resumed) and suspension_reason of a suspended task; both null when it runs."""
        suspension = in_force(self._tables.suspensions.get(task_id), utc_now())
        if suspension is None:
            return {"suspended_until": None, "suspension_reason": None}
        return {"suspended_until": suspension.model_dump(mode="json")["until"], "suspension_reason": suspension.reason}

    async def _task(self, request: web.Request) -> web.Response:
        task_id = request.match_info["task_id"]
        spec = self._tables.tasks.get(task_id)
        if spec is None:
            return _error(404, f"no task {task_id!r}")
        versions = [a.model_dump(mode="json", exclude={"source_code"}) | {"lines": a.source_code.count("\n") + 1}
                    for _, a in sorted(self._tables.artifacts.versions_of(task_id).items())]
        return web.json_response({"spec": spec.model_dump(mode="json"), "versions": versions,
                                  "canary": {"version": spec.canary_version, "percent": spec.canary_percent}
                                  if spec.canary_version else None, **self._suspension(task_id)})

    async def _task_stats(self, request: web.Request) -> web.Response:
        task_id = request.match_info["task_id"]
        if self._tables.tasks.get(task_id) is None:
            return _error(404, f"no task {task_id!r}")
        try:
            days = int(request.query.get("days", "14"))
            if not 1 <= days <= 366:
                raise ValueError
        except ValueError:
            return web.json_response({"detail": [{"loc": ["query", "days"], "msg": "an integer from 1 to 366",
                                                  "type": "value_error"}]}, status=422)
        known = await self._daily_stats(task_id)
        today = self._windows.today(utc_now())
        recent = [known[key] for key in (StatsKey(task_id, None, (today.day - timedelta(days=back)).isoformat())
                                         for back in range(days - 1, -1, -1)) if key in known]
        versions = {str(key.version): day.model_dump(mode="json") for key, day in known.items()
                    if key.version is not None and key.date == today.date}
        shown = known.get(StatsKey(task_id, None, today.date))
        return web.json_response({"task_id": task_id, "time_zone": self._settings.analytics_time_zone,
                                  "today": None if shown is None else shown.model_dump(mode="json"),
                                  "today_by_version": versions,
                                  "days": [d.model_dump(mode="json") for d in recent]})

    async def _daily_stats(self, task_id: str) -> dict[StatsKey, DailyStats]:
        cached = self._stats_cache.get(task_id)
        if cached is not None and time.monotonic() - cached[0] < _STATS_CACHE_S:
            return cached[1]
        known = await daily_stats(self._settings, task_id)
        self._stats_cache[task_id] = (time.monotonic(), known)
        return known

    # --- the dashboard

    async def _dashboard(self, request: web.Request) -> web.Response:
        return web.Response(text=_asset("index.html"), content_type="text/html")

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in _STATIC:  # only the shipped files: no path from the request reaches the filesystem
            raise web.HTTPNotFound()
        return web.Response(text=_asset(name), content_type=_STATIC[name])

    async def _favicon(self, request: web.Request) -> web.Response:
        return web.Response(body=FAVICON, content_type="image/x-icon",
                            headers={"Cache-Control": "public, max-age=86400"})

    async def _dashboard_data(self, request: web.Request) -> web.Response:
        """Every task's summary and live window, the recent signals and dead letters; with ?chart=TASK, that
        task's last 15 minutes too (points of [unix seconds, executions/s, error rate, request -> result p99 ms,
        execution p99 ms], every metrics.SERIES_STEP_S, the last one now)."""
        live = self.metrics.live()
        accuracy = self.recent.accuracy()
        tasks = []
        for summary in [self._task_summary(t.name) for t in sorted(self._tables.tasks.values(),
                                                                    key=lambda t: t.name)]:
            task_id = summary["task_id"]
            window = live.get(task_id)
            summary["live"] = None if window is None else asdict(window)
            summary["accuracy"] = {version: {"validated": validated, "matched": matched,
                                             "accuracy": matched / validated if validated else None}
                                   for (task, version), (validated, matched) in sorted(accuracy.items())
                                   if task == task_id}
            tasks.append(summary)
        ready, health = self.health()
        chart = request.query.get("chart")
        return web.json_response({
            "worker_id": self._settings.worker_id, "ready": ready, "reasons": health["reasons"],
            "partitions": health["partitions"], "executed": self._executor.executed, "tasks": tasks,
            "signals": [s.model_dump(mode="json") for s in reversed(self.recent.signals)],
            "dead_letters": [_letter_summary(letter) for letter in reversed(self.recent.dead_letters)],
            "chart": None if chart is None else {"task_id": chart, "step_s": SERIES_STEP_S,
                                                 "points": self.metrics.history(chart)},
            "improvements": [_improvement_summary(r) for r in reversed(self.recent.improvements)],
        })

    async def _openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_document())


def _improvement_summary(record: ImprovementRequest) -> dict[str, Any]:
    """An improvement request or outcome as the dashboard lists it (not the sources and examples it carries)."""
    return record.model_dump(mode="json", include={
        "improvement_id", "task_id", "status", "trigger", "reason", "active_version", "candidate_version",
        "candidate_score", "active_score", "updated_at"})


# Probes and scrapers keep working without the token, and a browser's icon request (it tells nothing); everything
# else (execute, tasks, the dashboard) needs it.
_OPEN_PATHS = frozenset({"/health", "/metrics", "/openapi.json", "/favicon.ico"})
_TOKEN_COOKIE = "loopai_token"


def require_token(token: str) -> Any:
    """Middleware: 401 unless the request carries the token, as `Authorization: Bearer <token>`, or as the
    cookie a browser gets by opening the dashboard once at /?token=<token> (its own calls then carry it)."""

    def carries(given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), token.encode())

    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path in _OPEN_PATHS:
            return await handler(request)
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        if (scheme.lower() == "bearer" and carries(credentials.strip())) or carries(request.cookies.get(_TOKEN_COOKIE)):
            return await handler(request)
        if request.path == "/" and carries(request.query.get("token")):
            response = await handler(request)
            response.set_cookie(_TOKEN_COOKIE, token, httponly=True, samesite="Strict")
            return response
        return web.json_response(
            {"detail": "this worker requires its web_token: send `Authorization: Bearer <token>`, or open the "
                       "dashboard at /?token=<token>"},
            status=401, headers={"WWW-Authenticate": "Bearer"})

    return check


def _record(record: Record, status: int = 200) -> web.Response:
    return web.Response(text=record.model_dump_json(), status=status, content_type="application/json")


def _error(status: int, detail: str) -> web.Response:
    return web.json_response({"detail": detail}, status=status)


def _field_errors(exc: ValidationError) -> web.Response:
    """422 with one entry per problem, located in the body (as FastAPI answers, which clients know)."""
    detail = [{"loc": ["body", *err["loc"]], "msg": err["msg"], "type": err["type"]}
              for err in exc.errors(include_url=False, include_input=False)]
    return web.json_response({"detail": detail}, status=422, dumps=lambda v: json.dumps(v, default=str))


def _letter_summary(letter: DeadLetter) -> dict[str, Any]:
    """A dead letter without its bytes: a page need not carry every failed payload."""
    return {"reason": letter.reason, "error_type": letter.error_type, "source_topic": letter.source_topic,
            "source_partition": letter.source_partition, "source_offset": letter.source_offset,
            "worker_id": letter.worker_id, "dead_lettered_at": letter.dead_lettered_at.isoformat()}


def _asset(name: str) -> str:
    return resources.files("app.web").joinpath("static", name).read_text(encoding="utf-8")


def _icon(size: int = 16) -> bytes:
    """The dashboard's icon, drawn here rather than shipped as a binary: a .ico holding one PNG, a dark square
    with a rising line (browsers ask for /favicon.ico whatever the page says; a 404 would be an error logged
    on every page load)."""
    dark, light, empty = b"\x1d\x24\x30\xff", b"\x7c\xc4\xff\xff", b"\x00\x00\x00\x00"
    rows = []
    for y in range(size):
        row = bytearray(b"\x00")  # PNG filter: none
        for x in range(size):
            inside = 1 <= x < size - 1 and 1 <= y < size - 1
            on_line = inside and abs((size - 1 - y) - (x * 3 // 4 + 2)) <= 1
            row += light if on_line else dark if inside else empty
        rows.append(bytes(row))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 6, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", size, size, 0, 0, 1, 32, len(png), 22) + png


FAVICON = _icon()
