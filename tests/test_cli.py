"""The `loopai` command against the embedded broker, run as a user would (a subprocess)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.broker import EmbeddedBroker
from app.topics import topics_for
from tests.conftest import make_settings


def loopai(settings_env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **settings_env})


@pytest.fixture
def env(broker: EmbeddedBroker) -> dict[str, str]:
    return make_settings(broker).to_env()


def test_topics_apply_is_idempotent(env: dict[str, str]) -> None:
    first = loopai(env, "topics", "apply")
    assert first.returncode == 0, first.stderr
    count = len(topics_for("").all())
    assert first.stdout.count("created") == count and "compact" in first.stdout
    second = loopai(env, "topics", "apply")
    assert second.stdout.count("exists") == count and "created" not in second.stdout


def test_task_and_artifact_lifecycle(env: dict[str, str], tmp_path: Path) -> None:
    assert loopai(env, "topics", "apply").returncode == 0
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "required": ["text"]}))
    created = loopai(env, "task", "create", "spam", "--description", "spam or ham", "--input-schema", str(schema))
    assert created.returncode == 0, created.stderr
    program = tmp_path / "p.py"
    program.write_text("def run(input):\n    return 'spam'\n")
    assert "v1" in loopai(env, "artifact", "publish", "spam", str(program), "--activate").stdout
    assert "v2" in loopai(env, "artifact", "publish", "spam", str(program)).stdout
    listed = loopai(env, "artifact", "list", "spam").stdout.splitlines()
    assert listed[0].startswith("* v1") and listed[1].startswith("  v2")
    assert loopai(env, "artifact", "activate", "spam", "2").returncode == 0
    assert loopai(env, "artifact", "list", "spam").stdout.splitlines()[1].startswith("* v2")
    shown = json.loads(loopai(env, "task", "show", "spam").stdout)
    assert shown["active_version"] == 2 and shown["input_schema"] == {"type": "object", "required": ["text"]}
    assert "spam\tactive=2" in loopai(env, "task", "list").stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["artifact", "publish", "ghost", "PROGRAM"], "unknown task 'ghost'"),
        (["artifact", "activate", "spam", "7"], "task 'spam' has no version 7"),
        (["artifact", "publish", "spam", "BAD_PROGRAM"], "import of 'os' is not allowed"),
        (["task", "create", "bad name"], "invalid field 'name'"),
        (["task", "create", "ok", "--sampling-rate", "2"], "invalid field 'sampling_rate'"),
        (["task", "show", "ghost"], "unknown task 'ghost'"),
    ],
)
def test_bad_input_gets_a_clear_error(env: dict[str, str], tmp_path: Path, args: list[str], message: str) -> None:
    assert loopai(env, "topics", "apply").returncode == 0
    (tmp_path / "ok.py").write_text("def run(input):\n    return 1\n")
    (tmp_path / "bad.py").write_text("import os\ndef run(input):\n    return 1\n")
    assert loopai(env, "task", "create", "spam").returncode == 0
    args = [str(tmp_path / "ok.py") if a == "PROGRAM" else str(tmp_path / "bad.py") if a == "BAD_PROGRAM" else a
            for a in args]
    done = loopai(env, *args)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_invalid_config_file_names_the_field(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("executor_batch_size: lots\n")
    done = subprocess.run([sys.executable, "-m", "app.cli", "--config", str(config), "topics", "apply"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "invalid setting 'executor_batch_size'" in done.stderr and "Traceback" not in done.stderr


def test_send_and_tail(env: dict[str, str], tmp_path: Path) -> None:
    assert loopai(env, "topics", "apply").returncode == 0
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"request_id": "a", "input": {"text": "x"}}\n{"request_id": "b", "input": {"text": "y"}}\n')
    sent = loopai(env, "send", "spam", "--file", str(requests))
    assert sent.returncode == 0 and "sent 2" in sent.stdout, sent.stderr
    assert "sent 1" in loopai(env, "send", "spam", "--input", '{"text": "z"}').stdout
    tailed = loopai(env, "tail", "requests", "--idle-exit", "1")
    records = [json.loads(line) for line in tailed.stdout.splitlines()]
    assert [r["request_id"] for r in records[:2]] == ["a", "b"] and len(records) == 3
    assert {r["task_id"] for r in records} == {"spam"}
    bad = loopai(env, "send", "spam", "--input", '{"text": 1', )
    assert bad.returncode != 0 and "not JSON" in bad.stderr


def test_dev_runs_the_whole_loop() -> None:
    done = subprocess.run([sys.executable, "-m", "app.cli", "dev", "--duration", "4", "--rate", "25"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "spam-filter: version 2 activated" in done.stdout
    assert " 0 missing" in done.stdout
    assert "spam-filter v1 ok" in done.stdout and "spam-filter v2 ok" in done.stdout
