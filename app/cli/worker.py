"""`loopai worker`: a worker on the configured broker (app/worker.py), once the broker answers."""


import click

from app.cli.common import kafka_settings
from app.contract.registry import RegistryError


@click.command()
@click.pass_context
def worker(ctx: click.Context) -> None:
    """Run a worker against the configured broker until interrupted."""
    settings = kafka_settings(ctx)  # before faust, whose own start-up would hang or print tracebacks
    from app.worker import run_worker

    try:
        run_worker(settings)
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from exc
