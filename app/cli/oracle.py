"""`loopai oracle serve`: the reference oracle service, answering oracle requests from a labels file."""

from pathlib import Path

import click

from app.cli.common import kafka_settings, run, stop_on_ctrl_c


@click.group()
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
    settings = kafka_settings(ctx)

    async def go() -> int:
        stop = stop_on_ctrl_c()

        def ready() -> None:
            click.echo(f"oracle {oracle_id} serving {len(table)} label(s) from {labels}; Ctrl-C stops it")

        return await serve_oracle(settings, table, oracle_id, stop, on_ready=ready)

    answered = run(go())
    click.echo(f"oracle {oracle_id} stopped: answered {answered} verdict(s)")
