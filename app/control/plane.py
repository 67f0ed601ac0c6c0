"""The control plane: consumes commands (create and update tasks, publish/activate program artifacts, start, promote and
abort canaries, resume suspended tasks), produces them to task-specs, program-artifacts, canary-decisions and
task-suspensions, and reads a task's decisions back."""

from __future__ import annotations

import hashlib
import logging
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaProducer

from app.contract.codecs import codec_for
from app.contract.records import (
    CanaryAction,
    CanaryDecision,
    OracleKind,
    ProgramArtifact,
    ProgramStatus,
    SynthesisStrategy,
    TaskSpec,
    TaskSuspension,
    utc_now,
)
from app.contract.topics import TopicSpec, topics_for
from app.domain.programs import check_source, complexity_of
from app.domain.resolution import SchemaError, schema_validator
from app.domain.task_budget import in_force
from app.kafka.clients import make_producer, partition_for
from app.kafka.metadata import topic_partitions
from app.kafka.tables import TableReader, artifact_key, read_to_end
from app.settings import Settings

# Reads the current tables first (to the true end), so versions and activations build on what is there.

log = logging.getLogger(__name__)

# Fields of a task that have commands of their own (activate, canary, promote, abort), not update_task.
_MANAGED_FIELDS = frozenset({"name", "active_version", "canary_version", "canary_percent", "updated_at"})


class ControlError(ValueError):
    """An operation that cannot be done as asked; the message says why."""


