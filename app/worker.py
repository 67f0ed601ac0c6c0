"""A worker process: a faust app hosting the loop's services. It reads the task and artifact tables, starts
the sandbox pool, then executes requests; later agents (sampling, analytics) join the same app."""

from __future__ import annotations

import gc
import logging
from typing import Any

import faust
from mode import Service

from app.agents.execute_requests import ExecuteRequests
from app.sandbox.boundary import Boundary
from app.sandbox.pool import SandboxPool
from app.settings import Settings
from app.tables import TableReader
from app.topics import topics_for

log = logging.getLogger(__name__)


class LoopWorker(Service):
    """Starts tables, then the sandbox pool, then the executor; stops them in reverse."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        topics = topics_for(settings.topic_prefix)
        self.tables = TableReader(settings, topics.task_specs, topics.program_artifacts)
        self.pool = SandboxPool(
            Boundary.from_settings(settings),
            settings.sandbox_processes,
            spares=settings.sandbox_spares,
            chunk_size=settings.sandbox_chunk_size,
        )
        self.executor = ExecuteRequests(settings, topics, self.tables, self.pool)

    async def on_start(self) -> None:
        await self.tables.start()
        self.tables.follow()
        await self.pool.start()
        await self.executor.start()
        # Everything alive now (faust, aiokafka, tables) lives as long as the process: keep the collector
        # from scanning it again and again, and let it run less often. Each batch allocates tens of
        # thousands of short-lived objects; with the defaults collection took about a third of the time.
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        log.info("worker %s serving: sandbox %s", self.settings.worker_id, self.pool.protections)

    async def on_stop(self) -> None:
        await self.executor.stop()
        await self.pool.stop()
        await self.tables.stop()
        log.info("worker %s stopped after %d results", self.settings.worker_id, self.executor.executed)


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
    return faust.App(
        settings.app_id,
        broker=[f"kafka://{server}" for server in settings.bootstrap_servers.split(",")],
        broker_credentials=credentials,
        web_enabled=False,
        store="memory://",
        topic_replication_factor=settings.replication_factor,
        table_standby_replicas=0,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.heartbeat_interval_s,
        broker_rebalance_timeout=settings.rebalance_timeout_s,
        broker_commit_interval=settings.commit_interval_s,
        producer_linger=0.01,
    )


def run_worker(settings: Settings) -> None:
    """Run a worker until SIGINT/SIGTERM."""
    app = build_app(settings)
    worker = faust.Worker(
        app, LoopWorker(settings), loglevel=settings.log_level, redirect_stdouts=False, quiet=True
    )
    worker.execute_from_commandline()
