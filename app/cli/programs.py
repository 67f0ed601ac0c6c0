"""`loopai run FILE --input JSON`: one program run offline in the sandbox workers use; prints the outcome."""

import asyncio
import json
import sys
from pathlib import Path

import click

from app.cli.common import (
    read_text,
    settings_of,
)
from app.sandbox.boundary import Boundary, SandboxUnavailable
from app.sandbox.pool import run_once


@click.command("run")
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
    settings = settings_of(ctx)
    if memory_mb is not None:
        settings = settings.model_copy(update={"sandbox_memory_mb": memory_mb})
    timeout_s = (timeout_ms or settings.default_timeout_ms) / 1000
    try:
        outcome = asyncio.run(run_once(Boundary.from_settings(settings), read_text(file), value, timeout_s))
    except SandboxUnavailable as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps({"status": outcome.status, "output": outcome.output, "error_message": outcome.error,
                           "duration_ms": round(outcome.latency_ms, 3), "memory_mb": outcome.memory_mb}))
    sys.exit(0 if outcome.status == "ok" else 1)
