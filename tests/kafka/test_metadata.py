"""Metadata as Apache Kafka serves it: a client learns a topic only by asking for it (and a new topic may
answer late), and a broker that is not there is one clear error within connect_timeout_s."""

import time

import pytest

from app.contract.records import TaskSpec, utc_now
from app.contract.topics import topics_for
from app.control.plane import ControlPlane
from app.kafka.clients import make_consumer
from app.kafka.loop_client import follow, request_from, send_requests
from app.kafka.metadata import BrokerUnreachable, TopicUnavailable, check_broker, topic_partitions
from app.kafka.tables import TableReader
from app.settings import Settings
from devtools.broker import EmbeddedBroker, free_port
from tests.conftest import KafkaLikeMetadata, make_settings


async def test_follow_waits_for_metadata_that_arrives_late(
    settings: Settings, kafka_like_metadata: KafkaLikeMetadata
) -> None:
    await send_requests(settings, [request_from("spam", {"text": "x"}, request_id="r1")])
    spec = topics_for(settings.topic_prefix).execution_requests
    kafka_like_metadata.hide(spec.name, 1.0)
    seen = [record async for _, _, record in follow(settings, spec, idle_timeout_s=1)]
    assert [r.request_id for r in seen] == ["r1"]
    assert kafka_like_metadata.withheld > 0  # the follower really was told nothing at first


async def test_every_client_works_when_topics_are_described_only_on_request(
    settings: Settings, kafka_like_metadata: KafkaLikeMetadata
) -> None:
    topics = topics_for(settings.topic_prefix)
    for spec in topics.all():
        kafka_like_metadata.hide(spec.name, 0.5)
    async with ControlPlane(settings) as control:
        await control.put_task(TaskSpec(name="spam", updated_at=utc_now()))
    reader = TableReader(settings, topics.task_specs, topics.program_artifacts)
    await reader.start()
    await reader.stop()
    assert reader.tasks.get("spam") is not None
    assert await send_requests(settings, [request_from("spam", {"text": "x"})]) == 1


async def test_a_missing_topic_is_named_with_the_command_that_makes_it(settings: Settings) -> None:
    consumer = make_consumer(settings)
    await consumer.start()
    started = time.monotonic()
    try:
        with pytest.raises(TopicUnavailable, match=r"topic \S+nowhere does not exist.*`loopai topics apply`"):
            await topic_partitions(consumer, f"{settings.topic_prefix}nowhere", timeout_s=0.5)
    finally:
        await consumer.stop()
    assert time.monotonic() - started < 5


async def test_a_topic_the_client_may_not_use_is_named_at_once(
    settings: Settings, kafka_like_metadata: KafkaLikeMetadata
) -> None:
    spec = topics_for(settings.topic_prefix).execution_results
    kafka_like_metadata.deny(spec.name)
    consumer = make_consumer(settings)
    await consumer.start()
    started = time.monotonic()
    try:
        with pytest.raises(TopicUnavailable, match=rf"not authorised to use topic {spec.name}; check the client's"):
            await topic_partitions(consumer, spec.name, timeout_s=10)
    finally:
        await consumer.stop()
    assert time.monotonic() - started < 5  # no waiting out the timeout


async def test_a_reachable_broker_passes_the_check(broker: EmbeddedBroker) -> None:
    await check_broker(make_settings(broker))


@pytest.mark.parametrize("kind", ["nothing listening", "silent"])
async def test_an_absent_broker_is_one_line_naming_address_and_setting(kind: str, silent_broker: str) -> None:
    address = silent_broker if kind == "silent" else f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(BrokerUnreachable) as caught:
        await check_broker(Settings(bootstrap_servers=address, connect_timeout_s=1))
    assert time.monotonic() - started < 2
    message = str(caught.value)
    reason = "did not answer within 1 s" if kind == "silent" else "refused the connection"
    assert f"{address} {reason}" in message and "LOOPAI_BOOTSTRAP_SERVERS" in message and "\n" not in message


async def test_an_unreachable_advertised_address_is_named(
    broker: EmbeddedBroker, kafka_like_metadata: KafkaLikeMetadata, silent_broker: str
) -> None:
    """Bootstrap answers but advertises an address clients cannot reach (a Docker advertised.listeners)."""
    host, port = silent_broker.split(":")
    kafka_like_metadata.advertise((host, int(port)))
    with pytest.raises(BrokerUnreachable, match=rf"{silent_broker} did not answer.*advertised\.listeners"):
        await check_broker(make_settings(broker, connect_timeout_s=1))
