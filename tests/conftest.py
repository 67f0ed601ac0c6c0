"""Fixtures: the real embedded broker (one per session), settings with a unique topic prefix per test,
worker processes, `loopai broker` in a subprocess, helpers that wait for results by request id, and metadata
answered as Apache Kafka answers it."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
from aiokafka.conn import AIOKafkaConnection
from aiokafka.protocol.metadata import MetadataRequest

from app.contract.records import DeadLetter, ExecutionResult
from app.contract.topics import topics_for
from app.kafka.clients import apply_topics
from app.kafka.loop_client import follow
from app.settings import Settings
from devtools.broker import EMBEDDED_TIMINGS, EmbeddedBroker

# Hypothesis's per-example deadline (200 ms) measures the machine more than the code on a busy 2-core runner.
hypothesis.settings.register_profile("busy-machine", deadline=None)
hypothesis.settings.load_profile("busy-machine")

_counter = itertools.count()
_data_root: Path | None = None  # where the workers' faust data goes: pytest's temporary directory, not the checkout


@pytest.fixture(scope="session", autouse=True)
def _faust_data_root(tmp_path_factory: pytest.TempPathFactory) -> None:
    global _data_root
    _data_root = tmp_path_factory.mktemp("faust-data")


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    log = tmp_path_factory.mktemp("broker") / "broker.log"
    with EmbeddedBroker(log_file=log) as running:
        yield running


def make_settings(broker: EmbeddedBroker, **overrides: Any) -> Settings:
    """Settings on the embedded broker with a prefix no other test uses."""
    prefix = f"t{os.getpid()}-{next(_counter)}."
    values: dict[str, Any] = {
        "bootstrap_servers": broker.bootstrap_servers,
        "topic_prefix": prefix,
        "app_id": f"app-{prefix.rstrip('.')}",
        "data_dir": (_data_root or Path(tempfile.mkdtemp())) / prefix.rstrip("."),
        "sandbox_processes": 16,  # the tests' workers serve up to a dozen tasks at once
        "web_port": 0,  # no HTTP: tests run many workers at once; tests/test_web.py gives its own a free port
        **EMBEDDED_TIMINGS,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
async def settings(broker: EmbeddedBroker) -> Settings:
    made = make_settings(broker)
    await apply_topics(made, topics_for(made.topic_prefix))
    return made


class WorkerProcess:
    """`loopai worker` in a subprocess, its output in a log file."""

    def __init__(self, settings: Settings, log_path: Path, worker_id: str) -> None:
        self.settings = settings
        self.log_path = log_path
        self.worker_id = worker_id
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60) -> WorkerProcess:
        return self.launch().wait_serving(timeout_s)

    def launch(self) -> WorkerProcess:
        """Start the process without waiting for it (several workers start side by side)."""
        env = {**os.environ, **self.settings.to_env(), "LOOPAI_WORKER_ID": self.worker_id}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker"],
            env=env, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
        )
        return self

    def wait_serving(self, timeout_s: float = 60) -> WorkerProcess:
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited {self.process.returncode}:\n{self.log()[-3000:]}")
            if f"worker {self.worker_id} serving" in self.log():
                return self
            time.sleep(0.1)
        raise RuntimeError(f"worker not serving after {timeout_s}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(settings: Settings, worker_id: str | None = None) -> WorkerProcess:
        worker_id = worker_id or f"worker-{len(started) + 1}"
        worker = WorkerProcess(settings, tmp_path / f"{worker_id}.log", worker_id).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop(signal.SIGKILL if worker.process and worker.process.poll() is None else signal.SIGTERM)


async def collect(settings: Settings, topic_key: str, until: Callable[[list[Any]], bool],
                  timeout_s: float = 30) -> list[Any]:
    """Records of a topic (from the beginning) until `until(records)` holds; fails on timeout."""
    spec = topics_for(settings.topic_prefix).by_name(topic_key)
    records: list[Any] = []

    async def read() -> None:
        async for _, _, record in follow(settings, spec):
            records.append(record)
            if until(records):
                return

    try:
        await asyncio.wait_for(read(), timeout_s)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout_s}s on {spec.name}; have {len(records)}: {records[-5:]}")
    return records


async def results_for(
    settings: Settings, request_ids: Iterable[str], timeout_s: float = 30
) -> dict[str, ExecutionResult]:
    """The result of each request id (the last one seen if redelivered)."""
    wanted = set(request_ids)
    records = await collect(
        settings, "execution_results",
        lambda rs: wanted <= {r.request_id for r in rs if isinstance(r, ExecutionResult)}, timeout_s,
    )
    return {r.request_id: r for r in records if isinstance(r, ExecutionResult) and r.request_id in wanted}


async def dead_letters(settings: Settings, count: int, timeout_s: float = 30) -> list[DeadLetter]:
    return await collect(settings, "dead_letters", lambda rs: len(rs) >= count, timeout_s)


class KafkaLikeMetadata:
    """Makes the embedded broker's metadata answers look like Apache Kafka's, in this process.

    Kafka answers a request that names no topics (aiokafka's bootstrap) with no topics, and a client learns
    a topic only by asking for it; the embedded broker lists every topic up front. hide() also keeps a topic
    out of every answer for a while, as Kafka does for a topic created a moment ago; deny() answers for a
    topic as Kafka does to a client whose ACLs do not allow it; advertise() makes the cluster advertise other
    broker addresses (a misconfigured advertised.listeners).
    """

    def __init__(self) -> None:
        self._hidden_until: dict[str, float] = {}
        self._advertised: list[tuple[str, int]] | None = None
        self._denied: set[str] = set()
        self.withheld = 0  # answers that left out a topic the embedded broker had named

    def hide(self, topic: str, seconds: float) -> None:
        self._hidden_until[topic] = time.monotonic() + seconds

    def deny(self, topic: str) -> None:
        self._denied.add(topic)

    def advertise(self, *addresses: tuple[str, int]) -> None:
        self._advertised = list(addresses)

    async def answer(self, request: MetadataRequest, pending: Any) -> Any:
        response = await pending
        names_no_topic = request._topics == []  # v1+: an empty array asks for no topics at all
        now = time.monotonic()
        # The topic name is the second field of a topic's entry in every version.
        topics = [] if names_no_topic else [t for t in response.topics if self._hidden_until.get(t[1], 0) <= now]
        self.withheld += len(topics) < len(response.topics)
        # TOPIC_AUTHORIZATION_FAILED (29) and no partitions; v1+ entries: error, name, internal, partitions...
        response.topics = [(29, t[1], t[2], [], *t[4:]) if t[1] in self._denied else t for t in topics]
        if self._advertised is not None:
            response.brokers = [(i, host, port, None) for i, (host, port) in enumerate(self._advertised)]
        return response


@pytest.fixture
def kafka_like_metadata(monkeypatch: pytest.MonkeyPatch) -> KafkaLikeMetadata:
    """Every aiokafka client of this test process sees metadata as Apache Kafka serves it."""
    metadata = KafkaLikeMetadata()
    send = AIOKafkaConnection.send

    def send_like_kafka(conn: AIOKafkaConnection, request: Any, expect_response: bool = True) -> Any:
        pending = send(conn, request, expect_response)
        if isinstance(request, MetadataRequest) and expect_response:
            return metadata.answer(request, pending)
        return pending

    monkeypatch.setattr(AIOKafkaConnection, "send", send_like_kafka)
    return metadata


@pytest.fixture
def silent_broker() -> Iterator[str]:
    """An address that accepts TCP connections and never answers a byte (a hung or wrong server)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)  # the kernel completes handshakes without accept(); nothing is ever read
        yield f"127.0.0.1:{listener.getsockname()[1]}"


def wait_for_text(
    path: Path, wanted: str | re.Pattern[str], process: subprocess.Popen[bytes], timeout_s: float
) -> re.Match[str]:
    """Wait until a process's output file holds the text (or pattern); fails if the process exits first."""
    pattern = wanted if isinstance(wanted, re.Pattern) else re.compile(re.escape(wanted))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        found = pattern.search(text)
        if found:
            return found
        if process.poll() is not None:
            pytest.fail(f"exited with {process.returncode} before {pattern.pattern!r}:\n{text[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"no {pattern.pattern!r} after {timeout_s}s:\n{text[-3000:]}")


def loopai_broker(output: Path) -> subprocess.Popen[bytes]:
    """`loopai broker` on a free port, in a session of its own (as a terminal runs it), its output in a file."""
    with open(output, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "app.cli", "broker", "--port", "0"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


# What `loopai broker` prints for the other commands once it listens; group 2 is the port.
BROKER_EXPORT = re.compile(r"^export LOOPAI_BOOTSTRAP_SERVERS=(127\.0\.0\.1:(\d+))$", re.M)
