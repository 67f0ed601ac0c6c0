"""A task's timeout budget on a hand-driven clock: thresholds, the sliding window, the cool-down, resumes in
order, one suspension at a time, and suspensions adopted from the table."""

from datetime import UTC, datetime
from typing import Any

import pytest

from app.contract.records import TaskSuspension
from app.domain.task_budget import TimeoutBudget, cause_of, in_force, refusal_of

T0 = datetime(2026, 12, 7, 12, 0, 0, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


def _budget(clock: Clock, **kwargs: Any) -> TimeoutBudget:
    return TimeoutBudget(**{"max_timeouts": 3, "window_s": 10.0, "cooldown_s": 60.0, "worker_id": "w1",
                            "now": clock, **kwargs})


def _at(seconds: float) -> datetime:
    return datetime.fromtimestamp(T0 + seconds, UTC)


def _charge(budget: TimeoutBudget, clock: Clock, task: str, *times: float) -> list[TaskSuspension | None]:
    made = []
    for t in times:
        clock.t = T0 + t
        made.append(budget.charge(task))
    return made


def test_the_timeout_that_reaches_the_threshold_suspends_the_task_for_the_cool_down() -> None:
    clock = Clock()
    budget = _budget(clock)
    assert _charge(budget, clock, "loopy", 0, 1) == [None, None]
    assert budget.refusal("loopy") is None
    third = _charge(budget, clock, "loopy", 2)[0]
    assert third == TaskSuspension(
        task_id="loopy", suspended=True, until=_at(62), timeouts=3, window_s=10.0, worker_id="w1",
        updated_at=_at(2),
        reason="3 calls timed out within 10 s; suspended until 12:01:02 UTC; `loopai task resume loopy` lifts it")
    assert budget.refusal("loopy") == ("task 'loopy' is suspended until 12:01:02 UTC: 3 calls timed out within 10 s; "
                                       "`loopai task resume loopy` lifts it")
    assert budget.suspended() == {"loopy": third}
    assert budget.refusal("other") is None


def test_timeouts_older_than_the_window_do_not_count() -> None:
    clock = Clock()
    budget = _budget(clock)
    # 0, 5, 10.5: the first is 10.5 s old at the third; then 5, 10.5, 15 are within 10 s
    assert _charge(budget, clock, "t", 0, 5, 10.5) == [None, None, None]
    assert budget.refusal("t") is None
    assert _charge(budget, clock, "t", 15)[0] is not None


def test_exactly_window_s_apart_still_counts() -> None:
    clock = Clock()
    budget = _budget(clock)
    assert _charge(budget, clock, "t", 0, 4, 10)[2] is not None


def test_tasks_are_counted_apart() -> None:
    clock = Clock()
    budget = _budget(clock)
    assert _charge(budget, clock, "a", 0, 1) == [None, None]
    assert _charge(budget, clock, "b", 2, 3) == [None, None]
    assert budget.refusal("a") is None and budget.refusal("b") is None
    assert _charge(budget, clock, "a", 4)[0] is not None
    assert budget.refusal("b") is None


def test_a_suspended_task_is_not_suspended_again_by_its_calls_in_flight() -> None:
    clock = Clock()
    budget = _budget(clock)
    suspension = _charge(budget, clock, "t", 0, 1, 2)[2]
    assert _charge(budget, clock, "t", 3, 4, 5, 6) == [None] * 4
    assert budget.suspended() == {"t": suspension}


def test_the_suspension_ends_after_the_cool_down_and_the_count_starts_again() -> None:
    clock = Clock()
    budget = _budget(clock)
    _charge(budget, clock, "t", 0, 1, 2)
    clock.t = T0 + 61.999
    assert budget.refusal("t") is not None
    clock.t = T0 + 62
    assert budget.refusal("t") is None and budget.suspended() == {}
    # two timeouts right after are not enough: the ones before the suspension are forgotten
    assert _charge(budget, clock, "t", 63, 64) == [None, None]
    assert _charge(budget, clock, "t", 65)[0] is not None


def test_expired_suspensions_leave_suspended_without_a_refusal_call() -> None:
    clock = Clock()
    budget = _budget(clock)
    _charge(budget, clock, "t", 0, 1, 2)
    clock.t = T0 + 100
    assert budget.suspended() == {}


def test_zero_max_timeouts_never_suspends() -> None:
    clock = Clock()
    budget = _budget(clock, max_timeouts=0)
    assert _charge(budget, clock, "t", *range(100)) == [None] * 100
    assert budget.refusal("t") is None


@pytest.mark.parametrize("kwargs", [{"max_timeouts": -1}, {"window_s": 0}, {"cooldown_s": -5}])
def test_a_budget_that_makes_no_sense_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="a timeout budget needs"):
        _budget(Clock(), **kwargs)


def _resume(seconds: float, task: str = "t") -> TaskSuspension:
    return TaskSuspension(task_id=task, suspended=False, reason="resumed by an operator", updated_at=_at(seconds))


