"""Suspension notices: a suspension goes to task-suspensions and, as a signal naming the task, to anomaly-signals;
a notice that cannot be sent is logged, never raised into the executor."""

import logging
from datetime import timedelta
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError

from app.contract.codecs import codec_for
from app.contract.records import AnomalyMethod, AnomalySignal, TaskSuspension, utc_now
from app.contract.topics import topics_for
from app.kafka.suspensions import SuspensionNotices
from app.settings import Settings

SETTINGS = Settings.load(None)
TOPICS = topics_for("t-")


class _Producer:
    """Keeps what it is given; with `error` set, every send fails with it."""

    def __init__(self, error: Exception | None = None) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.error = error

    async def send_and_wait(self, topic: str, value: bytes, key: bytes) -> Any:
        if self.error is not None:
            raise self.error
        self.sent.append((topic, value, key))


def _suspension() -> TaskSuspension:
    now = utc_now()
    return TaskSuspension(task_id="spinner", suspended=True, until=now + timedelta(minutes=5),
                          reason="10 timeouts within 60 s", timeouts=10, window_s=60.0, worker_id="w1",
                          updated_at=now)


async def test_a_suspension_and_its_signal_go_out_keyed_by_the_task() -> None:
    producer, suspension = _Producer(), _suspension()
    await SuspensionNotices(SETTINGS, TOPICS).announce(producer, suspension)  # type: ignore[arg-type]
    by_topic = {topic: (value, key) for topic, value, key in producer.sent}
    assert set(by_topic) == {TOPICS.task_suspensions.name, TOPICS.anomaly_signals.name}
    assert all(key == b"spinner" for _, key in by_topic.values())
    sent = codec_for(TaskSuspension, SETTINGS, TOPICS.task_suspensions).decode(
        by_topic[TOPICS.task_suspensions.name][0])
    assert sent == suspension
    signal = codec_for(AnomalySignal, SETTINGS, TOPICS.anomaly_signals).decode(by_topic[TOPICS.anomaly_signals.name][0])
    assert signal.task_id == "spinner" and signal.method == AnomalyMethod.BUDGET
    assert "suspended: 10 timeouts within 60 s" in signal.hint


async def test_a_notice_that_cannot_be_sent_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    producer = _Producer(KafkaTimeoutError())
    with caplog.at_level(logging.ERROR, logger="app.kafka.suspensions"):
        await SuspensionNotices(SETTINGS, TOPICS).announce(producer, _suspension())  # type: ignore[arg-type]
    assert "could not announce the suspension of spinner" in caplog.text
