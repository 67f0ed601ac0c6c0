"""`apply_topics` on topics that exist already: their configs follow topics/topics.yaml (IncrementalAlterConfigs
on the embedded broker), and a broker that cannot alter configs gets the difference reported, not a crash."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import AIOKafkaConnection

from app.contract.topics import topics_for
from app.kafka.clients import TopicApplied, apply_topics
from app.kafka.topic_configs import configs_of
from app.settings import Settings
from devtools.broker import EmbeddedBroker
from tests.conftest import make_settings


async def made_by_hand(settings: Settings, **configs: dict[str, str]) -> None:
    """Create registry topics by hand with other configs, as an operator or an older release might have."""
    topics = topics_for(settings.topic_prefix)
    admin = AIOKafkaAdminClient(**settings.kafka_client_args())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(getattr(topics, key).name, getattr(topics, key).partitions, 1,
                                            topic_configs=config) for key, config in configs.items()])
    finally:
        await admin.close()


async def current(settings: Settings, *keys: str) -> dict[str, dict[str, str | None]]:
    topics = topics_for(settings.topic_prefix)
    admin = AIOKafkaAdminClient(**settings.kafka_client_args())
    await admin.start()
    try:
        return await configs_of(admin, {getattr(topics, k).name: getattr(topics, k).config for k in keys})
    finally:
        await admin.close()


def outcome(outcomes: list[TopicApplied], name: str) -> TopicApplied:
    return next(o for o in outcomes if o.name == name)


async def test_existing_topics_get_the_configs_of_topics_yaml(broker: EmbeddedBroker) -> None:
    settings = make_settings(broker)
    topics = topics_for(settings.topic_prefix)
    await made_by_hand(settings, analytics={"cleanup.policy": "delete", "retention.ms": "1000"},
                       validations={"cleanup.policy": "delete", "retention.ms": "1000"})

    first = await apply_topics(settings, topics)

    assert outcome(first, topics.analytics.name) == TopicApplied(
        topics.analytics.name, False, "altered: cleanup.policy delete -> compact", altered=True)
    assert outcome(first, topics.validations.name).detail == "altered: retention.ms 1000 -> 2592000000"
    assert await current(settings, "analytics", "validations") == {
        topics.analytics.name: {"cleanup.policy": "compact"},
        topics.validations.name: {"cleanup.policy": "delete", "retention.ms": "2592000000"}}
    again = await apply_topics(settings, topics)
    assert {o.detail for o in again} == {"configs as in topics.yaml"}


@pytest.fixture
def broker_without_incremental_alter_configs(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every connection of this process forgets API 44 once it has learnt the broker's versions, as Apache Kafka
    before 2.3 answers ApiVersions."""
    send = AIOKafkaConnection.send

    def send_without_api_44(conn: AIOKafkaConnection, request: Any, expect_response: bool = True) -> Any:
        conn._versions.pop(44, None)
        return send(conn, request, expect_response)

    monkeypatch.setattr(AIOKafkaConnection, "send", send_without_api_44)
    yield


@pytest.mark.usefixtures("broker_without_incremental_alter_configs")
async def test_a_broker_that_cannot_alter_configs_gets_the_difference_reported(broker: EmbeddedBroker) -> None:
    settings = make_settings(broker)
    topics = topics_for(settings.topic_prefix)
    await made_by_hand(settings, analytics={"cleanup.policy": "delete"})

    outcomes = await apply_topics(settings, topics)

    analytics = outcome(outcomes, topics.analytics.name)
    assert not analytics.altered
    assert analytics.detail == ("NOT altered, the broker cannot alter topic configs (it offers no "
                                "IncrementalAlterConfigs): cleanup.policy delete -> compact")
    assert await current(settings, "analytics") == {topics.analytics.name: {"cleanup.policy": "delete"}}
    assert outcome(outcomes, topics.validations.name).created
