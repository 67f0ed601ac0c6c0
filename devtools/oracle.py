"""A reference oracle service: consumes oracle-requests and a JSONL file of labelled inputs ({"input": {...}, "output":
<the right output>}), produces an oracle verdict keyed by execution id for each input it has a label for."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from app.contract.codecs import DecodeError, codec_for
from app.contract.records import OracleVerdict, ValidationRequest, utc_now
from app.contract.topics import topics_for
from app.kafka.clients import make_consumer, make_producer, partition_for
from app.kafka.delivery import Outbox, deliver_all
from app.kafka.metadata import topic_partitions
from app.settings import Settings

# An input without a label gets no answer, so its validation expires (as with any oracle that cannot answer).

log = logging.getLogger(__name__)


class LabelsError(ValueError):
    """A labels file that cannot be used; the message names the line."""


def load_labels(path: Path) -> dict[bytes, Any]:
    """The labels of a JSONL file, keyed by the canonical JSON of their input."""
    labels: dict[bytes, Any] = {}
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise LabelsError(f"cannot read {path}: {exc.strerror}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = orjson.loads(line)
            labels[canonical(entry["input"])] = entry["output"]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise LabelsError(f"{path} line {number}: not an object with input and output ({exc})") from exc
    return labels


def canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


async def serve_oracle(settings: Settings, labels: dict[bytes, Any], oracle_id: str, stop: asyncio.Event,
                       on_ready: Callable[[], None] | None = None) -> int:
    """Answer oracle requests until `stop` is set; returns how many were answered. `on_ready` is called once
    both topics are known to exist. Raises TopicUnavailable for a missing topic."""
    topics = topics_for(settings.topic_prefix)
    requests = codec_for(ValidationRequest, settings, topics.oracle_requests)
    verdicts = codec_for(OracleVerdict, settings, topics.oracle_verdicts)
    producer = make_producer(settings)
    await producer.start()
    try:
        # Asked by name first: subscribing to a missing topic would wait silently (or create it, on a broker
        # that auto-creates); and verdicts go by the cluster's partition count, not the registry's.
        await topic_partitions(producer, topics.oracle_requests.name)
        partitions = len(await topic_partitions(producer, topics.oracle_verdicts.name))
    except BaseException:
        await producer.stop()
        raise
    consumer = make_consumer(settings, topics.oracle_requests.name, group_id=f"{settings.app_id}-reference-oracle",
                             **settings.group_args())
    answered = 0
    try:
        await consumer.start()
        if on_ready is not None:
            on_ready()
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=200)
            outbox: Outbox[None] = Outbox()
            for messages in batches.values():
                for message in messages:
                    try:
                        request = requests.decode(message.value)
                    except DecodeError as exc:
                        log.warning("oracle request at offset %d skipped: %s", message.offset, exc)
                        continue
                    key = canonical(request.input)
                    if key not in labels:
                        continue
                    verdict = OracleVerdict(execution_id=request.execution_id, task_id=request.task_id,
                                            output=labels[key], oracle_id=oracle_id, answered_at=utc_now())
                    eid = request.execution_id.encode()
                    outbox.add(topics.oracle_verdicts.name, partition_for(eid, partitions), eid,
                               verdicts.encode(verdict), None)
            answered += await deliver_all(producer, outbox, settings.delivery_timeout_s)
            if batches:
                await consumer.commit()
    finally:
        await consumer.stop()
        await producer.stop()
    return answered
