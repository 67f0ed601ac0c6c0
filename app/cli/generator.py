"""`loopai generator serve`, `loopai artifact generate NAME` (and `task create NAME --generate`): candidate
programs from an OpenAI-compatible endpoint or a command (docs/improvement.md)."""

from collections.abc import Callable
from typing import Any

import click

from app.cli.common import kafka_settings, run, stop_on_ctrl_c
from app.contract.records import ImprovementStatus
from app.generator.providers import Provider, provider_from
from app.settings import Settings


def provider_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--command, --base-url, --model: which generator (the API key only from LOOPAI_GENERATOR_API_KEY, never an
    argument that `ps` shows)."""
    options = [
        click.option("--command", "generator_command",
                     help="A program that reads the request as JSON on stdin and prints a program "
                          "(generator_command)."),
        click.option("--base-url", "generator_base_url",
                     help="An OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (generator_base_url); the "
                          "key: LOOPAI_GENERATOR_API_KEY."),
        click.option("--model", "generator_model", help="The endpoint's model (generator_model)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def generator_settings(ctx: click.Context, options: dict[str, Any]) -> tuple[Settings, Provider]:
    """The settings with the provider options given, and the provider they name."""
    settings = kafka_settings(ctx)
    given = {name: value for name, value in options.items() if value is not None}
    settings = settings.model_copy(update=given)
    try:
        return settings, provider_from(settings)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc


def generate_first(ctx: click.Context, task_id: str, options: dict[str, Any]) -> None:
    """Ask the generator for a task's first version; publish it (active) if it passes the checks."""
    from app.generator.service import generate_first_version

    settings, provider = generator_settings(ctx, options)
    outcome = run(generate_first_version(settings, provider, task_id))
    click.echo(f"{task_id}: {outcome.status.value}: {outcome.reason}")
    if outcome.status is not ImprovementStatus.PUBLISHED:
        raise SystemExit(1)


@click.group()
def generator() -> None:
    """The generator: better programs for tasks that fall short."""


@generator.command("serve")
@provider_options
@click.pass_context
def generator_serve(ctx: click.Context, **options: Any) -> None:
    """Answer improvement requests until Ctrl-C: each candidate is checked, scored offline in the sandbox, and
    published as a canary only if it does better than the active version."""
    from app.generator.service import GeneratorService

    settings, provider = generator_settings(ctx, options)

    async def go() -> int:
        stop = stop_on_ctrl_c()

        def ready() -> None:
            click.echo(f"generator serving ({provider.name}, {provider.model}); Ctrl-C stops it")

        async with GeneratorService(settings, provider) as service:
            await service.run(stop, on_ready=ready)
            return len(service.answered)

    answered = run(go())
    click.echo(f"generator stopped: answered {answered} request(s)")
