"""One broker and the same job (decode -> spam_v1 -> encode -> produce) for five contenders, interleaved round by
round (A B C D E, A B C D E, ...) so that drift of a shared machine hits them alike:

- plain: the plain aiokafka loop in this process (getmany -> orjson -> program in-process -> send_batch), the
  practical limit, with no isolation and no delivery guarantee;
- plain_alo: the same loop, at-least-once (acks awaited and offsets committed per batch);
- quix: Quix Streams on the same job (its own virtualenv, bench/.venv-quix, made on first use);
- pipeline_1, pipeline_2: the loopai pipeline, one `loopai worker` process with its sandbox pool, or as many
  as there are cores.

Throughput is records / (seconds from a contender's first message processed to its last one produced), so
start-up does not count; for the pipeline that span is read from the results' executed_at (its workers
are started and warmed up first, then the requests produced at full speed). CPU per request is
the CPU of the contender's own processes over that span (the pipeline: its workers and their sandbox processes,
from /proc; never the broker). Then request->result latency of one worker at half its measured capacity, and
how soon after the last result the daily analytics (executor partials merged by the aggregator) hold every
execution. Prints min / median / max per contender and the ratios of medians. Everything it writes goes to a
temporary directory, removed at the end (except --json and --profile output).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from app.contract.codecs import codec_for
from app.contract.records import ExecutionRequest, TaskSpec, execution_id_for, utc_now
from app.contract.topics import topics_for
from app.control.plane import ControlPlane
from app.domain.daily_windows import DailyWindows
from app.domain.open_windows import OpenWindows
from app.domain.sampling import is_sampled
from app.kafka.clients import BatchSender, apply_topics, make_consumer, make_producer, partition_for
from app.kafka.loop_client import RequestSender, request_from, send_requests
from app.kafka.partitioned_state import read_state
from app.settings import Settings
from bench.cpu import TreeSampler
from devtools.broker import EMBEDDED_TIMINGS, EmbeddedBroker, free_port
from devtools.samples import SPAM_TEXTS, SPAM_TRUTH, TEXT_INPUT_SCHEMA, program_source

HERE = Path(__file__).resolve().parent
QUIX_VENV = HERE / ".venv-quix"
PROGRAM = "spam_v1"


def say(text: str) -> None:
    print(text, flush=True)


async def wait_for_commits(settings: Settings, group: str, expected: int, timeout_s: float) -> None:
    """Until the group has committed `expected` offsets: cheap to poll, unlike reading every result.
    (consumer.committed, not the admin client: aiokafka cannot parse the embedded broker's OffsetFetch
    answer to the admin's request version.)"""
    spec = topics_for(settings.topic_prefix).execution_requests
    probe = make_consumer(settings, group_id=group)
    await probe.start()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            committed = [await probe.committed(TopicPartition(spec.name, p)) for p in range(spec.partitions)]
            if sum(offset or 0 for offset in committed) >= expected:
                return
            await asyncio.sleep(0.5)
        raise TimeoutError(f"group {group} did not commit {expected} offsets in {timeout_s}s")
    finally:
        await probe.stop()


async def executed_span(settings: Settings, expected: int, timeout_s: float,
                        skipped: frozenset[str] = frozenset()) -> tuple[datetime, datetime]:
    """The first and the last executed_at among `expected` results, leaving out those of `skipped` request ids
    (counted in `expected`)."""
    spec = topics_for(settings.topic_prefix).execution_results
    consumer = make_consumer(settings)
    await consumer.start()
    tps = [TopicPartition(spec.name, p) for p in range(spec.partitions)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    stamps: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(stamps) < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(stamps)} of {expected} results after {timeout_s}s")
            for messages in (await consumer.getmany(timeout_ms=500, max_records=50_000)).values():
                stamps += [(fields["request_id"], fields["executed_at"])
                           for fields in (orjson.loads(m.value) for m in messages)]
    finally:
        await consumer.stop()
    moments = [datetime.fromisoformat(at) for request_id, at in stamps if request_id not in skipped]
    return min(moments), max(moments)


async def analytics_caught_up(settings: Settings, expected: int, timeout_s: float) -> tuple[datetime, int]:
    """When the daily-stats aggregator's open windows (its changelog, read to the end) first hold `expected`
    executions of the bench's tasks, and how many changelog records it took."""
    windows = DailyWindows(settings.analytics_time_zone)
    spec = topics_for(settings.topic_prefix).daily_windows
    records = 0

    def decode(key: bytes, value: bytes) -> OpenWindows:
        nonlocal records
        records += 1
        return OpenWindows.from_json(key.decode(), value, windows)

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        records = 0
        state = await read_state(settings, spec, decode)
        held = sum(d.executions for task in TASKS if (opened := state.get(task.encode())) is not None
                   for d in opened.running() if d.version is None)
        if held >= expected:
            return utc_now(), records
        await asyncio.sleep(0.2)
    raise TimeoutError(f"the daily stats did not reach {expected} executions in {timeout_s}s")


async def validations_caught_up(settings: Settings, expected: int, timeout_s: float) -> datetime:
    """When the validations topic first holds `expected` validations (one per sampled execution)."""
    spec = topics_for(settings.topic_prefix).validations
    consumer = make_consumer(settings)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(spec.name, p) for p in range(spec.partitions)])
        held = 0
        deadline = time.monotonic() + timeout_s
        while held < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{held} of {expected} validations after {timeout_s}s")
            held += sum(len(messages) for messages in (await consumer.getmany(timeout_ms=200)).values())
        return utc_now()
    finally:
        await consumer.stop()


