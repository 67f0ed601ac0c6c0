"""`loopai task create --generate`, `loopai artifact generate` and `loopai generator serve`'s refusals, run as a
user runs them, with `--command` generators."""

import json
import sys
from pathlib import Path

from tests.cli.conftest import loopai

PROGRAM = "def run(input):\n    return 'spam' if 'free' in input['text'].lower() else 'ham'\n"


def write_generator(tmp_path: Path, body: str, name: str = "write_program.py") -> str:
    script = tmp_path / name
    script.write_text(body)
    return f"{sys.executable} {script}"


def test_task_create_generate_publishes_a_first_version(env: dict[str, str], tmp_path: Path) -> None:
    assert loopai(env, "topics", "apply").returncode == 0
    examples = tmp_path / "examples.json"
    examples.write_text(json.dumps([{"input": {"text": "free prize"}, "expected_output": "spam"},
                                    {"input": {"text": "lunch"}, "expected_output": "ham"}]))
    command = write_generator(tmp_path, f"import json, sys\nasked = json.load(sys.stdin)\n"
                                        f"assert asked['request']['trigger'] == 'first_version'\nprint({PROGRAM!r})\n")
    made = loopai(env, "task", "create", "spam", "--examples", str(examples), "--generate", "--command", command)
    assert made.returncode == 0, made.stderr
    assert "task spam created" in made.stdout and "published as v1, active" in made.stdout
    assert "got 2/2 right offline" in made.stdout
    shown = json.loads(loopai(env, "artifact", "show", "spam", "1").stdout)
    assert shown["llm_provider"] == "command" and shown["synthesis_strategy"] == "rule" and shown["confidence"] == 1
    assert json.loads(loopai(env, "task", "show", "spam").stdout)["active_version"] == 1

    broken = write_generator(tmp_path, "print('def run(input):\\n    return open(\"/etc/passwd\").read()')\n",
                             "write_broken.py")
    refused = loopai(env, "artifact", "generate", "spam", "--command", broken)
    assert refused.returncode == 1 and "refused: the candidate fails the static check" in refused.stdout

    assert loopai(env, "task", "update", "spam", "--auto-improve", "off").returncode == 0
    assert json.loads(loopai(env, "task", "show", "spam").stdout)["auto_improve"] is False
    # Off is for automatic requests; a version asked for by hand for a task that has one starts as a canary.
    by_hand = loopai(env, "artifact", "generate", "spam", "--command", command)
    assert by_hand.returncode == 0 and "published as v2, a canary on 10%" in by_hand.stdout, by_hand.stdout


def test_no_generator_is_a_usage_error_before_anything_is_made(env: dict[str, str]) -> None:
    assert loopai(env, "topics", "apply").returncode == 0
    served = loopai(env, "generator", "serve")
    assert served.returncode == 2 and "no generator: set generator_command" in served.stderr
    made = loopai(env, "task", "create", "spam", "--generate")
    assert made.returncode == 2 and "no generator" in made.stderr
    assert loopai(env, "task", "show", "spam").returncode == 1  # not created
