import pytest

from app.contract.records import (
    AnomalySignal,
    DailyStats,
    DeadLetter,
    ExecutionRequest,
    ProgramArtifact,
    RetentionEvent,
    StatsPartial,
    TaskSpec,
    TaskSuspension,
)
from app.contract.topics import Topics, TopicSpec, topics_for


def test_prefix_applies_to_every_topic() -> None:
    topics = topics_for("acme.")
    assert {spec.name for spec in topics.all()} == {
        "acme.execution-requests", "acme.execution-results", "acme.program-artifacts",
        "acme.task-specs", "acme.dead-letters", "acme.validation-requests", "acme.oracle-requests",
        "acme.oracle-verdicts", "acme.validations", "acme.canary-decisions", "acme.oracle-pending-changelog",
        "acme.canary-accuracy-changelog", "acme.analytics", "acme.stats-partials", "acme.anomaly-signals",
        "acme.retention-events", "acme.canary-signals-changelog", "acme.daily-windows-changelog",
        "acme.leader-election", "acme.task-suspensions", "acme.improvement-requests",
    }


def test_the_canary_agents_topics_are_co_partitioned() -> None:
    """It reads stats-partials and signals in one stream: faust gives a worker the same partitions of both only
    when their counts agree, and its tables' changelogs follow the stream's partitions."""
    topics = topics_for("")
    counts = {topics.stats_partials.partitions, topics.anomaly_signals.partitions, topics.canary_accuracy.partitions,
              topics.canary_signals.partitions}
    assert len(counts) == 1, counts


def test_a_topic_is_found_by_key_and_the_yaml_and_the_typed_registry_must_agree() -> None:
    topics = topics_for("acme.")
    assert topics.oracle_verdicts.name == "acme.oracle-verdicts"
    specs = {spec.key: spec for spec in topics.all()}
    extra = TopicSpec("brand_new", "acme.brand-new", 1, None)
    with pytest.raises(KeyError, match=r"only in topics\.yaml: \['brand_new'\]; only in Topics: none"):
        Topics({**specs, "brand_new": extra})
    del specs["validations"]
    with pytest.raises(KeyError, match=r"only in topics\.yaml: none; only in Topics: \['validations'\]"):
        Topics(specs)


def test_tables_are_compacted_and_streams_are_not() -> None:
    topics = topics_for("")
    assert topics.program_artifacts.compacted and topics.task_specs.compacted and topics.task_suspensions.compacted
    assert not topics.execution_requests.compacted
    assert topics.execution_requests.config["retention.ms"] == "604800000"


def test_each_topic_carries_its_record_type() -> None:
    topics = topics_for("")
    assert topics.execution_requests.record is ExecutionRequest
    assert topics.program_artifacts.record is ProgramArtifact
    assert topics.task_specs.record is TaskSpec
    assert topics.dead_letters.record is DeadLetter
    assert topics.analytics.record is DailyStats and topics.analytics.compacted
    assert topics.stats_partials.record is StatsPartial
    assert topics.anomaly_signals.record is AnomalySignal
    assert topics.retention_events.record is RetentionEvent
    assert topics.task_suspensions.record is TaskSuspension and topics.task_suspensions.name == "task-suspensions"


def test_lookup_by_short_name() -> None:
    topics = topics_for("p.")
    assert topics.by_name("results").name == "p.execution-results"
    assert topics.by_name("dead_letters").name == "p.dead-letters"
    assert topics.by_name("p.task-specs").key == "task_specs"
