"""The improvement part of `loopai dev`: a review-sentiment task whose v1 misses a kind of praise, labelled traffic
for it, and a generator in process asking a fake OpenAI-compatible endpoint (devtools/fake_llm.py, fixtures, no
model) for a better version; prints each improvement request and outcome as it comes."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable, Iterator
from types import TracebackType

from app.contract.records import ImprovementRequest, TaskExample, TaskSpec, utc_now
from app.contract.topics import topics_for
from app.generator.providers import ChatCompletions
from app.generator.service import GeneratorService
from app.kafka.loop_client import follow
from app.settings import Settings
from devtools.fake_llm import FakeChat, Fixture
from devtools.samples import TEXT_INPUT_SCHEMA, program_source

TASK = "review-sentiment"
# v1 gets every review praised in other words than "great" or "love" wrong: half of these.
TRUTH = {
    "Great phone, love the screen": "positive",
    "I love it": "positive",
    "Excellent battery, superb camera": "positive",
    "Wonderful service, fantastic price": "positive",
    "Broke after a day": "negative",
    "Terrible, do not buy": "negative",
    "Arrived late and damaged": "negative",
    "Outstanding quality": "positive",
}
BETTER = ("PRAISE = ('great', 'love', 'excellent', 'superb', 'wonderful', 'fantastic', 'outstanding')\n\n\n"
          "def run(input):\n    text = input['text'].lower()\n"
          "    return 'positive' if any(word in text for word in PRAISE) else 'negative'\n")


def sentiment_task() -> TaskSpec:
    """Validated on every request (its requests carry their label), so it falls short within a second or two."""
    return TaskSpec(name=TASK, description="Say whether a product review is positive or negative.",
                    input_schema=TEXT_INPUT_SCHEMA, sampling_rate=1.0, accuracy_target=0.9, updated_at=utc_now(),
                    examples=[TaskExample(input={"text": "Great value"}, expected_output="positive"),
                              TaskExample(input={"text": "Awful"}, expected_output="negative")])


def sentiment_source() -> str:
    return program_source("sentiment_v1")


def sentiment_traffic() -> Iterator[tuple[dict[str, str], str]]:
    """An endless cycle of (input, its true label)."""
    for text in itertools.cycle(TRUTH):
        yield {"text": text}, TRUTH[text]


class Generator:
    """`async with Generator(settings):` a fake endpoint and `loopai generator serve` asking it, in this process."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._chat = FakeChat([Fixture(f"Task: {TASK}", f"```python\n{BETTER}```\n")])
        self._stop = asyncio.Event()
        self._serving: asyncio.Future[None] | None = None
        self._service: GeneratorService | None = None

    async def __aenter__(self) -> Generator:
        await self._chat.__aenter__()
        provider = ChatCompletions(self._chat.base_url, "fixture-coder", timeout_s=10)
        self._service = GeneratorService(self._settings, provider)
        await self._service.__aenter__()
        ready = asyncio.Event()
        self._serving = asyncio.ensure_future(self._service.run(self._stop, on_ready=ready.set))
        await asyncio.wait_for(ready.wait(), 60)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._stop.set()
        if self._serving is not None:
            with contextlib.suppress(Exception):
                await self._serving
        if self._service is not None:
            await self._service.__aexit__(exc_type, exc, tb)
        await self._chat.__aexit__(exc_type, exc, tb)


def improvement_line(record: ImprovementRequest) -> str:
    """One improvement record on one line, as `loopai dev` prints it."""
    candidate = f" -> v{record.candidate_version}" if record.candidate_version else ""
    return f"{record.task_id} v{record.active_version or '-'}{candidate}: {record.status.value}: {record.reason}"


async def print_improvements(settings: Settings, lines: list[str], say: Callable[[str], None]) -> None:
    spec = topics_for(settings.topic_prefix).improvement_requests
    async for _, _, record in follow(settings, spec):
        if isinstance(record, ImprovementRequest):
            lines.append(improvement_line(record))
            say(f">>> improvement {lines[-1]}")
