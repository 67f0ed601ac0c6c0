"""The external-oracle join: one validation per execution when its requests and verdicts are delivered again
(on the embedded broker, through a worker), and its expiry sweep across a rebalance, simulated: faust moves
partitions (and drops the keys its table read back for them) at any await, which no broker can be made to do at
a chosen moment."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import faust
import pytest
from faust.types import TP

from app.agents.join_oracle_verdicts import JoinOracleVerdicts
from app.contract.codecs import codec_for, json_codec
from app.contract.records import (
    OracleKind,
    OracleSpec,
    OracleVerdict,
    Validation,
    ValidationRequest,
    ValidationStatus,
    execution_id_for,
    utc_now,
)
from app.contract.topics import topics_for
from app.domain.validation import ValidationFields
from app.kafka.clients import apply_topics, make_producer, partition_for
from app.settings import Settings
from devtools.broker import EmbeddedBroker
from tests.conftest import WorkerProcess, collect, make_settings


class Rebalances:
    """The faust app's view of its assignment, moved by the test."""

    def __init__(self, app: faust.App, topic: str, owned: set[int]) -> None:
        self._app, self._topic, self.owned = app, topic, owned

    def assigned_actives(self) -> set[Any]:
        return {TP(self._topic, p) for p in self.owned}

    def revoke(self, partition: int, table: Any) -> None:
        """As faust does: a rebalance starts, the partition goes, the keys its table read back for it go too."""
        self._app.rebalancing, self._app.rebalancing_count = True, self._app.rebalancing_count + 1
        self.owned.discard(partition)
        for key in [k for k in table.data if partition_for(k, 6) == partition]:
            table.data.pop(key)


def _request(request_id: str, partition: int, timeout_s: float = 1) -> ValidationRequest:
    """A validation request for the external oracle, of a request id (suffixed) whose key falls in `partition`."""
    n = 0
    while partition_for(execution_id_for("asked", f"{request_id}-{n}").encode(), 6) != partition:
        n += 1
    name = f"{request_id}-{n}"
    return ValidationRequest(execution_id=execution_id_for("asked", name), request_id=name, task_id="asked",
                             version=1, input={"text": "x"}, output="spam", status="ok",
                             oracle=OracleSpec(kind=OracleKind.EXTERNAL, timeout_s=timeout_s), requested_at=utc_now())


def _waiting(request_id: str, partition: int) -> tuple[bytes, dict[str, Any]]:
    """An expired entry of the join's table."""
    request = _request(request_id, partition)
    return request.execution_id.encode(), {"request": json_codec(ValidationRequest).encode(request).decode(),
                                           "deadline": time.time() - 1}


class OracleTraffic:
    """Validation requests and verdicts produced as validate_executions and an oracle service produce them."""

    def __init__(self, settings: Settings) -> None:
        topics = topics_for(settings.topic_prefix)
        self._settings = settings
        self._requests = (topics.oracle_requests.name, codec_for(ValidationRequest, settings, topics.oracle_requests))
        self._verdicts = (topics.oracle_verdicts.name, codec_for(OracleVerdict, settings, topics.oracle_verdicts))

    async def send(self, *records: ValidationRequest | OracleVerdict) -> None:
        producer = make_producer(self._settings)
        await producer.start()
        try:
            for record in records:
                topic, codec = self._requests if isinstance(record, ValidationRequest) else self._verdicts
                await producer.send_and_wait(topic, codec.encode(record), key=record.execution_id.encode())  # type: ignore[arg-type]
        finally:
            await producer.stop()


def _verdict(request: ValidationRequest) -> OracleVerdict:
    return OracleVerdict(execution_id=request.execution_id, task_id="asked", output="spam", answered_at=utc_now())


