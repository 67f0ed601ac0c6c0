"""`loopai artifact` and the task commands around it: the lifecycle, canaries, clear errors for bad input."""

import json
from pathlib import Path

import pytest

from devtools.broker import EmbeddedBroker
from tests.cli.conftest import loopai
from tests.conftest import make_settings


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
        (["task", "create", "spam"], "task 'spam' already exists; change it with `loopai task update spam`"),
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


def test_canary_start_promote_and_abort_show_in_artifact_list(env: dict[str, str], tmp_path: Path) -> None:
    assert loopai(env, "topics", "apply").returncode == 0
    assert loopai(env, "task", "create", "spam").returncode == 0
    program = tmp_path / "p.py"
    program.write_text("def run(input):\n    return 'spam'\n")
    assert loopai(env, "artifact", "publish", "spam", str(program), "--activate").returncode == 0
    for _ in range(2):
        assert loopai(env, "artifact", "publish", "spam", str(program)).returncode == 0

    started = loopai(env, "artifact", "canary", "spam", "2", "--percent", "10")
    assert started.returncode == 0, started.stderr
    assert started.stdout == "spam: canary v2 started: 10% of requests run v2, the rest v1\n"
    listed = loopai(env, "artifact", "list", "spam").stdout.splitlines()
    assert listed[0].startswith("* v1") and listed[1].startswith("~ v2") and listed[1].endswith("\tcanary 10%")
    assert listed[2].startswith("  v3") and listed[3] == "canary decisions:"
    assert listed[4].endswith("\tstarted\tv2 vs v1\taccuracy - vs - (0 validations)\t10% of requests run v2, "
                              "the rest v1\tby manual")

    promoted = loopai(env, "artifact", "promote", "spam")
    assert promoted.stdout == "spam: canary v2 promoted: promoted by hand: v2 replaces v1\n", promoted.stderr
    assert loopai(env, "artifact", "canary", "spam", "3", "--percent", "2.5").returncode == 0
    aborted = loopai(env, "artifact", "abort", "spam")
    assert aborted.stdout == "spam: canary v3 aborted: aborted by hand: v2 stays active\n", aborted.stderr

    listed = loopai(env, "artifact", "list", "spam").stdout.splitlines()
    assert [line[:4] for line in listed[:3]] == ["  v1", "* v2", "  v3"]
    actions = [line.split("\t")[1:3] for line in listed[4:]]
    assert actions == [["started", "v2 vs v1"], ["promoted", "v2 vs v1"], ["started", "v3 vs v2"],
                       ["aborted", "v3 vs v2"]]


@pytest.fixture(scope="module")
def canary_env(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A task spam with v1 active and v2, v3 published, and no canary; the tests using it must not change it."""
    env = make_settings(broker).to_env()
    program = tmp_path_factory.mktemp("canary") / "p.py"
    program.write_text("def run(input):\n    return 1\n")
    for args in (["topics", "apply"], ["task", "create", "spam"], ["artifact", "publish", "spam", str(program),
                 "--activate"], ["artifact", "publish", "spam", str(program)], ["artifact", "publish", "spam",
                 str(program)]):
        done = loopai(env, *args)
        assert done.returncode == 0, done.stderr
    return env


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["artifact", "canary", "ghost", "2", "--percent", "10"], "unknown task 'ghost'"),
        (["artifact", "canary", "spam", "9", "--percent", "10"], "task 'spam' has no version 9; published: [1, 2, 3]"),
        (["artifact", "canary", "spam", "1", "--percent", "10"], "task 'spam' v1 is the active version already"),
        (["artifact", "canary", "spam", "2", "--percent", "0"], "percent must be more than 0 and at most 100, not 0"),
        (["artifact", "canary", "spam", "2", "--percent", "150"], "at most 100, not 150"),
        (["artifact", "canary", "spam", "2", "--percent", "ten"], "'ten' is not a valid float"),
        (["artifact", "canary", "spam", "2"], "Missing option '--percent'"),
        (["artifact", "canary", "spam", "two", "--percent", "10"], "'two' is not a valid integer"),
        (["artifact", "promote", "spam"], "task 'spam' has no canary running; start one with `loopai artifact canary"),
        (["artifact", "abort", "spam"], "task 'spam' has no canary running"),
        (["artifact", "promote", "ghost"], "unknown task 'ghost'"),
        (["task", "update", "ghost", "--description", "x"], "unknown task 'ghost'"),
        (["task", "update", "spam"], "nothing to change"),
        (["task", "update", "spam", "--comparison", "numeric"], "task 'spam' has no oracle; give its kind"),
        (["task", "update", "spam", "--oracle", "none", "--tolerance", "1"], "give no other oracle option with it"),
        (["task", "update", "spam", "--oracle", "shadow", "--shadow-version", "9"], "task 'spam' has no version 9"),
        (["task", "update", "spam", "--oracle", "label", "--shadow-version", "2"], "shadow version is for a shadow"),
        (["task", "update", "spam", "--accuracy-target", "1.5"], "invalid field 'accuracy_target'"),
        (["task", "create", "new", "--tolerance", "1"], "describe an oracle: give its kind with --oracle"),
        (["task", "create", "new", "--oracle", "psychic"], "'psychic' is not one of 'label', 'shadow', 'external'"),
        (["task", "create", "new", "--sampling-strategy", "all"], "'all' is not one of 'random', 'stratified'"),
        (["task", "create", "new", "--oracle-timeout-s", "0"], "0.0 is not in the range x>0"),
    ],
)
def test_bad_canary_and_task_options_get_a_clear_error(canary_env: dict[str, str], args: list[str],
                                                       message: str) -> None:
    done = loopai(canary_env, *args)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
