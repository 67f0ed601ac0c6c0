"""The reference oracle's labels file, broker-free (`loopai oracle serve` answering requests:
tests/cli/test_oracle.py)."""

from pathlib import Path

import pytest

from devtools.oracle import LabelsError, canonical, load_labels


def test_labels_are_keyed_by_their_input_whatever_its_key_order(tmp_path: Path) -> None:
    path = tmp_path / "labels.jsonl"
    path.write_text('{"input": {"a": 1, "b": [2]}, "output": "x"}\n\n{"input": {"text": "hi"}, "output": null}\n')
    assert load_labels(path) == {canonical({"b": [2], "a": 1}): "x", canonical({"text": "hi"}): None}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"input": {}, "output": 1}\n{"input": {}\n', "line 2: not an object with input and output"),
        (b'{"input": {}}\n', "line 1: not an object with input and output"),
        (b'["input", "output"]\n', "line 1: not an object with input and output"),
        (b'{"input": "caf\xe9", "output": 1}\n', "line 1: not an object with input and output"),
    ],
)
def test_a_bad_labels_line_is_named(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "labels.jsonl"
    path.write_bytes(content)
    with pytest.raises(LabelsError, match=f"{path} {message}"):
        load_labels(path)
