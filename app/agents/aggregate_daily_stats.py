"""Aggregates daily statistics: consumes stats-partials (key task_id: the executors' and validators' per-batch
summaries), merges them into each task's open daily windows (the daily-windows changelog), and produces each day's
DailyStats to analytics once, when the day closes (end + grace), traffic or not."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Any

import faust

from app.agents.plumbing import EventDeadLetters, owned_values, raw_topic
from app.contract.codecs import DecodeError, codec_for
from app.contract.records import DailyStats, StatsPartial, utc_now
from app.contract.topics import Topics
from app.domain.daily_stats import StatsKey
from app.domain.open_windows import OpenWindows
from app.kafka.partitioned_state import NotOwned, PartitionedState
from app.settings import Settings

# A task's windows live with the partition its key falls in, so exactly one worker owns them. A partial for a day
# already closed is late: dropped, logged and counted (`late`).

log = logging.getLogger(__name__)
_BATCH = 1000  # events merged before their windows go to the changelog
_BATCH_WITHIN_S = 0.05  # or once this long has passed since the batch's first event
_YIELD_EVERY = 50  # events merged between two turns of the event loop


class AggregateDailyStats:
    """The daily-analytics agent of a worker, registered on its faust app."""

    def __init__(self, app: faust.App, settings: Settings, topics: Topics) -> None:
        self._app = app
        self.windows = settings.daily_windows()
        self._partials = codec_for(StatsPartial, settings, topics.stats_partials)
        self._daily = codec_for(DailyStats, settings, topics.analytics)
        self._source = topics.stats_partials.name
        self._analytics = raw_topic(app, topics.analytics)
        self._dead_letters = EventDeadLetters(app, settings, topics)
        self.state: PartitionedState[OpenWindows] = PartitionedState(
            settings, topics.daily_windows, self._send, self._decode,
            lambda opened: opened.to_json() if opened else None)  # no open window left: a tombstone
        self.late = 0  # partials dropped because their day had closed
        self.closed = 0  # days emitted to analytics
        self.redelivered = 0  # messages merged before a crash and delivered again: skipped
        app.agent(raw_topic(app, topics.stats_partials), name="aggregate_daily_stats")(
            self._consume)
        app.timer(settings.analytics_close_interval_s, name="close_daily_windows")(self._close)
        app.on_partitions_assigned.connect(self._on_assigned)
        app.on_partitions_revoked.connect(self._on_revoked)

    async def _consume(self, stream: Any) -> None:
        """Merges events a batch at a time: a task's windows change in memory for each event, then go to the
        changelog once per batch (one record per task touched, acknowledged before faust acks the batch's
        events): record by record, each event would cost a changelog round trip."""
        async for events in stream.take_events(_BATCH, within=_BATCH_WITHIN_S):
            touched: dict[tuple[int, bytes], OpenWindows] = {}
            for index, event in enumerate(events):
                if index % _YIELD_EVERY == _YIELD_EVERY - 1:
                    await asyncio.sleep(0)  # a batch merges for milliseconds: the executor's batches go between
                message = event.message
                try:
                    partial = self._partials.decode(event.value)
                    await self._merge(message.partition, partial, message.topic, message.offset, touched)
                except NotOwned:
                    continue  # the partition moved: its new owner reads this event again
                except DecodeError as exc:
                    await self._dead_letters.send(event, str(exc), "DecodeError")
                except ValueError as exc:  # another zone, an impossible date, a corrupt sketch: this message only
                    await self._dead_letters.send(event, f"cannot be aggregated: {exc}", type(exc).__name__)
                except Exception as exc:  # a bug: this message only, the stream goes on
                    log.exception("daily stats failed at %s:%d:%d", message.topic, message.partition, message.offset)
                    await self._dead_letters.send(event, f"daily stats failed: {exc}", type(exc).__name__)
            for (partition, key), opened in touched.items():
                await self._write(partition, key, opened)

    async def _write(self, partition: int, key: bytes, opened: OpenWindows) -> None:
        """A task's windows to the changelog, also when the partition moved at an await: read back by its next
        owner (this worker again, or another), the windows' marks say which offsets they merged. A failed write
        is logged; the task's next write carries the whole state."""
        try:
            await self.state.put(partition, key, opened)
        except Exception:
            log.exception("daily windows of %s (partition %d) not written; the next change writes them",
                          opened.task_id, partition)

    async def _merge(self, partition: int, partial: StatsPartial, topic: str, offset: int,
                     touched: dict[tuple[int, bytes], OpenWindows]) -> None:
        owned = await owned_values(self._app, self.state, partition)
        key = partial.task_id.encode()
        opened = touched.get((partition, key)) or owned.get(key) or OpenWindows(partial.task_id, self.windows)
        if opened.merged(topic, offset):  # redelivered after a crash: its changes are in the changelog already
            self.redelivered += 1
            return
        if not opened.add(partial, utc_now()):
            self.late += 1
            log.warning("late stats of %s v%s for %s dropped (closed at %s; %d late so far)", partial.task_id,
                        partial.version, partial.date, self.windows.closes_at(self.windows.of_date(partial.date)),
                        self.late)
            return
        opened.mark(topic, offset)
        touched[(partition, key)] = opened

    async def _close(self) -> None:
        """Emit and forget every owned window that has closed: days close on time without new traffic."""
        now = utc_now()
        for partition, owned in list(self.state.owned()):
            for key, opened in list(owned.items()):
                if not self.state.owns(partition):
                    break  # moved at an await: its new owner closes the rest
                try:
                    await self._close_one(partition, key, opened, now)
                except Exception:
                    log.exception("closing the daily windows of %s failed; the next run tries again", opened.task_id)

    async def _close_one(self, partition: int, key: bytes, opened: OpenWindows, now: datetime) -> None:
        before = dict(opened.stats)
        closed = opened.close(now)
        if not closed:
            return
        try:
            for daily in closed:  # emitted before it is forgotten: a crash in between emits it again
                key_of = StatsKey(daily.task_id, daily.version, daily.date).encode().encode()
                await self._analytics.send(key=key_of, value=self._daily.encode(daily))
            await self._app.producer.flush()
            await self.state.put(partition, key, opened)
        except BaseException:
            opened.stats.clear()  # not forgotten: the next run closes them again
            opened.stats.update(before)
            raise
        self.closed += len(closed)
        log.info("closed %d daily window(s) of %s", len(closed), opened.task_id)

    def _decode(self, key: bytes, value: bytes) -> OpenWindows:
        return OpenWindows.from_json(key.decode(), value, self.windows)

    async def _send(self, topic: str, key: bytes, value: bytes | None, partition: int) -> None:
        await self._app.producer.send_and_wait(topic, key, value, partition, None, None)

    def _on_assigned(self, _: Any, /, *args: Any, signal: Any, **__: Any) -> None:
        # The whole assignment: partitions newly assigned are read back, those no longer here forgotten.
        assigned: set[Any] = args[0]
        self.state.assign(tp.partition for tp in assigned if tp.topic == self._source)

    def _on_revoked(self, _: Any, /, *args: Any, signal: Any, **__: Any) -> None:
        revoked: set[Any] = args[0]
        self.state.revoke(tp.partition for tp in revoked if tp.topic == self._source)
