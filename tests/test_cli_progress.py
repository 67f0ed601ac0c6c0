"""`loopai send --file` shows a progress bar on a terminal, and only there."""

import os
import pty
import subprocess
import sys
from pathlib import Path

import orjson

from devtools.broker import EmbeddedBroker
from tests.conftest import make_settings
from tests.test_cli import loopai


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
