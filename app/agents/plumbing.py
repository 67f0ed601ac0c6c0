"""What the faust agents share: raw-bytes topics from the registry (each agent decodes with the wire format's
codec itself, so bad bytes become dead letters rather than a stopped stream), dead letters of events, and the
per-partition state of an event's partition across a rebalance."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, TypeVar

import faust

from app.contract.codecs import codec_for
from app.contract.records import DeadLetter, utc_now
from app.contract.topics import Topics, TopicSpec
from app.kafka.partitioned_state import NotOwned, PartitionedState
from app.settings import Settings

log = logging.getLogger(__name__)
V = TypeVar("V")


def raw_topic(app: faust.App, *specs: TopicSpec) -> Any:
    """A faust topic over one or more registry topics, carrying bytes keys and values."""
    return app.topic(*(spec.name for spec in specs), key_type=bytes, value_type=bytes, key_serializer="raw",
                     value_serializer="raw", partitions=specs[0].partitions)


def changelog_table(app: faust.App, spec: TopicSpec, **options: Any) -> Any:
    """A faust table of JSON values by bytes keys, named by its changelog topic's key in the registry and kept
    in that (compacted) topic."""
    return app.Table(
        spec.key, key_type=bytes, partitions=spec.partitions,
        changelog_topic=app.topic(spec.name, key_type=bytes, key_serializer="raw", value_serializer="json",
                                  partitions=spec.partitions, compacting=True),
        **options,
    )


class EventDeadLetters:
    """Sends the dead letter of a faust event that could not be processed: the reason and the original bytes,
    topic, partition and offset. One per agent."""

    def __init__(self, app: faust.App, settings: Settings, topics: Topics) -> None:
        self._worker_id = settings.worker_id
        self._codec = codec_for(DeadLetter, settings, topics.dead_letters)
        self._topic = raw_topic(app, topics.dead_letters)

    async def send(self, event: Any, reason: str, error_type: str) -> None:
        """Send it; one that cannot be sent is logged with its source and the reason, and the stream goes on (a
        faust agent that raises stops serving its partitions)."""
        message = event.message
        try:
            await self._send(event, reason, error_type)
        except Exception:
            log.exception("dead letter of %s:%d:%d not sent (reason: %s)", message.topic, message.partition,
                          message.offset, reason)

    async def _send(self, event: Any, reason: str, error_type: str) -> None:
        message = event.message
        letter = DeadLetter(
            reason=reason, error_type=error_type, source_topic=message.topic, source_partition=message.partition,
            source_offset=message.offset, key=message.key, value=message.value, worker_id=self._worker_id,
            dead_lettered_at=utc_now(),
        )
        await self._topic.send(key=letter.key, value=self._codec.encode(letter))


async def owned_values(app: faust.App, state: PartitionedState[V], partition: int) -> dict[bytes, V]:
    """The state of an event's partition, once read back. A rebalance revokes every partition and may assign
    this one again: then its events in hand are processed after all, since faust commits the offset of an
    event acknowledged meanwhile (skipping it would lose it). NotOwned once the rebalance has given the
    partition to another worker, which reads the event again."""
    while True:
        try:
            return await state.values_of(partition)
        except NotOwned:
            if not app.rebalancing:
                raise
            await asyncio.sleep(0.1)
