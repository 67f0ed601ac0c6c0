"""`loopai generator serve`: consumes improvement requests, asks a provider for a candidate program and publishes it
as a canary when it scores better; produces every request's outcome (published, refused, failed or skipped, with the
reason) on improvement-requests under the request's id."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaProducer

from app.contract.codecs import DecodeError, codec_for
from app.contract.records import (
    ImprovementRequest,
    ImprovementStatus,
    ImprovementTrigger,
    TaskSpec,
    utc_now,
)
from app.contract.topics import topics_for
from app.control.plane import ControlError, ControlPlane
from app.domain.candidates import (
    Case,
    MalformedAnswer,
    RateLimit,
    Score,
    cases_for,
    is_better,
    program_from_answer,
    score,
)
from app.domain.programs import ProgramRejected, check_source
from app.generator.providers import GenerationError, Provider
from app.kafka.clients import make_consumer, make_producer, partition_for, stop_clients
from app.kafka.metadata import topic_partitions
from app.sandbox.boundary import Boundary
from app.sandbox.calls import Call
from app.sandbox.pool import SandboxPool
from app.settings import Settings

# A candidate is checked as any program is checked (the static check, then runs in the sandbox, never in this
# process), scored offline against the active version on the task's examples and the failing examples, and published
# only when better, with its provenance, as a canary (a first version: active at once).

log = logging.getLogger(__name__)


class Judge:
    """Runs programs offline on a request's cases in a sandbox pool of its own, and scores them."""

    def __init__(self, pool: SandboxPool) -> None:
        self._pool = pool

    async def score(self, task: TaskSpec, key: str, source: str, cases: list[Case]) -> Score:
        """How many cases `source` gets right, run in the sandbox as task `task` (its comparison and timeout)."""
        timeout_s = task.max_timeout_ms / 1000
        outcomes = await self._pool.run([Call(task.name, key, source, timeout_s, case.input) for case in cases])
        oracle = task.oracle
        comparison = oracle.comparison.value if oracle else "exact"
        return score([(o.status, o.output) for o in outcomes], cases, comparison, oracle.tolerance if oracle else 1e-6)


