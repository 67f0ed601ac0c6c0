"""The external-oracle join's expiry sweep across a rebalance, simulated: faust moves partitions (and drops the
keys its table read back for them) at any await, which no broker can be made to do at a chosen moment."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import faust
import pytest
from faust.types import TP

from app.agents.join_oracle_verdicts import JoinOracleVerdicts
from app.contract.codecs import json_codec
from app.contract.records import OracleKind, OracleSpec, ValidationRequest, execution_id_for, utc_now
from app.contract.topics import topics_for
from app.domain.validation import ValidationFields
from app.kafka.clients import partition_for
from devtools.broker import EmbeddedBroker
from tests.conftest import make_settings


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


def _waiting(request_id: str, partition: int | None = None) -> tuple[bytes, dict[str, Any]]:
    """An expired entry of the join's table, for a request id whose key falls in `partition` if given."""
    n = 0
    while True:
        name = f"{request_id}-{n}"
        key = execution_id_for("asked", name).encode()
        if partition is None or partition_for(key, 6) == partition:
            break
        n += 1
    request = ValidationRequest(execution_id=key.decode(), request_id=name, task_id="asked", version=1,
                                input={"text": "x"}, output="spam", status="ok",
                                oracle=OracleSpec(kind=OracleKind.EXTERNAL, timeout_s=1), requested_at=utc_now())
    return key, {"request": json_codec(ValidationRequest).encode(request).decode(), "deadline": time.time() - 1}


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
    assert not joined.pending.data
    key_c = list(entries)[2]
    assert changelog == [(key_c, None)]  # only c's end is written: a and b are their new owner's to end
