"""`loopai broker`: the embedded broker on its own, for the other commands; Ctrl-C stops it."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from app.contract.topics import topics_for
from devtools.broker import EmbeddedBroker, listening
from tests.conftest import make_settings, wait_for_text


def _loopai_broker(output: Path) -> subprocess.Popen[bytes]:
    """`loopai broker` on a free port, in a session of its own (as a terminal runs it), its output in a file."""
    with open(output, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "app.cli", "broker", "--port", "0"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


_EXPORT = re.compile(r"^export LOOPAI_BOOTSTRAP_SERVERS=(127\.0\.0\.1:(\d+))$", re.M)


def test_loopai_broker_serves_the_other_commands_until_ctrl_c(broker: EmbeddedBroker, tmp_path: Path) -> None:
    output = tmp_path / "broker.out"
    running = _loopai_broker(output)
    try:
        export = wait_for_text(output, _EXPORT, running, timeout_s=30)
        env = {**os.environ, **make_settings(broker).to_env(), "LOOPAI_BOOTSTRAP_SERVERS": export.group(1)}
        applied = subprocess.run([sys.executable, "-m", "app.cli", "topics", "apply"],
                                 capture_output=True, text=True, timeout=60, env=env)
        assert applied.returncode == 0 and applied.stdout.count("created") == len(topics_for("").all()), applied.stderr
        os.killpg(running.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        assert running.wait(timeout=30) == 0
    finally:
        if running.poll() is None:
            os.killpg(running.pid, signal.SIGKILL)
    assert output.read_text().rstrip().endswith("broker stopped")
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", int(export.group(2)))) != 0


def test_loopai_broker_refuses_a_port_in_use(broker: EmbeddedBroker) -> None:
    done = subprocess.run([sys.executable, "-m", "app.cli", "broker", "--port", str(broker.port)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert f"port {broker.port} is already in use" in done.stderr and "--port" in done.stderr


def test_a_killed_loopai_broker_takes_its_broker_with_it(tmp_path: Path) -> None:
    """SIGKILL leaves no time to stop the broker; the kernel ends it when its parent dies."""
    output = tmp_path / "broker.out"
    running = _loopai_broker(output)
    try:
        port = int(wait_for_text(output, _EXPORT, running, timeout_s=30).group(2))
    finally:
        os.killpg(running.pid, signal.SIGKILL)
        running.wait(timeout=30)
    deadline = time.monotonic() + 30
    while listening(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not listening(port)
