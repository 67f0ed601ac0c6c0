"""Triage of a fetch of execution-requests: in, its messages by partition; out, the requests to run (each with its
plan and message, and the mark of its record), while every other request gets its rejected result or dead letter
in the answers that go out at once."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from aiokafka import TopicPartition

from app.contract.codecs import DecodeError, codec_for
from app.contract.records import ExecutionRequest, utc_now
from app.contract.topics import Topics
from app.domain.resolution import ExecutionPlan, Refused, Resolver, SchemaValidators
from app.domain.results import rejected_fields
from app.kafka.lanes import Answers
from app.kafka.outcomes import Message, dead_letter_for
from app.kafka.progress import Mark, Segment
from app.kafka.tables import TableReader
from app.settings import Settings

log = logging.getLogger(__name__)
Pending = tuple[ExecutionRequest, ExecutionPlan, Message]
Track = Callable[[TopicPartition, list[Message]], Segment]  # Pipeline.track


class RequestTriage:
    """Decodes each request and resolves it against the tables as they are at its fetch. `refusal(task_id)` says
    why a task's requests are refused before resolution (a suspended task), None when they are not."""

    def __init__(self, settings: Settings, topics: Topics, tables: TableReader,
                 refusal: Callable[[str], str | None] | None = None) -> None:
        self._requests = codec_for(ExecutionRequest, settings, topics.execution_requests)
        self._tables = tables
        self._validators = SchemaValidators()  # kept across fetches: a task's schema is compiled once
        self._worker_id = settings.worker_id
        self._default_timeout_ms = settings.default_timeout_ms
        self._refusal = refusal

    def __call__(self, batches: dict[TopicPartition, list[Message]], track: Track,
                 out: Answers) -> tuple[list[Pending], list[Mark]]:
        """What to run of a fetch, and the records they answer; each partition's messages are tracked first. A
        refusal or dead letter is added to `out` with its record's mark; an error is caught per message."""
        now = utc_now()
        pending: list[Pending] = []
        marks: list[Mark] = []
        decode, worker_id = self._requests.decode, self._worker_id
        resolve = Resolver(self._tables.tasks.get, self._tables.artifacts.version, self._validators,
                           self._default_timeout_ms)
        refusal = self._refusal
        for tp, messages in batches.items():
            segment = track(tp, messages)
            for index, message in enumerate(messages):
                mark = (segment, index)
                try:
                    value = message.value
                    if value is None:
                        out.letters.append(dead_letter_for(message, "message has no value", "EmptyMessage",
                                                           worker_id))
                        out.marks.append(mark)
                        continue
                    try:
                        request = decode(value)
                    except DecodeError as exc:
                        self._undecodable(message, exc, now, out)
                        out.marks.append(mark)
                        continue
                    why = refusal(request.task_id) if refusal is not None else None
                    decision = resolve(request) if why is None else Refused(why, request.version)
                    if type(decision) is ExecutionPlan:
                        pending.append((request, decision, message))
                        marks.append(mark)
                    else:
                        assert isinstance(decision, Refused)
                        out.results.append((rejected_fields(request.task_id, request.request_id, decision.message,
                                                            now, worker_id, decision.version), message))
                        out.marks.append(mark)
                except Exception as exc:  # a bug must not cost the request: it goes to the dead letters
                    log.exception("request at %s:%d failed", message.topic, message.offset)
                    out.letters.append(dead_letter_for(message, f"internal error: {exc}", type(exc).__name__,
                                                       worker_id))
                    out.marks.append(mark)
        return pending, marks

    def _undecodable(self, message: Message, error: DecodeError, now: datetime, out: Answers) -> None:
        """A request that names itself gets its one result, saying why it was refused; else a dead letter."""
        fields = self._requests.loose(message.value) or {}
        request_id, task_id = fields.get("request_id"), fields.get("task_id")
        if isinstance(request_id, str) and request_id and isinstance(task_id, str) and task_id:
            out.results.append((rejected_fields(task_id, request_id, str(error), now, self._worker_id), message))
        else:
            out.letters.append(dead_letter_for(message, str(error), "DecodeError", self._worker_id))
