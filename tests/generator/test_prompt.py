from app.contract.records import (
    FailingExample,
    ImprovementRequest,
    ImprovementStatus,
    ImprovementTrigger,
    TaskExample,
    utc_now,
)
from app.generator.prompt import command_input, messages_for, prompt_version, sent_request


def request(**fields) -> ImprovementRequest:
    now = utc_now()
    values = {"improvement_id": "i", "task_id": "spam", "status": ImprovementStatus.REQUESTED,
              "trigger": ImprovementTrigger.ACCURACY, "reason": "accuracy 0.5", "description": "spam or ham",
              "examples": [TaskExample(input={"text": "free prize"}, expected_output="spam")],
              "active_version": 1, "active_source": "def run(input):\n    return 'ham'\n",
              "failing_examples": [FailingExample(input={"text": "secret-customer-input"}, expected="spam",
                                                 got="ham")],
              "requested_at": now, "updated_at": now, **fields}
    return ImprovementRequest(**values)


def test_the_prompt_says_the_contract_the_task_and_what_went_wrong() -> None:
    system, user = messages_for(request())
    assert system["role"] == "system" and "run(input)" in system["content"] and "hashlib" in system["content"]
    assert "${" not in system["content"] + user["content"]
    assert "spam or ham" in user["content"] and '{"text":"free prize"} -> "spam"' in user["content"]
    assert "return 'ham'" in user["content"] and "secret-customer-input" in user["content"]
    assert prompt_version() >= 1


def test_without_send_inputs_no_request_input_leaves() -> None:
    for message in messages_for(request(), send_inputs=False):
        assert "secret-customer-input" not in message["content"]
    assert sent_request(request(), send_inputs=False)["failing_examples"] == []
    assert b"secret-customer-input" not in command_input(request(), send_inputs=False)
    assert b"secret-customer-input" in command_input(request())


def test_a_first_version_is_asked_for_as_such() -> None:
    _, user = messages_for(request(trigger=ImprovementTrigger.FIRST_VERSION, active_version=None,
                                   active_source=None, failing_examples=[]))
    assert "first version" in user["content"]
