"""Where candidate programs come from: an OpenAI-compatible chat-completions endpoint (hosted APIs, vLLM,
llama.cpp's server, Ollama), or any command that reads the request as JSON on stdin and prints a program. Each
turns an improvement request into the answer's text; a failure is a GenerationError saying why."""

from __future__ import annotations

import asyncio
import contextlib
import shlex
from typing import Any, Protocol

import aiohttp
from pydantic import SecretStr

from app.contract.records import ImprovementRequest
from app.generator.prompt import command_input, messages_for
from app.settings import Settings

_SHOWN = 300  # characters of an endpoint's or a command's complaint kept in the reason


class GenerationError(Exception):
    """No answer: the endpoint or command failed, timed out, or answered something that is not one."""


class Provider(Protocol):
    """A source of candidate programs."""

    name: str
    model: str | None

    async def answer(self, request: ImprovementRequest) -> str:
        """The answer's text (a program, fenced or not); GenerationError when there is none."""
        ...


class ChatCompletions:
    """An OpenAI-compatible POST {base_url}/chat/completions."""

    name = "openai-compatible"

    def __init__(self, base_url: str, model: str, api_key: SecretStr | None = None, timeout_s: float = 120.0,
                 temperature: float = 0.2, send_inputs: bool = True) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model: str | None = model
        self._api_key = api_key
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._timeout_s = timeout_s
        self._temperature = temperature
        self._send_inputs = send_inputs

    async def answer(self, request: ImprovementRequest) -> str:
        headers = {"Authorization": f"Bearer {self._api_key.get_secret_value()}"} if self._api_key else {}
        body = {"model": self.model, "messages": messages_for(request, self._send_inputs),
                "temperature": self._temperature}
        try:
            async with aiohttp.ClientSession(timeout=self._timeout) as session, \
                    session.post(self.url, json=body, headers=headers) as response:
                text = await response.text()
                if response.status != 200:
                    raise GenerationError(f"{self.url} answered HTTP {response.status}: {text[:_SHOWN]}")
                try:
                    found: Any = await response.json(content_type=None)
                except ValueError:
                    raise GenerationError(f"{self.url} answered something that is not JSON: {text[:_SHOWN]}") from None
        except TimeoutError:
            raise GenerationError(f"{self.url} did not answer within {self._timeout_s:g} s") from None
        except aiohttp.ClientError as exc:
            raise GenerationError(f"{self.url} unreachable: {exc}") from None
        try:
            content = found["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise GenerationError(f"{self.url} answered without choices[0].message.content: "
                                  f"{str(found)[:_SHOWN]}") from None
        if not isinstance(content, str) or not content.strip():
            raise GenerationError(f"{self.url} answered an empty message")
        return content


class Command:
    """A program run once per request: the request as JSON on stdin (command_input), a program on stdout."""

    name = "command"

    def __init__(self, command: str, timeout_s: float = 120.0, send_inputs: bool = True) -> None:
        self.argv = shlex.split(command)
        if not self.argv:
            raise ValueError("the generator command is empty")
        self.model: str | None = self.argv[0].rsplit("/", 1)[-1]
        self._timeout_s = timeout_s
        self._send_inputs = send_inputs

    async def answer(self, request: ImprovementRequest) -> str:
        try:
            process = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
        except OSError as exc:
            raise GenerationError(f"cannot run {self.argv[0]!r}: {exc.strerror or exc}") from None
        try:
            stdout, stderr = await asyncio.wait_for(
                process.communicate(command_input(request, self._send_inputs)), self._timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise GenerationError(f"{self.argv[0]!r} did not answer within {self._timeout_s:g} s") from None
        if process.returncode != 0:
            raise GenerationError(f"{self.argv[0]!r} exited {process.returncode}: "
                                  f"{stderr.decode(errors='replace')[-_SHOWN:]}")
        answer = stdout.decode(errors="replace")
        if not answer.strip():
            raise GenerationError(f"{self.argv[0]!r} printed nothing")
        return answer


def provider_from(settings: Settings) -> Provider:
    """The provider the settings name: generator_command, else the generator_base_url endpoint."""
    if settings.generator_command:
        return Command(settings.generator_command, settings.generator_timeout_s, settings.generator_send_inputs)
    if settings.generator_base_url and settings.generator_model:
        return ChatCompletions(settings.generator_base_url, settings.generator_model, settings.generator_api_key,
                               settings.generator_timeout_s, settings.generator_temperature,
                               settings.generator_send_inputs)
    raise ValueError("no generator: set generator_command (--command), or generator_base_url and generator_model "
                     "(--base-url, --model) for an OpenAI-compatible endpoint")
