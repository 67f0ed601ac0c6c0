"""The outcome plumbing's start-up: a service whose clients cannot start leaves none of them open."""

import socket

import pytest
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaConnectionError

from app.contract.topics import topics_for
from app.kafka.clients import make_consumer, make_producer
from app.kafka.outcomes import start_answering
from app.settings import Settings


class _Ignore(ConsumerRebalanceListener):
    async def on_partitions_revoked(self, revoked: object) -> None:
        pass

    async def on_partitions_assigned(self, assigned: object) -> None:
        pass


async def test_clients_that_cannot_start_are_stopped_before_the_error_is_raised() -> None:
    with socket.socket() as closed:  # a port nothing listens on once the socket is gone
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    settings = Settings.load(None, bootstrap_servers=f"127.0.0.1:{port}")
    producer, consumer = make_producer(settings), make_consumer(settings, group_id="nobody")
    with pytest.raises(KafkaConnectionError):
        await start_answering(consumer, producer, settings, topics_for("t-"), "t-requests", _Ignore())
    assert producer._closed and consumer._closed  # no "Unclosed AIOKafkaProducer" left to the collector
