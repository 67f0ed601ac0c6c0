"""Kafka plumbing shared by every process: client factories and why a group consumer gave up, explicit
partitioning, batched sends, idempotent topic creation (and config alignment) from the registry, a watch that
notices when the cluster stops answering, and a backoff between the connection attempts of every client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import aiokafka.client
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import InvalidSessionTimeoutError, KafkaConnectionError, KafkaError, TopicAlreadyExistsError
from aiokafka.partitioner import murmur2
from aiokafka.protocol.admin import ApiVersionRequest

from app.contract.topics import Topics, TopicSpec
from app.kafka.delivery import describe_error
from app.kafka.topic_configs import ConfigsNotAltered, configs_of, differences, set_configs
from app.settings import Settings

log = logging.getLogger(__name__)


@lru_cache(maxsize=65536)
def partition_for(key: bytes, partitions: int) -> int:
    """Kafka's default partition for a key (murmur2), cached: the pure-Python hash is costly per record."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def make_producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    """A producer: acks=all, no idempotence (the embedded broker rejects InitProducerId v0)."""
    args: dict[str, Any] = {
        **settings.kafka_client_args(),
        "acks": "all",
        "linger_ms": 0,
        "max_batch_size": 1 << 20,
        "max_request_size": 4 << 20,
        "enable_idempotence": False,
    }
    args.update(overrides)
    return AIOKafkaProducer(**args)


def make_consumer(settings: Settings, *topics: str, **overrides: Any) -> AIOKafkaConsumer:
    """A consumer that reads from the earliest offset and never commits unless told to."""
    args: dict[str, Any] = {
        **settings.kafka_client_args(),
        "auto_offset_reset": "earliest",
        "enable_auto_commit": False,
        "max_partition_fetch_bytes": 4 << 20,
        "fetch_max_bytes": 16 << 20,
    }
    args.update(overrides)
    return AIOKafkaConsumer(*topics, **args)


def consumer_failure(topic: str, settings: Settings) -> Callable[[KafkaError], str]:
    """Why a group member consuming `topic` (its consumer made with settings.group_args()) cannot go on, from the
    error that stopped it: a session timeout the coordinator refused is named with the bounds it must lie in."""

    def failure(exc: KafkaError) -> str:
        if isinstance(exc.__cause__, InvalidSessionTimeoutError):
            return (f"the group coordinator refused session_timeout_s={settings.session_timeout_s:g}: "
                    "it must lie within the broker's group.min.session.timeout.ms and "
                    "group.max.session.timeout.ms (Apache Kafka's defaults: 6 s and 30 min)")
        return f"consuming {topic} failed: {describe_error(exc)}"

    return failure


async def stop_clients(*clients: AIOKafkaConsumer | AIOKafkaProducer | None, timeout_s: float = 10) -> None:
    """Stop each client (None: never made), bounded: with the broker gone, leaving a group or flushing would
    wait out request timeouts. One that does not stop in time is logged and left."""
    for client in clients:
        if client is not None:
            try:
                await asyncio.wait_for(client.stop(), timeout=timeout_s)
            except (TimeoutError, KafkaError) as exc:
                log.warning("%s did not stop cleanly: %s", type(client).__name__, describe_error(exc))


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task (None: never started) and return once it has ended; its cancellation is no error."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# Apache Kafka answers a fetch as soon as it has records, so a short fetch wait only paces idle polls. The embedded
# broker (Tansu, memory storage) needs a time to find an offset that grows with the record batches before it in
# the partition (measured: 20,000 one-record batches need more than 5 ms, 50,000 more than 10, 100,000 more than
# 20), and answers empty when the wait runs out first: a consumer with a short wait then stalls for good once a
# trickle of small batches has made its partition long enough.
_FETCH_WAIT_CEILING_MS = 1000


async def widen_fetch_wait_if_starved(consumer: AIOKafkaConsumer) -> None:
    """After a fetch that came back empty: if records wait past the consumer's position in a partition it is
    assigned (the broker could not find them within the fetch wait), double its fetch wait, up to a second.
    Never happens on Apache Kafka."""
    for tp in consumer.assignment():
        end = consumer.highwater(tp)
        if end is not None and end > await consumer.position(tp):
            fetcher = consumer._fetcher  # aiokafka keeps the wait there and reads it for every fetch request
            wait = fetcher._fetch_max_wait_ms
            if wait < _FETCH_WAIT_CEILING_MS:
                fetcher._fetch_max_wait_ms = min(_FETCH_WAIT_CEILING_MS, max(1, wait) * 2)
                log.warning("fetches of %s came back empty with records waiting at %d..%d: fetch wait %d ms -> %d ms",
                            tp, await consumer.position(tp), end, wait, fetcher._fetch_max_wait_ms)
            return


