"""`loopai task create|update|show|delete|list|resume`: task specs through the control plane."""

from collections.abc import Callable
from datetime import UTC
from pathlib import Path
from typing import Any

import click

from app.cli.common import control_call, control_read, json_file
from app.cli.generator import generate_first, generator_settings, provider_options
from app.contract.records import (
    Comparison,
    OracleKind,
    SamplingStrategy,
    TaskSpec,
    TaskSuspension,
    utc_now,
)
from app.domain.task_budget import cause_of


@click.group()
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
        click.option("--max-error-rate", type=click.FloatRange(0, 1),
                     help="Share of the results that ran allowed to fail, 0-1 (default 0.05): above it, surely, an "
                          "anomaly signal from the first minute of traffic."),
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
        click.option("--auto-improve", type=click.Choice(["on", "off"]),
                     help="Ask the generator for a better version when the program falls short (default on)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _task_changes(options: dict[str, Any]) -> dict[str, Any]:
    """The task fields the options give: schema and example files read, oracle options in one `oracle` dict."""
    given = {name: value for name, value in options.items() if value is not None}
    if "auto_improve" in given:
        given["auto_improve"] = given["auto_improve"] == "on"
    for name in ("input_schema", "output_schema", "examples"):
        if name in given:
            given[name] = json_file(given[name])
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
@click.option("--generate", is_flag=True,
              help="Then ask the generator for a first version from the description, schemas and examples; it is "
                   "checked and scored on the examples like any candidate, and published active.")
@provider_options
@click.pass_context
def task_create(ctx: click.Context, name: str, generate: bool, generator_command: str | None,
                generator_base_url: str | None, generator_model: str | None, **options: Any) -> None:
    """Create a task; refuses one that exists (`task update` changes it)."""
    generating = {"generator_command": generator_command, "generator_base_url": generator_base_url,
                  "generator_model": generator_model}
    if generate:
        generator_settings(ctx, generating)  # a missing generator is said before the task is made
    changes = _task_changes(options)
    if changes.get("oracle") and "kind" not in changes["oracle"]:
        raise click.UsageError("--comparison, --tolerance, --shadow-version and --oracle-timeout-s describe an "
                               "oracle: give its kind with --oracle label|shadow|external")
    saved = control_call(ctx, lambda control: control.create_task(TaskSpec(name=name, updated_at=utc_now(),
                                                                            **changes)))
    click.echo(f"task {saved.name} created")
    if generate:
        generate_first(ctx, saved.name, generating)


@task.command("update")
@click.argument("name")
@_task_options
@click.pass_context
def task_update(ctx: click.Context, name: str, **options: Any) -> None:
    """Change the options given of an existing task; the others keep their values."""
    changes = _task_changes(options)
    if not changes:
        raise click.UsageError("nothing to change: give at least one option (see --help)")
    control_call(ctx, lambda control: control.update_task(name, **changes))
    click.echo(f"task {name} updated: {', '.join(sorted(changes))}")


@task.command("show")
@click.argument("name")
@click.pass_context
def task_show(ctx: click.Context, name: str) -> None:
    """Print a task as JSON."""
    click.echo(control_read(ctx, lambda control: control.task(name)).model_dump_json(indent=2))


@task.command("delete")
@click.argument("name")
@click.confirmation_option(prompt="Delete the task and every version of its program?")
@click.pass_context
def task_delete(ctx: click.Context, name: str) -> None:
    """Delete a task and its program versions (tombstones); its requests are rejected from then on."""
    versions = control_call(ctx, lambda control: control.delete_task(name))
    click.echo(f"deleted task {name} and {len(versions)} version(s){': ' if versions else ''}"
               + ", ".join(f"v{v}" for v in versions))


@task.command("list")
@click.pass_context
def task_list(ctx: click.Context) -> None:
    """List tasks and their active versions, and which are suspended."""
    listed = control_read(ctx, lambda control: [(spec, control.suspension(spec.name)) for spec in
                                                sorted(control.tables.tasks.values(), key=lambda t: t.name)])
    for spec, suspension in listed:
        click.echo(f"{spec.name}\tactive={spec.active_version or '-'}\tsampling={spec.sampling_rate}"
                   + ("" if suspension is None else f"\t{_suspended_until(suspension)} ({cause_of(suspension)})"))


@task.command("resume")
@click.argument("name")
@click.pass_context
def task_resume(ctx: click.Context, name: str) -> None:
    """Lift a task's suspension (its calls kept timing out): every worker runs its requests again and forgets its
    timeouts so far."""
    lifted = control_call(ctx, lambda control: control.resume(name))
    if lifted is None:
        click.echo(f"task {name} was not suspended; its timeouts so far are forgotten all the same")
    else:
        click.echo(f"task {name} resumed: it was {_suspended_until(lifted)} ({cause_of(lifted)}, "
                   f"by {lifted.worker_id or 'an operator'})")


def _suspended_until(suspension: TaskSuspension) -> str:
    until = suspension.until
    return "suspended" if until is None else f"suspended until {until.astimezone(UTC):%H:%M:%S} UTC"
