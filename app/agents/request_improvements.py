"""Requests improvements: consumes validations and anomaly signals, watches each task's active version
(app/domain/improvement.py), and when it falls short produces one ImprovementRequest per incident to
improvement-requests (key task_id) (docs/improvement.md)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import faust

from app.agents.plumbing import EventDeadLetters, raw_topic
from app.contract.codecs import DecodeError, codec_for
from app.contract.records import (
    AnomalySignal,
    ImprovementRequest,
    ImprovementStatus,
    TaskSpec,
    Validation,
    utc_now,
)
from app.contract.topics import Topics
from app.domain.improvement import ImprovementWatch, Shortfall
from app.kafka.tables import TableReader, read_table
from app.settings import Settings

# Both inputs are keyed by task_id and co-partitioned, so one worker owns a task. A request carries the task's spec
# and examples, the active version and its source, the figures, and diverse failing examples.

log = logging.getLogger(__name__)
_BATCH, _BATCH_WITHIN_S = 1000, 0.05
_YIELD_EVERY = 100  # events: decoding a validation costs microseconds, and the executor shares the loop


class RequestImprovements:
    """The improvement watcher of a worker, registered on its faust app.

    Its windows live in memory: after a restart or a rebalance a task's accuracy is learned again from its next
    validations. The open incidents are not lost: at start it reads improvement-requests back (compacted, a task's
    latest request), and a task whose latest request was made for the version still active stays quiet."""

    def __init__(self, app: faust.App, settings: Settings, topics: Topics, tables: TableReader) -> None:
        self._settings = settings
        self._tables = tables
        self.watch = ImprovementWatch(settings.improvement_min_validations, settings.improvement_window,
                                      settings.improvement_alpha)
        self._validations = codec_for(Validation, settings, topics.validations)
        self._signals = codec_for(AnomalySignal, settings, topics.anomaly_signals)
        self._requests = codec_for(ImprovementRequest, settings, topics.improvement_requests)
        self._requests_spec = topics.improvement_requests
        self._signals_topic = topics.anomaly_signals.name
        self._requests_topic = raw_topic(app, topics.improvement_requests)
        self._dead_letters = EventDeadLetters(app, settings, topics)
        self.requested = 0
        app.agent(raw_topic(app, topics.validations, topics.anomaly_signals), name="request_improvements")(
            self._consume)

    async def _consume(self, stream: Any) -> None:
        await self._tables.ready.wait()  # the app may start before the worker's tables are read
        await self.recall_incidents()
        async for events in stream.take_events(_BATCH, within=_BATCH_WITHIN_S):
            for index, event in enumerate(events):
                if index % _YIELD_EVERY == _YIELD_EVERY - 1:
                    await asyncio.sleep(0)
                try:
                    await self._take(event)
                except DecodeError as exc:
                    await self._dead_letters.send(event, str(exc), "DecodeError")
                except Exception as exc:  # one message's failure must not stop the stream
                    log.exception("improvement watch failed at %s:%d:%d", event.message.topic,
                                  event.message.partition, event.message.offset)
                    await self._dead_letters.send(event, f"improvement watch failed: {exc}", type(exc).__name__)

    async def recall_incidents(self) -> None:
        """Open the incidents of requests made before this worker started, for versions still active."""
        try:
            latest = await read_table(self._settings, self._requests_spec)
        except TimeoutError as exc:  # the watch goes on; at worst one incident is asked about twice
            log.warning("improvement requests not read back: %s", exc)
            return
        for request in latest.values():
            assert isinstance(request, ImprovementRequest)
            task = self._tables.tasks.get(request.task_id)
            if task is not None and task.active_version == request.active_version:
                self.watch.open_incident(request.task_id, request.active_version)

    async def _take(self, event: Any) -> None:
        if event.message.topic == self._signals_topic:
            signal = self._signals.decode(event.value)
            task = self._tables.tasks.get(signal.task_id)
            if task is not None:
                await self._maybe_request(task, self.watch.observe_signal(signal, task.active_version))
            return
        validation = self._validations.decode(event.value)
        task = self._tables.tasks.get(validation.task_id)
        if task is not None:
            shortfall = self.watch.observe_validation(validation, task.active_version, task.accuracy_target)
            await self._maybe_request(task, shortfall)

    async def _maybe_request(self, task: TaskSpec, shortfall: Shortfall | None) -> None:
        if shortfall is None or task.canary_version is not None:
            return  # a canary is being judged already: its decision comes first
        artifact = self._tables.artifacts.version(task.name, task.active_version) if task.active_version else None
        now = utc_now()
        status, reason = ImprovementStatus.REQUESTED, shortfall.reason
        if not task.auto_improve:
            status, reason = ImprovementStatus.SKIPPED, f"{shortfall.reason}; auto_improve is off for this task"
        request = ImprovementRequest(
            improvement_id=f"{task.name}-v{task.active_version}-{now:%Y%m%dT%H%M%S}", task_id=task.name,
            status=status, trigger=shortfall.trigger, reason=reason, description=task.description,
            input_schema=task.input_schema, output_schema=task.output_schema, examples=task.examples,
            active_version=task.active_version, active_source=artifact.source_code if artifact else None,
            accuracy=shortfall.accuracy, accuracy_target=task.accuracy_target, validated=shortfall.validated,
            failing_examples=self.watch.failing_examples(task.name, self._settings.improvement_failing_examples),
            requested_at=now, updated_at=now,
        )
        await self._requests_topic.send(key=task.name.encode(), value=self._requests.encode(request))
        self.watch.open_incident(task.name, task.active_version)  # once sent: a failed send asks again next time
        self.requested += 1
        log.info("improvement of %s %s: %s", task.name, status.value, reason)
