"""What every command shares: one line of error for a bad config, a file that is not UTF-8, an absent or
silent broker."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from devtools.broker import free_port
from tests.cli.conftest import loopai


def test_invalid_config_file_names_the_field(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("executor_batch_size: lots\n")
    done = subprocess.run([sys.executable, "-m", "app.cli", "--config", str(config), "topics", "apply"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "invalid setting 'executor_batch_size'" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "args",
    [["send", "spam", "--file", "FILE"], ["artifact", "publish", "spam", "FILE"],
     ["task", "create", "spam", "--input-schema", "FILE"], ["--config", "FILE", "task", "list"]],
)
def test_a_file_that_is_not_utf8_is_a_clear_error(tmp_path: Path, args: list[str]) -> None:
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes('{"input": {"text": "caf\u00e9"}}\n'.encode("latin-1"))
    done = loopai({}, *[str(latin1) if a == "FILE" else a for a in args])
    assert done.returncode == 1
    assert f"{latin1}: not UTF-8 text (byte 0xe9 at offset 23)" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


KAFKA_COMMANDS = [
    ["topics", "apply"],
    ["task", "create", "spam"],
    ["task", "show", "spam"],
    ["task", "list"],
    ["artifact", "publish", "spam", "PROGRAM"],
    ["artifact", "activate", "spam", "1"],
    ["artifact", "list", "spam"],
    ["artifact", "canary", "spam", "2", "--percent", "10"],
    ["artifact", "promote", "spam"],
    ["artifact", "abort", "spam"],
    ["task", "update", "spam", "--description", "x"],
    ["oracle", "serve", "--labels", "LABELS"],
    ["send", "spam", "--input", "{}"],
    ["tail", "results"],
    ["worker"],
]


@pytest.mark.parametrize("kind", ["nothing listening", "silent"])
@pytest.mark.parametrize("args", KAFKA_COMMANDS, ids=" ".join)
def test_an_absent_broker_is_one_line_within_the_timeout(
    tmp_path: Path, silent_broker: str, kind: str, args: list[str]
) -> None:
    address = silent_broker if kind == "silent" else f"127.0.0.1:{free_port()}"
    (tmp_path / "p.py").write_text("def run(input):\n    return 1\n")
    (tmp_path / "labels.jsonl").write_text('{"input": {}, "output": 1}\n')
    files = {"PROGRAM": str(tmp_path / "p.py"), "LABELS": str(tmp_path / "labels.jsonl")}
    env = {"LOOPAI_BOOTSTRAP_SERVERS": address, "LOOPAI_CONNECT_TIMEOUT_S": "1"}
    started = time.monotonic()
    done = loopai(env, *[files.get(a, a) for a in args], timeout=30)
    elapsed = time.monotonic() - started
    assert done.returncode == 1
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"cannot reach Kafka: {address}" in done.stderr and "LOOPAI_BOOTSTRAP_SERVERS" in done.stderr
    if kind == "silent":  # it gave up after the timeout it was given (the wall clock cannot say: see below)
        assert "did not answer within 1 s (connect_timeout_s)" in done.stderr, done.stderr
    # No hang. About 2 s alone; beside the rest of the suite on two cores, the interpreter's start alone has
    # taken 8 s, so the wall clock only bounds it well below the subprocess's own 30 s.
    assert elapsed < 1 + 20, elapsed


def test_a_silent_broker_fails_within_the_default_timeout(silent_broker: str) -> None:
    started = time.monotonic()
    done = loopai({"LOOPAI_BOOTSTRAP_SERVERS": silent_broker}, "task", "list", timeout=60)
    assert done.returncode == 1 and "did not answer within 5 s (connect_timeout_s)" in done.stderr, done.stderr
    assert time.monotonic() - started < 5 + 20  # no hang; the interpreter's start may take 8 s on a busy machine
