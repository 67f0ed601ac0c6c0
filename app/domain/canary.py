"""Canary rollout: consumes request ids, validated accuracy counts and anomaly signals, produces which version a request
runs and whether a canary's candidate is promoted, rolled back or waits."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from app.contract.records import AnomalyMetric, AnomalySignal

# Routing is deterministic in the request id, so a redelivered request runs the same version. The decision compares
# validated accuracy: promote once the candidate has at least `min_validations` validations and its accuracy is at
# least both the active version's and the task's target; roll back once it falls below the active version's (or the
# target) by more than `margin`, or at once when an anomaly signal was raised against the candidate since its canary
# started: a canary that broke its task's error rate or latency is not promoted on accuracy, however good (a rollback,
# not a wait, so the broken version stops taking traffic now).


def runs_canary(request_id: str, percent: float) -> bool:
    """True for a `percent` share of request ids (0-100), the same answer every time for one id."""
    if percent <= 0:
        return False
    digest = hashlib.blake2b(request_id.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") / 0x1_0000_0000 * 100 < percent


@dataclass(frozen=True, slots=True)
class Accuracy:
    """Validations of one task version and how many of them matched."""

    validated: int = 0
    matched: int = 0

    @property
    def rate(self) -> float | None:
        return self.matched / self.validated if self.validated else None

    def add(self, validated: int, matched: int) -> Accuracy:
        """These counts plus `validated` more validations, `matched` of them matched."""
        return Accuracy(self.validated + validated, self.matched + matched)

    def counts(self) -> list[int]:
        """[validated, matched], as stored in a table."""
        return [self.validated, self.matched]


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with a canary now, and why (the reason goes on the decision record)."""

    action: str  # promote | rollback | wait
    reason: str


def signals_against(signals: Iterable[AnomalySignal], candidate_version: int,
                    canary_started: datetime) -> list[AnomalySignal]:
    """The signals that count against a canary: on its candidate version, for a minute that ended after the
    canary started (the same version may have run, and misbehaved, in an earlier canary). Not its accuracy
    against the task's target: decide() judges the candidate's accuracy, against the active version's too."""
    return [signal for signal in signals
            if signal.version == candidate_version and signal.detected_at > canary_started
            and signal.metric is not AnomalyMetric.ACCURACY]


def decide(candidate: Accuracy, active: Accuracy, accuracy_target: float, min_validations: int,
           margin: float, signals: Sequence[AnomalySignal] = ()) -> Decision:
    """What to do with a canary now, and why (the reason goes on the decision record). `signals` are the
    anomaly signals against the candidate (signals_against)."""
    if signals:
        hints = "; ".join(f"{signal.hint} ({signal.method.value}, score {signal.score:.1f})" for signal in signals)
        return Decision("rollback", f"{len(signals)} anomaly signal(s) against the candidate: {hints}")
    if candidate.validated < min_validations or candidate.rate is None:
        return Decision("wait", f"{candidate.validated} of {min_validations} validations")
    bar = accuracy_target if active.rate is None else max(accuracy_target, active.rate)
    floor = accuracy_target if active.rate is None else min(accuracy_target, active.rate)
    described = (f"candidate accuracy {candidate.rate:.3f} over {candidate.validated} validations; active "
                 + (f"{active.rate:.3f} over {active.validated}" if active.rate is not None else "unvalidated")
                 + f"; target {accuracy_target:.3f}")
    if candidate.rate >= bar:
        return Decision("promote", described)
    if candidate.rate < floor - margin:
        return Decision("rollback", described)
    return Decision("wait", described)
