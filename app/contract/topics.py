"""The topic registry: reads topics/topics.yaml, applies the prefix, pairs each topic with its record type.

No other module spells a topic name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any

import yaml

from app.contract.files import contract_dir
from app.contract.records import RECORD_TYPES, Record


@dataclass(frozen=True)
class TopicSpec:
    """One topic: its full name, partitions, configs and the record type it carries."""

    key: str
    name: str
    partitions: int
    record_name: str | None  # None for internal topics (faust table changelogs): bytes that only faust reads
    config: dict[str, str] = field(default_factory=dict)

    @property
    def record(self) -> type[Record]:
        """The record type the topic carries."""
        if self.record_name is None:
            raise KeyError(f"topic {self.name} is internal and carries no record type")
        return RECORD_TYPES[self.record_name]

    @property
    def compacted(self) -> bool:
        return "compact" in self.config.get("cleanup.policy", "")


class Topics:
    """All topics of one deployment (one prefix), as typed attributes named by their keys in topics/topics.yaml
    (`topics.execution_results`): a mistyped topic fails in mypy. topics.yaml and these attributes must name the
    same topics; building a registry checks it."""

    execution_requests: TopicSpec
    execution_results: TopicSpec
    program_artifacts: TopicSpec
    task_specs: TopicSpec
    dead_letters: TopicSpec
    validation_requests: TopicSpec
    oracle_requests: TopicSpec
    oracle_verdicts: TopicSpec
    validations: TopicSpec
    canary_decisions: TopicSpec
    oracle_pending: TopicSpec  # the changelogs of faust tables, named by these keys
    canary_accuracy: TopicSpec
    canary_signals: TopicSpec
    daily_windows: TopicSpec
    analytics: TopicSpec
    stats_partials: TopicSpec
    anomaly_signals: TopicSpec
    retention_events: TopicSpec
    leader_election: TopicSpec
    task_suspensions: TopicSpec
    improvement_requests: TopicSpec

    def __init__(self, specs: dict[str, TopicSpec], prefix: str = "") -> None:
        declared = set(Topics.__annotations__)
        if set(specs) != declared:
            raise KeyError(f"topics/topics.yaml and app/contract/topics.py Topics differ: only in topics.yaml: "
                           f"{sorted(set(specs) - declared) or 'none'}; only in Topics: "
                           f"{sorted(declared - set(specs)) or 'none'}")
        self._specs = specs
        self.prefix = prefix
        for key, spec in specs.items():
            setattr(self, key, spec)

    def all(self) -> list[TopicSpec]:
        return list(self._specs.values())

    def by_name(self, name: str) -> TopicSpec:
        """The topic with this full name, its name without the prefix, or its short key ("results",
        "execution_results"); dashes and underscores are the same ("dead-letters", "dead_letters")."""
        key = name.replace("-", "_")
        for spec in self.all():
            short = spec.name.removeprefix(self.prefix)
            if name in (spec.name, short) or key == spec.key or spec.key.endswith("_" + key):
                return spec
        known = ", ".join(s.key for s in self.all())
        raise KeyError(f"unknown topic {name!r}; known: {known}")


@cache
def _definitions() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((contract_dir("topics") / "topics.yaml").read_text())
    return loaded


def _known_record(name: str | None) -> str | None:
    if name is not None and name not in RECORD_TYPES:
        raise KeyError(f"topics/topics.yaml names an unknown record type {name!r}")
    return name


@cache
def topics_for(prefix: str) -> Topics:
    """The registry for a topic-name prefix."""
    specs = {}
    for key, definition in _definitions().items():
        specs[key] = TopicSpec(
            key=key,
            name=prefix + definition["name"],
            partitions=int(definition["partitions"]),
            record_name=_known_record(definition.get("record")),
            config={k: str(v) for k, v in (definition.get("config") or {}).items()},
        )
    return Topics(specs, prefix)
