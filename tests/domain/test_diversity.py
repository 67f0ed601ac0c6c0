import pytest

from app.domain.diversity import choose_diverse, distance, features, signature


def test_features_are_the_words_of_keys_and_values() -> None:
    assert features({"text": "FREE prize!", "n": 3}) == {"text", "free", "prize", "n", "3"}
    assert distance(features("a b"), features("a b")) == 0.0
    assert distance(features("a b"), features("c d")) == 1.0
    assert distance(features("a b"), features("a c")) == pytest.approx(2 / 3)


def test_choose_diverse_takes_one_of_each_kind_before_any_copy() -> None:
    items = ["win a free prize", "win a free prize now", "free prize win", "meeting at noon", "invoice 42 overdue",
             "invoice 43 overdue"]
    chosen = choose_diverse(items, 3, features)
    assert chosen[0] == items[0]
    assert "meeting at noon" in chosen
    assert any(item.startswith("invoice") for item in chosen)
    assert choose_diverse(items, 10, features) and len(choose_diverse(items, 10, features)) == len(items)
    assert choose_diverse([], 3, features) == [] and choose_diverse(items, 0, features) == []


def test_copies_come_last() -> None:
    items = ["a", "a", "a", "b"]
    assert choose_diverse(items, 2, features) == ["a", "b"]


def test_signature_keeps_the_shape_and_is_stable() -> None:
    assert signature({"text": "x y"}) == signature({"text": "y x"})
    assert signature({"text": "x"}).startswith("text|")
    assert signature({"a": 1, "b": 2}).startswith("a,b|")
    assert signature(None) == "NoneType|-"
