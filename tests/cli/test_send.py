"""`loopai send`: refusals before sending, JSONL lines named by number, --wait giving up at its timeout, a
progress bar on a terminal only."""

import os
import pty
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from devtools.broker import EmbeddedBroker
from tests.cli.conftest import loopai
from tests.conftest import make_settings


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ghost", "--input", '{"text": "x"}'], "unknown task 'ghost'; create it with `loopai task create ghost`"),
        (["spam", "--input", '{"text": "x"}', "--version", "3"], "task 'spam' has no version 3; published: [1]"),
        (["--file", "JSONL"], "unknown task 'ghost'"),
    ],
)
def test_send_refuses_requests_that_could_only_be_rejected(
    env: dict[str, str], tmp_path: Path, args: list[str], message: str
) -> None:
    assert loopai(env, "topics", "apply").returncode == 0
    assert loopai(env, "task", "create", "spam").returncode == 0
    (tmp_path / "p.py").write_text("def run(input):\n    return 1\n")
    assert loopai(env, "artifact", "publish", "spam", str(tmp_path / "p.py")).returncode == 0
    jsonl = tmp_path / "requests.jsonl"
    jsonl.write_text('{"task_id": "spam", "input": {}}\n{"task_id": "ghost", "input": {}}\n')
    done = loopai(env, "send", *[str(jsonl) if a == "JSONL" else a for a in args])
    assert done.returncode != 0 and message in done.stderr, done.stderr
    tailed = loopai(env, "tail", "requests", "--idle-exit", "0.5")
    assert tailed.returncode == 0 and tailed.stdout == ""  # nothing was sent, not even the good line


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"input": {"text": 1}', "line 3: not JSON: Expecting ',' delimiter (column 22)"),
        ('["not", "a", "request"]', "line 3: expected a JSON object, got list"),
        ('{"input": {}, "timeout_ms": 0}', "line 3: invalid request field 'timeout_ms'"),
        ('{"input": {}, "colour": "red"}', "line 3: invalid request field 'colour'"),
        ('{"text": "an input, not a request"}',
         'line 3: a request needs an "input" object; for a file of one input per line, add --inputs'),
    ],
)
def test_a_bad_jsonl_line_is_named_by_its_number(tmp_path: Path, line: str, message: str) -> None:
    jsonl = tmp_path / "requests.jsonl"
    jsonl.write_text('{"input": {"text": "ok"}}\n\n' + line + "\n")
    done = loopai({}, "send", "spam", "--file", str(jsonl))
    assert done.returncode == 1 and f"{jsonl} {message}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_send_wait_gives_up_at_its_timeout(env: dict[str, str], tmp_path: Path) -> None:
    assert loopai(env, "topics", "apply").returncode == 0
    assert loopai(env, "task", "create", "idle").returncode == 0
    waited = loopai(env, "send", "idle", "--input", "{}", "--wait", "--timeout", "1")  # no worker is running
    assert waited.returncode == 1 and "1 of 1 request(s) unanswered after 1 s" in waited.stderr, waited.stderr


def test_send_of_a_long_file_shows_progress_on_a_terminal_only(broker: EmbeddedBroker, tmp_path: Path) -> None:
    env = {**os.environ, **make_settings(broker).to_env()}
    assert loopai(env, "topics", "apply").returncode == 0
    assert loopai(env, "task", "create", "spam").returncode == 0
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(b"".join(orjson.dumps({"input": {"text": f"t{i}"}}) + b"\n" for i in range(6_000)))

    controller, terminal = pty.openpty()
    try:
        sent = subprocess.run([sys.executable, "-m", "app.cli", "send", "spam", "--file", str(requests)],
                              env=env, stdout=subprocess.PIPE, stderr=terminal, timeout=120)
        os.close(terminal)
        shown = b""
        while chunk := _read(controller):
            shown += chunk
    finally:
        os.close(controller)
    assert sent.returncode == 0 and sent.stdout.decode().strip() == "sent 6000 request(s)", shown
    assert b"sending" in shown and b"100%" in shown, shown

    piped = loopai(env, "send", "spam", "--file", str(requests))  # stderr a pipe: no bar
    assert piped.returncode == 0 and piped.stderr == "" and "sent 6000" in piped.stdout


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the terminal's other side is closed and everything was read
        return b""
