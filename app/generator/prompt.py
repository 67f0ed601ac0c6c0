"""The prompt sent to a generator for an improvement request, from the one versioned file beside this module
(prompt.md), and the JSON a `--command` generator reads on stdin. What leaves the cluster is decided here:
without `send_inputs`, no input of a request (the failing examples) is sent, only the task's own examples."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from string import Template
from typing import Any

import orjson

from app.contract.records import ImprovementRequest, ImprovementTrigger
from app.domain.programs import ALLOWED_MODULES

_FILE = Path(__file__).with_name("prompt.md")
_VERSION = re.compile(r"prompt, version (\d+)")
_SPLIT = "=== user ==="
_EXAMPLES_SHOWN = 30


@cache
def _template() -> tuple[int, Template, Template]:
    text = _FILE.read_text()
    found = _VERSION.search(text)
    if found is None:
        raise ValueError(f"{_FILE} does not say its version ('prompt, version N')")
    body = text.split("-->", 1)[1].lstrip("\n")
    system, user = body.split(_SPLIT + "\n", 1)
    return int(found.group(1)), Template(system.strip()), Template(user.strip())


def prompt_version() -> int:
    """The version the prompt file states."""
    return _template()[0]


def _json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS, default=str).decode()


def _situation(request: ImprovementRequest, send_inputs: bool) -> str:
    if request.trigger is ImprovementTrigger.FIRST_VERSION or not request.active_source:
        return "Write the first version of this task's program."
    lines = [f"The current version (v{request.active_version}) falls short: {request.reason}.", "",
             "Current version:", "```python", request.active_source.rstrip(), "```"]
    if send_inputs and request.failing_examples:
        lines += ["", "Executions it got wrong (input -> expected; what it returned or the error):"]
        for failure in request.failing_examples:
            got = f"error: {failure.error}" if failure.error else f"got {_json(failure.got)}"
            lines.append(f"- {_json(failure.input)} -> {_json(failure.expected)}; {got}")
    lines += ["", "Write a better version: keep what it gets right, fix what it gets wrong."]
    return "\n".join(lines)


def messages_for(request: ImprovementRequest, send_inputs: bool = True) -> list[dict[str, str]]:
    """The chat messages (system, user) for a request."""
    _, system, user = _template()
    examples = "\n".join(f"- {_json(e.input)} -> {_json(e.expected_output)}"
                         for e in request.examples[:_EXAMPLES_SHOWN]) or "(none)"
    return [
        {"role": "system", "content": system.substitute(allowed_modules=", ".join(sorted(ALLOWED_MODULES)))},
        {"role": "user", "content": user.substitute(
            task_id=request.task_id, description=request.description or "(none)",
            input_schema=_json(request.input_schema), output_schema=_json(request.output_schema),
            examples=examples, situation=_situation(request, send_inputs))},
    ]


def sent_request(request: ImprovementRequest, send_inputs: bool = True) -> dict[str, Any]:
    """The request as it may leave the cluster: without its failing examples unless `send_inputs`."""
    sent = request.model_dump(mode="json")
    if not send_inputs:
        sent["failing_examples"] = []
    return sent


def command_input(request: ImprovementRequest, send_inputs: bool = True) -> bytes:
    """What a `--command` generator reads on stdin: the prompt version, the chat messages, and the request."""
    return orjson.dumps({"prompt_version": prompt_version(), "messages": messages_for(request, send_inputs),
                         "request": sent_request(request, send_inputs)})
