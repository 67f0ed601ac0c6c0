"""The contenders of a round on one broker (Bench.run): the plain aiokafka loop in this process, Quix Streams in its
own virtualenv, the loopai pipeline as worker processes; each run's figures come out as a Run."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from app.contract.codecs import codec_for
from app.contract.records import ExecutionRequest
from app.contract.topics import topics_for
from app.kafka.clients import make_consumer, make_producer
from app.kafka.loop_client import send_requests
from app.settings import Settings
from bench import say
from bench.cpu import TreeSampler
from bench.probes import (
    analytics_caught_up,
    executed_span,
    latency,
    validations_caught_up,
    wait_for_commits,
    wait_for_stable_group,
)
from bench.workload import (
    PROGRAM,
    TASKS,
    create_outputs,
    encode_requests,
    produce,
    provision,
    request_for,
    sampled_among,
    send_encoded,
)
from devtools.broker import EMBEDDED_TIMINGS, EmbeddedBroker, free_port
from devtools.samples import program_source

HERE = Path(__file__).resolve().parent
QUIX_VENV = HERE / ".venv-quix"

CONTENDERS = {
    "plain": "plain aiokafka loop (in-process, no isolation)",
    "plain_alo": "plain loop, at-least-once",
    "quix": "Quix Streams (orjson serde, in-process)",
    "pipeline_1": "loopai pipeline, 1 worker",
    "pipeline_2": "loopai pipeline, 2 workers",
}


@dataclass
class Run:
    """One contender's figures in one round."""

    msg_per_s: float
    cpu_us_per_request: float
    latencies_ms: list[float] = field(default_factory=list)
    analytics_lag_s: float | None = None
    worker_cpu_us_per_request: float | None = None  # the pipeline's worker processes alone, sandboxes excluded
    validation_lag_s: float | None = None


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



class BatchSender:
    """The plain contender's own sender, as one would write it by hand over aiokafka: records per partition go
    as record batches (send_batch, far cheaper per record than send()); flush() returns the acks' futures."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer
        self._batches: dict[tuple[str, int], Any] = {}
        self._futures: list[asyncio.Future[Any]] = []

    async def add(self, topic: str, partition: int, key: bytes | None, value: bytes) -> None:
        if not self.try_add(topic, partition, key, value):
            await self.add_after_full(topic, partition, key, value)

    def try_add(self, topic: str, partition: int, key: bytes | None, value: bytes) -> bool:
        """Append without awaiting (the hot path); False when the partition's batch is full, and then
        add_after_full() ships it and appends to a new one."""
        slot = (topic, partition)
        batch = self._batches.get(slot)
        if batch is None:
            batch = self._batches[slot] = self._producer.create_batch()
        return batch.append(key=key, value=value, timestamp=None) is not None

    async def add_after_full(self, topic: str, partition: int, key: bytes | None, value: bytes) -> None:
        slot = (topic, partition)
        await self._ship(slot, self._batches[slot])
        batch = self._batches[slot] = self._producer.create_batch()
        if batch.append(key=key, value=value, timestamp=None) is None:
            raise ValueError(f"record of {len(value)} bytes does not fit a batch for {topic}")

    async def _ship(self, slot: tuple[str, int], batch: Any) -> None:
        batch.close()
        self._futures.append(await self._producer.send_batch(batch, slot[0], partition=slot[1]))

    async def flush(self) -> list[asyncio.Future[Any]]:
        """Send every open batch; the returned futures resolve when the broker has acknowledged them."""
        for slot, batch in self._batches.items():
            if batch.record_count():
                await self._ship(slot, batch)
        self._batches.clear()
        futures, self._futures = self._futures, []
        return futures


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


WARM_UP = 2_000  # requests a pipeline serves before the measured ones


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
