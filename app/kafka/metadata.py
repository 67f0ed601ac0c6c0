"""Cluster metadata as Apache Kafka serves it: is the broker there at all (check_broker), and which partitions
a topic has (topic_partitions). Kafka sends a topic's metadata only to a client that asks for that topic, so
nothing here assumes a client knows a topic right after it starts (the embedded broker tells it eagerly).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.client import AIOKafkaClient
from aiokafka.conn import collect_hosts, create_conn
from aiokafka.errors import KafkaError, TopicAuthorizationFailedError, for_code
from aiokafka.protocol.metadata import MetadataRequest

from app.settings import Settings

_FIX_ADDRESS = "set bootstrap_servers (LOOPAI_BOOTSTRAP_SERVERS or --bootstrap-servers) to the broker's address"


class BrokerUnreachable(ConnectionError):
    """No broker answered; the message is one line naming the address and the setting to change."""


class TopicUnavailable(LookupError):
    """The cluster has no such topic (or this client may not see it); the message says what to do."""


async def topic_partitions(
    client: AIOKafkaConsumer | AIOKafkaProducer, topic: str, timeout_s: float = 10.0
) -> list[int]:
    """The partition ids of a topic: from the client's metadata if it knows the topic, else from a metadata
    request naming it, repeated until timeout_s (a topic created a moment ago can be unknown or leaderless
    for a while). The request never creates the topic, whatever the broker's auto.create.topics.enable says:
    one made that way would have the wrong partitions and cleanup policy. Raises TopicUnavailable."""
    # A consumer keeps its client as _client, a producer as client (or something that stands in for one).
    kafka: AIOKafkaClient = getattr(client, "_client", None) or client.client  # type: ignore[union-attr]
    known = kafka.cluster.partitions_for_topic(topic)
    if known:
        return sorted(known)
    request = MetadataRequest([topic], allow_auto_topic_creation=False)
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                node = kafka.get_random_node()
                if node is None:
                    await kafka.force_metadata_update()  # it knows no broker yet
                else:
                    with contextlib.suppress(KafkaError, TimeoutError):
                        error, partitions = _topic_in(await kafka.send(node, request), topic)
                        if partitions:
                            return partitions
                        if error is TopicAuthorizationFailedError:
                            raise TopicUnavailable(f"not authorised to use topic {topic}; check the client's ACLs")
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise TopicUnavailable(
            f"topic {topic} does not exist (no metadata within {timeout_s:g} s); run `loopai topics apply`"
        ) from None


def _topic_in(response: Any, topic: str) -> tuple[type[KafkaError] | None, list[int]]:
    """The error and partition ids of one topic in a MetadataResponse (parsed here: aiokafka's own parser
    logs an error for every topic it does not find)."""
    for entry in response.topics:
        if entry[1] == topic:
            partitions = entry[2] if response.API_VERSION == 0 else entry[3]
            return for_code(entry[0]) if entry[0] else None, sorted(p[1] for p in partitions)
    return None, []


async def check_broker(settings: Settings) -> None:
    """Raise BrokerUnreachable unless a bootstrap server answers a metadata request, and every broker it
    advertises accepts a connection, within settings.connect_timeout_s. Takes a few ms when all is well."""
    timeout_s = settings.connect_timeout_s
    deadline = time.monotonic() + timeout_s
    args = settings.kafka_client_args()
    servers = [(host, port) for host, port, _ in collect_hosts(args.pop("bootstrap_servers"), randomize=False)]
    answers, reasons = await _first_answer(servers, args, timeout_s, deadline)
    if answers is None:
        raise BrokerUnreachable(f"cannot reach Kafka: {_describe(reasons)}; {_FIX_ADDRESS}")
    contacted, metadata = answers
    # Clients go on to the addresses the cluster advertises, not the bootstrap address they were given.
    advertised = [(broker[1], broker[2]) for broker in metadata.brokers]
    others = [address for address in advertised if address != contacted]
    if not others:
        return
    results = await asyncio.gather(
        *(_reason_unreachable(address, args, timeout_s, deadline) for address in others)
    )
    failed = {address: reason for address, reason in zip(others, results, strict=True) if reason}
    if failed:
        raise BrokerUnreachable(
            f"Kafka at {_address(contacted)} answered, but not every broker address it advertises can be "
            f"reached: {_describe(failed)}; fix the brokers' advertised.listeners, or {_FIX_ADDRESS}"
        )


async def _first_answer(
    servers: list[tuple[str, int]], args: dict[str, Any], timeout_s: float, deadline: float
) -> tuple[tuple[tuple[str, int], Any] | None, dict[tuple[str, int], str]]:
    """The first bootstrap server's metadata answer, asking all of them at once; else why each failed."""
    attempts = {asyncio.ensure_future(_ask_metadata(address, args, timeout_s)): address for address in servers}
    reasons: dict[tuple[str, int], str] = {}
    pending = set(attempts)
    try:
        while pending:
            done, pending = await asyncio.wait(
                pending, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                break
            for attempt in done:
                if attempt.exception() is None:
                    return (attempts[attempt], attempt.result()), reasons
                reasons[attempts[attempt]] = _reason(attempt.exception(), timeout_s)
    finally:
        for attempt in pending:
            attempt.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return None, {address: reasons.get(address) or _reason(TimeoutError(), timeout_s) for address in servers}


async def _ask_metadata(address: tuple[str, int], args: dict[str, Any], timeout_s: float) -> Any:
    conn = await _connect(address, args, timeout_s)
    try:
        return await conn.send(MetadataRequest([]))
    finally:
        conn.close()


async def _reason_unreachable(
    address: tuple[str, int], args: dict[str, Any], timeout_s: float, deadline: float
) -> str | None:
    try:
        conn = await asyncio.wait_for(_connect(address, args, timeout_s), max(0.0, deadline - time.monotonic()))
    except (OSError, KafkaError, TimeoutError) as exc:
        return _reason(exc, timeout_s)
    conn.close()
    return None


async def _connect(address: tuple[str, int], args: dict[str, Any], timeout_s: float) -> Any:
    """A connection that has exchanged ApiVersions (and authenticated, with SASL)."""
    return await create_conn(address[0], address[1], request_timeout_ms=int(timeout_s * 1000), **{
        key: value for key, value in args.items()
        if key in ("security_protocol", "ssl_context", "sasl_mechanism", "sasl_plain_username",
                   "sasl_plain_password")
    })


def _reason(exc: BaseException | None, timeout_s: float) -> str:
    """What went wrong, said of the address: "<host:port> <reason>"."""
    if isinstance(exc, TimeoutError):
        return f"did not answer within {timeout_s:g} s (connect_timeout_s)"
    if isinstance(exc, ConnectionRefusedError):
        return "refused the connection"
    if isinstance(exc, socket.gaierror):
        return "is an unknown host"
    if isinstance(exc, OSError):
        return f"failed: {exc.strerror or exc}"
    return f"failed: {exc or type(exc).__name__}"


def _address(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


def _describe(reasons: dict[tuple[str, int], str]) -> str:
    return ", ".join(f"{_address(address)} {reason}" for address, reason in reasons.items())