class ControlPlane:
    """Use as `async with ControlPlane(settings) as control:`."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._topics = topics_for(settings.topic_prefix)
        self.tables = TableReader(settings, self._topics.task_specs, self._topics.program_artifacts)
        self._producer: AIOKafkaProducer
        self._tasks_codec = codec_for(TaskSpec, settings, self._topics.task_specs)
        self._artifacts_codec = codec_for(ProgramArtifact, settings, self._topics.program_artifacts)
        self._decisions_codec = codec_for(CanaryDecision, settings, self._topics.canary_decisions)
        self._suspensions_codec = codec_for(TaskSuspension, settings, self._topics.task_suspensions)
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
        """The task of this name; ControlError saying how to create it when there is none."""
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

    async def create_task(self, task: TaskSpec) -> TaskSpec:
        """Create a task; one that exists already is refused (update_task changes it)."""
        if self.tables.tasks.get(task.name) is not None:
            raise ControlError(f"task {task.name!r} already exists; change it with `loopai task update {task.name}` "
                               "(it changes only the options given)")
        self._check_task(task)
        await self._send_task(task)
        return task

    async def update_task(self, name: str, **changes: Any) -> TaskSpec:
        """Change only the given fields of a task. `oracle` is a dict of the oracle fields to change (merged
        into the task's oracle; it must name a kind when the task has none), or None to remove the oracle."""
        current = self.task(name)
        managed = sorted(_MANAGED_FIELDS & changes.keys())
        if managed:
            raise ControlError(f"update_task does not change {', '.join(managed)}: activate a version or run a "
                               "canary instead")
        if changes.get("oracle") is not None:
            changes["oracle"] = _merged_oracle(current, changes["oracle"])
        updated = TaskSpec.model_validate({**current.model_dump(), **changes, "updated_at": utc_now()})
        self._check_task(updated, shadow_published=True)
        await self._send_task(updated)
        return updated

    def suspension(self, task_id: str) -> TaskSuspension | None:
        """The task's suspension if one is in force (a worker suspended it for timing out), else None."""
        return in_force(self.tables.suspensions.get(task_id), utc_now())

    async def resume(self, task_id: str) -> TaskSuspension | None:
        """Lift a task's suspension: a resume record on task-suspensions, on which every worker lifts the
        suspensions that started no later and forgets the task's timeouts so far. Returns the suspension that was
        in force, or None (the record is written all the same: a worker may have suspended the task a moment ago,
        and its timeouts are forgotten too)."""
        self.task(task_id)
        lifted = self.suspension(task_id)
        record = TaskSuspension(task_id=task_id, suspended=False, reason="resumed by an operator",
                                updated_at=utc_now())
        spec = self._topics.task_suspensions
        key, value = task_id.encode(), self._suspensions_codec.encode(record)
        await self._producer.send_and_wait(spec.name, value, key=key,
                                           partition=partition_for(key, await self._partition_count(spec)))
        self.tables.suspensions.apply(key, value, -1)
        return lifted

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

    async def delete_task(self, name: str) -> list[int]:
        """Delete a task: tombstones for its spec and for every version of its program (a compacted topic then
        forgets them); its requests are rejected as for an unknown task from then on. Returns the versions."""
        self.task(name)
        versions = sorted(self.tables.artifacts.versions_of(name))
        artifacts, tasks = self._topics.program_artifacts, self._topics.task_specs
        partition = partition_for(name.encode(), self._partitions[artifacts.name])
        for version in versions:
            key = artifact_key(name, version).encode()
            await self._producer.send_and_wait(artifacts.name, None, key=key, partition=partition)
            self.tables.artifacts.apply(key, None, -1)
        key = name.encode()
        await self._producer.send_and_wait(tasks.name, None, key=key,
                                           partition=partition_for(key, self._partitions[tasks.name]))
        self.tables.tasks.apply(key, None, -1)
        return versions

    async def activate(self, task_id: str, version: int) -> TaskSpec:
        """Make a published version the active one (also how to roll back)."""
        task = self.task(task_id)
        self._check_published(task_id, version)
        updated = task.model_copy(update={"active_version": version, "updated_at": utc_now()})
        await self._send_task(updated)
        return updated

    async def start_canary(self, task_id: str, version: int, percent: float, *, reason: str = "",
                           decided_by: str = "manual") -> CanaryDecision:
        """Run a published version on `percent` % of the task's requests (0 < percent <= 100), the rest on the
        active version. Starting the running canary's version again changes its percentage. `reason` is added to
        the decision's; `decided_by` names who started it (the generator starts its candidates)."""
        why = reason
        task = self.task(task_id)
        if not 0 < percent <= 100:
            raise ControlError(f"a canary's percent must be more than 0 and at most 100, not {percent:g}")
        self._check_published(task_id, version)
        if task.active_version is None:
            raise ControlError(f"task {task_id!r} has no active version to compare a canary with; activate one "
                               f"first (`loopai artifact activate {task_id} N`)")
        if version == task.active_version:
            raise ControlError(f"task {task_id!r} v{version} is the active version already; a canary runs another")
        if task.canary_version not in (None, version):
            raise ControlError(f"task {task_id!r} has a canary running already (v{task.canary_version} at "
                               f"{task.canary_percent:g}%); promote or abort it first")
        reason = f"{percent:g}% of requests run v{version}, the rest v{task.active_version}"
        if task.canary_version == version:
            reason += f" (was {task.canary_percent:g}%)"
        if why:
            reason += f"; {why}"
        updated = task.model_copy(update={"canary_version": version, "canary_percent": float(percent),
                                          "updated_at": utc_now()})
        return await self._record_canary(task, updated, version, CanaryAction.STARTED, reason, decided_by)

    async def promote_canary(self, task_id: str) -> CanaryDecision:
        """Make the running canary the active version, by hand, whatever its accuracy."""
        task = self.task(task_id)
        canary = self._running_canary(task)
        updated = task.model_copy(update={"active_version": canary, "canary_version": None, "canary_percent": 0.0,
                                          "updated_at": utc_now()})
        reason = f"promoted by hand: v{canary} replaces v{task.active_version}"
        return await self._record_canary(task, updated, canary, CanaryAction.PROMOTED, reason)

    async def abort_canary(self, task_id: str) -> CanaryDecision:
        """End the running canary, by hand; every request runs the active version again."""
        task = self.task(task_id)
        canary = self._running_canary(task)
        updated = task.model_copy(update={"canary_version": None, "canary_percent": 0.0, "updated_at": utc_now()})
        reason = f"aborted by hand: v{task.active_version} stays active"
        return await self._record_canary(task, updated, canary, CanaryAction.ABORTED, reason)

    async def decisions(self, task_id: str, timeout_s: float = 30.0) -> list[CanaryDecision]:
        """The canary decisions of a task, manual and automatic, oldest first (the canary-decisions topic read
        to its end)."""
        self.task(task_id)
        try:
            everything = await read_to_end(self._settings, self._topics.canary_decisions, timeout_s)
        except TimeoutError as exc:
            raise ControlError(str(exc)) from None
        found = [record for record in everything if isinstance(record, CanaryDecision) and record.task_id == task_id]
        return sorted(found, key=lambda decision: decision.decided_at)

    def _running_canary(self, task: TaskSpec) -> int:
        if task.canary_version is None:
            raise ControlError(f"task {task.name!r} has no canary running; start one with "
                               f"`loopai artifact canary {task.name} N --percent P`")
        return task.canary_version

    async def _record_canary(self, before: TaskSpec, after: TaskSpec, candidate: int, action: CanaryAction,
                             reason: str, decided_by: str = "manual") -> CanaryDecision:
        """Write the task's new spec, then the decision that explains it (as the canary agent does)."""
        decision = CanaryDecision(task_id=before.name, candidate_version=candidate,
                                  active_version=before.active_version, action=action, reason=reason,
                                  decided_by=decided_by, decided_at=utc_now())
        await self._send_task(after)
        spec = self._topics.canary_decisions
        key = before.name.encode()
        await self._producer.send_and_wait(spec.name, self._decisions_codec.encode(decision), key=key,
                                           partition=partition_for(key, await self._partition_count(spec)))
        return decision

    async def _partition_count(self, spec: TopicSpec) -> int:
        """The cluster's partition count of a topic, asked for the first time it is needed."""
        if spec.name not in self._partitions:
            self._partitions[spec.name] = len(await topic_partitions(self._producer, spec.name))
        return self._partitions[spec.name]

    def _check_task(self, task: TaskSpec, *, shadow_published: bool = False) -> None:
        """Refuse invalid schemas and a shadow version on another kind of oracle; with shadow_published, also a
        shadow version that is not published (a new task has no versions yet: it may name one to come)."""
        if task.input_schema is not None:
            _check_json_schema(task.input_schema, "input_schema")
        if task.output_schema is not None:
            _check_json_schema(task.output_schema, "output_schema")
        oracle = task.oracle
        if oracle is not None and oracle.shadow_version is not None:
            if oracle.kind is not OracleKind.SHADOW:
                raise ControlError(f"a shadow version is for a shadow oracle, not a {oracle.kind.value} one")
            if shadow_published:
                self._check_published(task.name, oracle.shadow_version)

    def check_request_target(self, task_id: str, version: int | None = None) -> None:
        """Raise ControlError unless the task exists and a pinned version is published: a request that
        fails this could only be rejected."""
        self.task(task_id)
        if version is not None:
            self._check_published(task_id, version)

    def artifact(self, task_id: str, version: int) -> ProgramArtifact:
        """One published version of a task's program; ControlError naming the published ones if it is not."""
        self.task(task_id)
        found = self.tables.artifacts.version(task_id, version)
        if found is None:
            published = sorted(self.tables.artifacts.versions_of(task_id))
            raise ControlError(f"task {task_id!r} has no version {version}; published: {published or 'none'}")
        return found

    def _check_published(self, task_id: str, version: int) -> None:
        self.artifact(task_id, version)

    async def _send_task(self, task: TaskSpec) -> None:
        spec = self._topics.task_specs
        value = self._tasks_codec.encode(task)
        key = task.name.encode()
        await self._producer.send_and_wait(
            spec.name, value, key=key, partition=partition_for(key, self._partitions[spec.name])
        )
        self.tables.tasks.apply(key, value, -1)


def _merged_oracle(task: TaskSpec, changes: dict[str, Any]) -> dict[str, Any]:
    """The task's oracle with some fields changed; a new kind drops a shadow version it does not give."""
    if task.oracle is None:
        if "kind" not in changes:
            raise ControlError(f"task {task.name!r} has no oracle; give its kind (label, shadow or external)")
        return changes
    current = task.oracle.model_dump()
    if changes.get("kind", current["kind"]) != current["kind"] and "shadow_version" not in changes:
        current["shadow_version"] = None
    return {**current, **changes}


def _check_json_schema(schema: dict[str, Any], field: str) -> None:
    try:
        schema_validator(schema)
    except SchemaError as exc:
        raise ControlError(f"{field} is not a valid JSON Schema, or refers outside itself (workers fetch no $ref): "
                           f"{exc}") from exc
