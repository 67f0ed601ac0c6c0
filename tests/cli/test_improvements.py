"""`loopai improvements list`: each request's latest record, its candidate's offline score and canary decision."""

import asyncio

from app.contract.codecs import codec_for
from app.contract.records import CanaryAction, CanaryDecision, ImprovementStatus, TaskSpec, utc_now
from app.contract.topics import topics_for
from app.control.plane import ControlPlane
from app.kafka.clients import make_producer
from app.settings import Settings
from tests.cli.conftest import loopai
from tests.generator.test_service import request_for


async def write(settings: Settings) -> None:
    topics = topics_for(settings.topic_prefix)
    async with ControlPlane(settings) as control:
        await control.put_task(TaskSpec(name="spam", updated_at=utc_now()))
    requested = request_for("spam")
    published = requested.model_copy(update={"status": ImprovementStatus.PUBLISHED, "candidate_version": 2,
                                             "candidate_score": 1.0, "active_score": 0.5, "reason": "v2 better"})
    other = request_for("other", improvement_id="other-v1-1")
    decision = CanaryDecision(task_id="spam", candidate_version=2, active_version=1, action=CanaryAction.PROMOTED,
                              reason="accuracy", decided_at=utc_now())
    producer = make_producer(settings)
    await producer.start()
    try:
        codec = codec_for(type(requested), settings, topics.improvement_requests)
        for record in (requested, published, other):
            await producer.send_and_wait(topics.improvement_requests.name, codec.encode(record),
                                         key=record.task_id.encode())
        await producer.send_and_wait(topics.canary_decisions.name,
                                     codec_for(CanaryDecision, settings, topics.canary_decisions).encode(decision),
                                     key=b"spam")
    finally:
        await producer.stop()


def test_improvements_list_shows_the_outcome_and_the_canary_decision(settings: Settings) -> None:
    env = settings.to_env()
    assert loopai(env, "improvements", "list", "spam").stdout.startswith("no improvement requests for spam")
    asyncio.run(write(settings))
    listed = loopai(env, "improvements", "list", "spam")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 1, lines
    assert "spam-v1-1\tpublished\taccuracy\tv1 -> v2\toffline 1.000 vs 0.500\tpromoted\tv2 better" in lines[0]
    assert len(loopai(env, "improvements", "list").stdout.splitlines()) == 2
