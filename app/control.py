"""The control plane: creates tasks and publishes/activates program artifacts on the compacted topics.

Reads the current tables first (to the true end), so versions and activations build on what is there.
"""

from __future__ import annotations

import hashlib
from types import TracebackType
from typing import Any

import jsonschema
from aiokafka import AIOKafkaProducer

from app.codecs import codec_for
from app.domain.programs import check_source, complexity_of
from app.kafka import make_producer, partition_for
from app.metadata import topic_partitions
from app.records import ProgramArtifact, ProgramStatus, SynthesisStrategy, TaskSpec, utc_now
from app.settings import Settings
from app.tables import TableReader, artifact_key
from app.topics import topics_for


class ControlError(ValueError):
    """An operation that cannot be done as asked; the message says why."""


class ControlPlane:
    """Use as `async with ControlPlane(settings) as control:`."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._topics = topics_for(settings.topic_prefix)
        self.tables = TableReader(settings, self._topics.task_specs, self._topics.program_artifacts)
        self._producer: AIOKafkaProducer
        self._tasks_codec = codec_for(TaskSpec, settings.wire_format)
        self._artifacts_codec = codec_for(ProgramArtifact, settings.wire_format)
        self._partitions: dict[str, int] = {}

    async def __aenter__(self) -> ControlPlane:
        await self.tables.start()
        self._producer = make_producer(self._settings)
        try:
            await self._producer.start()
            # The cluster's partition counts, which may differ from topics.yaml for topics made elsewhere.
            self._partitions = {
                spec.name: len(await topic_partitions(self._producer, spec.name))
                for spec in (self._topics.task_specs, self._topics.program_artifacts)
            }
        except BaseException:
            await self._producer.stop()
            await self.tables.stop()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._producer.stop()
        await self.tables.stop()

    def task(self, name: str) -> TaskSpec:
        task = self.tables.tasks.get(name)
        if task is None:
            raise ControlError(f"unknown task {name!r}; create it with `loopai task create {name}`")
        return task

    async def put_task(self, task: TaskSpec) -> TaskSpec:
        """Create or replace a task (keeps its active version unless the new spec sets one)."""
        if task.input_schema is not None:
            _check_json_schema(task.input_schema, "input_schema")
        if task.output_schema is not None:
            _check_json_schema(task.output_schema, "output_schema")
        current = self.tables.tasks.get(task.name)
        if current is not None and task.active_version is None:
            task = task.model_copy(update={"active_version": current.active_version})
        await self._send_task(task)
        return task

    async def publish(
        self,
        task_id: str,
        source: str,
        *,
        version: int | None = None,
        activate: bool = False,
        **details: Any,
    ) -> ProgramArtifact:
        """Check and publish a program as a new version of a task (the next number unless given)."""
        task = self.task(task_id)
        check_source(source)
        versions = self.tables.artifacts.versions_of(task_id)
        if version is None:
            version = max(versions, default=0) + 1
        elif version in versions:
            raise ControlError(f"task {task_id!r} already has version {version}; versions are immutable")
        digest = hashlib.sha256(source.encode()).hexdigest()[:12]
        artifact = ProgramArtifact(
            task_id=task_id,
            version=version,
            program_id=f"{task_id}-v{version}-{digest}",
            source_code=source,
            complexity_metrics=complexity_of(source),
            created_at=utc_now(),
            status=ProgramStatus.VALIDATED,
            synthesis_strategy=SynthesisStrategy(details.pop("synthesis_strategy", "manual")),
            **details,
        )
        key = artifact_key(task_id, version).encode()
        spec = self._topics.program_artifacts
        await self._producer.send_and_wait(
            spec.name, self._artifacts_codec.encode(artifact), key=key,
            partition=partition_for(task_id.encode(), self._partitions[spec.name]),
        )
        self.tables.artifacts.apply(key, self._artifacts_codec.encode(artifact), -1)
        if activate:
            await self.activate(task.name, version)
        return artifact

    async def activate(self, task_id: str, version: int) -> TaskSpec:
        """Make a published version the active one (also how to roll back)."""
        task = self.task(task_id)
        self._check_published(task_id, version)
        updated = task.model_copy(update={"active_version": version, "updated_at": utc_now()})
        await self._send_task(updated)
        return updated

    def check_request_target(self, task_id: str, version: int | None = None) -> None:
        """Raise ControlError unless the task exists and a pinned version is published: a request that
        fails this could only be rejected."""
        self.task(task_id)
        if version is not None:
            self._check_published(task_id, version)

    def _check_published(self, task_id: str, version: int) -> None:
        if self.tables.artifacts.version(task_id, version) is None:
            published = sorted(self.tables.artifacts.versions_of(task_id))
            raise ControlError(f"task {task_id!r} has no version {version}; published: {published or 'none'}")

    async def _send_task(self, task: TaskSpec) -> None:
        spec = self._topics.task_specs
        value = self._tasks_codec.encode(task)
        key = task.name.encode()
        await self._producer.send_and_wait(
            spec.name, value, key=key, partition=partition_for(key, self._partitions[spec.name])
        )
        self.tables.tasks.apply(key, value, -1)


def _check_json_schema(schema: dict[str, Any], field: str) -> None:
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ControlError(f"{field} is not a valid JSON Schema: {exc.message}") from exc
