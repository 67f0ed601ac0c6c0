"""The bench's job as requests: its tasks (one per partition, the same program), the i-th request with its true
label, encoded and produced; in: a broker's settings, out: the topics, tasks and requests on it."""

from __future__ import annotations

from collections.abc import Iterable

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from app.contract.codecs import codec_for
from app.contract.records import ExecutionRequest, TaskSpec, execution_id_for, utc_now
from app.contract.topics import topics_for
from app.control.plane import ControlPlane
from app.domain.sampling import is_sampled
from app.kafka.clients import apply_topics, make_producer, partition_for
from app.kafka.delivery import Outbox, deliver_all
from app.kafka.loop_client import RequestSender, request_from
from app.settings import Settings
from devtools.samples import SPAM_TEXTS, SPAM_TRUTH, TEXT_INPUT_SCHEMA, program_source

PROGRAM = "spam_v1"


def _one_task_per_partition() -> list[str]:
    """Task names (same program) whose keys land on every partition of the requests topic: a request's task is
    its partition, so with one task a second worker would have nothing to do."""
    partitions = topics_for("").execution_requests.partitions
    names: dict[int, str] = {}
    for n in range(1000):
        names.setdefault(partition_for(f"spam-filter-{n}".encode(), partitions), f"spam-filter-{n}")
        if len(names) == partitions:
            return [names[p] for p in range(partitions)]
    raise RuntimeError("no task names cover every partition")


TASKS = _one_task_per_partition()
SAMPLING_RATE = 0.05  # TaskSpec's default


def request_for(i: int) -> ExecutionRequest:
    """The i-th request of the job: the tasks in turn, the sample texts in turn, each with its true label (so
    that the pipeline's sampled executions are validated against it, the whole loop running)."""
    text = SPAM_TEXTS[i % len(SPAM_TEXTS)]
    return request_from(TASKS[i % len(TASKS)], {"text": text}, expected_output=SPAM_TRUTH[text])


def sampled_among(requests: Iterable[ExecutionRequest]) -> int:
    """How many of these requests the executor samples for validation (random sampling: decided by the
    execution id alone)."""
    return sum(is_sampled(execution_id_for(r.task_id, r.request_id), SAMPLING_RATE) for r in requests)


def encode_requests(settings: Settings, requests: list[ExecutionRequest]) -> list[tuple[bytes, bytes, int]]:
    """(key, value, partition) of each request, as RequestSender would send it."""
    spec = topics_for(settings.topic_prefix).execution_requests
    codec = codec_for(ExecutionRequest, settings, spec)
    return [(r.task_id.encode(), codec.encode(r), partition_for(r.task_id.encode(), spec.partitions))
            for r in requests]


async def send_encoded(settings: Settings, requests: list[tuple[bytes, bytes, int]]) -> None:
    """Produce encoded requests in batches, acknowledged at the end."""
    topic = topics_for(settings.topic_prefix).execution_requests.name
    producer = make_producer(settings)
    await producer.start()
    try:
        outbox: Outbox[None] = Outbox()
        for key, value, partition in requests:
            outbox.add(topic, partition, key, value, None)
        await deliver_all(producer, outbox, settings.delivery_timeout_s)
    finally:
        await producer.stop()


async def produce(settings: Settings, count: int) -> None:
    """`count` requests of the bench's tasks on the requests topic."""
    async with RequestSender(settings) as sender:
        for start in range(0, count, 10_000):
            await sender.send(request_for(i) for i in range(start, min(count, start + 10_000)))


async def provision(settings: Settings) -> None:
    """Topics, and the bench's tasks (one per partition, the same program) with their program active."""
    await apply_topics(settings, topics_for(settings.topic_prefix))
    async with ControlPlane(settings) as control:
        for task in TASKS:
            # The baselines' job (decode, classify, encode, produce), and the pipeline checks each input against
            # its task's schema besides, as users' tasks have one.
            await control.put_task(TaskSpec(name=task, input_schema=TEXT_INPUT_SCHEMA, sampling_rate=SAMPLING_RATE,
                                            updated_at=utc_now()))
            await control.publish(task, program_source(PROGRAM), activate=True)


async def create_outputs(settings: Settings, *names: str) -> None:
    """The output topics of in-process contenders, `<prefix><name>-out`, partitioned like the requests."""
    admin = AIOKafkaAdminClient(**settings.kafka_client_args())
    await admin.start()
    try:
        partitions = topics_for(settings.topic_prefix).execution_requests.partitions
        await admin.create_topics([NewTopic(f"{settings.topic_prefix}{name}-out", partitions, 1) for name in names])
    finally:
        await admin.close()
