"""The `loopai` command against the embedded broker, run as a user would (a subprocess)."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from app.contract.topics import topics_for
from devtools.broker import EmbeddedBroker, free_port
from tests.conftest import WorkerProcess, make_settings


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


def test_task_create_and_update_set_sampling_and_oracle(env: dict[str, str], tmp_path: Path) -> None:
    assert loopai(env, "topics", "apply").returncode == 0
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object"}))
    created = loopai(env, "task", "create", "spam", "--input-schema", str(schema), "--sampling-strategy",
                     "stratified", "--oracle", "external", "--comparison", "numeric", "--tolerance", "0.5",
                     "--oracle-timeout-s", "5")
    assert created.returncode == 0 and "task spam created" in created.stdout, created.stderr
    shown = json.loads(loopai(env, "task", "show", "spam").stdout)
    assert shown["sampling_strategy"] == "stratified" and shown["input_schema"] == {"type": "object"}
    assert shown["oracle"] == {"kind": "external", "comparison": "numeric", "tolerance": 0.5, "shadow_version": None,
                               "timeout_s": 5.0}

    updated = loopai(env, "task", "update", "spam", "--sampling-rate", "0.2", "--comparison", "exact")
    assert updated.returncode == 0 and "task spam updated: oracle, sampling_rate" in updated.stdout, updated.stderr
    shown = json.loads(loopai(env, "task", "show", "spam").stdout)
    assert shown["sampling_rate"] == 0.2 and shown["sampling_strategy"] == "stratified"
    assert shown["input_schema"] == {"type": "object"}  # issue 11: a second create used to wipe it
    assert shown["oracle"]["comparison"] == "exact" and shown["oracle"]["timeout_s"] == 5.0

    assert loopai(env, "task", "update", "spam", "--oracle", "none").returncode == 0
    assert json.loads(loopai(env, "task", "show", "spam").stdout)["oracle"] is None


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


def test_invalid_config_file_names_the_field(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("executor_batch_size: lots\n")
    done = subprocess.run([sys.executable, "-m", "app.cli", "--config", str(config), "topics", "apply"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "invalid setting 'executor_batch_size'" in done.stderr and "Traceback" not in done.stderr


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


def _one_request(tmp_path: Path, request_id: str) -> str:
    path = tmp_path / f"{request_id}.jsonl"
    path.write_text(json.dumps({"request_id": request_id, "input": {"text": request_id}}) + "\n")
    return str(path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ghost", "--input", '{"text": "x"}'], "unknown task 'ghost'; create it with `loopai task create ghost`"),
        (["spam", "--input", '{"text": "x"}', "--version", "3"], "task 'spam' has no version 3; published: [1]"),
        (["--file", "JSONL"], "unknown task 'ghost'"),
    ],
)
def test_send_refuses_requests_that_could_only_be_rejected(
    env: dict[str, str], tmp_path: Path, args: list[str], message: str
) -> None:
    assert loopai(env, "topics", "apply").returncode == 0
    assert loopai(env, "task", "create", "spam").returncode == 0
    (tmp_path / "p.py").write_text("def run(input):\n    return 1\n")
    assert loopai(env, "artifact", "publish", "spam", str(tmp_path / "p.py")).returncode == 0
    jsonl = tmp_path / "requests.jsonl"
    jsonl.write_text('{"task_id": "spam", "input": {}}\n{"task_id": "ghost", "input": {}}\n')
    done = loopai(env, "send", *[str(jsonl) if a == "JSONL" else a for a in args])
    assert done.returncode != 0 and message in done.stderr, done.stderr
    tailed = loopai(env, "tail", "requests", "--idle-exit", "0.5")
    assert tailed.returncode == 0 and tailed.stdout == ""  # nothing was sent, not even the good line


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"input": {"text": 1}', "line 3: not JSON: Expecting ',' delimiter (column 22)"),
        ('["not", "a", "request"]', "line 3: expected a JSON object, got list"),
        ('{"input": {}, "timeout_ms": 0}', "line 3: invalid request field 'timeout_ms'"),
        ('{"input": {}, "colour": "red"}', "line 3: invalid request field 'colour'"),
        ('{"text": "an input, not a request"}',
         'line 3: a request needs an "input" object; for a file of one input per line, add --inputs'),
    ],
)
def test_a_bad_jsonl_line_is_named_by_its_number(tmp_path: Path, line: str, message: str) -> None:
    jsonl = tmp_path / "requests.jsonl"
    jsonl.write_text('{"input": {"text": "ok"}}\n\n' + line + "\n")
    done = loopai({}, "send", "spam", "--file", str(jsonl))
    assert done.returncode == 1 and f"{jsonl} {message}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


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


def test_send_wait_gives_up_at_its_timeout(env: dict[str, str], tmp_path: Path) -> None:
    assert loopai(env, "topics", "apply").returncode == 0
    assert loopai(env, "task", "create", "idle").returncode == 0
    waited = loopai(env, "send", "idle", "--input", "{}", "--wait", "--timeout", "1")  # no worker is running
    assert waited.returncode == 1 and "1 of 1 request(s) unanswered after 1 s" in waited.stderr, waited.stderr


def test_topics_apply_sets_the_configs_of_existing_topics(env: dict[str, str], broker: EmbeddedBroker) -> None:
    analytics = topics_for(env["LOOPAI_TOPIC_PREFIX"]).analytics

    async def make_it_deleting() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
        await admin.start()
        await admin.create_topics([NewTopic(analytics.name, analytics.partitions, 1,
                                            topic_configs={"cleanup.policy": "delete"})])
        await admin.close()

    asyncio.run(make_it_deleting())
    done = loopai(env, "topics", "apply")
    assert done.returncode == 0, done.stderr
    assert f"altered {analytics.name} (altered: cleanup.policy delete -> compact)" in done.stdout
    assert f"exists  {analytics.name} (configs as in topics.yaml)" in loopai(env, "topics", "apply").stdout