@dataclass(frozen=True)
class TopicApplied:
    """What `apply_topics` did to one topic (created it, altered its configs or not) and the line that says so."""

    name: str
    created: bool
    detail: str
    altered: bool = False


async def apply_topics(settings: Settings, topics: Topics) -> list[TopicApplied]:
    """Create every registered topic that is missing, and set the configs topics.yaml names (cleanup.policy,
    retention.ms) on those that exist. A broker that cannot alter configs gets the difference reported."""
    admin = AIOKafkaAdminClient(**settings.kafka_client_args())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        outcomes = await _align_configs(admin, [s for s in topics.all() if s.name in existing])
        missing = [s for s in topics.all() if s.name not in existing]
        if missing:
            new = [
                NewTopic(s.name, s.partitions, settings.replication_factor, topic_configs=s.config)
                for s in missing
            ]
            response = await admin.create_topics(new)
            for name, code, message in _topic_errors(response):
                # 36: created concurrently by another process, which is the outcome we wanted.
                if code not in (0, TopicAlreadyExistsError.errno):
                    raise RuntimeError(f"cannot create topic {name}: error {code}: {message}")
            for s in missing:
                outcomes.append(TopicApplied(s.name, True, f"{s.partitions} partitions, {_configs(s)}"))
        order = {s.name: i for i, s in enumerate(topics.all())}
        return sorted(outcomes, key=lambda o: order[o.name])
    finally:
        await admin.close()


async def _align_configs(admin: AIOKafkaAdminClient, specs: list[TopicSpec]) -> list[TopicApplied]:
    """Existing topics get topics.yaml's configs; on a broker that cannot, each outcome says what to set."""
    wanted = {s.name: s.config for s in specs if s.config}
    try:
        changes = {c.topic: c for c in differences(wanted, await configs_of(admin, wanted))} if wanted else {}
    except ConfigsNotAltered as exc:
        return [TopicApplied(s.name, False, f"configs not checked ({exc}); should be {_configs(s)}") for s in specs]
    not_altered = ""
    try:
        await set_configs(admin, list(changes.values()))
    except ConfigsNotAltered as exc:
        not_altered = str(exc)
    outcomes = []
    for s in specs:
        change = changes.get(s.name)
        if change is None:
            outcomes.append(TopicApplied(s.name, False, "configs as in topics.yaml"))
        elif not_altered:
            outcomes.append(TopicApplied(s.name, False, f"NOT altered, {not_altered}: {change.describe()}"))
        else:
            outcomes.append(TopicApplied(s.name, False, f"altered: {change.describe()}", altered=True))
    return outcomes


def _configs(spec: TopicSpec) -> str:
    return ", ".join(f"{k}={v}" for k, v in spec.config.items())


def _topic_errors(response: Any) -> list[tuple[str, int, str | None]]:
    return [(err[0], err[1], err[2] if len(err) > 2 else None) for err in response.topic_errors]


class BrokerWatch:
    """Asks the cluster for its API versions every second, on a connection of its own. `lost` is set, with
    `lost_reason`, once no broker has answered for settings.broker_lost_timeout_s; a cluster that answers
    again before that is simply used again (the clients reconnect on their own)."""

    PROBE_INTERVAL_S = 1.0
    PROBE_TIMEOUT_S = 2.0  # a port that accepts connections but never answers counts as no answer

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._client: AIOKafkaClient | None = None
        self._task: asyncio.Task[None] | None = None
        self.lost = asyncio.Event()
        self.lost_reason = ""
        self.answered_at: float | None = None  # time.monotonic() of the last answer (for /health)

    async def start(self) -> None:
        self._client = AIOKafkaClient(**self._settings.kafka_client_args())
        await self._client.bootstrap()
        self.answered_at = time.monotonic()
        self._task = asyncio.ensure_future(self._watch())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        if self._client is not None:
            await self._client.close()

    async def _watch(self) -> None:
        timeout = self._settings.broker_lost_timeout_s
        answered = time.monotonic()
        while True:
            await asyncio.sleep(self.PROBE_INTERVAL_S)
            if await self._answers():
                answered = self.answered_at = time.monotonic()
            elif time.monotonic() - answered >= timeout:
                self.lost_reason = (
                    f"the Kafka broker at {self._settings.bootstrap_servers} has not answered for {timeout:g} s "
                    "(settings bootstrap_servers, broker_lost_timeout_s)"
                )
                self.lost.set()
                return

    async def _answers(self) -> bool:
        assert self._client is not None
        for broker in self._client.cluster.brokers():
            try:
                await asyncio.wait_for(self._client.send(broker.nodeId, ApiVersionRequest()), self.PROBE_TIMEOUT_S)
                return True
            except Exception:  # whatever the failure, that broker did not answer; the watch must not die of it
                continue
        return False


