"""What the dashboard and /metrics show of the whole loop: validations counted by task, version and outcome, the
last signals and dead letters; bytes that are not records are not shown. On the embedded broker: a start shows
the last few signals and letters at once and counts validations from then on."""

import asyncio
import time
from collections.abc import Callable
from typing import Any

from app.contract.codecs import codec_for
from app.contract.records import (
    AnomalyMethod,
    AnomalyMetric,
    AnomalySignal,
    Comparison,
    DeadLetter,
    OracleKind,
    Validation,
    ValidationStatus,
    utc_now,
)
from app.contract.topics import Topics, topics_for
from app.kafka.clients import apply_topics, make_producer
from app.settings import Settings
from app.web.recent import RecentEvents
from devtools.broker import EmbeddedBroker
from tests.conftest import make_settings


def validation(task: str, version: int, status: ValidationStatus, match: bool | None) -> Validation:
    return Validation(execution_id="e", request_id="r", task_id=task, version=version, input={}, program_output="a",
                      oracle_output="a", oracle_kind=OracleKind.LABEL, comparison=Comparison.EXACT, status=status,
                      match=match, details="", validated_at=utc_now())


def signal(hint: str) -> AnomalySignal:
    return AnomalySignal(task_id="spam", version=1, metric=AnomalyMetric.ERROR_RATE, value=0.5, baseline=0.0,
                         score=9.0, method=AnomalyMethod.ZSCORE, hint=hint, detected_at=utc_now())


def letter(reason: str) -> DeadLetter:
    return DeadLetter(reason=reason, error_type="DecodeError", source_topic="requests", source_partition=0,
                      source_offset=0, value=b"x", worker_id="w", dead_lettered_at=utc_now())


def encoder(settings: Settings, topics: Topics) -> Callable[[Any], tuple[str, bytes]]:
    """(topic, value) of a record, on its topic."""
    specs = {Validation: topics.validations, AnomalySignal: topics.anomaly_signals, DeadLetter: topics.dead_letters}

    def encode(record: Any) -> tuple[str, bytes]:
        spec = specs[type(record)]
        return spec.name, codec_for(type(record), settings, spec).encode(record)

    return encode


def test_validations_are_counted_and_the_last_signals_and_letters_kept() -> None:
    settings = Settings(topic_prefix="p.", web_recent_items=2)
    topics = topics_for(settings.topic_prefix)
    recent, encode = RecentEvents(settings, topics), encoder(settings, topics)
    for record in [validation("spam", 1, ValidationStatus.VALIDATED, True),
                   validation("spam", 1, ValidationStatus.VALIDATED, True),
                   validation("spam", 1, ValidationStatus.VALIDATED, False),
                   validation("spam", 1, ValidationStatus.EXPIRED, None),
                   validation("spam", 2, ValidationStatus.FAILED, None),
                   signal("first"), signal("second"), signal("third"), letter("one"), letter("two")]:
        recent.apply(*encode(record))
    recent.apply(topics.validations.name, b"not a validation")  # another writer's garbage: not shown
    recent.apply(topics.dead_letters.name, None)  # a tombstone
    assert recent.validations == {("spam", "1", "match"): 2, ("spam", "1", "mismatch"): 1,
                                  ("spam", "1", "expired"): 1, ("spam", "2", "failed"): 1}
    assert recent.accuracy() == {("spam", "1"): (3, 2), ("spam", "2"): (0, 0)}
    assert [s.hint for s in recent.signals] == ["second", "third"]
    assert [d.reason for d in recent.dead_letters] == ["one", "two"]
    counted, accuracy = list(recent.metrics())
    assert {(tuple(s.labels.values()), s.value) for s in counted.samples if s.name.endswith("_total")} == {
        (("spam", "1", "match"), 2), (("spam", "1", "mismatch"), 1), (("spam", "1", "expired"), 1),
        (("spam", "2", "failed"), 1)}
    assert [(s.labels, round(s.value, 3)) for s in accuracy.samples] == [({"task": "spam", "version": "1"}, 0.667)]


async def test_a_start_shows_the_last_signals_and_letters_and_counts_validations_from_then_on(
        broker: EmbeddedBroker) -> None:
    settings = make_settings(broker, web_recent_items=2)
    topics = topics_for(settings.topic_prefix)
    await apply_topics(settings, topics)
    encode = encoder(settings, topics)
    producer = make_producer(settings)
    await producer.start()
    recent = RecentEvents(settings, topics)
    try:
        for record in [signal("old"), signal("kept 1"), signal("kept 2"),
                       validation("spam", 1, ValidationStatus.VALIDATED, True), letter("kept")]:
            topic, value = encode(record)
            await producer.send_and_wait(topic, value, key=b"spam", partition=0)
        await recent.start()
        topic, value = encode(validation("spam", 1, ValidationStatus.VALIDATED, False))
        await producer.send_and_wait(topic, value, key=b"spam", partition=0)
        deadline = time.monotonic() + 30
        while not (recent.validations and len(recent.signals) == 2 and recent.dead_letters):
            assert time.monotonic() < deadline, "the new validation, the last signals and the letter: not all shown"
            await asyncio.sleep(0.05)
    finally:
        await recent.stop()
        await producer.stop()
    assert recent.validations == {("spam", "1", "mismatch"): 1}  # the one before the start is not counted
    assert [s.hint for s in recent.signals] == ["kept 1", "kept 2"]
    assert [d.reason for d in recent.dead_letters] == ["kept"]
