"""A worker process: a faust app that reads the task and artifact tables, starts the sandbox pool, executes requests and
validates sampled executions (both batched, aiokafka), and hosts the validation loop's low-rate faust agents (join
oracle verdicts, decide canaries, analytics, anomalies, retention, improvement requests)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import signal
import threading
import time
import traceback
import weakref
from typing import Any

import faust
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from mode import Service

from app.agents.aggregate_daily_stats import AggregateDailyStats
from app.agents.decide_canaries import DecideCanaries
from app.agents.detect_anomalies import DetectAnomalies
from app.agents.emit_retention_events import EmitRetentionEvents
from app.agents.execute_requests import ExecuteRequests
from app.agents.join_oracle_verdicts import JoinOracleVerdicts
from app.agents.request_improvements import RequestImprovements
from app.agents.validate_executions import ValidateExecutions
from app.contract.registry import register_schemas
from app.contract.topics import topics_for
from app.kafka.clients import BrokerWatch
from app.kafka.leader import leader_assignor_for
from app.kafka.recovery import read_changelogs_to_their_true_end
from app.kafka.tables import TableReader
from app.sandbox.boundary import Boundary
from app.sandbox.pool import SandboxPool
from app.settings import Settings
from app.web.metrics import EventLoopLag
from app.web.server import WebServer

# A worker that cannot go on without losing a request (the cluster gone, a dead letter refused) logs one line saying
# why and exits with code 1, committing nothing more.

log = logging.getLogger(__name__)

_FORCED_EXIT_AFTER_S = 60.0  # a stop after a failure that takes longer is not going to finish
_AGENT_MAX_POLL_RECORDS = 500
_M_MMAP_THRESHOLD = -3  # mallopt's parameter (glibc's malloc.h)


class LoopWorker(Service):
    """Starts tables, then the sandbox pool, then the executor and the validator; stops them in reverse."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.topics = topics = topics_for(settings.topic_prefix)
        self.tables = TableReader(settings, topics.task_specs, topics.program_artifacts)
        self.pool = SandboxPool(
            Boundary.from_settings(settings),
            settings.sandbox_processes,
            spares=settings.sandbox_spares,
            chunk_size=settings.sandbox_chunk_size,
        )
        if settings.wire_format == "avro":
            # Before any codec is built: a schema the registry refuses stops the worker here, saying why.
            register_schemas(settings, topics)
        self.budget = settings.timeout_budget()
        self.executor = ExecuteRequests(settings, topics, self.tables, self.pool, self.budget)
        # The pool starts no call of a suspended task, charges each timeout to its task's budget, and starts no
        # call while the outputs held are past their bound; the table brings other workers' suspensions and resumes.
        self.pool.gate, self.pool.on_timeout = self.budget.refusal, self.executor.charge_timeout
        self.pool.room = self.executor.wait_for_output_room
        self.tables.on_suspension = self.budget.apply
        self.validator = ValidateExecutions(settings, topics, self.tables, self.pool)
        self.watch = BrokerWatch(settings)
        self.web = WebServer(settings, topics, self.tables, self.executor, self.pool, self.watch) \
            if settings.web_port else None
        self.loop_lag = EventLoopLag()
        if self.web is not None:
            self.web.metrics.watch(self.loop_lag.metrics)
        self.failure: str | None = None

    def register_agents(self, app: faust.App) -> None:
        """The validation loop's faust agents, on the worker's app: they share its tables and sandbox pool."""
        JoinOracleVerdicts(app, self.settings, self.topics)
        DecideCanaries(app, self.settings, self.topics, self.tables, self.executor.assembler.sampler)
        self.daily_stats = AggregateDailyStats(app, self.settings, self.topics)
        DetectAnomalies(app, self.settings, self.topics, self.tables)
        EmitRetentionEvents(app, self.settings, self.topics)
        RequestImprovements(app, self.settings, self.topics, self.tables)

    async def on_start(self) -> None:
        for handler in logging.getLogger().handlers:  # faust has set up logging by now
            handler.addFilter(RepeatsHeldBack())
        await self.watch.start()
        await self.tables.start()
        self.tables.follow()
        await self.pool.start()
        await self.executor.start()
        await self.validator.start()
        if self.web is not None:
            await self.web.start()
        # Everything alive now (faust, aiokafka, tables) lives as long as the process: keep the collector
        # from scanning it again and again. A young collection runs once more objects are alive than the
        # threshold since the last one; the batches in flight at full load are tens of thousands of objects,
        # all freed by reference counting, so a lower threshold walks them for nothing (docs/performance.md).
        gc.freeze()
        gc.set_threshold(200_000, 20, 100)
        self.add_future(self._stop_on_failure())
        self.add_future(self.loop_lag.run())
        log.info("worker %s serving: sandbox %s", self.settings.worker_id, self.pool.protections)

    async def on_stop(self) -> None:
        if self.web is not None:
            await self.web.stop()
        await self.executor.stop()
        await self.validator.stop()
        await self.pool.stop()
        await self.tables.stop()
        await self.watch.stop()
        log.info("worker %s stopped after %d results; the event loop ran at most %.0f ms late",
                 self.settings.worker_id, self.executor.executed, self.loop_lag.worst_s * 1000)

    async def _stop_on_failure(self) -> None:
        waits = [asyncio.ensure_future(event.wait())
                 for event in (self.executor.pipeline.failed, self.validator.pipeline.failed, self.watch.lost)]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        self.failure = (self.executor.pipeline.failure or self.validator.pipeline.failure
                        or self.watch.lost_reason)
        self.executor.fail(self.failure)
        self.validator.fail(self.failure)
        log.critical("worker %s stopping, nothing more committed: %s", self.settings.worker_id, self.failure)
        if self.watch.lost.is_set():
            # Without a broker there is nothing to commit, leave or flush, and faust's own clients would wait
            # out their timeouts (or hang) on the way down: stop the sandbox processes and exit now.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pool.stop(), timeout=5)
            logging.shutdown()
            os._exit(1)
        # Otherwise the same orderly stop as on a signal (the group hears we left); run_worker exits with 1.
        backstop = threading.Timer(_FORCED_EXIT_AFTER_S, os._exit, (1,))
        backstop.daemon = True
        backstop.start()
        os.kill(os.getpid(), signal.SIGTERM)