class Answerer:
    """Answers one improvement request at a time: generate, check, score, publish."""

    def __init__(self, settings: Settings, provider: Provider, control: ControlPlane, judge: Judge,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self.provider = provider
        self._control = control
        self._judge = judge
        self._clock = clock
        self.limit = RateLimit(settings.generator_min_interval_s)

    async def answer(self, request: ImprovementRequest) -> ImprovementRequest:
        """The request's outcome (a new record of the same id): never raises for the provider's or the
        candidate's faults."""
        task = self._control.tables.tasks.get(request.task_id)
        why_not = self._why_not(request, task)
        if why_not is not None or task is None:
            return self.outcome(request, ImprovementStatus.SKIPPED, why_not or "the task is gone")
        self.limit.spend(request.task_id, self._clock())
        source, attempts, failure = await self._generate(request)
        if source is None:
            return self.outcome(request, ImprovementStatus.FAILED, failure, attempts=attempts)
        try:
            check_source(source)
        except ProgramRejected as exc:
            return self.outcome(request, ImprovementStatus.REFUSED, f"the candidate fails the static check: {exc}",
                                 attempts=attempts)
        cases = cases_for(request)
        candidate = await self._judge.score(task, f"candidate/{request.improvement_id}", source, cases)
        active = None
        if request.active_source and request.trigger is not ImprovementTrigger.FIRST_VERSION:
            active = await self._judge.score(task, f"active/{request.improvement_id}", request.active_source, cases)
        figures = {"candidate_score": candidate.share, "active_score": active.share if active else None,
                   "attempts": attempts}
        scored = f"the candidate got {candidate} right offline" + (f", v{request.active_version} {active}"
                                                                   if active else "")
        if not is_better(candidate, active):
            return self.outcome(request, ImprovementStatus.REFUSED, f"{scored}: not better", **figures)
        try:
            version, started = await self._publish(request, task, source, candidate)
        except ControlError as exc:  # the task changed meanwhile (a canary started, the task deleted)
            return self.outcome(request, ImprovementStatus.REFUSED, f"{scored}, but not published: {exc}", **figures)
        return self.outcome(request, ImprovementStatus.PUBLISHED, f"{scored}: published as v{version}, {started}",
                             candidate_version=version, **figures)

    def _why_not(self, request: ImprovementRequest, task: TaskSpec | None) -> str | None:
        if task is None:
            return "the task is gone"
        if request.trigger is not ImprovementTrigger.FIRST_VERSION:  # a first version is asked for by hand
            if not task.auto_improve:
                return "auto_improve is off for this task"
            if task.active_version != request.active_version:
                return f"stale: v{task.active_version} is active now, the request was about v{request.active_version}"
            if task.canary_version is not None:
                return f"v{task.canary_version} is on canary already; its decision comes first"
        wait_s = self.limit.wait_s(request.task_id, self._clock())
        if wait_s > 0:
            return (f"rate limit: one candidate per task per {self._settings.generator_min_interval_s:g} s; the next "
                    f"in {wait_s:.0f} s")
        return None

    async def _generate(self, request: ImprovementRequest) -> tuple[str | None, int, str]:
        """(the program, calls made, why there is none): up to generator_attempts calls, backing off."""
        failure = ""
        backoff = self._settings.generator_retry_backoff_s
        for attempt in range(1, self._settings.generator_attempts + 1):
            try:
                return program_from_answer(await self.provider.answer(request)), attempt, ""
            except (GenerationError, MalformedAnswer) as exc:
                failure = f"{self.provider.name}: {exc}"
                log.warning("generation for %s, attempt %d of %d: %s", request.improvement_id, attempt,
                            self._settings.generator_attempts, failure)
            if attempt < self._settings.generator_attempts:
                await asyncio.sleep(backoff)
                backoff *= 2
        return None, self._settings.generator_attempts, \
            f"no candidate after {self._settings.generator_attempts} attempt(s); the last: {failure}"

    async def _publish(self, request: ImprovementRequest, task: TaskSpec, source: str,
                       candidate: Score) -> tuple[int, str]:
        """Publish the candidate: active at once for a task without a version, else as a canary (also a "first"
        version asked for by hand for a task that has one). Returns its version and how it started."""
        first = task.active_version is None
        artifact = await self._control.publish(
            task.name, source, activate=first, synthesis_strategy="rule", confidence=candidate.share,
            llm_provider=self.provider.name, llm_model=self.provider.model,
            parent_version=task.active_version, improvement_id=request.improvement_id)
        if first:
            return artifact.version, "active"
        percent = self._settings.generator_canary_percent
        await self._control.start_canary(task.name, artifact.version, percent, decided_by="generator",
                                         reason=f"improvement {request.improvement_id}")
        return artifact.version, f"a canary on {percent:g}% of requests"

    def outcome(self, request: ImprovementRequest, status: ImprovementStatus, reason: str,
                **fields: Any) -> ImprovementRequest:
        """The request's record again, with what came of it."""
        return request.model_copy(update={"status": status, "reason": reason, "llm_provider": self.provider.name,
                                          "llm_model": self.provider.model, "updated_at": utc_now(), **fields})


class GeneratorService:
    """The long-running generator: `async with GeneratorService(settings, provider) as service: await
    service.run(stop)`. Group `<app_id>-generators`: several generators share the tasks' partitions."""

    def __init__(self, settings: Settings, provider: Provider) -> None:
        self._settings = settings
        self._provider = provider
        self._spec = topics_for(settings.topic_prefix).improvement_requests
        self._codec = codec_for(ImprovementRequest, settings, self._spec)
        self._control = ControlPlane(settings)
        self._pool = SandboxPool(Boundary.from_settings(settings), processes=2, spares=0)
        self._producer: AIOKafkaProducer | None = None
        self.answered: list[ImprovementRequest] = []

    async def __aenter__(self) -> GeneratorService:
        await self._control.__aenter__()
        self._control.tables.follow()  # a long-lived service: the tasks as they are now, not as they were
        await self._pool.start()
        self._producer = make_producer(self._settings)
        await self._producer.start()
        self._partitions = len(await topic_partitions(self._producer, self._spec.name))
        self.answerer = Answerer(self._settings, self._provider, self._control, Judge(self._pool))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await stop_clients(self._producer)
        await self._pool.stop()
        await self._control.__aexit__(None, None, None)

    def task(self, task_id: str) -> TaskSpec:
        """A task as the service's control plane knows it (ControlError if there is none)."""
        return self._control.task(task_id)

    async def send(self, outcome: ImprovementRequest) -> None:
        """Put a request or its outcome on improvement-requests (key task_id)."""
        assert self._producer is not None
        key = outcome.task_id.encode()
        await self._producer.send_and_wait(self._spec.name, self._codec.encode(outcome), key=key,
                                           partition=partition_for(key, self._partitions))

    async def answer(self, request: ImprovementRequest) -> ImprovementRequest:
        """Answer one request and put its outcome on the topic."""
        outcome = await self.answerer.answer(request)
        await self.send(outcome)
        self.answered.append(outcome)
        log.info("improvement %s of %s: %s: %s", request.improvement_id, request.task_id, outcome.status.value,
                 outcome.reason)
        return outcome

    async def run(self, stop: asyncio.Event, on_ready: Callable[[], None] | None = None) -> None:
        """Answer requests as they come (and those not answered before), committing each, until `stop`."""
        settings = self._settings
        # One request may take every attempt's timeout and backoff between two polls: the group must not take its
        # partitions away meanwhile (and hand the request to another generator, which would answer it again).
        busy_s = settings.generator_attempts * settings.generator_timeout_s \
            + settings.generator_retry_backoff_s * 2 ** settings.generator_attempts + 300
        consumer = make_consumer(settings, self._spec.name, group_id=f"{settings.app_id}-generators",
                                 fetch_max_wait_ms=settings.agent_fetch_max_wait_ms,
                                 max_poll_interval_ms=int(busy_s * 1000), **settings.group_args())
        await consumer.start()
        try:
            if on_ready is not None:
                on_ready()
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=200)
                for records in batches.values():
                    for message in records:
                        await self._take(message)
                if batches:
                    await consumer.commit()
        finally:
            await stop_clients(consumer)

    async def _take(self, message: Any) -> None:
        if message.value is None:
            return
        try:
            request = self._codec.decode(message.value)
        except DecodeError as exc:
            log.error("improvement-requests offset %d undecodable, skipped: %s", message.offset, exc)
            return
        if request.status is ImprovementStatus.REQUESTED:  # the rest are outcomes, ours or another generator's
            try:
                await self.answer(request)
            except Exception as exc:  # a bug or the broker: this request fails, with the reason, the rest go on
                log.exception("improvement %s failed", request.improvement_id)
                await self.send(self.answerer.outcome(request, ImprovementStatus.FAILED,
                                                       f"the generator failed: {exc}"))


def first_version_request(task: TaskSpec) -> ImprovementRequest:
    """A request for a task's first version, from its description, schemas and examples."""
    now = utc_now()
    return ImprovementRequest(
        improvement_id=f"{task.name}-first-{now:%Y%m%dT%H%M%S}", task_id=task.name,
        status=ImprovementStatus.REQUESTED, trigger=ImprovementTrigger.FIRST_VERSION,
        reason="the task has no program yet", description=task.description, input_schema=task.input_schema,
        output_schema=task.output_schema, examples=task.examples, accuracy_target=task.accuracy_target,
        requested_at=now, updated_at=now)


async def generate_first_version(settings: Settings, provider: Provider, task_id: str) -> ImprovementRequest:
    """Ask for, check, score on the task's examples and publish (active) a task's first version; the request and
    its outcome go on improvement-requests."""
    async with GeneratorService(settings, provider) as service:
        task = service.task(task_id)
        request = first_version_request(task)
        await service.send(request)
        return await service.answer(request)
