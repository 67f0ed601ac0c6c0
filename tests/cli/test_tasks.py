"""`loopai task`: create and update set sampling, the oracle and --max-timeout-ms; a suspended task in
`task list`, and `task resume`."""

import asyncio
import json
from datetime import timedelta
from pathlib import Path

import pytest

from app.contract.codecs import codec_for
from app.contract.records import TaskSuspension, utc_now
from app.contract.topics import topics_for
from app.kafka.clients import make_producer, partition_for
from app.settings import Settings
from devtools.broker import EmbeddedBroker
from tests.cli.conftest import loopai
from tests.conftest import make_settings


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
    assert shown["input_schema"] == {"type": "object"}  # a second create used to wipe it
    assert shown["oracle"]["comparison"] == "exact" and shown["oracle"]["timeout_s"] == 5.0

    assert loopai(env, "task", "update", "spam", "--oracle", "none").returncode == 0
    assert json.loads(loopai(env, "task", "show", "spam").stdout)["oracle"] is None
    assert shown["max_error_rate"] == 0.05  # the default, until set
    assert loopai(env, "task", "update", "spam", "--max-error-rate", "0.2").returncode == 0
    assert json.loads(loopai(env, "task", "show", "spam").stdout)["max_error_rate"] == 0.2
    refused = loopai(env, "task", "update", "spam", "--max-error-rate", "1.5")
    assert refused.returncode == 2 and "1.5 is not in the range 0<=x<=1" in refused.stderr, refused.stderr


@pytest.fixture
def ready(broker: EmbeddedBroker) -> tuple[Settings, dict[str, str]]:
    settings = make_settings(broker)
    env = settings.to_env()
    assert loopai(env, "topics", "apply").returncode == 0
    return settings, env


def test_max_timeout_ms_is_a_task_option(ready: tuple[Settings, dict[str, str]]) -> None:
    _, env = ready
    created = loopai(env, "task", "create", "patient", "--max-timeout-ms", "5000")
    assert created.returncode == 0, created.stderr
    assert '"max_timeout_ms": 5000' in loopai(env, "task", "show", "patient").stdout
    updated = loopai(env, "task", "update", "patient", "--max-timeout-ms", "20000")
    assert updated.returncode == 0 and "task patient updated: max_timeout_ms" in updated.stdout, updated.stderr
    assert '"max_timeout_ms": 20000' in loopai(env, "task", "show", "patient").stdout
    assert loopai(env, "task", "create", "plain").returncode == 0
    assert '"max_timeout_ms": 1000' in loopai(env, "task", "show", "plain").stdout
    for wrong in ("0", "60001"):
        refused = loopai(env, "task", "update", "patient", "--max-timeout-ms", wrong)
        assert refused.returncode != 0 and f"{wrong} is not in the range 1<=x<=60000" in refused.stderr, refused.stderr
    assert '"max_timeout_ms": 20000' in loopai(env, "task", "show", "patient").stdout


async def _suspend(settings: Settings, task: str) -> TaskSuspension:
    """What a worker writes when the task's calls keep timing out."""
    now = utc_now()
    record = TaskSuspension(task_id=task, suspended=True, until=now + timedelta(minutes=5),
                            reason="10 calls timed out within 60 s", timeouts=10, window_s=60.0, worker_id="w1",
                            updated_at=now)
    spec = topics_for(settings.topic_prefix).task_suspensions
    producer = make_producer(settings)
    await producer.start()
    try:
        await producer.send_and_wait(spec.name, codec_for(TaskSuspension, settings, spec).encode(record),
                                     key=task.encode(), partition=partition_for(task.encode(), spec.partitions))
    finally:
        await producer.stop()
    return record


def test_a_suspended_task_is_listed_as_such_until_resumed(ready: tuple[Settings, dict[str, str]]) -> None:
    settings, env = ready
    for name in ("loopy", "calm"):
        assert loopai(env, "task", "create", name).returncode == 0
    suspension = asyncio.run(_suspend(settings, "loopy"))
    assert suspension.until is not None
    until = suspension.until.strftime("%H:%M:%S")

    listed = loopai(env, "task", "list").stdout.splitlines()
    assert listed == ["calm\tactive=-\tsampling=0.05",
                      f"loopy\tactive=-\tsampling=0.05\tsuspended until {until} UTC (10 calls timed out within 60 s)"]

    resumed = loopai(env, "task", "resume", "loopy")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == (f"task loopy resumed: it was suspended until {until} UTC (10 calls timed out within "
                              "60 s, by w1)\n")
    assert "suspended" not in loopai(env, "task", "list").stdout

    again = loopai(env, "task", "resume", "loopy")
    assert again.returncode == 0
    assert again.stdout == "task loopy was not suspended; its timeouts so far are forgotten all the same\n"
    ghost = loopai(env, "task", "resume", "ghost")
    assert ghost.returncode != 0 and "unknown task 'ghost'; create it with `loopai task create ghost`" in ghost.stderr
    assert "Traceback" not in ghost.stderr
