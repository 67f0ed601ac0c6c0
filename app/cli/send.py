"""`loopai send`: execution requests from the command line or a JSONL file, optionally waiting for results."""

import json
import sys
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from app.cli.common import kafka_settings, read_text, run
from app.contract.records import (
    ExecutionRequest,
)
from app.control.plane import ControlPlane
from app.kafka.loop_client import RequestSender, request_from, send_and_wait, send_requests
from app.settings import Settings, describe_validation_error


@click.command()
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
        for number, line in enumerate(read_text(jsonl).splitlines(), 1):
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
    settings = kafka_settings(ctx)

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

    sent = run(go())
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


# Progress of `send`: below this many requests a send takes about a second, not worth a bar.
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