def test_a_resume_lifts_the_suspension_and_forgets_the_timeouts_before_it() -> None:
    clock = Clock()
    budget = _budget(clock)
    _charge(budget, clock, "t", 0, 1, 2)
    clock.t = T0 + 5
    budget.apply(_resume(5))
    assert budget.refusal("t") is None and budget.suspended() == {}
    assert _charge(budget, clock, "t", 6, 7) == [None, None]
    assert _charge(budget, clock, "t", 8)[0] is not None  # the program still loops: suspended again


def test_a_resume_forgets_the_timeouts_of_a_task_that_was_not_suspended() -> None:
    clock = Clock()
    budget = _budget(clock)
    _charge(budget, clock, "t", 0, 1)
    budget.apply(_resume(1.5))
    assert _charge(budget, clock, "t", 2, 3) == [None, None]


def test_a_resume_older_than_the_suspension_does_not_lift_it() -> None:
    clock = Clock()
    budget = _budget(clock)
    suspension = _charge(budget, clock, "t", 10, 11, 12)[2]
    budget.apply(_resume(11))  # made before this suspension started (it arrived late)
    assert budget.refusal("t") is not None and budget.suspended() == {"t": suspension}


def test_a_suspension_older_than_a_resume_already_applied_is_not_adopted() -> None:
    """A worker's suspension written after an operator's later resume (records of one task keep their order on
    the topic, but not the order they were made in)."""
    clock = Clock()
    budget = _budget(clock)
    clock.t = T0 + 20
    budget.apply(_resume(15))
    other = _suspension(10, until=200, worker="w2")
    budget.apply(other)
    assert budget.refusal("t") is None


def _suspension(seconds: float, until: float, worker: str = "w2", task: str = "t") -> TaskSuspension:
    return TaskSuspension(task_id=task, suspended=True, until=_at(until), reason="3 calls timed out within 10 s",
                          timeouts=3, window_s=10.0, worker_id=worker, updated_at=_at(seconds))


def test_another_workers_suspension_is_adopted_until_it_ends() -> None:
    clock = Clock()
    budget = _budget(clock)
    _charge(budget, clock, "t", 0, 1)
    other = _suspension(2, until=62)
    budget.apply(other)
    assert budget.suspended() == {"t": other}
    assert budget.refusal("t") == ("task 't' is suspended until 12:01:02 UTC: 3 calls timed out within 10 s; "
                                   "`loopai task resume t` lifts it")
    assert _charge(budget, clock, "t", 3)[0] is None  # suspended already, by w2
    clock.t = T0 + 62
    assert budget.refusal("t") is None
    assert _charge(budget, clock, "t", 63, 64) == [None, None]  # the count started again


def test_an_ended_suspension_from_the_table_is_not_adopted() -> None:
    """A worker reading the table from the beginning meets suspensions long over."""
    clock = Clock()
    budget = _budget(clock)
    clock.t = T0 + 1000
    budget.apply(_suspension(2, until=62))
    assert budget.refusal("t") is None and budget.suspended() == {}


def test_an_older_suspension_does_not_replace_a_newer_one() -> None:
    clock = Clock()
    budget = _budget(clock)
    ours = _charge(budget, clock, "t", 10, 11, 12)[2]
    budget.apply(_suspension(5, until=65))
    assert budget.suspended() == {"t": ours}


def test_this_workers_own_suspension_coming_back_from_the_table_changes_nothing() -> None:
    clock = Clock()
    budget = _budget(clock)
    ours = _charge(budget, clock, "t", 0, 1, 2)[2]
    assert ours is not None
    refusal = budget.refusal("t")
    budget.apply(ours)
    assert budget.suspended() == {"t": ours} and budget.refusal("t") == refusal


def test_a_suspension_without_an_end_lasts_until_a_resume() -> None:
    clock = Clock()
    budget = _budget(clock)
    held = TaskSuspension(task_id="t", suspended=True, reason="held by an operator", updated_at=_at(0))
    budget.apply(held)
    clock.t = T0 + 10 ** 6
    assert budget.refusal("t") == "task 't' is suspended: held by an operator; `loopai task resume t` lifts it"
    budget.apply(_resume(10 ** 6))
    assert budget.refusal("t") is None


def test_a_far_end_is_shown_with_its_date() -> None:
    far = _suspension(0, until=3 * 86_400)
    assert "until 2026-12-10 12:00:00 UTC" in refusal_of(far, T0)
    assert "until 13:00:00 UTC:" in refusal_of(_suspension(0, until=3600), T0)


def test_in_force_is_a_suspension_that_has_not_ended() -> None:
    now = _at(100)
    assert in_force(None, now) is None
    assert in_force(_resume(50), now) is None
    assert in_force(_suspension(0, until=100), now) is None
    running = _suspension(0, until=100.001)
    assert in_force(running, now) is running
    held = TaskSuspension(task_id="t", suspended=True, reason="held", updated_at=_at(0))
    assert in_force(held, now) is held and cause_of(held) == "held"
    assert cause_of(running) == "3 calls timed out within 10 s"
