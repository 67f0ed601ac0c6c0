"""Decides canary rollouts: consumes stats-partials (validated and matched counts) and anomaly-signals, produces a
canary decision and the task's new spec when a canary has shown itself better or worse, or has a signal against it
(app/domain/canary.py)."""

from __future__ import annotations

import logging
from typing import Any

import faust

from app.agents.plumbing import EventDeadLetters, changelog_table, raw_topic
from app.contract.codecs import DecodeError, codec_for, json_codec
from app.contract.records import (
    AnomalySignal,
    CanaryAction,
    CanaryDecision,
    StatsPartial,
    TaskSpec,
    utc_now,
)
from app.contract.topics import Topics
from app.domain.canary import Accuracy, decide, signals_against
from app.domain.sampling import Sampler
from app.kafka.tables import TableReader
from app.settings import Settings

# Both inputs are keyed by task_id and co-partitioned, so one worker owns a task; the validators' partials carry the
# counts, kept with the signals per task version in faust tables. Promoted: the candidate becomes active; rolled back:
# the canary ends.

log = logging.getLogger(__name__)
_SIGNALS_KEPT = 20  # per task version: a decision needs one; the newest few say enough on the record


class DecideCanaries:
    """The canary agent of a worker, registered on its faust app."""

    def __init__(self, app: faust.App, settings: Settings, topics: Topics, tables: TableReader,
                 sampler: Sampler | None = None) -> None:
        self._settings = settings
        self._sampler = sampler  # adaptive sampling learns recent disagreement from the validations seen here
        self._tables = tables
        self._partials = codec_for(StatsPartial, settings, topics.stats_partials)
        self._signals = codec_for(AnomalySignal, settings, topics.anomaly_signals)
        self._stored_signals = json_codec(AnomalySignal)  # the table's own format, whatever the wire's
        self._signals_topic = topics.anomaly_signals.name
        self._decisions = codec_for(CanaryDecision, settings, topics.canary_decisions)
        self._specs = codec_for(TaskSpec, settings, topics.task_specs)
        self._decisions_topic = raw_topic(app, topics.canary_decisions)
        self._specs_topic = raw_topic(app, topics.task_specs)
        self._dead_letters = EventDeadLetters(app, settings, topics)
        # Canaries decided here, by (task, candidate, when the canary was started): a decision takes a moment to
        # come back through the task table, and the same version may go on canary again later.
        self._decided: set[tuple[str, int, object]] = set()
        # b"task/version" -> [validated, matched]
        self.accuracy = changelog_table(app, topics.canary_accuracy)
        # b"task/version" -> the latest signals against that version, as JSON texts, oldest first
        self.signals = changelog_table(app, topics.canary_signals)
        app.agent(raw_topic(app, topics.stats_partials, topics.anomaly_signals), name="decide_canaries")(
            self._consume)

    def accuracy_of(self, task_id: str, version: int | None) -> Accuracy:
        """A task version's validated and matched counts so far (none for no version)."""
        counts = self.accuracy.get(f"{task_id}/{version}".encode()) if version is not None else None
        return Accuracy(*counts) if counts else Accuracy()

    def signals_of(self, task_id: str, version: int) -> list[AnomalySignal]:
        """The newest anomaly signals kept against a task version (_SIGNALS_KEPT at most)."""
        stored = self.signals.get(f"{task_id}/{version}".encode()) or []
        return [self._stored_signals.decode(text.encode()) for text in stored]

    async def _consume(self, stream: Any) -> None:
        await self._tables.ready.wait()  # the app may start before the worker's tables are read
        async for event in stream.events():
            try:
                if event.message.topic == self._signals_topic:
                    await self._take_signal(self._signals.decode(event.value))
                else:
                    await self._take_partial(self._partials.decode(event.value))
            except DecodeError as exc:
                await self._dead_letters.send(event, str(exc), "DecodeError")
            except Exception as exc:  # one message's failure must not stop the stream
                log.exception("canary decision failed at %s:%d:%d", event.message.topic, event.message.partition,
                              event.message.offset)
                await self._dead_letters.send(event, f"canary decision failed: {exc}", type(exc).__name__)

    async def _take_partial(self, partial: StatsPartial) -> None:
        if not partial.validated:  # an executor's partial: results, no validations
            return
        if self._sampler is not None:
            self._sampler.observe_validations(partial.task_id, partial.validated, partial.matched)
        key = f"{partial.task_id}/{partial.version}".encode()
        accuracy = self.accuracy_of(partial.task_id, partial.version).add(partial.validated, partial.matched)
        self.accuracy[key] = accuracy.counts()
        await self._maybe_decide(partial.task_id)

    async def _take_signal(self, signal: AnomalySignal) -> None:
        if signal.version is None:
            return  # results of no version: no canary to count it against
        key = f"{signal.task_id}/{signal.version}".encode()
        kept = [*(self.signals.get(key) or []), self._stored_signals.encode(signal).decode()]
        self.signals[key] = kept[-_SIGNALS_KEPT:]
        await self._maybe_decide(signal.task_id)

    async def _maybe_decide(self, task_id: str) -> None:
        task = self._tables.tasks.get(task_id)
        if task is None or task.canary_version is None:
            return
        canary = (task_id, task.canary_version, task.updated_at)
        if canary in self._decided:
            return
        candidate = self.accuracy_of(task_id, task.canary_version)
        active = self.accuracy_of(task_id, task.active_version)
        # The spec's updated_at is when the canary started (or was last changed: a signal seen while it ran
        # has been decided on already).
        signals = signals_against(self.signals_of(task_id, task.canary_version), task.canary_version,
                                  task.updated_at)
        decision = decide(candidate, active, task.accuracy_target, self._settings.canary_min_validations,
                          self._settings.canary_margin, signals)
        if decision.action == "wait":
            return
        promoted = decision.action == "promote"
        spec = task.model_copy(update={
            "active_version": task.canary_version if promoted else task.active_version,
            "canary_version": None, "canary_percent": 0.0, "updated_at": utc_now(),
        })
        record = CanaryDecision(
            task_id=task_id, candidate_version=task.canary_version, active_version=task.active_version,
            action=CanaryAction.PROMOTED if promoted else CanaryAction.ROLLED_BACK, reason=decision.reason,
            candidate_accuracy=candidate.rate, active_accuracy=active.rate, validations=candidate.validated,
            decided_at=utc_now(),
        )
        await self._specs_topic.send(key=task_id.encode(), value=self._specs.encode(spec))
        await self._decisions_topic.send(key=task_id.encode(), value=self._decisions.encode(record))
        self._decided.add(canary)  # once sent: a send that failed is tried again at the next partial
        log.info("canary of %s v%d %s: %s", task_id, task.canary_version, record.action.value, decision.reason)