async def _validations(settings: Settings, until: str) -> dict[str, list[Validation]]:
    """The validations by request id, read until one of `until` is seen."""
    records = await collect(settings, "validations",
                            lambda rs: any(isinstance(r, Validation) and r.request_id == until for r in rs), 90)
    found: dict[str, list[Validation]] = {}
    for record in records:
        if isinstance(record, Validation):
            found.setdefault(record.request_id, []).append(record)
    return found


async def test_requests_and_verdicts_delivered_again_after_the_decision_are_not_judged_again(
    broker: EmbeddedBroker, tmp_path: Any
) -> None:
    """A redelivered request (a batch redone after a crash, or read again from uncommitted offsets) whose
    execution was answered or has expired must not wait again, and then expire: one validation per execution."""
    settings = make_settings(broker)
    await apply_topics(settings, topics_for(settings.topic_prefix))
    worker = WorkerProcess(settings, tmp_path / "worker.log", "joiner").start()
    try:
        # All in one partition, so the last one is read (and expires) after the others.
        answered, unanswered, last = (_request(name, 2, timeout_s=3) for name in ("answered", "unanswered", "last"))
        traffic = OracleTraffic(settings)
        await traffic.send(answered, _verdict(answered), unanswered)
        await _validations(settings, until=unanswered.request_id)  # expired: answered is validated before it
        await traffic.send(answered, _verdict(answered), unanswered, last)  # delivered again
        found = await _validations(settings, until=last.request_id)
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
    assert [v.status for v in found[answered.request_id]] == [ValidationStatus.VALIDATED]
    assert [v.status for v in found[unanswered.request_id]] == [ValidationStatus.EXPIRED]
    assert [v.status for v in found[last.request_id]] == [ValidationStatus.EXPIRED]


@pytest.fixture
def join(broker: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch) -> tuple[faust.App, JoinOracleVerdicts, list[Any]]:
    settings = make_settings(broker)
    topics = topics_for(settings.topic_prefix)
    app = faust.App(settings.app_id, broker=f"kafka://{settings.bootstrap_servers}")
    joined = JoinOracleVerdicts(app, settings, topics)
    changelog: list[Any] = []

    def send_changelog(partition: int | None, key: bytes, value: Any, *args: Any, **kwargs: Any) -> Any:
        changelog.append((key, value))
        return SimpleNamespace(message=SimpleNamespace(partition=partition_for(key, 6)))

    monkeypatch.setattr(joined.pending, "send_changelog", send_changelog)
    return app, joined, changelog


async def test_a_rebalance_at_an_await_of_the_expiry_sweep_takes_nothing_down(
    join: tuple[faust.App, JoinOracleVerdicts, list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    app, joined, changelog = join
    revoked_first, kept = 0, 3
    entries = dict([_waiting("a", revoked_first), _waiting("b", revoked_first), _waiting("c", kept),
                    _waiting("d", 5)])  # d was set here before partition 5 moved away: its new owner has it
    for key, value in entries.items():
        joined.pending.data[key] = value
    rebalances = Rebalances(app, joined._requests_topic, {revoked_first, kept})
    monkeypatch.setattr(app, "assignor", rebalances)
    sent: list[str] = []

    async def send(record: ValidationFields) -> None:
        sent.append(record["request_id"])
        if len(sent) == 1:  # the partition moves while the first expiry is being sent
            rebalances.revoke(revoked_first, joined.pending)

    monkeypatch.setattr(joined, "_send", send)
    await joined._expire()  # before: KeyError at `del self.pending[key]`, and the worker crashed
    assert [r.split("-")[0] for r in sent] == ["a"]  # the sweep stops while partitions move
    app.rebalancing = False
    await joined._expire()
    assert [r.split("-")[0] for r in sent] == ["a", "c"]  # b went with its partition; d is its new owner's
    key_a, _, key_c, _ = entries
    # Each decision is remembered, a's too (its new owner may not have read its partition back yet); a is no
    # longer kept here, nor is d.
    assert [(key, value["decided"]) for key, value in changelog] == [(key_a, "expired"), (key_c, "expired")]
    assert list(joined.pending.data) == [key_c]
