"""The executor's per-request CPU on the worker side, step by step, without broker or sandbox: in, a fetch's batch
of spam_v1 requests spread over the bench's tasks; out, µs per request of each step (decode and resolve, batch
lines, answers, results, encoding, partials) and their sum. `--help` says how to run it."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
from collections.abc import Callable
from datetime import timedelta
from operator import attrgetter
from types import SimpleNamespace
from typing import Any

import orjson
from aiokafka import ConsumerRecord, TopicPartition

from app.contract.codecs import codec_for
from app.contract.records import ExecutionResult, ProgramArtifact, TaskSpec, utc_now
from app.contract.topics import topics_for
from app.domain.daily_stats import summarise_results
from app.domain.daily_windows import DailyWindows
from app.domain.resolution import calls_of
from app.domain.results import ResultAssembler
from app.kafka.lanes import Answers
from app.kafka.loop_client import request_from
from app.kafka.progress import PartitionProgress
from app.kafka.triage import RequestTriage
from app.sandbox.boundary import Boundary, Limits
from app.sandbox.process import SandboxProcess
from app.settings import Settings
from bench.workload import TASKS
from devtools.samples import SPAM_TEXTS, TEXT_INPUT_SCHEMA, program_source


def messages(count: int) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
    """A fetch of `count` requests of the bench's tasks, partition by partition (a task is a partition)."""
    fetched: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {}
    for i in range(count):
        partition = i % len(TASKS)
        request = request_from(TASKS[partition], {"text": SPAM_TEXTS[i % len(SPAM_TEXTS)]})
        records = fetched.setdefault(TopicPartition("requests", partition), [])
        records.append(ConsumerRecord("requests", partition, len(records), 0, 0, request.task_id.encode(),
                                      orjson.dumps(request.model_dump(mode="json")), None, 0, 0, []))
    return fetched


def answers_frame(count: int) -> bytes:
    """What a sandbox process writes for `count` spam_v1 calls (see app/sandbox/child._flush)."""
    output = orjson.dumps({"label": "ham", "score": 0.1})
    header = [["ok", len(output), None, 0.004, 31.5] for _ in range(count)]
    return orjson.dumps(header) + b"\n" + output * count


async def steps(batch_size: int) -> dict[str, Callable[[], Any]]:
    settings = Settings.load(None, bootstrap_servers="localhost:9092")
    topics = topics_for(settings.topic_prefix)
    results_codec = codec_for(ExecutionResult, settings, topics.execution_results)
    tasks = {name: TaskSpec(name=name, input_schema=TEXT_INPUT_SCHEMA, active_version=1, updated_at=utc_now())
             for name in TASKS}
    artifacts = {name: ProgramArtifact(task_id=name, version=1, program_id=f"{name}-v1",
                                       source_code=program_source("spam_v1"), created_at=utc_now())
                 for name in TASKS}
    tables = SimpleNamespace(tasks=tasks, artifacts=SimpleNamespace(version=lambda t, v: artifacts.get(t)))
    triage = RequestTriage(settings, topics, tables)  # type: ignore[arg-type]  # it reads no more of the tables
    progress, refused = PartitionProgress(), Answers()  # where the executor's pipeline tracks; where refusals go

    def triaged() -> list[Any]:
        return triage(by_partition, lambda tp, records: progress.add(tp, [r.offset for r in records]), refused)[0]

    by_partition = messages(batch_size)
    pending = triaged()
    process = SandboxProcess(Boundary(Limits()))
    frame = answers_frame(batch_size)
    loop = asyncio.get_running_loop()
    assembler = ResultAssembler("bench")
    windows = DailyWindows("UTC", timedelta(seconds=60))
    executed_at = utc_now()

    def decode_and_resolve() -> None:
        assert len(triaged()) == batch_size

    def batch_lines() -> list[bytes]:  # one per version, as the pool writes them (app/sandbox/pool.py)
        return [orjson.dumps({"batch": 1, "load": [], "key": key, "run": [(c.timeout_s, c.input) for c in calls]},
                             option=orjson.OPT_APPEND_NEWLINE)
                for key, calls in itertools.groupby(calls_of(pending), key=attrgetter("key"))]

    def parse_answers() -> None:
        process._results, process._expected, process._done = [], batch_size, loop.create_future()
        process._timeouts = [1.0] * batch_size
        process._on_data(frame)
        assert process._done.done() and process.kill_reason is None

    process._results, process._expected, process._done = [], batch_size, loop.create_future()
    process._timeouts = [1.0] * batch_size
    process._on_data(frame)
    outcomes = process._results
    made: list[tuple[dict[str, Any], Any]] = []

    def assemble() -> None:
        made[:] = assembler.assemble(pending, outcomes, executed_at)[0]

    assemble()

    def encode() -> list[bytes]:
        return [results_codec.encode_fields(fields) for fields, _ in made]

    def partials() -> None:
        summarise_results([fields for fields, _ in made], windows)

    return {"decode + resolve": decode_and_resolve, "sandbox batch lines": batch_lines,
            "parse sandbox answers": parse_answers, "assemble results": assemble, "encode results": encode,
            "daily-stats partials": partials}


async def measure(batch_size: int, repeat: int) -> None:
    timed = await steps(batch_size)
    total = 0.0
    print(f"worker-side µs per request, batches of {batch_size}, min of {repeat} runs")
    for name, step in timed.items():
        best = float("inf")
        for _ in range(repeat):
            started = time.perf_counter()
            step()
            best = min(best, time.perf_counter() - started)
        per_request = best / batch_size * 1e6
        total += per_request
        print(f"  {name:<24}{per_request:8.2f}")
    print(f"  {'sum':<24}{total:8.2f}")


_HELP = """\
The executor's per-request CPU on the worker side, step by step, without broker or sandbox: a batch of spam_v1
requests as Kafka messages, spread over the bench's tasks (one per partition) as a fetch returns them ->
decode and resolve -> the sandbox batch lines -> the answers frame parsed -> results assembled -> results
encoded -> daily-stats partials. Prints µs per request per step (the minimum of --repeat runs, which drifts
little on a busy machine) and their sum. What a step makes is kept alive while it runs, as in the worker;
run it with MALLOC_TRIM_THRESHOLD_ raised (e.g. 268435456), or glibc hands each run's memory back to the
system and the next run pays page faults for it.

    python -m bench.executor_path [--batch N] [--repeat N]
"""  # what --help prints


def main() -> None:
    parser = argparse.ArgumentParser(description=_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    asyncio.run(measure(args.batch, args.repeat))


if __name__ == "__main__":
    main()
