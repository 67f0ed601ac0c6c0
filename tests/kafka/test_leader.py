"""The leader election's topic comes from the registry, and must have the one partition faust elects with."""

import dataclasses

import pytest

from app.contract.topics import topics_for
from app.kafka.leader import leader_assignor_for
from app.settings import Settings
from app.worker import build_app


def test_a_workers_app_elects_through_the_registrys_topic() -> None:
    settings = Settings(topic_prefix="acme.", app_id="loopai-acme")
    app = build_app(settings)
    assignor = app.conf.LeaderAssignor(app)
    assert assignor._leader_topic_name == "acme.leader-election" == topics_for("acme.").leader_election.name
    assert assignor._leader_topic.get_topic_name() == "acme.leader-election"


def test_a_leader_topic_with_more_partitions_is_refused() -> None:
    spec = dataclasses.replace(topics_for("acme.").leader_election, partitions=3)
    with pytest.raises(ValueError, match=r"acme\.leader-election must have 1 partition, not 3"):
        leader_assignor_for(spec)
