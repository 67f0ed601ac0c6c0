"""Retention rules: consumes what the compacted topics hold (analytics keys, artifact versions, task specs) and
the settings, produces the tombstones to write and the RetentionEvents that say what expired and why."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from app.contract.records import RetentionEvent, TaskSpec, artifact_key
from app.contract.topics import TopicSpec
from app.domain.daily_stats import StatsKey
from app.domain.daily_windows import DailyWindows

# - Analytics days: a day expires once it is more than `retention_days` days before today (local, in the
#   analytics time zone): with 30, on the 30th of November the 31st of October is kept and the 30th goes.
# - Program versions: per task, the `keep_versions` newest versions that serve no purpose now are kept; older
#   ones are tombstoned. A version that serves one is never tombstoned: the active version, the canary, and the
#   shadow version an oracle runs. A task without a spec gets nothing tombstoned: what it runs is unknown.
# - Deleting topics (cleanup.policy delete): the broker drops records by retention.ms; one event per run names
#   the days that went, from the day after the previous run's last one.


@dataclass(frozen=True, slots=True)
class Tombstone:
    """A null value to write under `key` on a compacted topic."""

    topic: str
    key: str


@dataclass
class RetentionPlan:
    """What one retention run writes: tombstones first, then the events describing them."""

    tombstones: list[Tombstone] = field(default_factory=list)
    events: list[RetentionEvent] = field(default_factory=list)

    def extend(self, other: RetentionPlan) -> None:
        self.tombstones += other.tombstones
        self.events += other.events


def first_kept_day(today: date, retention_days: int) -> date:
    """The oldest day still kept."""
    if retention_days < 0:
        raise ValueError(f"retention_days must not be negative, not {retention_days}")
    return today - timedelta(days=retention_days)


def expire_analytics(keys: Iterable[StatsKey], topic: TopicSpec, windows: DailyWindows, retention_days: int,
                     now: datetime) -> RetentionPlan:
    """Tombstones and one event per analytics key whose day is older than retention_days."""
    first_kept = first_kept_day(windows.today(now).day, retention_days).isoformat()
    plan = RetentionPlan()
    for key in sorted((k for k in keys if k.date < first_kept), key=StatsKey.encode):  # YYYY-MM-DD: string order
        plan.tombstones.append(Tombstone(topic.name, key.encode()))
        plan.events.append(RetentionEvent(
            topic=topic.name, key=key.encode(), date_from=key.date, date_to=key.date, emitted_at=now,
            reason=f"analytics day older than retention_days={retention_days} (first kept {first_kept})"))
    return plan


def protected_versions(task: TaskSpec) -> set[int]:
    """The versions a task uses now: active, canary, and its oracle's shadow version."""
    shadow = task.oracle.shadow_version if task.oracle is not None else None
    return {v for v in (task.active_version, task.canary_version, shadow) if v is not None}


def versions_to_tombstone(task: TaskSpec | None, versions: Iterable[int], keep_versions: int) -> list[int]:
    """The versions of one task beyond the keep_versions newest unused ones, oldest first."""
    if keep_versions < 0:
        raise ValueError(f"keep_versions must not be negative, not {keep_versions}")
    if task is None:
        return []
    unused = sorted(set(versions) - protected_versions(task), reverse=True)
    return sorted(unused[keep_versions:])


def expire_versions(versions_by_task: Mapping[str, Iterable[int]], tasks: Mapping[str, TaskSpec],
                    topic: TopicSpec, keep_versions: int, now: datetime) -> RetentionPlan:
    """Tombstones and one event per program version beyond keep_versions, over every task."""
    plan = RetentionPlan()
    for task_id in sorted(versions_by_task):
        task = tasks.get(task_id)
        doomed = versions_to_tombstone(task, versions_by_task[task_id], keep_versions)
        if not doomed or task is None:
            continue
        kept = ", ".join(str(v) for v in sorted(protected_versions(task))) or "none"
        for version in doomed:
            key = artifact_key(task_id, version)
            plan.tombstones.append(Tombstone(topic.name, key))
            plan.events.append(RetentionEvent(
                topic=topic.name, key=key, emitted_at=now,
                reason=f"unused version beyond keep_versions={keep_versions} (in use: {kept})"))
    return plan


def expire_topic_days(topics: Iterable[TopicSpec], windows: DailyWindows, now: datetime,
                      last_expired: Mapping[str, date]) -> RetentionPlan:
    """One event per deleting topic with days past its retention.ms since the previous run (`last_expired`:
    topic name to the last day an earlier event named). No tombstones: the broker deletes these."""
    plan = RetentionPlan()
    for topic in topics:
        retention_ms = topic.config.get("retention.ms")
        if topic.compacted or retention_ms is None or int(retention_ms) < 0:  # -1: kept forever
            continue
        horizon = now - timedelta(milliseconds=int(retention_ms))
        last_gone = windows.window_for(horizon).day - timedelta(days=1)  # the last day wholly past retention
        previous = last_expired.get(topic.name)
        if previous is not None and previous >= last_gone:
            continue
        days = int(retention_ms) / 86_400_000
        plan.events.append(RetentionEvent(
            topic=topic.name, date_from=None if previous is None else (previous + timedelta(days=1)).isoformat(),
            date_to=last_gone.isoformat(), emitted_at=now,
            reason=f"older than retention.ms={retention_ms} ({days:g} days): deleted by the broker"))
    return plan
