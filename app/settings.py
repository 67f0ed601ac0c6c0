"""Settings: one object built from LOOPAI_* environment variables and an optional YAML file.

The YAML file may use ${VAR} and ${VAR:-default}; environment variables override the file.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import fields
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from app.domain.anomaly import AnomalyThresholds
from app.domain.anomaly_targets import TargetLimits
from app.domain.daily_windows import DailyWindows
from app.domain.task_budget import TimeoutBudget

log = logging.getLogger(__name__)

# LOOPAI_* variables that are not settings: the Kafka Connect files read them (connect/*.properties).
_CONNECT_VARIABLES = ("LOOPAI_EXPORT_", "LOOPAI_CONNECT_REST_PORT", "LOOPAI_CONNECT_OFFSETS_FILE",
                      "LOOPAI_SCHEMA_REGISTRY_URL")

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(ValueError):
    """Configuration that cannot be used; the message names the field."""


def substitute_env(text: str, environ: dict[str, str]) -> str:
    """Replace ${VAR} and ${VAR:-default} in text; an unset variable without default is an error."""

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        raise ConfigError(f"config file refers to ${{{name}}}, which is not set")

    return _VAR.sub(replace, text)


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    """Everything a loopai process can be configured with."""

    model_config = SettingsConfigDict(env_prefix="LOOPAI_", extra="forbid", frozen=True)

    # Kafka connection; the security fields pass straight through to the clients.
    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    connect_timeout_s: float = Field(5.0, gt=0, description="how long a command waits for the broker to answer")

    topic_prefix: str = Field("loopai.", pattern=r"^[A-Za-z0-9._-]*$")
    wire_format: Literal["json", "avro"] = "json"
    replication_factor: int = Field(1, ge=1)

    worker_id: str = Field(default_factory=_default_worker_id, min_length=1)
    app_id: str = Field("loopai", min_length=1, description="faust app id; also names the executor group")
    # faust's local files (its tables are in memory; it still keeps a directory): default ./<app_id>-data
    data_dir: Path | None = None

    # Executor
    # Requests fetched at once; up to 4x this while fetches come full and spread over many tasks (Pipeline.spread).
    executor_batch_size: int = Field(1000, ge=1, le=100_000)
    # Requests in flight (fetched, not yet answered) are at most batch size x this, fetching pauses past it; and
    # at most this many deliveries of results are on their way at once (the next gathers what comes meanwhile).
    executor_max_inflight_batches: int = Field(4, ge=1, le=64)
    # Bytes of program outputs a worker holds until their results are acknowledged; fetching pauses past it, so
    # a task of megabyte outputs costs its own throughput, not the worker's memory.
    executor_max_output_bytes: int = Field(64 << 20, ge=1 << 20)
    # How long a fetch may wait for requests. Apache Kafka answers a fetch as soon as a record arrives, so this
    # only paces an idle poll; the embedded broker waits it out every time (EMBEDDED_TIMINGS sets it low), and
    # the wait doubles while fetches come back empty with records waiting (a long partition on that broker).
    executor_fetch_max_wait_ms: int = Field(20, ge=0, le=1000)
    # The same for the agents' consumers, the faust agents' and the validator's (faust fixes it at 1500 ms; so
    # does the default here). On the embedded broker each hop of the validation loop and the analytics waited
    # that long (EMBEDDED_TIMINGS: 100).
    agent_fetch_max_wait_ms: int = Field(1500, ge=0, le=10_000)
    # How often answered requests are committed, after their daily-stats partials are sent (one per
    # task/version/day over all of them): a crash redoes at most this much work besides the requests in flight.
    # While requests are in flight a commit may wait up to 10 intervals for its partials to summarise enough
    # results each (app/agents/execute_requests.py).
    executor_commit_interval_ms: int = Field(100, ge=0, le=10_000)
    default_timeout_ms: int = Field(1000, ge=1, le=60_000)
    # A task whose calls keep timing out is suspended: task_suspend_timeouts of them within task_suspend_window_s
    # (0: never) and its requests are rejected at once for task_suspend_cooldown_s, or until `loopai task resume`.
    # Each timeout holds a sandbox process for up to the task's max_timeout_ms while other tasks' calls wait:
    # 10 in a minute is no passing glitch, and 5 minutes is long enough for an owner to notice (a signal names the
    # task) yet short enough that a transient cause costs little.
    task_suspend_timeouts: int = Field(10, ge=0, le=100_000, description="0: never suspend")
    task_suspend_window_s: float = Field(60.0, gt=0)
    task_suspend_cooldown_s: float = Field(300.0, gt=0)

    # Sandbox
    sandbox_isolation: Literal["strict", "weak"] = Field(
        "strict", description="weak: no namespaces (development on hosts without user namespaces only)"
    )
    # One program version per process: keep it at least the number of task versions a worker serves at once, or
    # they take turns (each turn a stopped process and a fresh one). Idle processes cost memory, not CPU.
    sandbox_processes: int = Field(16, ge=1, le=4096)
    sandbox_spares: int = Field(1, ge=0, le=64, description="processes started ahead for tasks that need one")
    sandbox_memory_mb: int = Field(512, ge=64)
    sandbox_cpu_seconds: int = Field(3600, ge=1, description="CPU budget of one sandbox process's life")
    sandbox_max_output_bytes: int = Field(1_000_000, ge=1024)
    sandbox_chunk_size: int = Field(500, ge=1)

    # Group membership (docs/delivery.md). A SIGKILLed worker's partitions move after session_timeout_s;
    # Apache Kafka refuses less than group.min.session.timeout.ms (6 s by default). The heartbeat is how
    # soon a member hears of a rebalance, so it bounds a graceful handover.
    session_timeout_s: float = Field(6.0, gt=0)
    heartbeat_interval_s: float = Field(1.0, gt=0)
    rebalance_timeout_s: float = Field(30.0, gt=0)
    commit_interval_s: float = Field(2.0, gt=0)

    # Validation loop
    canary_min_validations: int = Field(50, ge=1, description="validations of a canary before any decision")
    canary_margin: float = Field(0.05, ge=0, le=1, description="how far below the bar a canary is rolled back")

    # Delivery: how long a batch's records may keep failing with retriable errors before they count as
    # undeliverable (Kafka's delivery.timeout.ms), and how long a worker runs without an answer from any broker.
    delivery_timeout_s: float = Field(120.0, gt=0)
    broker_lost_timeout_s: float = Field(30.0, gt=0)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # Retention (emit_retention_events): analytics days kept, unused program versions kept per task, how often
    # a run looks. At least one unused version is kept: the newest version number must survive, or the control
    # plane would hand it out again to a different program.
    retention_days: int = Field(90, ge=1, description="analytics days kept before they are tombstoned")
    keep_versions: int = Field(3, ge=1, description="unused program versions kept per task, newest first")
    retention_interval_s: float = Field(3600.0, gt=0, description="how often the retention job runs")

    # Schema registry (wire_format "avro": Confluent-framed Avro, docs/wire-formats.md). mock://NAME is
    # confluent-kafka's in-process registry, for tests.
    registry_url: str | None = None
    registry_username: str | None = None
    registry_password: SecretStr | None = None

    # Daily analytics (app/agents/aggregate_daily_stats.py): the days' time zone (IANA name), how long after a
    # day's end its late results still count, and how often open windows are checked for closing.
    analytics_time_zone: str = Field("UTC", min_length=1)
    analytics_grace_s: float = Field(3600.0, ge=0)
    analytics_close_interval_s: float = Field(5.0, gt=0)

    @field_validator("analytics_time_zone")
    @classmethod
    def _known_time_zone(cls, zone: str) -> str:
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {zone!r} (an IANA name such as Europe/Paris)") from None
        return zone

    @model_validator(mode="after")
    def _heartbeat_within_session(self) -> Settings:
        if self.heartbeat_interval_s * 3 > self.session_timeout_s:
            raise ValueError(
                f"heartbeat_interval_s ({self.heartbeat_interval_s:g}) must be at most a third of "
                f"session_timeout_s ({self.session_timeout_s:g}), or a slow heartbeat ends the session"
            )
        return self

    @model_validator(mode="after")
    def _avro_needs_a_registry(self) -> Settings:
        if self.wire_format == "avro" and not self.registry_url:
            raise ValueError("wire_format avro (Confluent-framed) needs registry_url, the schema registry's URL")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Explicit arguments win, then the environment; load() passes file values as defaults below both.
        return init_settings, env_settings

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> Settings:
        """Build the settings from a YAML file (optional), the environment and overrides.

        Raises ConfigError naming the offending field.
        """
        file_values: dict[str, Any] = {}
        if config_file is not None:
            try:
                text = Path(config_file).read_text()
            except OSError as exc:
                raise ConfigError(f"cannot read config file {config_file}: {exc.strerror}") from exc
            try:
                loaded = yaml.safe_load(substitute_env(text, dict(os.environ)))
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file {config_file} is not valid YAML: {exc}") from exc
            if loaded is None:
                loaded = {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"config file {config_file} must hold a mapping of setting: value")
            file_values = loaded
            for key in file_values:
                if key not in cls.model_fields:
                    raise ConfigError(f"invalid setting {key!r} in config file {config_file}: not a setting"
                                      + _closest(str(key), list(cls.model_fields)))
        for message in cls.unknown_environment(os.environ):
            log.warning(message)
        env_set = {name for name in cls.model_fields if f"LOOPAI_{name.upper()}" in os.environ}
        values = {k: v for k, v in file_values.items() if k not in env_set}
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, "setting")) from exc

    @classmethod
    def unknown_environment(cls, environ: Mapping[str, str]) -> list[str]:
        """One message per LOOPAI_* variable that names no setting (it is ignored), with the closest name."""
        fields = list(cls.model_fields)
        return [f"unknown environment variable {variable} ignored: not a setting"
                + _closest(variable.removeprefix("LOOPAI_").lower(), fields,
                           lambda close: f"LOOPAI_{close.upper()} ({close})")
                for variable in sorted(environ)
                if variable.startswith("LOOPAI_") and variable.removeprefix("LOOPAI_").lower() not in fields
                and not variable.startswith(_CONNECT_VARIABLES)]

    def to_env(self) -> dict[str, str]:
        """These settings as LOOPAI_* variables, to hand to a child process."""
        env = {}
        for name, value in self.model_dump(exclude_none=True).items():
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[f"LOOPAI_{name.upper()}"] = str(value)
        return env

    def kafka_client_args(self) -> dict[str, Any]:
        """Connection arguments shared by every aiokafka client."""
        args: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            args["sasl_mechanism"] = self.sasl_mechanism
            args["sasl_plain_username"] = self.sasl_username
            args["sasl_plain_password"] = self.sasl_password.get_secret_value() if self.sasl_password else None
        if self.security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            args["ssl_context"] = create_ssl_context(
                cafile=str(self.ssl_cafile) if self.ssl_cafile else None,
                certfile=str(self.ssl_certfile) if self.ssl_certfile else None,
                keyfile=str(self.ssl_keyfile) if self.ssl_keyfile else None,
            )
        return args

    def timeout_budget(self) -> TimeoutBudget:
        """The task_suspend_* settings as a worker's timeout budget."""
        return TimeoutBudget(self.task_suspend_timeouts, self.task_suspend_window_s, self.task_suspend_cooldown_s,
                             self.worker_id)

    def daily_windows(self) -> DailyWindows:
        """The analytics' days: in analytics_time_zone, open analytics_grace_s past their end."""
        return DailyWindows(self.analytics_time_zone, timedelta(seconds=self.analytics_grace_s))

    def group_args(self) -> dict[str, Any]:
        """Consumer-group timing arguments for aiokafka consumers."""
        return {
            "session_timeout_ms": int(self.session_timeout_s * 1000),
            "heartbeat_interval_ms": int(self.heartbeat_interval_s * 1000),
            "rebalance_timeout_ms": int(self.rebalance_timeout_s * 1000),
        }

    # Anomaly signals: the fields of app/domain/anomaly.py AnomalyThresholds, prefixed anomaly_, and
    # when a task's minute is judged: `lateness_s` after its end on the task's event-time clock, which follows
    # the wall clock once the task's partials have stopped for `idle_s` (app/domain/anomaly_watch.py).
    anomaly_baseline_minutes: int = Field(60, ge=2)
    anomaly_min_executions: int = Field(20, ge=1, description="a minute with fewer results that ran is skipped")
    anomaly_zscore_raise: float = Field(6.0, gt=0)
    anomaly_zscore_rearm: float = Field(2.0, gt=0)
    anomaly_ewma_lambda: float = Field(0.1, gt=0, le=1)
    anomaly_ewma_raise: float = Field(4.5, gt=0)
    anomaly_ewma_rearm: float = Field(1.0, gt=0)
    anomaly_rearm_minutes: int = Field(15, ge=0, description="quiet minutes that end an incident")
    anomaly_reference_alpha: float = Field(0.002, gt=0, lt=1)
    anomaly_error_rate_floor: float = Field(0.02, gt=0, le=1)
    anomaly_latency_floor: float = Field(0.05, gt=0)
    anomaly_lateness_s: float = Field(5.0, ge=0)
    anomaly_idle_s: float = Field(10.0, ge=0)
    anomaly_tick_s: float = Field(1.0, gt=0, description="how often idle tasks' minutes are checked")
    # A task's targets (max_error_rate, latency_target_ms, accuracy_target) are judged from its first minute, with
    # no baseline: over the last `window_minutes`, once `min_executions` results (or validations) say at
    # `confidence` that the target is breached (app/domain/anomaly_targets.py). anomaly_rearm_minutes ends an incident.
    anomaly_target_min_executions: int = Field(20, ge=1)
    anomaly_target_confidence: float = Field(0.999, gt=0.5, lt=1)
    anomaly_target_window_minutes: int = Field(5, ge=1)

    @model_validator(mode="after")
    def _anomaly_thresholds_make_sense(self) -> Settings:
        try:
            self.anomaly_thresholds()  # its own checks, e.g. a re-arm threshold above its raise threshold
        except ValueError as exc:
            raise ValueError(f"anomaly_* settings: {exc}") from exc
        return self

    def anomaly_thresholds(self) -> AnomalyThresholds:
        """The anomaly_* settings as the detector takes them."""
        return AnomalyThresholds(**{f.name: getattr(self, f"anomaly_{f.name}") for f in fields(AnomalyThresholds)})

    def target_limits(self) -> TargetLimits:
        """The anomaly_target_* settings as the target detector takes them."""
        return TargetLimits(min_executions=self.anomaly_target_min_executions,
                            confidence=self.anomaly_target_confidence,
                            window_minutes=self.anomaly_target_window_minutes,
                            rearm_minutes=self.anomaly_rearm_minutes)

    # Closing the loop (docs/improvement.md). The watcher (app/agents/request_improvements.py): a task falls short
    # when over its active version's last improvement_window validations (at least improvement_min_validations) an
    # exact one-sided binomial test rejects "accuracy >= accuracy_target" at improvement_alpha; a request carries up
    # to improvement_failing_examples of its failures, chosen to be diverse.
    improvement_min_validations: int = Field(50, ge=1)
    improvement_window: int = Field(200, ge=1, le=100_000)
    improvement_alpha: float = Field(0.01, gt=0, lt=1)
    improvement_failing_examples: int = Field(8, ge=0, le=100)
    # The generator (`loopai generator serve`): an OpenAI-compatible chat-completions endpoint (generator_base_url,
    # generator_model, generator_api_key), or generator_command, a program reading the request as JSON on stdin and
    # printing a program. generator_send_inputs false: requests' inputs stay in the cluster, only the task's own
    # examples are sent. A task gets at most one candidate per generator_min_interval_s; a request is tried
    # generator_attempts times (endpoint down, malformed answer) before it is recorded as failed.
    generator_base_url: str | None = None
    generator_model: str | None = None
    generator_api_key: SecretStr | None = None
    generator_command: str | None = None
    generator_timeout_s: float = Field(120.0, gt=0, description="one call to the generator")
    generator_attempts: int = Field(3, ge=1, le=20, description="calls per request before it fails")
    generator_retry_backoff_s: float = Field(2.0, ge=0, description="first wait between calls; doubles each time")
    generator_min_interval_s: float = Field(3600.0, ge=0, description="between two candidates of one task")
    generator_canary_percent: float = Field(10.0, gt=0, le=100, description="share a published candidate starts on")
    generator_send_inputs: bool = Field(True, description="false: only the task's examples leave the cluster")
    generator_temperature: float = Field(0.2, ge=0, le=2)

    @model_validator(mode="after")
    def _improvement_window_holds_the_minimum(self) -> Settings:
        if self.improvement_min_validations > self.improvement_window:
            raise ValueError(f"improvement_min_validations ({self.improvement_min_validations}) must be at most "
                             f"improvement_window ({self.improvement_window})")
        return self

    # HTTP on the worker (app/web/): health, metrics, execute, tasks, the dashboard. Loopback by default, because
    # POST /execute needs no token unless web_token is set: a container sets web_host 0.0.0.0 and keeps the
    # port on its own network. 8080 is on by default so every worker can be probed; web_port 0 turns it off.
    web_host: str = Field("127.0.0.1", min_length=1)
    web_port: int = Field(8080, ge=0, le=65535, description="0: no HTTP server")
    web_execute_timeout_s: float = Field(10.0, gt=0, description="how long POST /execute waits for the result")
    web_recent_items: int = Field(50, ge=1, le=10_000, description="anomaly signals and dead letters kept to show")
    # When set, POST /execute, /tasks and the dashboard answer 401 without it (app/web/server.py,
    # docs/production.md); /health and /metrics stay open for probes and Prometheus.
    # An empty value is no token: docker-compose.yml passes LOOPAI_WEB_TOKEN through, empty when not set.
    web_token: SecretStr | None = None

    @field_validator("web_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, token: Any) -> Any:
        return None if token == "" else token


def _closest(name: str, candidates: list[str], shown: Callable[[str], str] = str) -> str:
    """"; did you mean X?" for the candidate most like name (difflib), or a pointer to the list."""
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {shown(close[0])}?"
    return " (the settings: README, Configuration; app/settings.py)"


def describe_validation_error(exc: ValidationError, what: str) -> str:
    """One line per problem, each naming the field: "invalid setting 'x': reason"."""
    lines = []
    for err in exc.errors():
        field = ".".join(str(part) for part in err["loc"]) or "(root)"
        lines.append(f"invalid {what} '{field}': {err['msg']}")
    return "; ".join(lines)
