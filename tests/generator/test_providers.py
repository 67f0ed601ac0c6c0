"""Both providers against what they talk to: a fake OpenAI-compatible server, and real commands."""

import json
import sys

import pytest
from pydantic import SecretStr

from app.generator.providers import ChatCompletions, Command, GenerationError, provider_from
from app.settings import Settings
from devtools.fake_llm import FakeChat, Fixture
from tests.generator.test_prompt import request

PROGRAM = "```python\ndef run(input):\n    return 'spam'\n```"


async def test_chat_completions_sends_the_prompt_and_the_key_and_returns_the_answer() -> None:
    async with FakeChat([Fixture("spam or ham", PROGRAM)]) as chat:
        provider = ChatCompletions(chat.base_url, "tiny-coder", SecretStr("sk-test"), timeout_s=10)
        assert await provider.answer(request()) == PROGRAM
    sent = chat.requests[0]
    assert sent["model"] == "tiny-coder" and sent["authorization"] == "Bearer sk-test"
    assert [m["role"] for m in sent["messages"]] == ["system", "user"]


@pytest.mark.parametrize(("fixture", "complaint"), [
    (Fixture("spam", "overloaded", status=503), "HTTP 503"),
    (Fixture("spam", "", delay_s=5), "did not answer within 0.5 s"),
    (Fixture("nothing matches", PROGRAM), "HTTP 404"),
])
async def test_chat_completions_failures_say_why(fixture: Fixture, complaint: str) -> None:
    async with FakeChat([fixture]) as chat:
        with pytest.raises(GenerationError, match=complaint):
            await ChatCompletions(chat.base_url, "m", timeout_s=0.5).answer(request())


async def test_an_endpoint_that_is_not_there() -> None:
    with pytest.raises(GenerationError, match="unreachable"):
        await ChatCompletions("http://127.0.0.1:9/v1", "m", timeout_s=5).answer(request())


def script(body: str) -> str:
    return f"{sys.executable} -c {json.dumps(body)}"


async def test_command_reads_the_request_on_stdin_and_prints_a_program() -> None:
    echo_task = ("import json, sys; sent = json.load(sys.stdin); "
                 "print('def run(input):\\n    return ' + repr(sent['request']['task_id']))")
    answer = await Command(script(echo_task), timeout_s=10).answer(request())
    assert answer.strip() == "def run(input):\n    return 'spam'"


@pytest.mark.parametrize(("body", "complaint"), [
    ("import sys; sys.stderr.write('no model'); sys.exit(3)", "exited 3: no model"),
    ("import time; time.sleep(10)", "did not answer within 0.5 s"),
    ("pass", "printed nothing"),
])
async def test_command_failures_say_why(body: str, complaint: str) -> None:
    with pytest.raises(GenerationError, match=complaint):
        await Command(script(body), timeout_s=0.5).answer(request())


def test_the_provider_comes_from_the_settings() -> None:
    assert isinstance(provider_from(Settings(generator_command="cat")), Command)
    chat = provider_from(Settings(generator_base_url="http://x/v1", generator_model="m",
                                       generator_api_key="sk-secret"))
    assert isinstance(chat, ChatCompletions) and chat.url == "http://x/v1/chat/completions"
    assert "sk-secret" not in repr(Settings(generator_api_key="sk-secret"))
    with pytest.raises(ValueError, match="no generator"):
        provider_from(Settings())
