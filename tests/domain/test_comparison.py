import pytest

from app.domain.comparison import COMPARISONS, compare, normalise_text


@pytest.mark.parametrize(
    ("kind", "output", "expected", "match"),
    [
        ("exact", "spam", "spam", True),
        ("exact", "spam", "Spam", False),
        ("exact", {"a": [1, 2]}, {"a": [1, 2]}, True),
        ("normalised_text", "  Hello\tWORLD ", "hello world", True),
        ("normalised_text", "ﬁne", "fine", True),  # NFKC folds the ligature
        ("normalised_text", "hello", "help", False),
        ("numeric", 0.1 + 0.2, 0.3, True),
        ("numeric", "2.5", 2.5, True),
        ("numeric", 1.0, 1.1, False),
        ("numeric", "abc", 1, False),
        ("json_fields", {"label": "spam", "score": 0.9000000001}, {"score": 0.9, "label": "spam"}, True),
        ("json_fields", {"label": "spam", "extra": 1}, {"label": "spam"}, False),
        ("json_fields", [1, {"a": 2}], [1, {"a": 3}], False),
    ],
)
def test_comparisons(kind: str, output, expected, match: bool) -> None:
    verdict = compare(kind, output, expected)
    assert verdict.match is match
    assert bool(verdict.details) is not match


def test_json_fields_names_each_difference() -> None:
    verdict = compare("json_fields", {"a": 1, "b": {"c": "x"}, "d": 4}, {"a": 1, "b": {"c": "y"}, "e": 5})
    assert verdict.details == "/b/c: 'x' != 'y'; /d: unexpected; /e: missing"


def test_unknown_comparison_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown comparison 'fuzzy'"):
        compare("fuzzy", 1, 1)
    assert "exact" in COMPARISONS and normalise_text(3) == "3"
