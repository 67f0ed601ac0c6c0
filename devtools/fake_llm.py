"""A small OpenAI-compatible chat-completions server that answers from fixtures, for tests and `loopai dev`: no
model, no network. Each fixture is (a text the user message contains, the answer); the first that matches answers.
A fixture's answer may also be a delay (seconds to wait before answering, to time a client out) or an HTTP status."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Fixture:
    contains: str
    answer: str = ""
    delay_s: float = 0.0
    status: int = 200


@dataclass
class FakeChat:
    """Serve with `async with FakeChat([...]) as chat:`; `chat.base_url` is what a client is given."""

    fixtures: list[Fixture]
    requests: list[dict[str, Any]] = field(default_factory=list)  # every body received, with its headers
    base_url: str = ""

    async def __aenter__(self) -> FakeChat:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._complete)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._runner.cleanup()

    async def _complete(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append({**body, "authorization": request.headers.get("Authorization")})
        user = next((m["content"] for m in body.get("messages", []) if m.get("role") == "user"), "")
        for fixture in self.fixtures:
            if fixture.contains in user:
                if fixture.delay_s:
                    await asyncio.sleep(fixture.delay_s)
                if fixture.status != 200:
                    return web.Response(status=fixture.status, text=fixture.answer or "fixture error")
                return web.json_response({
                    "id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "model": body.get("model"),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": fixture.answer}}],
                })
        return web.Response(status=404, text="no fixture matches this prompt")
