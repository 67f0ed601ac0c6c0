"""`loopai artifact publish|activate|list|show|generate|canary|promote|abort|check`: program versions and canaries."""

import sys
from pathlib import Path
from typing import Any

import click

from app.cli.common import control_call, control_read, read_text
from app.cli.generator import generate_first, provider_options
from app.contract.records import (
    CanaryDecision,
    ProgramArtifact,
    TaskSpec,
)
from app.control.plane import ControlPlane
from app.domain.programs import ProgramRejected, check_source


@click.group()
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
    source = read_text(file)
    published = control_call(ctx, lambda control: control.publish(
        task_id, source, version=version, activate=activate, synthesis_strategy=strategy,
        confidence=confidence, llm_provider=llm_provider, llm_model=llm_model,
    ))
    state = "active" if activate else "inactive"
    click.echo(f"published {task_id} v{published.version} ({published.program_id}, {state})")


@artifact.command("activate")
@click.argument("task_id")
@click.argument("version", type=int)
@click.pass_context
def artifact_activate(ctx: click.Context, task_id: str, version: int) -> None:
    """Make VERSION the active one (also rolls back)."""
    control_call(ctx, lambda control: control.activate(task_id, version))
    click.echo(f"{task_id}: version {version} is active")


@artifact.command("list")
@click.argument("task_id")
@click.pass_context
def artifact_list(ctx: click.Context, task_id: str) -> None:
    """List the versions of a task (* active, ~ canary), then its canary decisions."""
    async def listing(control: ControlPlane) -> tuple[TaskSpec, list[ProgramArtifact], list[CanaryDecision]]:
        spec = control.task(task_id)
        versions = sorted(control.tables.artifacts.versions_of(task_id).values(), key=lambda a: a.version)
        return spec, versions, await control.decisions(task_id)

    spec, versions, decisions = control_call(ctx, listing)
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


@artifact.command("generate")
@click.argument("task_id")
@provider_options
@click.pass_context
def artifact_generate(ctx: click.Context, task_id: str, **options: Any) -> None:
    """Ask the generator for a first version of TASK_ID; it is checked and scored on the task's examples like any
    candidate, and published active. Exit 1 with the reason when it is not."""
    generate_first(ctx, task_id, options)


@artifact.command("show")
@click.argument("task_id")
@click.argument("version", type=int)
@click.option("--source", "source_only", is_flag=True, help="Print only the program's source.")
@click.pass_context
def artifact_show(ctx: click.Context, task_id: str, version: int, source_only: bool) -> None:
    """Print one version of a task's program as JSON (or only its source)."""
    found = control_read(ctx, lambda control: control.artifact(task_id, version))
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
    _echo_decision(control_call(ctx, lambda control: control.start_canary(task_id, version, percent)))


@artifact.command("promote")
@click.argument("task_id")
@click.pass_context
def artifact_promote(ctx: click.Context, task_id: str) -> None:
    """Make the running canary the active version now, whatever its accuracy."""
    _echo_decision(control_call(ctx, lambda control: control.promote_canary(task_id)))


@artifact.command("abort")
@click.argument("task_id")
@click.pass_context
def artifact_abort(ctx: click.Context, task_id: str) -> None:
    """End the running canary; every request runs the active version again."""
    _echo_decision(control_call(ctx, lambda control: control.abort_canary(task_id)))


def _echo_decision(decision: CanaryDecision) -> None:
    click.echo(f"{decision.task_id}: canary v{decision.candidate_version} {decision.action.value}: {decision.reason}")


@artifact.command("check")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
def artifact_check(file: Path) -> None:
    """Check FILE against the program contract, offline; exit 1 listing every problem with its line."""
    try:
        check_source(read_text(file))
    except ProgramRejected as exc:
        for problem in str(exc).split("; "):
            click.echo(f"{file}: {problem}", err=True)
        sys.exit(1)
    click.echo(f"{file}: ok")
