"""Validates sampled executions: consumes validation-requests (key task_id) and produces validations.

A label oracle compares with the expected output the request carried; a shadow oracle runs another version of
the task's program on the same input in the sandbox pool; an external oracle forwards the request to
oracle-requests (key execution_id), where an oracle service answers (see join_oracle_verdicts).
"""

from __future__ import annotations

import logging
from typing import Any

import faust

from app.agents.plumbing import EventDeadLetters, raw_topic
from app.contract.codecs import DecodeError, codec_for
from app.contract.records import OracleKind, Validation, ValidationRequest, ValidationStatus, utc_now
from app.contract.topics import Topics
from app.domain.validation import shadow_version_for, unvalidated, validated
from app.kafka.tables import TableReader
from app.sandbox.pool import Call, SandboxPool
from app.settings import Settings

log = logging.getLogger(__name__)


class ValidateExecutions:
    """The validation agent of a worker, registered on its faust app."""

    def __init__(self, app: faust.App, settings: Settings, topics: Topics, tables: TableReader,
                 pool: SandboxPool) -> None:
        self._settings = settings
        self._tables = tables
        self._pool = pool
        self._requests = codec_for(ValidationRequest, settings, topics.validation_requests)
        self._oracle_codec = codec_for(ValidationRequest, settings, topics.oracle_requests)
        self._validations = codec_for(Validation, settings, topics.validations)
        self._validations_topic = raw_topic(app, topics.validations)
        self._oracle_requests = raw_topic(app, topics.oracle_requests)
        self._dead_letters = EventDeadLetters(app, settings, topics)
        self.validated = 0
        app.agent(raw_topic(app, topics.validation_requests), name="validate_executions")(self._consume)

    async def _consume(self, stream: Any) -> None:
        await self._tables.ready.wait()  # the app may start before the worker's tables are read
        async for event in stream.events():
            try:
                request = self._requests.decode(event.value)
            except DecodeError as exc:
                await self._dead_letters.send(event, str(exc), "DecodeError")
                continue
            try:
                await self._validate(request)
            except Exception as exc:  # one request's failure must not stop the stream
                log.exception("validating %s failed", request.execution_id)
                await self._dead_letters.send(event, f"validation failed: {exc}", type(exc).__name__)

    async def _validate(self, request: ValidationRequest) -> None:
        kind = request.oracle.kind
        if kind is OracleKind.EXTERNAL:
            await self._oracle_requests.send(key=request.execution_id.encode(),
                                             value=self._oracle_codec.encode(request))
            return
        if kind is OracleKind.LABEL:
            record = validated(request, request.expected_output, utc_now())
        else:
            record = await self._shadow(request)
        await self._validations_topic.send(key=request.task_id.encode(), value=self._validations.encode(record))
        self.validated += 1

    async def _shadow(self, request: ValidationRequest) -> Validation:
        """Run the shadow version on the request's input, in the sandbox like any program."""
        version = shadow_version_for(request, self._tables.tasks.get(request.task_id))
        artifact = self._tables.artifacts.version(request.task_id, version) if version is not None else None
        if artifact is None:
            return unvalidated(request, ValidationStatus.FAILED,
                               f"no shadow version to compare with (wanted {version})", utc_now())
        timeout_s = self._settings.default_timeout_ms / 1000
        outcome = (await self._pool.run([Call(request.task_id, artifact.program_id, artifact.source_code,
                                              timeout_s, request.input)]))[0]
        if outcome.status != "ok":
            return unvalidated(request, ValidationStatus.FAILED,
                               f"shadow version {version} ended as {outcome.status}: {outcome.error}", utc_now())
        return validated(request, outcome.output, utc_now())


