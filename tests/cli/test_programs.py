"""`loopai run` and `loopai artifact check`: offline, through the workers' own sandbox and static check."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


def loopai(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def program(tmp_path: Path):
    def write(source: str) -> str:
        path = tmp_path / "program.py"
        path.write_text(source)
        return str(path)

    return write


def test_run_prints_the_outcome(program) -> None:
    done = loopai("run", program("def run(input):\n    return input['n'] * 2\n"), "--input", '{"n": 21}')
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout)
    assert outcome["status"] == "ok" and outcome["output"] == 42 and outcome["error_message"] is None
    assert outcome["duration_ms"] >= 0


def test_run_enforces_the_timeout_and_memory_limit(program) -> None:
    done = loopai("run", program("def run(input):\n    while True:\n        pass\n"), "--input", "{}",
                  "--timeout-ms", "100")
    assert done.returncode == 1 and json.loads(done.stdout)["status"] == "timeout"
    done = loopai("run", program("def run(input):\n    return len(bytearray(200 << 20))\n"), "--input", "{}",
                  "--memory-mb", "128")
    assert done.returncode == 1 and json.loads(done.stdout)["error_message"] == "program ran out of memory"


def test_run_cannot_reach_the_worker_environment(program, monkeypatch) -> None:
    monkeypatch.setenv("LOOPAI_SASL_PASSWORD", "s3cret")
    done = loopai("run", program("import json\ndef run(input):\n    return json.dumps(input)\n"), "--input", "{}")
    assert done.returncode == 0 and "s3cret" not in done.stdout


def test_run_refuses_bad_input_clearly(program) -> None:
    done = loopai("run", program("def run(input):\n    return 1\n"), "--input", "{not json")
    assert done.returncode == 2 and "not JSON" in done.stderr and "Traceback" not in done.stderr


def test_check_lists_each_problem_with_its_line(program) -> None:
    path = program("import os\ndef run(input):\n    return '{0.__class__}'.format(input)\n")
    done = loopai("artifact", "check", path)
    assert done.returncode == 1
    assert f"{path}: line 1: import of 'os' is not allowed" in done.stderr
    assert f"{path}: line 3: attribute 'format' is not allowed" in done.stderr


def test_check_accepts_a_good_program(program, tmp_path: Path) -> None:
    done = loopai("artifact", "check", program("def run(input):\n    return 1\n"))
    assert done.returncode == 0 and done.stdout.strip().endswith(": ok")
    bad = tmp_path / "latin1.py"
    bad.write_bytes(b"def run(input):\n    return '\xe9'\n")
    done = loopai("artifact", "check", str(bad))
    assert done.returncode == 1 and "not UTF-8" in done.stderr and "Traceback" not in done.stderr
