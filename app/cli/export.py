"""`loopai export FILE`: execution results to a JSONL file through a Kafka Connect file sink."""

import signal
import subprocess
import tempfile
from pathlib import Path

import click

from app.cli.common import interrupted_by, kafka_settings, run
from app.contract.topics import topics_for


@click.command("export")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.pass_context
def export(ctx: click.Context, file: Path) -> None:
    """Write every execution result to FILE as JSON lines, through Kafka Connect, then new ones until Ctrl-C.

    A new (or empty) FILE gets every result kept on the topic, from its start. An export to a FILE that
    already has lines resumes: its own consumer group (one per file) remembers what FILE was given, and only
    the results produced since are appended; to start over, remove FILE. Runs an Apache Kafka Connect
    standalone worker with connect/file-sink.properties (needs Java 17; its jars are fetched once into
    ~/.cache/loopai/connect)."""
    settings = kafka_settings(ctx)
    from devtools.connect import ConnectUnavailable, file_export, prepare_export

    topic = topics_for(settings.topic_prefix).execution_results.name
    code = None
    with tempfile.TemporaryDirectory(prefix="loopai-connect-") as work, interrupted_by(signal.SIGTERM, signal.SIGHUP):
        try:
            connect = file_export(settings, file, Path(work))
        except ConnectUnavailable as exc:
            raise click.ClickException(str(exc)) from exc
        try:
            start = run(prepare_export(settings, file))
        except TimeoutError as exc:
            raise click.ClickException(str(exc)) from exc
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
