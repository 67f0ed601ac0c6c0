"""What the sandbox takes and gives back: a Call is a plain tuple of its fields, and an Outcome keeps the output as
the JSON bytes the sandbox wrote, parsed only when asked."""

from app.sandbox.calls import Call, Outcome


def test_a_call_is_the_tuple_of_its_fields() -> None:
    call = Call("spam-filter", "spam-filter-v1", "def run(input):\n    return 1\n", 0.5, {"text": "hi"})
    assert tuple(call) == ("spam-filter", "spam-filter-v1", "def run(input):\n    return 1\n", 0.5, {"text": "hi"})
    assert call.timeout_s == 0.5 and call.input == {"text": "hi"}


def test_an_outcome_keeps_its_output_as_bytes_and_parses_it_on_demand() -> None:
    outcome = Outcome("ok", b'{"label": "spam", "score": [1, 2.5]}', None, 0.01, 31.5)
    assert outcome.output_json == b'{"label": "spam", "score": [1, 2.5]}'
    assert outcome.output == {"label": "spam", "score": [1, 2.5]}
    assert Outcome("timeout", error="killed").output is None
    assert Outcome("error").latency_ms == 0.0 and Outcome("error").memory_mb is None
