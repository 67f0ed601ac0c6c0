"""A worker creates no topic of its own: every topic on the broker that carries its prefix or its app id is one
of the registry's (faust's leader election included)."""

from collections.abc import Callable

from aiokafka.admin import AIOKafkaAdminClient

from app.contract.topics import topics_for
from app.kafka.clients import apply_topics
from devtools.broker import EmbeddedBroker
from tests.conftest import WorkerProcess, make_settings, wait_for_text


async def test_a_serving_worker_uses_only_the_registrys_topics(
    broker: EmbeddedBroker, start_worker: Callable[..., WorkerProcess]
) -> None:
    # A short retention interval: the leader's timer job runs too before the topics are listed.
    settings = make_settings(broker, retention_interval_s=0.5)
    topics = topics_for(settings.topic_prefix)
    await apply_topics(settings, topics)
    worker = start_worker(settings)  # serving: faust's first rebalance is over, its topics are declared
    assert worker.process is not None
    # Only the elected leader runs the retention job: the election works through the registry's topic.
    wait_for_text(worker.log_path, f"retention run by worker {worker.worker_id}", worker.process, timeout_s=30)

    admin = AIOKafkaAdminClient(**settings.kafka_client_args())
    await admin.start()
    try:
        on_broker = set(await admin.list_topics())
    finally:
        await admin.close()
    ours = {name for name in on_broker if name.startswith((settings.topic_prefix, settings.app_id))}
    assert ours == {spec.name for spec in topics.all()}
