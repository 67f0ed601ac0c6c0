"""What the faust agents share: raw-bytes topics from the registry (each agent decodes with the wire format's
codec itself, so bad bytes become dead letters rather than a stopped stream) and dead letters of events."""

from __future__ import annotations

from typing import Any

import faust

from app.records import DeadLetter, utc_now
from app.topics import TopicSpec


def raw_topic(app: faust.App, *specs: TopicSpec) -> Any:
    """A faust topic over one or more registry topics, carrying bytes keys and values."""
    return app.topic(*(spec.name for spec in specs), key_type=bytes, value_type=bytes, key_serializer="raw",
                     value_serializer="raw", partitions=specs[0].partitions)


def event_dead_letter(event: Any, reason: str, error_type: str, worker_id: str) -> DeadLetter:
    """The dead letter of a faust event that could not be processed: the reason and the original bytes."""
    message = event.message
    return DeadLetter(
        reason=reason, error_type=error_type, source_topic=message.topic, source_partition=message.partition,
        source_offset=message.offset, key=message.key, value=message.value, worker_id=worker_id,
        dead_lettered_at=utc_now(),
    )
