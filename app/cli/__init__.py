"""The `loopai` command: one module per command group, each adding its commands here."""

from __future__ import annotations

from pathlib import Path

import click

from app import __version__
from app.cli import (
    artifacts,
    dev,
    export,
    generator,
    improvements,
    oracle,
    programs,
    schemas,
    send,
    stats,
    tail,
    tasks,
    topics,
    worker,
)

# Every command that talks to Kafka first checks that the broker answers, so a wrong address is one line of
# error within connect_timeout_s rather than a traceback or a long hang.


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


for command in (topics.topics, tasks.task, artifacts.artifact, programs.run_program, worker.worker, send.send,
                tail.tail, oracle.oracle, dev.broker, dev.dev, schemas.schemas, export.export, stats.stats,
                generator.generator, improvements.improvements):
    cli.add_command(command)


def main() -> None:
    """The `loopai` console script."""
    cli(prog_name="loopai")
