import pytest

from app.contract.records import (
    FailingExample,
    ImprovementRequest,
    ImprovementStatus,
    ImprovementTrigger,
    TaskExample,
    utc_now,
)
from app.domain.candidates import (
    Case,
    MalformedAnswer,
    RateLimit,
    Score,
    cases_for,
    is_better,
    program_from_answer,
    score,
)


def test_program_from_a_fenced_answer_or_a_bare_one() -> None:
    assert program_from_answer("Here:\n```python\ndef run(input):\n    return 1\n```\nDone.") == \
        "def run(input):\n    return 1\n"
    two = "```\nprint('x')\n```\n```py\nimport re\ndef run(input):\n    return 2\n```"
    assert program_from_answer(two) == "import re\ndef run(input):\n    return 2\n"
    assert program_from_answer("def run(input):\n    return 3") == "def run(input):\n    return 3\n"
    with pytest.raises(MalformedAnswer, match="no program"):
        program_from_answer("I cannot help with that.")


def request(**fields) -> ImprovementRequest:
    now = utc_now()
    return ImprovementRequest(improvement_id="i", task_id="spam", status=ImprovementStatus.REQUESTED,
                              trigger=ImprovementTrigger.ACCURACY, reason="r", requested_at=now, updated_at=now,
                              **fields)


def test_cases_are_examples_then_failures_once_per_input_with_an_expected_output() -> None:
    made = cases_for(request(
        examples=[TaskExample(input={"text": "a"}, expected_output="spam"), TaskExample(input={"text": "b"})],
        failing_examples=[FailingExample(input={"text": "a"}, expected="ham", got="spam"),
                          FailingExample(input={"text": "c"}, expected="spam", got="ham"),
                          FailingExample(input={"text": "d"}, error="boom")]))
    assert made == [Case({"text": "a"}, "spam"), Case({"text": "c"}, "spam")]


def test_score_counts_matches_and_never_an_error() -> None:
    cases = [Case(1, "spam"), Case(2, " SPAM "), Case(3, "ham")]
    assert score([("ok", "spam"), ("ok", "spam"), ("error", None)], cases) == Score(1, 3)
    assert score([("ok", "spam"), ("ok", "spam"), ("timeout", None)], cases, "normalised_text") == Score(2, 3)


def test_only_a_strictly_better_candidate_is_published() -> None:
    assert is_better(Score(3, 4), Score(2, 4))
    assert not is_better(Score(2, 4), Score(2, 4))
    assert not is_better(Score(1, 4), Score(2, 4))
    assert is_better(Score(1, 4), None) and not is_better(Score(0, 4), None)  # a first version
    assert Score(0, 0).share is None and str(Score(1, 2)) == "1/2"


def test_rate_limit_per_task() -> None:
    limit = RateLimit(3600)
    assert limit.wait_s("a", 100.0) == 0
    limit.spend("a", 100.0)
    assert limit.wait_s("a", 1000.0) == 2700.0 and limit.wait_s("b", 1000.0) == 0
    assert limit.wait_s("a", 3700.0) == 0
