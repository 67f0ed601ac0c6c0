"""The external-oracle join: one validation per execution when its requests and verdicts are delivered again
(on the embedded broker, through a worker), and its expiry sweep across a rebalance, simulated: faust moves
partitions (and drops the keys its table read back for them) at any await, which no broker can be made to do at
a chosen moment.

The join's own logic is also tested fast, at the end: its handlers called directly, without a broker or a worker."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import faust
import pytest
from faust.types import TP

from app.agents import join_oracle_verdicts
from app.agents.join_oracle_verdicts import JoinOracleVerdicts
from app.contract.codecs import codec_for, json_codec
from app.contract.records import (
    DeadLetter,
    OracleKind,
    OracleSpec,
    OracleVerdict,
    StatsPartial,
    Validation,
    ValidationRequest,
    ValidationStatus,
    execution_id_for,
    utc_now,
)
from app.contract.topics import topics_for
from app.domain.validation import ValidationFields
from app.kafka.clients import apply_topics, make_producer, partition_for
from app.kafka.tables import read_topic
from app.settings import Settings
from devtools.broker import EmbeddedBroker
from tests.agents.test_aggregate_daily_stats import Batches
from tests.agents.test_plumbing import Events, Sends
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



async def _table_changes(settings: Settings) -> dict[bytes, list[Any]]:
    """The join's table as its changelog holds it, read to its true end: each key's values in order."""
    changes: dict[bytes, list[Any]] = {}

    def keep(_: Any, message: Any) -> None:
        changes.setdefault(message.key, []).append(json.loads(message.value) if message.value is not None else None)

    await read_topic(settings, topics_for(settings.topic_prefix).oracle_pending, keep)
    return changes


async def _all_validations(settings: Settings, requests: list[ValidationRequest]) -> dict[str, list[Validation]]:
    """The validations by request id, read until each of `requests` has one (the join writes them in the order it
    decides them, not in the requests' order)."""
    wanted = {r.request_id for r in requests}
    records = await collect(settings, "validations",
                            lambda rs: wanted <= {r.request_id for r in rs if isinstance(r, Validation)}, 90)
    found: dict[str, list[Validation]] = {}
    for record in records:
        if isinstance(record, Validation):
            found.setdefault(record.request_id, []).append(record)
    return found


def _decided(changes: dict[bytes, list[Any]], request: ValidationRequest) -> bool:
    """Whether the execution's latest entry in the join's table is its decision."""
    latest = (changes.get(request.execution_id.encode()) or [None])[-1]
    return latest is not None and "decided" in latest


async def test_requests_and_verdicts_redelivered_after_a_kill_9_are_not_judged_again(
    broker: EmbeddedBroker, tmp_path: Any
) -> None:
    """A worker decides 120 executions and is killed (-9) before faust commits the offsets of their requests and
    verdicts; the next owner reads the decisions back from the table's changelog and is then handed every request
    and verdict again: it must judge none of them again (nor wait for them again, which would end as a false
    expiry). The verdicts come at once, so their decisions reach the changelog in a few record batches."""
    settings = make_settings(broker)
    await apply_topics(settings, topics_for(settings.topic_prefix))
    requests = [_request(f"r{n}", n % 6, timeout_s=120) for n in range(120)]
    traffic = OracleTraffic(settings)
    # commits nothing within the test: all of it is delivered again to the next owner
    victim = WorkerProcess(settings.model_copy(update={"commit_interval_s": 600}), tmp_path / "victim.log",
                           "victim").start()
    try:
        await traffic.send(*requests)
        await traffic.send(*(_verdict(r) for r in requests))
        found = await _all_validations(settings, requests)
        deadline = time.monotonic() + 30
        changes = await _table_changes(settings)
        while not all(_decided(changes, r) for r in requests):
            assert time.monotonic() < deadline, "the decisions never reached the table's changelog"
            changes = await _table_changes(settings)
        assert victim.process is not None
        victim.process.kill()
        victim.process.wait()
    finally:
        victim.stop()
    assert sum(len(found.get(r.request_id, [])) for r in requests) == len(requests)
    successor = WorkerProcess(settings, tmp_path / "successor.log", "successor").start()
    try:
        last = [_request("last", p, timeout_s=120) for p in range(6)]  # read after every redelivery of its partition
        await traffic.send(*last, *(_verdict(r) for r in last))
        found = await _all_validations(settings, last)
        changes = await _table_changes(settings)
    finally:
        assert successor.stop() == 0, successor.log()[-3000:]
    judged = {r.request_id: [v.status for v in found.get(r.request_id, [])] for r in requests}
    assert {rid: statuses for rid, statuses in judged.items() if statuses != [ValidationStatus.VALIDATED]} == {}
    assert [r.request_id for r in requests if not _decided(changes, r)] == []  # none waits again



async def test_decisions_in_the_changelogs_last_record_batch_are_read_back(
    broker: EmbeddedBroker, tmp_path: Any
) -> None:
    """300 decisions in one record batch of the join's changelog (the embedded broker answers ListOffsets with
    that batch's first offset + 1): a worker starting on it must read them all back, and so must not wait again
    for a request of any of them."""
    settings = make_settings(broker)
    topics = topics_for(settings.topic_prefix)
    await apply_topics(settings, topics)
    decided = [_request(f"d{n}", 2) for n in range(300)]
    producer = make_producer(settings, linger_ms=200)
    await producer.start()
    try:
        value = json.dumps({"decided": "validated", "deadline": time.time() + 3600}).encode()
        sent = [await producer.send(topics.oracle_pending.name, value, key=r.execution_id.encode(), partition=2)
                for r in decided]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()
    worker = WorkerProcess(settings, tmp_path / "worker.log", "reader").start()
    try:
        last = _request("last", 2)
        traffic = OracleTraffic(settings)
        await traffic.send(*decided, last, _verdict(last))  # delivered again, as after a crash
        found = await _validations(settings, until=last.request_id)
        changes = await _table_changes(settings)
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
    assert [r.request_id for r in decided if r.request_id in found] == []
    assert [r.request_id for r in decided if not _decided(changes, r)] == []  # none waits again



async def test_a_worker_joining_while_requests_expire_takes_no_worker_down(
    broker: EmbeddedBroker, tmp_path: Any
) -> None:
    """Two workers hold 600 requests that no oracle answers, due over 36 s; a third worker joins meanwhile, so the
    join's partitions move in the middle of expiry sweeps (each expiry awaits its sends). Every worker keeps
    running, and every request expires once."""
    settings = make_settings(broker)
    await apply_topics(settings, topics_for(settings.topic_prefix))
    workers = [WorkerProcess(settings, tmp_path / f"{name}.log", name) for name in ("first", "second", "third")]
    await asyncio.gather(*(asyncio.to_thread(w.start) for w in workers[:2]))
    try:
        # Due from 4 s to 40 s: a worker's start takes 10 s on a quiet machine and 30 s on a busy one.
        requests = [_request(f"e{n}", n % 6, timeout_s=4 + n % 37) for n in range(600)]
        await OracleTraffic(settings).send(*requests)
        await collect(settings, "validations", lambda rs: any(isinstance(r, Validation) for r in rs), 60)
        workers[2].launch()  # once the expiries have begun: its join falls among them
        wanted = {r.request_id for r in requests}
        records = await collect(settings, "validations",
                                lambda rs: wanted <= {r.request_id for r in rs if isinstance(r, Validation)}, 120)
        await asyncio.to_thread(workers[2].wait_serving)
        running = [w.worker_id for w in workers if w.process is not None and w.process.poll() is None]
    finally:
        codes = [w.stop() for w in workers]
    assert running == ["first", "second", "third"], [w.log()[-2000:] for w in workers]
    assert codes == [0, 0, 0]
    assert [w.worker_id for w in workers if "Crashed reason" in w.log()] == []
    statuses: dict[str, list[ValidationStatus]] = {}
    expired_at = []
    for record in records:
        if isinstance(record, Validation) and record.request_id in wanted:
            statuses.setdefault(record.request_id, []).append(record.status)
            expired_at.append(record.validated_at.timestamp())
    assert {rid: s for rid, s in statuses.items() if s != [ValidationStatus.EXPIRED]} == {}
    # the condition itself: the first two workers' agents rebalanced while requests were expiring
    moved = [at for w in workers[:2] for at in _rejoined(w.log(), settings.app_id)]
    assert any(min(expired_at) < at < max(expired_at) for at in moved), (moved, min(expired_at), max(expired_at))


def _rejoined(log: str, group: str) -> list[float]:
    """When a worker began rejoining its faust app's group (the agents' partitions move), from its log."""
    times = []
    for line in log.splitlines():
        if f"(Re-)joining group {group} " in line + " ":
            stamp = line[1:24]  # [2026-12-07 16:07:17,306]
            times.append(datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return times


@pytest.fixture
def join(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[faust.App, JoinOracleVerdicts, list[Any]]:
    settings = Settings(bootstrap_servers="127.0.0.1:9", topic_prefix="p.", data_dir=tmp_path)
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


@dataclass
class Joiner:
    """The join under test, owning every partition; what it sent, its table's changelog, and its clock."""

    agent: JoinOracleVerdicts
    sends: Sends
    changelog: list[Any]
    now: float
    events: Events = field(default_factory=lambda: Events({ValidationRequest: "p.oracle-requests",
                                                          OracleVerdict: "p.oracle-verdicts"}))

    async def consume(self, *records: ValidationRequest | OracleVerdict | tuple[str, bytes]) -> None:
        """Events of oracle-requests and oracle-verdicts (bytes as they are, on the topic named with them)."""
        await self.agent._consume(Batches([self.events(*records)]))

    def validations(self) -> list[tuple[str, ValidationStatus, bool | None, str]]:
        """The validations sent: (request id, status, match, details)."""
        return [(v.request_id, v.status, v.match, v.details) for v in self.sends.to("p.validations", Validation)]


@pytest.fixture
def joiner(join: tuple[faust.App, JoinOracleVerdicts, list[Any]], monkeypatch: pytest.MonkeyPatch) -> Joiner:
    app, joined, changelog = join
    joiner = Joiner(joined, Sends().install(monkeypatch), changelog, now=time.time())
    monkeypatch.setattr(app, "assignor", Rebalances(app, joined._requests_topic, set(range(6))))
    monkeypatch.setattr(join_oracle_verdicts, "time", SimpleNamespace(time=lambda: joiner.now))
    return joiner


async def test_a_request_is_judged_once_its_verdict_comes_and_only_once(joiner: Joiner) -> None:
    request = _request("answered", 2, timeout_s=5)
    await joiner.consume(request)
    assert joiner.sends.sent == []  # waiting for its verdict
    await joiner.consume(_verdict(request))
    assert joiner.validations() == [(request.request_id, ValidationStatus.VALIDATED, True, "")]
    # Its daily-stats partial follows it, keyed by task like it.
    assert [(topic, key) for topic, key, _ in joiner.sends.sent] == [("p.validations", b"asked"),
                                                                      ("p.stats-partials", b"asked")]
    [partial] = joiner.sends.to("p.stats-partials", StatsPartial)
    assert (partial.task_id, partial.validated, partial.matched) == ("asked", 1, 1)
    # Delivered again, the request and its verdict are not judged again, nor does the request wait and expire.
    await joiner.consume(request, _verdict(request))
    joiner.now += 60
    await joiner.agent._expire()
    assert len(joiner.validations()) == 1
    assert [value["decided"] for key, value in joiner.changelog if "decided" in value] == ["validated"]


async def test_a_verdict_read_before_its_request_judges_it_when_it_comes(joiner: Joiner) -> None:
    request = _request("fast", 3)
    await joiner.consume(_verdict(request).model_copy(update={"output": "ham"}))
    assert joiner.sends.sent == []
    await joiner.consume(request)
    assert joiner.validations() == [(request.request_id, ValidationStatus.VALIDATED, False, "'spam' != 'ham'")]


async def test_a_request_whose_verdict_never_comes_expires_once_and_is_forgotten_later(joiner: Joiner) -> None:
    request = _request("unanswered", 4, timeout_s=5)
    await joiner.consume(request)
    joiner.now += 4.9
    await joiner.agent._expire()
    assert joiner.sends.sent == []  # not due yet
    joiner.now += 0.2
    await joiner.agent._expire()
    assert joiner.validations() == [(request.request_id, ValidationStatus.EXPIRED, None, "no verdict within 5 s")]
    await joiner.consume(_verdict(request), request)  # too late; and delivered again
    await joiner.agent._expire()
    assert len(joiner.validations()) == 1
    # The decision is remembered for an hour, then forgotten: a tombstone in the changelog.
    key = request.execution_id.encode()
    joiner.now += 3600
    await joiner.agent._expire()
    assert joiner.agent.pending.get(key) is None and joiner.changelog[-1] == (key, None)


async def test_undecodable_requests_and_verdicts_become_dead_letters(joiner: Joiner) -> None:
    request = _request("after", 1)
    await joiner.consume(("p.oracle-requests", b"\xff not a request"), ("p.oracle-verdicts", b'{"output": 1}'),
                         request, _verdict(request))
    letters = joiner.sends.to("p.dead-letters", DeadLetter)
    assert [(d.source_topic, d.source_offset, d.error_type) for d in letters] == [
        ("p.oracle-requests", 0, "DecodeError"), ("p.oracle-verdicts", 1, "DecodeError")]
    assert [v[0] for v in joiner.validations()] == [request.request_id]  # the stream goes on


async def test_a_verdict_read_while_its_expiry_is_being_sent_is_not_judged_too(
        joiner: Joiner, monkeypatch: pytest.MonkeyPatch) -> None:
    request = _request("raced", 5)
    await joiner.consume(request)
    sent: list[ValidationStatus] = []

    async def send(record: ValidationFields) -> None:
        sent.append(record["status"])
        if len(sent) == 1:  # the stream reads the verdict at the expiry's await
            await joiner.consume(_verdict(request))

    monkeypatch.setattr(joiner.agent, "_send", send)
    joiner.now += 2
    await joiner.agent._expire()
    assert sent == [ValidationStatus.EXPIRED]
