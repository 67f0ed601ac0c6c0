"""The embedded broker dies with the process that started it, however that process dies (`loopai broker`
itself: tests/cli/test_dev.py)."""

import os
import signal
import time
from pathlib import Path

from devtools.broker import listening
from tests.conftest import BROKER_EXPORT, loopai_broker, wait_for_text


def test_a_killed_loopai_broker_takes_its_broker_with_it(tmp_path: Path) -> None:
    """SIGKILL leaves no time to stop the broker; the kernel ends it when its parent dies."""
    output = tmp_path / "broker.out"
    running = loopai_broker(output)
    try:
        port = int(wait_for_text(output, BROKER_EXPORT, running, timeout_s=30).group(2))
    finally:
        os.killpg(running.pid, signal.SIGKILL)
        running.wait(timeout=30)
    deadline = time.monotonic() + 30
    while listening(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not listening(port)