class ConnectBackoff:
    """Paces the connection attempts of every aiokafka client in this process, faust's included, per broker
    address: after a failed attempt the next one waits 50 ms, doubling up to 1 s (Kafka's own
    reconnect.backoff.ms and reconnect.backoff.max.ms), until one succeeds. aiokafka 0.14 has no such setting,
    and its loops retry a refused connection at once: with the broker gone, a worker made about 3,600 attempts a
    second. A caller that waited while another's attempt failed fails too, without an attempt of its own.
    Logs one line per address and `report_every_s` with the count of failed attempts."""

    def __init__(self, initial_s: float = 0.05, max_s: float = 1.0, report_every_s: float = 10.0) -> None:
        self._initial_s = initial_s
        self._max_s = max_s
        self._report_every_s = report_every_s
        # faust's consumer has a thread and an event loop of its own: the state is guarded by a thread lock,
        # never held across an await.
        self._lock = threading.Lock()
        self._addresses: dict[tuple[str, int], _Address] = {}

    async def connect(self, create: Callable[..., Awaitable[Any]], host: str, port: int, **kwargs: Any) -> Any:
        """`create(host, port, **kwargs)` (aiokafka's create_conn) once this address's backoff allows it."""
        with self._lock:
            address = self._addresses.setdefault((host, port), _Address(self._initial_s))
            failures = address.failures
        while True:
            with self._lock:
                if not address.failing:
                    break  # no backoff while connections succeed
                now = time.monotonic()
                wait = address.next_at - now
                if wait <= 0:
                    address.next_at = now + address.delay_s  # this caller's turn: the others wait for it
                    break
            await asyncio.sleep(wait)
            if address.failures != failures:
                raise KafkaConnectionError(f"cannot connect to {host}:{port} (backing off)")
        try:
            connection = await create(host, port, **kwargs)
        except BaseException:
            self._failed(host, port, address)
            raise
        with self._lock:
            if address.failing:
                log.warning("connected to %s:%d again", host, port)
            address.succeeded(self._initial_s)
        return connection

    def _failed(self, host: str, port: int, address: _Address) -> None:
        with self._lock:
            address.failures += 1
            address.failures_unreported += 1
            address.failing = True
            address.delay_s = min(address.delay_s * 2, self._max_s)
            address.next_at = time.monotonic() + address.delay_s
            now = time.monotonic()
            if now - address.reported_at < self._report_every_s:
                return
            count, address.failures_unreported, address.reported_at = address.failures_unreported, 0, now
        log.warning("cannot connect to %s:%d: %d attempt%s failed in the last %g s; trying again every %g s at most",
                    host, port, count, "" if count == 1 else "s", self._report_every_s, self._max_s)


@dataclass
class _Address:
    delay_s: float
    next_at: float = 0.0  # monotonic time before which no attempt starts
    failures: int = 0
    failures_unreported: int = 0
    failing: bool = False
    reported_at: float = float("-inf")

    def succeeded(self, initial_s: float) -> None:
        self.delay_s, self.next_at, self.failing, self.failures_unreported = initial_s, 0.0, False, 0
        self.reported_at = float("-inf")


connect_backoff = ConnectBackoff()
_create_conn = aiokafka.client.create_conn


async def _create_conn_backing_off(host: str, port: int, **kwargs: Any) -> Any:
    return await connect_backoff.connect(_create_conn, host, port, **kwargs)


# Every client in the process goes through aiokafka.client's create_conn (bootstrap and each broker connection).
aiokafka.client.create_conn = _create_conn_backing_off
