"""Announces a task's suspension: in, a TaskSuspension; out, its record on task-suspensions (every worker then
refuses the task) and an anomaly signal naming it."""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaProducer

from app.contract.codecs import codec_for
from app.contract.records import AnomalySignal, TaskSuspension
from app.contract.topics import Topics
from app.domain.task_budget import signal_of
from app.kafka.delivery import describe_error
from app.settings import Settings

log = logging.getLogger(__name__)


class SuspensionNotices:
    """Sends suspensions and their signals; a notice that cannot be sent is logged (the suspension holds on the
    worker that decided it all the same)."""

    def __init__(self, settings: Settings, topics: Topics) -> None:
        self._topics = topics
        self._suspensions = codec_for(TaskSuspension, settings, topics.task_suspensions)
        self._signals = codec_for(AnomalySignal, settings, topics.anomaly_signals)

    async def announce(self, producer: AIOKafkaProducer, suspension: TaskSuspension) -> None:
        key = suspension.task_id.encode()
        try:
            await asyncio.gather(
                producer.send_and_wait(self._topics.task_suspensions.name, self._suspensions.encode(suspension),
                                       key=key),
                producer.send_and_wait(self._topics.anomaly_signals.name, self._signals.encode(signal_of(suspension)),
                                       key=key))
        except Exception as exc:
            log.error("could not announce the suspension of %s: %s", suspension.task_id, describe_error(exc))