async def plain_loop(settings: Settings, source: str, output: str, count: int, at_least_once: bool,
                     group: str, **consumer_args: Any) -> tuple[float, float]:
    """decode -> classify in-process -> encode -> produce with send_batch. Without at_least_once, acks are
    awaited only at the end and nothing is committed (the practical limit); with it, each batch's acks are
    awaited and its offsets committed before the next getmany (the pipeline's guarantee, done simply).
    Returns seconds from the first message to the last ack, and the CPU seconds of this process meanwhile
    (the broker is another process)."""
    namespace: dict[str, Any] = {}
    exec(program_source(PROGRAM), namespace)
    run = namespace["run"]
    gc.collect()
    gc.freeze()  # the same collector tuning as the worker, for a like-for-like limit
    gc.set_threshold(50_000, 20, 100)
    consumer = make_consumer(settings, source, group_id=group, **settings.group_args(), **consumer_args)
    producer = make_producer(settings)
    await consumer.start()
    await producer.start()
    done = 0
    started = cpu_started = 0.0
    acks: list[asyncio.Future[Any]] = []
    try:
        while done < count:
            batches = await consumer.getmany(timeout_ms=500, max_records=1000)
            if batches and not started:
                started, cpu_started = time.perf_counter(), time.process_time()
            sender = BatchSender(producer)
            for tp, messages in batches.items():
                for m in messages:
                    value = orjson.loads(m.value)
                    out = {"request_id": value["request_id"], "task_id": value["task_id"],
                           "output": run(value["input"])}
                    await sender.add(output, tp.partition, m.key, orjson.dumps(out))
                done += len(messages)
            acks += await sender.flush()
            if at_least_once and batches:
                await asyncio.gather(*acks)
                acks.clear()
                await consumer.commit()
        await asyncio.gather(*acks)
        return time.perf_counter() - started, time.process_time() - cpu_started
    finally:
        gc.set_threshold(700, 10, 10)
        gc.unfreeze()
        await consumer.stop()
        await producer.stop()


