"""What the whole loop has seen lately: consumes validations, anomaly-signals, dead-letters and improvement-requests,
produces the last N signals, dead letters and improvement records and the validations counted per task and version
since the worker started, for the dashboard and /metrics."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Iterator
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from app.contract.codecs import DecodeError, codec_for
from app.contract.records import AnomalySignal, DeadLetter, ImprovementRequest, Validation, ValidationStatus
from app.contract.topics import Topics
from app.kafka.clients import cancel_and_wait, make_consumer
from app.kafka.metadata import topic_partitions
from app.settings import Settings
from app.web.metrics import counter, gauge

log = logging.getLogger(__name__)


class RecentEvents:
    """Follows the four topics from shortly before their end: the last `web_recent_items` records of each
    signals, dead-letters and improvement-requests partition are shown at once; validations count from the end
    (this start on)."""

    def __init__(self, settings: Settings, topics: Topics) -> None:
        self._settings = settings
        self._topics = topics
        self._codecs = {spec.name: codec_for(spec.record, settings, spec)
                        for spec in (topics.validations, topics.anomaly_signals, topics.dead_letters,
                                     topics.improvement_requests)}
        keep = settings.web_recent_items
        self.signals: deque[AnomalySignal] = deque(maxlen=keep)
        self.dead_letters: deque[DeadLetter] = deque(maxlen=keep)
        self.improvements: deque[ImprovementRequest] = deque(maxlen=keep)  # requests and outcomes, as they come
        self.validations: Counter[tuple[str, str, str]] = Counter()  # (task, version, outcome) -> validations
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        consumer = self._consumer = make_consumer(self._settings, fetch_max_wait_ms=200)
        await consumer.start()
        partitions = [TopicPartition(name, p) for name in self._codecs for p in await topic_partitions(consumer, name)]
        consumer.assign(partitions)  # every partition, no group: every worker sees all of them
        await consumer.seek_to_end(*partitions)
        for tp in partitions:
            end = await consumer.position(tp)
            if tp.topic != self._topics.validations.name:
                consumer.seek(tp, max(0, end - self._settings.web_recent_items))
        self._task = asyncio.ensure_future(self._follow())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        if self._consumer is not None:
            await self._consumer.stop()

    def apply(self, topic: str, value: bytes | None) -> None:
        """One record of one of the four topics; what cannot be decoded is not shown (it is some other
        writer's problem, and the dead-letter topic is exactly where such records already are)."""
        if value is None:
            return
        try:
            record: Any = self._codecs[topic].decode(value)
        except DecodeError as exc:
            log.debug("%s: record not shown: %s", topic, exc)
            return
        if isinstance(record, Validation):
            self.validations[record.task_id, str(record.version), _outcome(record)] += 1
        elif isinstance(record, AnomalySignal):
            self.signals.append(record)
        elif isinstance(record, DeadLetter):
            self.dead_letters.append(record)
        elif isinstance(record, ImprovementRequest):
            self.improvements.append(record)

    def accuracy(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(task, version) -> (validated, matched), since the worker started."""
        seen: dict[tuple[str, str], tuple[int, int]] = {}
        for (task, version, outcome), count in self.validations.items():
            validated, matched = seen.get((task, version), (0, 0))
            if outcome in ("match", "mismatch"):
                validated += count
            if outcome == "match":
                matched += count
            seen[task, version] = (validated, matched)
        return seen

    def metrics(self) -> Iterator[Any]:
        """Validations and accuracy as read from the validations topic (the same on every worker: the whole
        loop's, not this worker's share)."""
        yield counter("loopai_validations", "Validations on the validations topic since this worker started, "
                      "by task, version and outcome (every worker counts all of them: do not sum across "
                      "workers)", ["task", "version", "outcome"],
                      (([task, version, outcome], count)
                       for (task, version, outcome), count in sorted(self.validations.items())))
        yield gauge("loopai_validation_accuracy", "Matched / validated since this worker started",
                    ["task", "version"],
                    (([task, version], matched / validated)
                     for (task, version), (validated, matched) in sorted(self.accuracy().items()) if validated))

    async def _follow(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                for tp, messages in (await self._consumer.getmany(timeout_ms=500)).items():
                    for message in messages:
                        self.apply(tp.topic, message.value)
            except KafkaError as exc:  # the dashboard can wait; the worker's watch decides when the broker is gone
                log.warning("recent events: %s; retrying", exc)
                await asyncio.sleep(1.0)


def _outcome(validation: Validation) -> str:
    if validation.status is not ValidationStatus.VALIDATED:
        return validation.status.value  # expired, failed: nothing compared
    return "match" if validation.match else "mismatch"
