"""A restarted watcher keeps the incidents already asked about: it reads improvement-requests back and stays quiet
about a task whose latest request was about the version still active."""

from app.agents.request_improvements import RequestImprovements
from app.contract.codecs import codec_for
from app.contract.records import ImprovementRequest, TaskSpec, utc_now
from app.contract.topics import topics_for
from app.control.plane import ControlPlane
from app.kafka.clients import make_producer
from app.kafka.tables import TableReader
from app.settings import Settings
from app.worker import build_app
from tests.generator.test_service import V1, request_for


async def test_incidents_asked_about_before_a_restart_stay_open(settings: Settings) -> None:
    topics = topics_for(settings.topic_prefix)
    async with ControlPlane(settings) as control:
        for name in ("asked", "moved-on"):
            await control.put_task(TaskSpec(name=name, updated_at=utc_now()))
            await control.publish(name, V1, activate=True)
        await control.publish("moved-on", V1.replace("'ham'", "'not spam'"), activate=True)  # v2 live since
    codec = codec_for(ImprovementRequest, settings, topics.improvement_requests)
    producer = make_producer(settings)
    await producer.start()
    try:
        for name in ("asked", "moved-on"):
            await producer.send_and_wait(topics.improvement_requests.name, codec.encode(request_for(name)),
                                         key=name.encode())
    finally:
        await producer.stop()
    tables = TableReader(settings, topics.task_specs, topics.program_artifacts)
    await tables.start()
    try:
        watcher = RequestImprovements(build_app(settings), settings, topics, tables)
        await watcher.recall_incidents()
    finally:
        await tables.stop()
    assert watcher.watch.in_incident("asked", 1)
    assert not watcher.watch.in_incident("moved-on", 2)  # the request was about v1: v2 is watched afresh