async def create_outputs(settings: Settings, *names: str) -> None:
    """The output topics of in-process contenders, `<prefix><name>-out`, partitioned like the requests."""
    admin = AIOKafkaAdminClient(**settings.kafka_client_args())
    await admin.start()
    try:
        partitions = topics_for(settings.topic_prefix).execution_requests.partitions
        await admin.create_topics([NewTopic(f"{settings.topic_prefix}{name}-out", partitions, 1) for name in names])
    finally:
        await admin.close()


async def latency_floor(settings: Settings, rate: int, seconds: float) -> list[float]:
    """The latency load served by the plain loop in this process, polling as often as the executor: what the
    broker's two hops (request in, result out) and the job cost without isolation, batching for a sandbox or
    any guarantee. One second of the same load first, so the loop's group has formed."""
    await provision(settings)
    await create_outputs(settings, "plain")
    output = f"{settings.topic_prefix}plain-out"
    serving = asyncio.ensure_future(plain_loop(
        settings, topics_for(settings.topic_prefix).execution_requests.name, output, sys.maxsize, False,
        "bench-latency-floor", fetch_max_wait_ms=settings.executor_fetch_max_wait_ms))
    try:
        await latency(settings, rate, 1.0, output)
        return await latency(settings, rate, seconds, output)
    finally:
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving


def quix_available() -> bool:
    python = QUIX_VENV / "bin" / "python"
    if python.exists():
        return True
    say("  making bench/.venv-quix (quixstreams, once)...")
    made = subprocess.run(f"{sys.executable} -m venv {QUIX_VENV} && {QUIX_VENV}/bin/pip install -q "
                          "quixstreams==3.28.1 orjson", shell=True, capture_output=True, text=True)
    if made.returncode != 0:
        say(f"  could not install quixstreams: {made.stderr[-500:]}")
    return made.returncode == 0


