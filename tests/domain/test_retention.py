from datetime import UTC, date, datetime

import pytest

from app.contract.records import OracleKind, OracleSpec, TaskSpec
from app.contract.topics import topics_for
from app.domain.daily_stats import StatsKey
from app.domain.daily_windows import DailyWindows
from app.domain.retention import (
    Tombstone,
    expire_analytics,
    expire_topic_days,
    expire_versions,
    first_kept_day,
    versions_to_tombstone,
)

NOW = datetime(2026, 11, 30, 12, tzinfo=UTC)
TOPICS = topics_for("loopai.")
WINDOWS = DailyWindows("Europe/Paris")


def task(active: int | None = None, canary: int | None = None, shadow: int | None = None) -> TaskSpec:
    oracle = OracleSpec(kind=OracleKind.SHADOW, shadow_version=shadow) if shadow else None
    return TaskSpec(name="spam", active_version=active, canary_version=canary, oracle=oracle, updated_at=NOW)


def test_the_first_kept_day() -> None:
    assert first_kept_day(date(2026, 11, 30), 30) == date(2026, 10, 31)
    assert first_kept_day(date(2026, 11, 30), 0) == date(2026, 11, 30)
    with pytest.raises(ValueError, match="retention_days"):
        first_kept_day(date(2026, 11, 30), -1)


def test_analytics_days_older_than_retention_expire() -> None:
    keys = [StatsKey("spam", v, d) for v in (None, 2) for d in ("2026-10-29", "2026-10-30", "2026-10-31",
                                                                  "2026-11-30")]
    plan = expire_analytics(keys, TOPICS.analytics, WINDOWS, retention_days=30, now=NOW)
    assert plan.tombstones == [Tombstone("loopai.analytics", k) for k in (
        "spam/2/2026-10-29", "spam/2/2026-10-30", "spam/all/2026-10-29", "spam/all/2026-10-30")]
    event = plan.events[0]
    assert (event.topic, event.key, event.date_from, event.date_to) == (
        "loopai.analytics", "spam/2/2026-10-29", "2026-10-29", "2026-10-29")
    assert "retention_days=30" in event.reason and event.emitted_at == NOW
    assert [e.key for e in plan.events] == [t.key for t in plan.tombstones]


def test_today_is_the_local_one() -> None:
    late_evening = datetime(2026, 11, 30, 23, 30, tzinfo=UTC)  # already December 1st in Paris
    plan = expire_analytics([StatsKey("spam", None, "2026-10-31")], TOPICS.analytics, WINDOWS, 30, late_evening)
    assert [t.key for t in plan.tombstones] == ["spam/all/2026-10-31"]
    utc_plan = expire_analytics([StatsKey("spam", None, "2026-10-31")], TOPICS.analytics, DailyWindows("UTC"), 30,
                                late_evening)
    assert utc_plan.tombstones == []


@pytest.mark.parametrize(("spec", "versions", "keep", "doomed"), [
    (task(active=5), range(1, 6), 2, [1, 2]),           # keeps 4 and 3 besides the active 5
    (task(active=1, canary=6), range(1, 7), 0, [2, 3, 4, 5]),
    (task(active=1, canary=2), [1, 2], 0, []),           # nothing but the active and the canary
    (task(active=3, shadow=1), range(1, 6), 1, [2, 4]),  # the shadow oracle still runs version 1
    (task(), range(1, 4), 1, [1, 2]),
    (None, range(1, 10), 0, []),                         # no spec: what it runs is unknown
])
def test_versions_beyond_keep_versions(spec: TaskSpec | None, versions: range | list[int], keep: int,
                                       doomed: list[int]) -> None:
    assert versions_to_tombstone(spec, versions, keep) == doomed


@pytest.mark.parametrize("keep", range(0, 4))
def test_never_the_active_or_the_canary_version(keep: int) -> None:
    for active in range(1, 8):
        for canary in [None, *range(1, 8)]:
            spec = task(active=active, canary=canary)
            doomed = versions_to_tombstone(spec, range(1, 8), keep)
            assert active not in doomed and canary not in doomed
            assert len(doomed) == max(0, 7 - len({active, canary} - {None}) - keep)


def test_version_plan_names_artifact_keys_and_what_is_in_use() -> None:
    plan = expire_versions({"spam": [1, 2, 3, 4], "ham": [1]}, {"spam": task(active=4, canary=3)},
                           TOPICS.program_artifacts, keep_versions=1, now=NOW)
    assert plan.tombstones == [Tombstone("loopai.program-artifacts", "spam/1")]
    [event] = plan.events
    assert event.key == "spam/1" and event.date_from is None and event.date_to is None
    assert "keep_versions=1" in event.reason and "in use: 3, 4" in event.reason


def test_deleting_topics_report_the_days_that_went_once() -> None:
    results = TOPICS.execution_results  # retention.ms: 7 days
    plan = expire_topic_days([results, TOPICS.analytics], WINDOWS, NOW, last_expired={})
    [event] = plan.events
    assert plan.tombstones == []
    assert (event.topic, event.key, event.date_from, event.date_to) == (
        "loopai.execution-results", None, None, "2026-11-22")
    assert "7 days" in event.reason
    again = expire_topic_days([results], WINDOWS, NOW, last_expired={results.name: date(2026, 11, 22)})
    assert again.events == []
    next_day = expire_topic_days([results], WINDOWS, datetime(2026, 12, 1, 12, tzinfo=UTC),
                                 last_expired={results.name: date(2026, 11, 22)})
    assert [(e.date_from, e.date_to) for e in next_day.events] == [("2026-11-23", "2026-11-23")]
