"""Detects anomalies: consumes stats-partials and the task table (each task's targets), produces to anomaly-signals (key
task_id) one AnomalySignal per incident in a task version's error rate, p99 latency or accuracy (docs/anomalies.md)."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import faust
from faust.types import TP

from app.agents.plumbing import EventDeadLetters, raw_topic
from app.contract.codecs import DecodeError, codec_for
from app.contract.records import AnomalySignal, StatsPartial, utc_now
from app.contract.topics import Topics
from app.domain.anomaly_targets import Targets
from app.domain.anomaly_watch import AnomalyWatch
from app.kafka.tables import TableReader
from app.settings import Settings

# stats-partials are keyed by task_id, so each task has one owner. A timer closes the minutes of tasks that went
# quiet.

log = logging.getLogger(__name__)


class DetectAnomalies:
    """The anomaly detection of a worker, registered on its faust app.

    The detector's state lives in memory only: after a restart or a rebalance a task's baseline is learned again
    from its next `anomaly_baseline_minutes` of traffic, and its open minutes are lost. A changelog-backed
    baseline would not agree with the committed offsets (faust writes changelogs and commits source offsets
    separately, so a restored baseline may have learned minutes that are read again), and faust's table recovery
    on the embedded broker comes back stale (app/kafka/tables.py), so no test could show it right.
    """

    def __init__(self, app: faust.App, settings: Settings, topics: Topics, tables: TableReader) -> None:
        self._tables = tables
        self.watch = AnomalyWatch(settings.anomaly_thresholds(), timedelta(seconds=settings.anomaly_lateness_s),
                                  timedelta(seconds=settings.anomaly_idle_s), settings.target_limits(),
                                  self._targets_of)
        self._partials = codec_for(StatsPartial, settings, topics.stats_partials)
        self._signals = codec_for(AnomalySignal, settings, topics.anomaly_signals)
        self._partials_topic = topics.stats_partials.name
        self._signals_topic = raw_topic(app, topics.anomaly_signals)
        self._dead_letters = EventDeadLetters(app, settings, topics)
        self._tasks_by_partition: dict[int, set[str]] = {}
        self._dropped_reported = 0
        app.agent(raw_topic(app, topics.stats_partials), name="detect_anomalies")(self._consume)
        app.timer(settings.anomaly_tick_s, name="close_idle_minutes")(self._tick)
        app.on_partitions_revoked.connect(self._forget_revoked)

    def _targets_of(self, task_id: str) -> Targets | None:
        spec = self._tables.tasks.get(task_id)
        return None if spec is None else Targets.of(spec)

    async def _consume(self, stream: Any) -> None:
        await self._tables.ready.wait()  # a task's first partials must not pass before its targets are known
        async for event in stream.events():
            try:
                partial = self._partials.decode(event.value)
                signals = self.watch.add(partial, utc_now())
            except DecodeError as exc:
                await self._dead_letters.send(event, str(exc), "DecodeError")
                continue
            except Exception as exc:  # a bad sketch, say: one message must not stop the stream
                log.exception("anomaly detection failed at %s:%d", event.message.topic, event.message.offset)
                await self._dead_letters.send(event, f"anomaly detection failed: {exc}", type(exc).__name__)
                continue
            self._tasks_by_partition.setdefault(event.message.partition, set()).add(partial.task_id)
            await self._send(signals)

    async def _tick(self) -> None:
        try:
            signals = self.watch.tick(utc_now())
        except Exception:  # a timer that raises takes the worker down; the next tick judges again
            log.exception("anomaly tick failed")
            return
        await self._send(signals)
        if self.watch.dropped_late > self._dropped_reported:
            log.warning("%d partial(s) came after their minute was judged (anomaly_lateness_s is %g s)",
                        self.watch.dropped_late - self._dropped_reported, self.watch.lateness.total_seconds())
            self._dropped_reported = self.watch.dropped_late

    async def _forget_revoked(self, app: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        # Another worker judges these tasks from now on; judging them here too would send their signals twice.
        revoked: set[TP] = args[0]  # faust's signal passes the revoked partitions as its one argument
        for tp in revoked:
            if tp.topic == self._partials_topic:
                self.watch.forget(self._tasks_by_partition.pop(tp.partition, set()))

    async def _send(self, signals: list[AnomalySignal]) -> None:
        """Each signal on its own: one that cannot be sent is logged with what it said, and the others go."""
        for signal in signals:
            log.info("anomaly in %s v%s: %s", signal.task_id, signal.version, signal.hint)
            try:
                await self._signals_topic.send(key=signal.task_id.encode(), value=self._signals.encode(signal))
            except Exception:
                log.exception("anomaly signal of %s v%s not sent (%s)", signal.task_id, signal.version, signal.hint)
