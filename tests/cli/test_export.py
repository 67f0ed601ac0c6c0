"""`loopai export FILE` as a user runs it, stopped with Ctrl-C: a new file starts at the beginning of the results
topic, one that has lines resumes after them."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from app.contract.topics import topics_for
from app.kafka.clients import make_producer
from app.settings import Settings
from devtools.connect import java_binary


class _Export:
    """`loopai export FILE` in a subprocess, stopped with Ctrl-C (SIGINT) as a user would."""

    def __init__(self, settings: Settings, file: Path) -> None:
        self.file = file
        self.process = subprocess.Popen([sys.executable, "-m", "app.cli", "export", str(file)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, **settings.to_env()})
        assert self.process.stdout is not None
        self.said = self.process.stdout.readline()  # once Connect's REST API answers

    def lines_when(self, count: int, timeout_s: float = 60) -> list[str]:
        deadline = time.monotonic() + timeout_s
        lines: list[str] = []
        while time.monotonic() < deadline:
            lines = self.file.read_text().splitlines() if self.file.exists() else []
            if len(lines) >= count:
                return lines
            assert self.process.poll() is None, self.process.communicate()
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"{len(lines)} of {count} lines in {self.file} after {timeout_s}s: {self.said}")

    def stop(self) -> str:
        self.process.send_signal(signal.SIGINT)
        out, err = self.process.communicate(timeout=60)
        assert self.process.returncode == 0, err
        return out


async def test_export_to_a_new_file_starts_at_the_beginning_and_one_that_has_lines_resumes(
    settings: Settings, tmp_path: Path
) -> None:
    if java_binary() is None:
        pytest.skip("no java on PATH (see tests/devtools/test_connect.py)")
    topic = topics_for(settings.topic_prefix).execution_results.name

    async def produce(numbers: range) -> None:  # in one record batch: the count must not stop at its base
        producer = make_producer(settings)
        await producer.start()
        try:
            await asyncio.gather(*[await producer.send(topic, orjson.dumps({"n": n}), key=b"k") for n in numbers])
        finally:
            await producer.stop()

    await produce(range(5))
    first = _Export(settings, tmp_path / "results.jsonl")
    assert "from the start of the topic: 5 result(s) kept" in first.said, first.said
    assert len(first.lines_when(5)) == 5
    assert "export stopped: 5 result(s) written" in first.stop()

    # The issue: a second file after a first export got nothing, its group already past every result.
    second = _Export(settings, tmp_path / "results2.jsonl")
    assert "from the start of the topic" in second.said, second.said
    assert [orjson.loads(line)["n"] for line in second.lines_when(5)] == [0, 1, 2, 3, 4]
    second.stop()

    await produce(range(5, 7))
    again = _Export(settings, tmp_path / "results.jsonl")
    assert "resuming" in again.said and "holds 5 line(s): 2 of the 7 result(s)" in again.said, again.said
    assert [orjson.loads(line)["n"] for line in again.lines_when(7)] == list(range(7))  # nothing twice
    assert "2 result(s) written" in again.stop()
