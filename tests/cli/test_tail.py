"""`loopai tail` with `send`: the last records, -n, -f, filters, and the smaller commands on a live worker."""

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from app.contract.topics import topics_for
from devtools.broker import EmbeddedBroker
from tests.cli.conftest import loopai
from tests.conftest import WorkerProcess, make_settings


def test_send_and_tail(env: dict[str, str], tmp_path: Path) -> None:
    assert loopai(env, "topics", "apply").returncode == 0
    assert loopai(env, "task", "create", "spam").returncode == 0
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"request_id": "a", "input": {"text": "x"}}\n{"request_id": "b", "input": {"text": "y"}}\n')
    sent = loopai(env, "send", "spam", "--file", str(requests))
    assert sent.returncode == 0 and "sent 2" in sent.stdout, sent.stderr
    assert "sent 1" in loopai(env, "send", "spam", "--input", '{"text": "z"}').stdout
    tailed = loopai(env, "tail", "requests", "--idle-exit", "1")
    records = [json.loads(line) for line in tailed.stdout.splitlines()]
    assert [r["request_id"] for r in records[:2]] == ["a", "b"] and len(records) == 3
    assert {r["task_id"] for r in records} == {"spam"}
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    as_inputs = loopai(env, "send", "spam", "--file", str(inputs), "--inputs")
    assert as_inputs.returncode == 0 and "sent 2" in as_inputs.stdout, as_inputs.stderr
    assert [json.loads(line)["input"] for line in loopai(env, "tail", "requests", "-n", "2").stdout.splitlines()] \
        == [{"text": "one"}, {"text": "two"}]
    no_task = loopai(env, "send", "--file", str(inputs), "--inputs")
    assert no_task.returncode == 2 and "--inputs reads one input per line of --file for TASK_ID" in no_task.stderr
    bad = loopai(env, "send", "spam", "--input", '{"text": 1', )
    assert bad.returncode != 0 and "not JSON" in bad.stderr


def test_tail_n_prints_the_last_records_and_exits_and_follow_waits(env: dict[str, str], tmp_path: Path) -> None:
    assert loopai(env, "topics", "apply").returncode == 0
    assert loopai(env, "task", "create", "spam").returncode == 0
    none = loopai(env, "tail", "requests", "-n", "10", timeout=30)  # an empty topic: no hang, a note
    assert none.returncode == 0 and none.stdout == "" and "# no records in" in none.stderr, none.stderr
    for letter in "abcde":
        assert loopai(env, "send", "spam", "--file", _one_request(tmp_path, letter)).returncode == 0
    last = loopai(env, "tail", "requests", "-n", "2", timeout=30)
    assert [json.loads(line)["request_id"] for line in last.stdout.splitlines()] == ["d", "e"], last.stderr
    assert [json.loads(line)["request_id"] for line in loopai(env, "tail", "requests").stdout.splitlines()] == [
        *"abcde"]  # 10 by default, as tail
    everything = loopai(env, "tail", "requests", "--from-beginning", "-n", "1")
    assert sorted(json.loads(line)["request_id"] for line in everything.stdout.splitlines()) == [*"abcde"]
    filtered = loopai(env, "tail", "requests", "--task", "ghost", "-n", "3", timeout=30)
    assert filtered.stdout == "" and "# no matching records in" in filtered.stderr

    following = subprocess.Popen([sys.executable, "-m", "app.cli", "tail", "requests", "-n", "1", "-f"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, **env})
    try:
        assert following.stdout is not None and following.stderr is not None
        assert json.loads(following.stdout.readline())["request_id"] == "e"
        assert "waiting for new records on" in following.stderr.readline()
        assert loopai(env, "send", "spam", "--file", _one_request(tmp_path, "f")).returncode == 0
        assert json.loads(following.stdout.readline())["request_id"] == "f"  # the pipe's read ends the wait
        assert following.poll() is None
    finally:
        following.send_signal(signal.SIGINT)
        following.wait(timeout=30)
    assert following.returncode == 0


def test_send_wait_tail_filters_and_the_smaller_commands(
    broker: EmbeddedBroker, tmp_path: Path, start_worker: Callable[..., WorkerProcess]
) -> None:
    settings = make_settings(broker)
    env = settings.to_env()
    assert loopai(env, "topics", "apply").returncode == 0
    assert loopai(env, "task", "create", "echo").returncode == 0
    program = tmp_path / "echo.py"
    program.write_text("def run(input):\n    if input['n'] == 2:\n        raise ValueError('two')\n"
                       "    return input['n']\n")
    assert loopai(env, "artifact", "publish", "echo", str(program), "--activate").returncode == 0
    start_worker(settings)

    waited = loopai(env, "send", "echo", "--wait", *[a for n in (1, 2, 3) for a in ("--input", f'{{"n": {n}}}')])
    assert waited.returncode == 0, waited.stderr
    results = [json.loads(line) for line in waited.stdout.splitlines()]
    assert sorted((r["status"], r["output"]) for r in results) == [("error", None), ("ok", 1), ("ok", 3)]
    assert "sent 3 request(s), every one answered" in waited.stderr

    errors = loopai(env, "tail", "results", "--task", "echo", "--status", "error", "--idle-exit", "1")
    assert [json.loads(line)["error_message"] for line in errors.stdout.splitlines()] == ["ValueError: two"]
    first = loopai(env, "tail", "execution-results", "-n", "1", "--pretty")
    assert first.returncode == 0 and first.stdout.startswith("{\n  ") and json.loads(first.stdout)["task_id"] == "echo"
    assert loopai(env, "tail", "dead-letters", "--idle-exit", "0.5").returncode == 0  # either spelling names it
    assert loopai(env, "tail", "dead_letters", "--idle-exit", "0.5").returncode == 0

    assert loopai(env, "artifact", "show", "echo", "1", "--source").stdout == program.read_text() + "\n"
    assert json.loads(loopai(env, "artifact", "show", "echo", "1").stdout)["version"] == 1
    missing = loopai(env, "artifact", "show", "echo", "9")
    assert missing.returncode != 0 and "task 'echo' has no version 9; published: [1]" in missing.stderr

    listed = loopai(env, "topics", "list").stdout.splitlines()
    assert len(listed) == len(topics_for("").all())
    assert any(line.startswith(f"{settings.topic_prefix}program-artifacts\t3 partitions\tProgramArtifact\tcompact")
               for line in listed)
    assert all(line.endswith("partitions)") for line in listed), listed
    assert loopai(env, "--version").stdout.strip().startswith("loopai, version ")

    deleted = loopai(env, "task", "delete", "echo", "--yes")
    assert deleted.returncode == 0 and "deleted task echo and 1 version(s): v1" in deleted.stdout, deleted.stderr
    assert "unknown task 'echo'" in loopai(env, "task", "show", "echo").stderr
    assert "unknown task 'echo'" in loopai(env, "send", "echo", "--input", "{}").stderr


def _one_request(tmp_path: Path, request_id: str) -> str:
    path = tmp_path / f"{request_id}.jsonl"
    path.write_text(json.dumps({"request_id": request_id, "input": {"text": request_id}}) + "\n")
    return str(path)
