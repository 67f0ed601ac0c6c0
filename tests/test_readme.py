"""The README's "Using it" block, run line by line as written, so it cannot drift from the code and the files
in examples/quickstart/.

Each line runs from a directory holding `examples/` (a link to the repository's), so what the commands write
(results.jsonl, the worker's data) stays out of the checkout. Lines the README marks "own terminal" run in the
background until the end. Two departures, both forced by a shared test machine: `loopai broker` gets
`--port 0` (9092 may be taken), and the worker gets the embedded broker's short timings and no HTTP port."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from devtools.broker import EMBEDDED_TIMINGS
from devtools.connect import java_binary

REPO = Path(__file__).resolve().parent.parent
LOOPAI = str(Path(sys.executable).parent / "loopai")
# What each long-running command prints once it is ready.
READY = {"broker": "export LOOPAI_BOOTSTRAP_SERVERS=", "oracle": "serving", "worker": "serving",
         "tail": "waiting for new records", "export": "exporting"}


def using_it_lines() -> list[str]:
    """The command lines of the first code block under "## Using it"."""
    section = (REPO / "README.md").read_text().split("\n## Using it\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


@dataclass
class Background:
    line: str
    log: Path
    process: subprocess.Popen[bytes]
    stopped: int | None = field(default=None)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout_s: float = 60) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.output():
                return self.output()
            assert self.process.poll() is None, f"{self.line!r} exited {self.process.returncode}:\n{self.output()}"
            time.sleep(0.1)
        pytest.fail(f"{self.line!r} did not print {text!r} within {timeout_s}s:\n{self.output()[-3000:]}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def test_the_readme_using_it_block_runs_as_written(tmp_path: Path) -> None:
    if java_binary() is None:
        pytest.skip("no java on PATH: `loopai export` needs Java 17 (make test names what to install)")
    lines = using_it_lines()
    assert len(lines) >= 20, lines
    (tmp_path / "examples").symlink_to(REPO / "examples")
    env = {name: value for name, value in os.environ.items() if not name.startswith("LOOPAI_")}
    env.update({f"LOOPAI_{name.upper()}": str(value) for name, value in EMBEDDED_TIMINGS.items()})
    env["LOOPAI_WEB_PORT"] = "0"
    background: list[Background] = []
    outputs: dict[str, str] = {}
    try:
        for line in lines:
            words = shlex.split(line, comments=True)
            if words[0] == "export":  # the shell's export: the line `loopai broker` printed, port aside
                name, value = words[1].split("=", 1)
                printed = re.search(r"^export LOOPAI_BOOTSTRAP_SERVERS=(\S+)$", background[0].output(), re.M)
                assert printed and name == "LOOPAI_BOOTSTRAP_SERVERS", background[0].output()
                assert value.rsplit(":", 1)[0] == printed.group(1).rsplit(":", 1)[0]
                env[name] = printed.group(1)
                continue
            assert words[0] == "loopai", line
            command = [LOOPAI, *words[1:]]
            if "own terminal" in line:
                if words[1] == "broker":
                    command += ["--port", "0"]
                log = tmp_path / f"background-{len(background)}.log"
                process = subprocess.Popen(command, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                                           stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
                background.append(Background(line, log, process))
                background[-1].wait_for(READY[words[1]])
                continue
            done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
            assert done.returncode == 0, f"{line}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}"
            outputs[" ".join(words[1:])] = done.stdout

        # What the lines did, beyond exiting 0.
        waited = next(out for command, out in outputs.items() if "--wait" in command)
        assert len(waited.splitlines()) == 6 and '"status":"ok"' in waited
        canary = next(out for command, out in outputs.items() if command.startswith("artifact canary"))
        assert "canary v3 started" in canary
        tailed = next(out for command, out in outputs.items() if command.startswith("tail"))
        assert '"status": "ok"' in tailed and '"task_id": "spam-filter"' in tailed
        exported = tmp_path / "results.jsonl"  # 1 + 6 + 5 requests sent above, each one result
        deadline = time.monotonic() + 60
        while not (exported.exists() and len(exported.read_text().splitlines()) >= 12):
            assert time.monotonic() < deadline, f"results.jsonl: {background[-1].output()[-3000:]}"
            time.sleep(0.2)
        follower = next(b for b in background if " tail " in b.line)  # started before the first send
        while follower.output().count('"task_id":"spam-filter"') < 12:
            assert time.monotonic() < deadline, follower.output()
            time.sleep(0.2)
    finally:
        for process in reversed(background):  # the broker last
            process.stopped = process.stop()
    assert [(b.line, b.stopped) for b in background] == [(b.line, 0) for b in background], \
        "\n\n".join(b.output()[-2000:] for b in background)