async def latency(settings: Settings, rate: int, seconds: float, results_topic: str | None = None) -> list[float]:
    """Send at a steady rate; milliseconds from send to result seen (on execution-results, or `results_topic`),
    per request."""
    spec = topics_for(settings.topic_prefix).execution_results
    topic, partitions = results_topic or spec.name, spec.partitions
    sent_at: dict[str, float] = {}
    latencies: list[float] = []
    # as short a poll as the executor's: the embedded broker holds a fetch for its whole max wait
    consumer = make_consumer(settings, fetch_max_wait_ms=settings.executor_fetch_max_wait_ms)
    await consumer.start()
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    await consumer.seek_to_end(*tps)
    for tp in tps:
        await consumer.position(tp)

    async def receive() -> None:
        while True:
            for messages in (await consumer.getmany(timeout_ms=100)).values():
                now = time.perf_counter()
                for m in messages:
                    request_id = orjson.loads(m.value)["request_id"]
                    if request_id in sent_at:
                        latencies.append((now - sent_at.pop(request_id)) * 1000)

    # Every request is made and encoded before the clock starts, as for the throughput rounds: building them on
    # the fly cost this process a fifth of a core at half a worker's capacity, taken from the worker and broker.
    per_tick = max(1, rate // 100)
    requests = [request_for(i) for i in range(per_tick * math.ceil(seconds * 100))]
    encoded = encode_requests(settings, requests)
    ticks = [(requests[at:at + per_tick], encoded[at:at + per_tick]) for at in range(0, len(requests), per_tick)]
    requests_topic = topics_for(settings.topic_prefix).execution_requests.name
    receiver = asyncio.ensure_future(receive())
    producer = make_producer(settings)
    await producer.start()
    try:
        started = time.perf_counter()
        for tick, (made, encoded) in enumerate(ticks, 1):
            now = time.perf_counter()
            for r in made:
                sent_at[r.request_id] = now
            sender = BatchSender(producer)
            for key, value, partition in encoded:
                await sender.add(requests_topic, partition, key, value)
            await asyncio.gather(*await sender.flush())
            await asyncio.sleep(max(0.0, started + tick * 0.01 - time.perf_counter()))
    finally:
        await producer.stop()
    deadline = time.monotonic() + 30
    while sent_at and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    receiver.cancel()
    await consumer.stop()
    return latencies


async def provision(settings: Settings) -> None:
    """Topics, and the bench's tasks (one per partition, the same program) with their program active."""
    await apply_topics(settings, topics_for(settings.topic_prefix))
    async with ControlPlane(settings) as control:
        for task in TASKS:
            # The baselines' job (decode, classify, encode, produce), and the pipeline checks each input against
            # its task's schema besides, as users' tasks have one.
            await control.put_task(TaskSpec(name=task, input_schema=TEXT_INPUT_SCHEMA, sampling_rate=SAMPLING_RATE,
                                            updated_at=utc_now()))
            await control.publish(task, program_source(PROGRAM), activate=True)


async def produce(settings: Settings, count: int) -> None:
    """`count` requests of the bench's tasks on the requests topic."""
    async with RequestSender(settings) as sender:
        for start in range(0, count, 10_000):
            await sender.send(request_for(i) for i in range(start, min(count, start + 10_000)))


async def wait_for_stable_group(logs: list[Path], partitions: int, timeout_s: float = 120) -> None:
    """Until every worker's latest assignment is non-empty and together they cover every partition."""
    pattern = re.compile(r"executor assigned \[([0-9, ]*)\]")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        latest = [pattern.findall(log.read_text(errors="replace")) for log in logs]
        if all(latest):
            owned = [set(map(int, filter(None, found[-1].split(", ")))) for found in latest]
            if all(owned) and set().union(*owned) == set(range(partitions)):
                return
        await asyncio.sleep(0.5)
    raise TimeoutError("the executor group did not settle")


@dataclass
class Run:
    """One contender's figures in one round."""

    msg_per_s: float
    cpu_us_per_request: float
    latencies_ms: list[float] = field(default_factory=list)
    analytics_lag_s: float | None = None
    worker_cpu_us_per_request: float | None = None  # the pipeline's worker processes alone, sandboxes excluded
    validation_lag_s: float | None = None


async def pipeline(settings: Settings, count: int, workers: int, work: Path, rate: int | None,
                   worker_command: list[str] | None = None) -> Run:
    """`workers` worker processes over `count` requests: msg/s, CPU per request of the workers and their sandbox
    processes, latencies if rate is given, and how long after the last result the daily analytics held every
    execution.

    The workers start first, settle their group and serve WARM_UP requests; then the `count` requests, encoded
    beforehand, are produced as fast as the producer goes. So neither a rebalance nor the workers' start-up
    (faust starting its agents and tables alongside the executor) falls inside the measurement, just as the
    other contenders are timed from their first message. Workers run in `work` (faust keeps its table data
    under its working directory).
    """
    env = {**os.environ, **settings.to_env(), "LOOPAI_LOG_LEVEL": "INFO", "PYTHONPATH": str(HERE.parent),
           # one process per task it may serve (a process serves one task; an idle one costs no CPU)
           "LOOPAI_SANDBOX_PROCESSES": str(len(TASKS))}
    requests = encode_requests(settings, [request_for(i) for i in range(count)])
    processes, logs = [], []
    for n in range(workers):
        logs.append(work / f"worker-{settings.topic_prefix}{n}.log")
        with open(logs[-1], "wb") as log:  # the worker keeps its own copy of the descriptor
            processes.append(subprocess.Popen(worker_command or [sys.executable, "-m", "app.cli", "worker"],
                                              # HTTP on, each its own port: the metrics' counting is measured too
                                              env={**env, "LOOPAI_WORKER_ID": f"bench-{n}",
                                                   "LOOPAI_WEB_PORT": str(free_port())},
                                              cwd=work, stdout=log, stderr=subprocess.STDOUT))
    cpu = TreeSampler([p.pid for p in processes])
    cpu.start()
    try:
        await wait_for_stable_group(logs, topics_for(settings.topic_prefix).execution_requests.partitions)
        warm_up = [request_for(i) for i in range(WARM_UP)]
        await send_requests(settings, warm_up)
        group = f"{settings.app_id}-executors"
        await wait_for_commits(settings, group, WARM_UP, 120)
        caught_up = asyncio.ensure_future(analytics_caught_up(settings, WARM_UP + count, 600))
        decode = codec_for(ExecutionRequest, settings, topics_for(settings.topic_prefix).execution_requests).decode
        sampled = sampled_among([*warm_up, *(decode(value) for _, value, _ in requests)])
        validated = asyncio.ensure_future(validations_caught_up(settings, sampled, 600))
        await send_encoded(settings, requests)
        await wait_for_commits(settings, group, WARM_UP + count, 600)
        first, last = await executed_span(settings, WARM_UP + count, 60,
                                          frozenset(r.request_id for r in warm_up))
        await cpu.stop()
        analytics_at, changes = await caught_up
        lag = (analytics_at - last).total_seconds()
        say(f"    daily analytics held all {count} executions {lag:.2f} s after the last result "
            f"({changes} changelog records)")
        validation_lag = (await validated - last).total_seconds()
        say(f"    all {sampled} sampled executions validated {validation_lag:.2f} s after the last result")
        span = max((last - first).total_seconds(), 0.001)
        cpu_s = cpu.between(first.timestamp(), last.timestamp())
        worker_s = cpu.between(first.timestamp(), last.timestamp(), roots_only=True)
        latencies = sorted(await latency(settings, rate, 5.0)) if rate else []
        return Run(count / span, cpu_s / count * 1e6, latencies, lag, worker_s / count * 1e6, validation_lag)
    except BaseException:
        for log_path in logs:  # the temporary directory goes with the run: show why here
            say(f"--- the end of {log_path.name}:\n{log_path.read_text(errors='replace')[-3000:]}")
        raise
    finally:
        await cpu.stop()
        for process in processes:
            process.terminate()
        for n, process in enumerate(processes):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:  # the bench must not hang, nor leave it behind
                say(f"    worker {n} did not stop within 30 s of SIGTERM; killed. The end of its log:\n"
                    + "".join(logs[n].read_text(errors="replace").splitlines(keepends=True)[-8:]))
                process.kill()
                process.wait()


WARM_UP = 2_000  # requests a pipeline serves before the measured ones


def _one_task_per_partition() -> list[str]:
    """Task names (same program) whose keys land on every partition of the requests topic: a request's task is
    its partition, so with one task a second worker would have nothing to do."""
    partitions = topics_for("").execution_requests.partitions
    names: dict[int, str] = {}
    for n in range(1000):
        names.setdefault(partition_for(f"spam-filter-{n}".encode(), partitions), f"spam-filter-{n}")
        if len(names) == partitions:
            return [names[p] for p in range(partitions)]
    raise RuntimeError("no task names cover every partition")


TASKS = _one_task_per_partition()
SAMPLING_RATE = 0.05  # TaskSpec's default


def request_for(i: int) -> ExecutionRequest:
    """The i-th request of the job: the tasks in turn, the sample texts in turn, each with its true label (so
    that the pipeline's sampled executions are validated against it, the whole loop running)."""
    text = SPAM_TEXTS[i % len(SPAM_TEXTS)]
    return request_from(TASKS[i % len(TASKS)], {"text": text}, expected_output=SPAM_TRUTH[text])


def sampled_among(requests: Iterable[ExecutionRequest]) -> int:
    """How many of these requests the executor samples for validation (random sampling: decided by the
    execution id alone)."""
    return sum(is_sampled(execution_id_for(r.task_id, r.request_id), SAMPLING_RATE) for r in requests)


def encode_requests(settings: Settings, requests: list[ExecutionRequest]) -> list[tuple[bytes, bytes, int]]:
    """(key, value, partition) of each request, as RequestSender would send it."""
    spec = topics_for(settings.topic_prefix).execution_requests
    codec = codec_for(ExecutionRequest, settings, spec)
    return [(r.task_id.encode(), codec.encode(r), partition_for(r.task_id.encode(), spec.partitions))
            for r in requests]


async def send_encoded(settings: Settings, requests: list[tuple[bytes, bytes, int]]) -> None:
    """Produce encoded requests in batches, acknowledged at the end."""
    topic = topics_for(settings.topic_prefix).execution_requests.name
    producer = make_producer(settings)
    await producer.start()
    try:
        acks: list[asyncio.Future[Any]] = []
        for start in range(0, len(requests), 5_000):
            sender = BatchSender(producer)
            for key, value, partition in requests[start:start + 5_000]:
                await sender.add(topic, partition, key, value)
            acks += await sender.flush()
        await asyncio.gather(*acks)
    finally:
        await producer.stop()


CONTENDERS = {
    "plain": "plain aiokafka loop (in-process, no isolation)",
    "plain_alo": "plain loop, at-least-once",
    "quix": "Quix Streams (orjson serde, in-process)",
    "pipeline_1": "loopai pipeline, 1 worker",
    "pipeline_2": "loopai pipeline, 2 workers",
}


class Bench:
    """The rounds of one bench run on one embedded broker; `work` is its temporary directory."""

    def __init__(self, broker: EmbeddedBroker, work: Path, count: int) -> None:
        self.broker = broker
        self.work = work
        self.count = count
        self.program = work / "program.py"
        self.program.write_text(program_source(PROGRAM))

    def settings_for(self, prefix: str) -> Settings:
        # Its own app id too, so its own consumer groups: on the embedded broker, a worker joining a group that
        # earlier workers (of another run) left could wait for ever to be given partitions.
        return Settings.load(None, bootstrap_servers=self.broker.bootstrap_servers, topic_prefix=prefix,
                             app_id=f"bench-{prefix.rstrip('.')}", **EMBEDDED_TIMINGS)

    async def shared_requests(self, round_no: int) -> Settings:
        """The requests the in-process contenders of a round consume (each in its own group), and their outputs."""
        settings = self.settings_for(f"bench-r{round_no}.")
        await provision(settings)
        await produce(settings, self.count)
        await create_outputs(settings, "plain", "plain_alo", "quix")
        return settings

    async def run(self, name: str, round_no: int, shared: Settings | None, rate: int | None) -> Run | None:
        count = self.count
        if name in ("plain", "plain_alo"):
            assert shared is not None
            seconds, cpu_s = await plain_loop(
                shared, topics_for(shared.topic_prefix).execution_requests.name,
                f"{shared.topic_prefix}{name}-out", count, name == "plain_alo", f"bench-{name}-r{round_no}")
            return Run(count / seconds, cpu_s / count * 1e6)
        if name == "quix":
            assert shared is not None
            job = subprocess.run(
                [str(QUIX_VENV / "bin" / "python"), str(HERE / "quix_job.py"), self.broker.bootstrap_servers,
                 topics_for(shared.topic_prefix).execution_requests.name, f"{shared.topic_prefix}quix-out",
                 str(count), f"bench-quix-r{round_no}", str(self.program)],
                capture_output=True, text=True, timeout=600, cwd=self.work)  # its state dir goes in work
            if job.returncode != 0:
                say(f"    Quix job failed: {job.stderr[-800:]}")
                return None
            timed = json.loads(job.stdout.strip().splitlines()[-1])
            return Run(count / timed["seconds"], timed["cpu_s"] / count * 1e6)
        workers = 1 if name == "pipeline_1" else max(2, os.cpu_count() or 1)
        settings = self.settings_for(f"bench-r{round_no}-{name.replace('_', '')}.")
        await provision(settings)
        return await pipeline(settings, count, workers, self.work, rate)


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def report(runs: dict[str, list[Run]], lat: list[float], floor: list[float], rate: int | None, machine: str,
           rate_given: bool = False) -> dict[str, Any]:
    """Print the table and return the --json document."""
    medians = {name: statistics.median(r.msg_per_s for r in got) for name, got in runs.items() if got}
    rounds = max((len(got) for got in runs.values()), default=0)
    say("")
    say(f"{machine}; {rounds} round(s), interleaved")
    say(f"{'':<44}{'msg/s':^27}")
    say(f"{'contender':<44}{'min':>9}{'median':>9}{'max':>9}{'CPU µs/req':>13}{'vs plain':>10}{'vs Quix':>9}")
    for name, got in runs.items():
        if not got:
            continue
        rates = [r.msg_per_s for r in got]
        cpu = statistics.median(r.cpu_us_per_request for r in got)
        vs_plain = f"{medians[name] / medians['plain']:.2f}" if "plain" in medians else "-"
        vs_quix = f"{medians[name] / medians['quix']:.2f}" if "quix" in medians else "-"
        say(f"{CONTENDERS[name]:<44}{min(rates):>9,.0f}{medians[name]:>9,.0f}{max(rates):>9,.0f}"
            f"{cpu:>13.1f}{vs_plain:>10}{vs_quix:>9}")
    say("targets: pipeline >= 0.50 x plain loop, >= 1.00 x Quix Streams; CPU µs/request <= Quix's")
    for name in ("pipeline_1", "pipeline_2"):
        lags = [r.analytics_lag_s for r in runs.get(name, []) if r.analytics_lag_s is not None]
        if lags:
            say(f"{CONTENDERS[name]}: daily analytics complete {statistics.median(lags):.2f} s after the last "
                f"result (median; max {max(lags):.2f} s; target <= 2 s)")
        lags = [r.validation_lag_s for r in runs.get(name, []) if r.validation_lag_s is not None]
        if lags:
            say(f"{CONTENDERS[name]}: sampled executions all validated {statistics.median(lags):.2f} s after the "
                f"last result (median; max {max(lags):.2f} s; target <= 2 s)")
    latency_doc = None
    if lat and rate:
        p50, p99 = statistics.median(lat), _p99(lat)
        why = "as asked" if rate_given else "half its median capacity"
        say(f"request->result latency, 1 worker at {rate:,} req/s ({why}): p50 {p50:.1f} ms, "
            f"p99 {p99:.1f} ms ({len(lat)} requests; targets p50 <= 5 ms, p99 <= 20 ms)")
        latency_doc = {"rate": rate, "p50_ms": round(p50, 2), "p99_ms": round(p99, 2)}
        if floor:
            floor_p50, floor_p99 = statistics.median(floor), _p99(floor)
            say(f"the same load through the plain loop (no isolation, no guarantee), the broker's floor: "
                f"p50 {floor_p50:.1f} ms, p99 {floor_p99:.1f} ms ({len(floor)} requests)")
            latency_doc["plain"] = {"p50_ms": round(floor_p50, 2), "p99_ms": round(floor_p99, 2)}
    return {
        "contenders": {name: {"msg_per_s": [round(r.msg_per_s, 1) for r in got],
                              "cpu_us_per_request": [round(r.cpu_us_per_request, 2) for r in got]}
                       for name, got in runs.items() if got},
        "latency": latency_doc,
    }


async def bench(count: int, rounds: int, only: list[str], rate: int | None, json_path: Path | None) -> None:
    if "quix" in only and not quix_available():
        only = [name for name in only if name != "quix"]
    cores = os.cpu_count() or 1
    machine = f"{cores} cores, {os.uname().machine}, load average {os.getloadavg()[0]:.1f} at the start"
    runs: dict[str, list[Run]] = {name: [] for name in only}
    lat: list[float] = []
    floor: list[float] = []
    latency_rate: int | None = None
    with tempfile.TemporaryDirectory(prefix="loopai-bench-") as temporary, \
            EmbeddedBroker(log_file=Path(temporary) / "broker.log") as broker:
        work = Path(temporary)
        bench_run = Bench(broker, work, count)
        for round_no in range(rounds):
            say(f"round {round_no + 1} of {rounds}: {count:,} requests per contender")
            shared = await bench_run.shared_requests(round_no) \
                if {"plain", "plain_alo", "quix"} & set(only) else None
            for name in only:
                say(f"  {CONTENDERS[name]}...")
                got = await bench_run.run(name, round_no, shared, None)
                if got is None:
                    continue
                runs[name].append(got)
                split = "" if got.worker_cpu_us_per_request is None else \
                    f" (workers {got.worker_cpu_us_per_request:.1f}, sandboxes " \
                    f"{got.cpu_us_per_request - got.worker_cpu_us_per_request:.1f})"
                say(f"    {got.msg_per_s:,.0f} msg/s, {got.cpu_us_per_request:.1f} CPU µs per request{split}")
        if "pipeline_1" in only and runs["pipeline_1"]:
            latency_rate = rate or int(statistics.median(r.msg_per_s for r in runs["pipeline_1"]) / 2)
            say(f"latency: 1 worker at {latency_rate:,} req/s...")
            settings = bench_run.settings_for("bench-latency.")
            await provision(settings)
            measured = await pipeline(settings, min(count, 20_000), 1, work, latency_rate)
            lat = measured.latencies_ms
            say(f"latency floor: the plain loop at {latency_rate:,} req/s...")
            floor = await latency_floor(bench_run.settings_for("bench-floor."), latency_rate, 5.0)
        document = report(runs, lat, floor, latency_rate, machine, rate is not None)
    if json_path is not None:
        json_path.write_text(json.dumps(document, indent=2) + "\n")
        say(f"wrote {json_path}")


async def profile(count: int, out: Path) -> None:
    """A worker under cProfile over `count` requests, and a sandbox process's batch loop over as many calls."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="loopai-bench-") as temporary, \
            EmbeddedBroker(log_file=Path(temporary) / "broker.log") as broker:
        work = Path(temporary)
        settings = Bench(broker, work, count).settings_for("bench-profile.")
        await provision(settings)
        worker_out = out / "worker.prof.txt"
        say(f"the worker under cProfile, {count:,} requests...")
        got = await pipeline(settings, count, 1, work, None,
                             [sys.executable, "-m", "bench.profiled", "worker", str(worker_out.resolve())])
        say(f"  {got.msg_per_s:,.0f} msg/s under the profiler, {got.cpu_us_per_request:.1f} CPU µs per request")
    sandbox_out = out / "sandbox.prof.txt"
    say(f"a sandbox process's batch loop under cProfile, {count:,} calls...")
    subprocess.run([sys.executable, "-m", "bench.profiled", "sandbox", str(sandbox_out.resolve()), str(count)],
                   check=True, cwd=HERE.parent)
    say(f"wrote {worker_out} and {sandbox_out} (sorted by own time, then by cumulative time)")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200_000, help="per contender and round")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(CONTENDERS)}")
    parser.add_argument("--rate", type=int, help="requests/s for the latency phase (default: half of one "
                                                 "worker's median measured capacity)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--profile", type=Path, nargs="?", const=Path("bench-profile"), metavar="DIR",
                        help="instead: profile a worker and a sandbox process into DIR (default bench-profile)")
    args = parser.parse_args()
    only = list(CONTENDERS) if not args.only else [name.strip() for name in args.only.split(",")]
    unknown = [name for name in only if name not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(CONTENDERS)}")
    if args.profile is not None:
        asyncio.run(profile(args.requests, args.profile))
    else:
        asyncio.run(bench(args.requests, args.rounds, only, args.rate, args.json))


if __name__ == "__main__":
    main()
