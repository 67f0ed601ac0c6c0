"""faust's table recovery, read to each changelog partition's true end: consumes the changelog partitions a table
recovers, produces their end offsets as a real fetch response's high watermark says them."""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Iterable
from typing import Any

from aiokafka import TopicPartition
from faust.tables.recovery import Recovery

from app.kafka.clients import make_consumer
from app.settings import Settings

# faust reads a table's changelog back up to the end offsets ListOffsets(latest) answers; the embedded broker answers
# the base offset of the last record batch + 1, so a recovery stopped short of that batch's later records, and faust
# crashed a worker whose table had already read past that answer (`ConsistencyError: The persisted offset ... is
# higher than the last offset in that topic`). The true end is the high watermark of a real fetch response (as
# app/kafka/tables.py reads its tables).

log = logging.getLogger(__name__)

_settings_of: weakref.WeakKeyDictionary[Any, Settings] = weakref.WeakKeyDictionary()
_faust_build_highwaters = Recovery._build_highwaters


async def true_end_offsets(settings: Settings, partitions: Iterable[TopicPartition],
                           timeout_s: float = 10.0) -> dict[TopicPartition, int]:
    """Each partition's end offset as a fetch response's high watermark says it."""
    wanted = list(partitions)
    consumer = make_consumer(settings, fetch_max_wait_ms=50)
    await consumer.start()
    try:
        consumer.assign(wanted)
        await consumer.seek_to_end(*wanted)  # the broker's answer: at or short of the true end
        ends: dict[TopicPartition, int] = {}
        async with asyncio.timeout(timeout_s):
            while len(ends) < len(wanted):
                await consumer.getmany(timeout_ms=50)
                ends.update((tp, end) for tp in wanted if (end := consumer.highwater(tp)) is not None)
        return ends
    finally:
        await consumer.stop()


async def _build_true_highwaters(self: Recovery, consumer: Any, tps: set[Any], destination: Any, title: str) -> None:
    await _faust_build_highwaters(self, consumer, tps, destination, title)
    settings = _settings_of.get(self.app)
    if settings is None or not tps:
        return
    try:
        ends = await true_end_offsets(settings, [TopicPartition(tp.topic, tp.partition) for tp in tps])
    except Exception as exc:  # faust's own answer stands: short on the embedded broker, right on Apache Kafka
        log.warning("could not fetch the true ends of %s changelog partitions: %r", title, exc)
        return
    for tp in tps:
        last = ends.get(TopicPartition(tp.topic, tp.partition), 0) - 1  # faust keeps the last offset, not the end
        if last > destination[tp]:
            log.info("%s:%d is read back to its end by a fetch, %d, not to the end ListOffsets answered, %d",
                     tp.topic, tp.partition, last + 1, destination[tp] + 1)
            destination[tp] = last


def read_changelogs_to_their_true_end(app: Any, settings: Settings) -> None:
    """From now on, the app's table recoveries read each changelog partition to its true end."""
    _settings_of[app] = settings
    Recovery._build_highwaters = _build_true_highwaters  # type: ignore[method-assign]
