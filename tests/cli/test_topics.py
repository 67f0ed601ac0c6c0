"""`loopai topics apply`: idempotent, it sets the configs of topics that exist, and with the Avro wire format
it registers their schemas (codecs only look the ids up)."""

import asyncio

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from app.contract.topics import topics_for
from devtools.broker import EmbeddedBroker
from devtools.registry import LocalRegistry
from tests.cli.conftest import loopai


def test_topics_apply_is_idempotent(env: dict[str, str]) -> None:
    first = loopai(env, "topics", "apply")
    assert first.returncode == 0, first.stderr
    count = len(topics_for("").all())
    assert first.stdout.count("created") == count and "compact" in first.stdout
    second = loopai(env, "topics", "apply")
    assert second.stdout.count("exists") == count and "created" not in second.stdout


def test_topics_apply_sets_the_configs_of_existing_topics(env: dict[str, str], broker: EmbeddedBroker) -> None:
    analytics = topics_for(env["LOOPAI_TOPIC_PREFIX"]).analytics

    async def make_it_deleting() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
        await admin.start()
        await admin.create_topics([NewTopic(analytics.name, analytics.partitions, 1,
                                            topic_configs={"cleanup.policy": "delete"})])
        await admin.close()

    asyncio.run(make_it_deleting())
    done = loopai(env, "topics", "apply")
    assert done.returncode == 0, done.stderr
    assert f"altered {analytics.name} (altered: cleanup.policy delete -> compact)" in done.stdout
    assert f"exists  {analytics.name} (configs as in topics.yaml)" in loopai(env, "topics", "apply").stdout


def test_topics_apply_registers_the_schemas_with_the_avro_wire_format(env: dict[str, str]) -> None:
    with LocalRegistry() as registry:
        avro = {**env, "LOOPAI_WIRE_FORMAT": "avro", "LOOPAI_REGISTRY_URL": registry.url}
        before = loopai(avro, "task", "list")  # a codec before registration: one line saying what to run
        assert before.returncode == 1 and "loopai topics apply" in before.stderr, before.stderr
        applied = loopai(avro, "topics", "apply")
        assert applied.returncode == 0, applied.stderr
        carried = [spec for spec in topics_for(env["LOOPAI_TOPIC_PREFIX"]).all() if spec.record_name]
        assert applied.stdout.count("registered ") == len(carried)
        assert f"registered {carried[0].name}-value (schema id " in applied.stdout
        assert loopai(avro, "task", "list").returncode == 0
