"""`loopai broker` and `loopai dev` (app/cli/dev.py): the embedded broker alone, serving the other commands until
Ctrl-C; a port in use and a rate of zero refused (the whole loop `loopai dev` runs: tests/devtools/test_dev.py)."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from app.contract.topics import topics_for
from devtools.broker import EmbeddedBroker
from tests.conftest import BROKER_EXPORT, loopai_broker, make_settings, wait_for_text


def test_loopai_broker_serves_the_other_commands_until_ctrl_c(broker: EmbeddedBroker, tmp_path: Path) -> None:
    output = tmp_path / "broker.out"
    running = loopai_broker(output)
    try:
        export = wait_for_text(output, BROKER_EXPORT, running, timeout_s=30)
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


def test_dev_refuses_a_rate_of_zero() -> None:
    done = subprocess.run([sys.executable, "-m", "app.cli", "dev", "--rate", "0"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "Invalid value for '--rate': 0.0 is not in the range x>0" in done.stderr
    assert "Traceback" not in done.stderr
