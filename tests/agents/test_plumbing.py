"""What the faust agents share, without a broker: raw-bytes topics of the registry, the dead letter of an event
(its original bytes and where they came from; one that cannot be sent does not stop the stream), and the state of
an event's partition across a rebalance."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import faust
import pytest

from app.agents.plumbing import EventDeadLetters, owned_values, raw_topic
from app.contract.codecs import json_codec
from app.contract.records import DeadLetter, Record
from app.contract.topics import topics_for
from app.kafka.partitioned_state import NotOwned
from app.settings import Settings
from app.worker import build_app

R = TypeVar("R", bound=Record)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(bootstrap_servers="kafka:9092", topic_prefix="p.", worker_id="w7", data_dir=tmp_path)


def event(value: bytes | None, key: bytes | None = b"k", topic: str = "p.stats-partials", partition: int = 3,
          offset: int = 41) -> Any:
    """An event as faust hands it to an agent: its value, and its message's origin and bytes."""
    message = SimpleNamespace(topic=topic, partition=partition, offset=offset, key=key, value=value)
    return SimpleNamespace(message=message, value=value)


class Events:
    """Makes events of records as faust hands them to an agent, at successive offsets: a record JSON-encoded on its
    type's topic in `topic_of`, or (topic name, bytes) as they are."""

    def __init__(self, topic_of: dict[type[Record], str]) -> None:
        self._topic_of = topic_of
        self.offset = 0

    def __call__(self, *records: Record | tuple[str, bytes], partition: int = 0) -> list[Any]:
        made = []
        for record in records:
            topic, value = record if isinstance(record, tuple) else (
                self._topic_of[type(record)], json_codec(type(record)).encode(record))
            made.append(event(value, topic=topic, partition=partition, offset=self.offset))
            self.offset += 1
        return made


@dataclass
class Sends:
    """Stands in for faust's Topic.send (install() it): what the agents sent, as (topic name, key, value); a send
    to a topic in `refusing` fails."""

    sent: list[tuple[str, bytes | None, bytes]] = field(default_factory=list)
    refusing: set[str] = field(default_factory=set)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> Sends:
        async def send(topic: Any, key: bytes | None = None, value: bytes = b"", **_: Any) -> None:
            if topic.get_topic_name() in self.refusing:
                raise ConnectionError("broker gone")
            self.sent.append((topic.get_topic_name(), key, value))

        monkeypatch.setattr(faust.topics.Topic, "send", send)
        return self

    def to(self, topic: str, model: type[R]) -> list[R]:
        """The records sent to `topic`, decoded."""
        codec = json_codec(model)
        return [codec.decode(value) for name, _, value in self.sent if name == topic]


def test_a_raw_topic_carries_bytes_of_every_registry_topic_named(settings: Settings) -> None:
    topics = topics_for(settings.topic_prefix)
    topic = raw_topic(build_app(settings), topics.stats_partials, topics.anomaly_signals)
    assert set(topic.topics) == {topics.stats_partials.name, topics.anomaly_signals.name}
    assert (topic.key_type, topic.value_type, topic.key_serializer, topic.value_serializer) == (
        bytes, bytes, "raw", "raw")
    assert topic.partitions == topics.stats_partials.partitions


async def test_a_dead_letter_carries_the_events_bytes_and_source(settings: Settings,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    sends = Sends().install(monkeypatch)
    letters = EventDeadLetters(build_app(settings), settings, topics_for(settings.topic_prefix))
    await letters.send(event(b"\xff garbage"), "not a partial", "DecodeError")
    [(topic, key, value)] = sends.sent
    letter = json_codec(DeadLetter).decode(value)
    assert topic == "p.dead-letters" and key == b"k"
    assert (letter.reason, letter.error_type, letter.value, letter.key) == ("not a partial", "DecodeError",
                                                                            b"\xff garbage", b"k")
    assert (letter.source_topic, letter.source_partition, letter.source_offset, letter.worker_id) == (
        "p.stats-partials", 3, 41, "w7")


async def test_a_dead_letter_that_cannot_be_sent_is_logged_and_the_stream_goes_on(
        settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    async def refuse(*_: Any, **__: Any) -> None:
        raise ConnectionError("broker gone")

    monkeypatch.setattr(faust.topics.Topic, "send", refuse)
    letters = EventDeadLetters(build_app(settings), settings, topics_for(settings.topic_prefix))
    with caplog.at_level(logging.ERROR, logger="app.agents.plumbing"):
        await letters.send(event(b"x"), "not a partial", "DecodeError")  # does not raise
    assert "dead letter of p.stats-partials:3:41 not sent (reason: not a partial)" in caplog.text


class Partitions:
    """A partitioned state that does not own the partition for its first `refusals` reads."""

    def __init__(self, refusals: int, app: Any, rebalanced_after: int | None = None) -> None:
        self.reads = 0
        self._refusals = refusals
        self._app = app
        self._rebalanced_after = rebalanced_after

    async def values_of(self, partition: int) -> dict[bytes, str]:
        self.reads += 1
        if self.reads == self._rebalanced_after:
            self._app.rebalancing = False
        if self.reads <= self._refusals:
            raise NotOwned(partition)
        return {b"task": f"state of {partition}"}


async def test_during_a_rebalance_the_state_is_waited_for_until_the_partition_is_owned_again() -> None:
    app: Any = SimpleNamespace(rebalancing=True)
    state = Partitions(refusals=2, app=app)
    assert await owned_values(app, state, 4) == {b"task": "state of 4"}  # type: ignore[arg-type]
    assert state.reads == 3


async def test_a_partition_given_to_another_worker_is_not_owned() -> None:
    app: Any = SimpleNamespace(rebalancing=False)
    with pytest.raises(NotOwned):
        await owned_values(app, Partitions(refusals=1, app=app), 4)  # type: ignore[arg-type]
    app.rebalancing = True  # the rebalance ends elsewhere: the partition went to another worker
    state = Partitions(refusals=5, app=app, rebalanced_after=2)
    with pytest.raises(NotOwned):
        await owned_values(app, state, 4)  # type: ignore[arg-type]
    assert state.reads == 2