class RepeatsHeldBack(logging.Filter):
    """Lets the first warning or error of a kind through, then at most one per window with a count of those
    held back. A lost broker makes aiokafka log the same few lines hundreds of times a second."""

    def __init__(self, window_s: float = 10.0) -> None:
        super().__init__()
        self._window_s = window_s
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}  # (logger, template) -> (last shown, held)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        kind = (record.name, str(record.msg))
        now = time.monotonic()
        shown, held = self._seen.get(kind, (float("-inf"), 0))
        if now - shown < self._window_s:
            self._seen[kind] = (shown, held + 1)
            return False
        self._seen[kind] = (now, 0)
        if held:
            record.msg = f"{record.msg} [and {held} more like it in the last {self._window_s:g} s]"
        return True


_agent_fetch_waits: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
_faust_worker_consumer = AIOKafkaConsumerThread._create_worker_consumer


def _worker_consumer(self: AIOKafkaConsumerThread, transport: Any) -> Any:
    """faust builds its agents' consumer with fetch_max_wait_ms=1500, fixed; this one takes the app's
    `agent_fetch_max_wait_ms` (Apache Kafka answers a fetch once a record arrives, so that only paces idle
    polls; the embedded broker holds every fetch that long)."""
    consumer = _faust_worker_consumer(self, transport)
    wait_ms = _agent_fetch_waits.get(self.app)
    if wait_ms is not None:
        consumer._fetch_max_wait_ms = wait_ms  # read when the consumer starts and builds its fetcher
    return consumer


AIOKafkaConsumerThread._create_worker_consumer = _worker_consumer  # type: ignore[method-assign]


def build_app(settings: Settings) -> faust.App:
    """The faust app of a worker, with group timings and credentials from the settings."""
    credentials: Any = None
    client_args = settings.kafka_client_args()
    if settings.sasl_mechanism:
        credentials = faust.SASLCredentials(
            username=settings.sasl_username,
            password=settings.sasl_password.get_secret_value() if settings.sasl_password else None,
            mechanism=settings.sasl_mechanism,
            ssl_context=client_args.get("ssl_context"),
        )
    elif "ssl_context" in client_args:
        credentials = faust.SSLCredentials(client_args["ssl_context"])
    if settings.data_dir:
        settings.data_dir.mkdir(parents=True, exist_ok=True)  # faust makes the directory, not its parents
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{server}" for server in settings.bootstrap_servers.split(",")],
        broker_credentials=credentials,
        web_enabled=False,
        store="memory://",
        datadir=settings.data_dir or f"{settings.app_id}-data",
        topic_replication_factor=settings.replication_factor,
        table_standby_replicas=0,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.heartbeat_interval_s,
        broker_rebalance_timeout=settings.rebalance_timeout_s,
        broker_commit_interval=settings.commit_interval_s,
        producer_linger=0.01,
        # On a rebalance or a stop, faust would wait for every event handed to an agent to be acked; an event
        # fetched for two agents (stats-partials feeds the analytics and the anomaly agents) can stay unacked
        # once the streams stop, and the worker then hangs there (seen on every stop with partials in flight).
        # Every agent is at-least-once already (the analytics agent skips what it merged by offset): an event cut
        # short is delivered again to the partition's next owner.
        stream_wait_empty=False,
        # A poll's records are handled without a pause of the event loop the executor shares: on Apache Kafka a
        # table's recovery after a rebalance otherwise fetches (and applies) tens of thousands at a time.
        broker_max_poll_records=_AGENT_MAX_POLL_RECORDS,
        # faust would name the election's topic after the app id, outside the prefix and the registry
        LeaderAssignor=leader_assignor_for(topics_for(settings.topic_prefix).leader_election),
    )
    _agent_fetch_waits[app] = settings.agent_fetch_max_wait_ms
    read_changelogs_to_their_true_end(app, settings)
    return app


class Worker(faust.Worker):
    """faust starts the services before the app and stops them after it; a stopping worker must hand its
    request partitions over first (the agents' low-rate streams can wait), so here the app comes first."""

    worker_id = ""  # for the crash line

    def on_init_dependencies(self) -> Any:
        dependencies = list(super().on_init_dependencies())  # also wires the app's "ready" callback
        return [self.app, *(service for service in dependencies if service is not self.app)]

    def _shutdown_loop(self) -> None:
        """After a crash (an error escaped an agent or a timer), faust's last word is "We experienced a crash!
        Reraising original exception...", which does not say what crashed: say it in one line, and exit 1."""
        reason, self.crash_reason = self.crash_reason, None
        super()._shutdown_loop()
        if reason is not None:
            log.critical("worker %s stopped after a crash: %s (its traceback is above, at \"Crashed reason\")",
                         self.worker_id, describe_crash(reason))
            raise SystemExit(1)


def describe_crash(reason: BaseException) -> str:
    """The error and where it was raised: `KeyError(b'3fcc') in _expire (app/agents/x.py:87)`."""
    frames = traceback.extract_tb(reason.__traceback__)
    if not frames:
        return repr(reason)
    where = frames[-1]
    return f"{reason!r} in {where.name} ({where.filename}:{where.lineno})"


def _return_large_blocks() -> None:
    """glibc maps a block of 256 kB or more on its own and unmaps it when freed. By default the threshold rises
    to the largest block freed, after which megabyte outputs come from the heap and stay in the worker's resident
    memory once delivered; fixed, the memory bound on outputs is the worker's too."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 256 << 10)


def run_worker(settings: Settings) -> None:
    """Run a worker until SIGINT/SIGTERM (exit 0), or until it cannot go on (exit 1)."""
    _return_large_blocks()
    app = build_app(settings)
    service = LoopWorker(settings)
    service.register_agents(app)
    worker = Worker(app, service, loglevel=settings.log_level, redirect_stdouts=False, quiet=True)
    worker.worker_id = settings.worker_id
    try:
        worker.execute_from_commandline()
    except SystemExit:
        if service.failure is not None:
            raise SystemExit(1) from None
        raise
