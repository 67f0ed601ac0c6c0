"""One run, one broker, one topic of requests, three consumers of it:

- the plain aiokafka loop in this process (getmany -> orjson -> program in-process -> send_batch): the
  practical limit, with no isolation;
- Quix Streams on the same job (its own virtualenv, bench/.venv-quix, made on first use);
- the loopai pipeline: a `loopai worker` process with its sandbox pool.

Throughput for each is records / (seconds from its first message processed to its last one produced),
so start-up time does not count. For the pipeline that span is read from the results' executed_at.
Then request->result latency of the pipeline at a steady rate, and how soon after the last result the daily
analytics (executor partials merged by the aggregator) hold every execution. Prints the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from app.contract.records import TaskSpec, utc_now
from app.contract.topics import topics_for
from app.control.plane import ControlPlane
from app.domain.daily_windows import DailyWindows
from app.domain.open_windows import OpenWindows
from app.kafka.client import RequestSender, request_from
from app.kafka.clients import BatchSender, apply_topics, make_consumer, make_producer
from app.kafka.partitioned_state import read_state
from app.settings import Settings
from devtools.broker import EMBEDDED_TIMINGS, EmbeddedBroker, free_port
from devtools.samples import SPAM_TEXTS, program_source

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


async def executed_span(settings: Settings, expected: int, timeout_s: float) -> tuple[float, datetime]:
    """Seconds from the first to the last executed_at among `expected` results, and the last one."""
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
                stamps += [orjson.loads(m.value)["executed_at"] for m in messages]
    finally:
        await consumer.stop()
    moments = [datetime.fromisoformat(s) for s in stamps]
    return max((max(moments) - min(moments)).total_seconds(), 0.001), max(moments)


async def analytics_caught_up(settings: Settings, expected: int, timeout_s: float) -> tuple[datetime, int]:
    """When the daily-stats aggregator's open windows (its changelog, read to the end) first hold `expected`
    executions of spam-filter, and how many changelog records it took."""
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
        opened = state.get(b"spam-filter")
        if opened is not None and sum(d.executions for d in opened.running() if d.version is None) >= expected:
            return utc_now(), records
        await asyncio.sleep(0.2)
    raise TimeoutError(f"the daily stats did not reach {expected} executions in {timeout_s}s")


async def plain_loop(settings: Settings, source: str, output: str, count: int, at_least_once: bool) -> float:
    """decode -> classify in-process -> encode -> produce with send_batch. Without at_least_once, acks are
    awaited only at the end and nothing is committed (the practical limit); with it, each batch's acks are
    awaited and its offsets committed before the next getmany (the pipeline's guarantee, done simply).
    Returns seconds from the first message to the last ack."""
    namespace: dict[str, Any] = {}
    exec(program_source(PROGRAM), namespace)
    run = namespace["run"]
    gc.collect()
    gc.freeze()  # the same collector tuning as the worker, for a like-for-like limit
    gc.set_threshold(50_000, 20, 100)
    group = "bench-plain-alo" if at_least_once else "bench-plain"
    consumer = make_consumer(settings, source, group_id=group, **settings.group_args())
    producer = make_producer(settings)
    await consumer.start()
    await producer.start()
    done = 0
    started = 0.0
    acks: list[asyncio.Future[Any]] = []
    try:
        while done < count:
            batches = await consumer.getmany(timeout_ms=500, max_records=1000)
            if batches and not started:
                started = time.perf_counter()
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
        return time.perf_counter() - started
    finally:
        gc.set_threshold(700, 10, 10)
        gc.unfreeze()
        await consumer.stop()
        await producer.stop()


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


async def latency(settings: Settings, rate: int, seconds: float) -> list[float]:
    """Send at a steady rate; milliseconds from send to result seen, per request."""
    spec = topics_for(settings.topic_prefix).execution_results
    sent_at: dict[str, float] = {}
    latencies: list[float] = []
    consumer = make_consumer(settings, fetch_max_wait_ms=5)
    await consumer.start()
    tps = [TopicPartition(spec.name, p) for p in range(spec.partitions)]
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

    receiver = asyncio.ensure_future(receive())
    per_tick = max(1, rate // 100)
    async with RequestSender(settings) as sender:
        started = time.perf_counter()
        tick = 0
        while time.perf_counter() - started < seconds:
            batch = [request_from("spam-filter", {"text": SPAM_TEXTS[i % len(SPAM_TEXTS)]}) for i in range(per_tick)]
            now = time.perf_counter()
            for r in batch:
                sent_at[r.request_id] = now
            await sender.send(batch)
            tick += 1
            await asyncio.sleep(max(0.0, started + tick * 0.01 - time.perf_counter()))
    deadline = time.monotonic() + 30
    while sent_at and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    receiver.cancel()
    await consumer.stop()
    return latencies


async def provision(settings: Settings) -> None:
    """Topics, and the spam-filter task with its program active."""
    await apply_topics(settings, topics_for(settings.topic_prefix))
    async with ControlPlane(settings) as control:
        # No input_schema: the same job as the baselines (decode, classify, encode, produce).
        await control.put_task(TaskSpec(name="spam-filter", updated_at=utc_now()))
        await control.publish("spam-filter", program_source(PROGRAM), activate=True)


async def produce(settings: Settings, count: int) -> None:
    """`count` spam-filter requests on the requests topic."""
    async with RequestSender(settings) as sender:
        for start in range(0, count, 10_000):
            await sender.send(request_from("spam-filter", {"text": SPAM_TEXTS[i % len(SPAM_TEXTS)]})
                              for i in range(start, min(count, start + 10_000)))


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


async def pipeline(
    settings: Settings, count: int, workers: int, log_dir: Path, rate: int | None
) -> tuple[float, list[float], float]:
    """msg/s of `workers` worker processes over `count` requests, latencies if rate is given, and how long after
    the last result the daily analytics held every execution.

    One worker starts on requests already produced. Several are started first and the requests produced
    once their group has settled: otherwise a rebalance, as each one joins, falls inside the measurement.
    """
    env = {**os.environ, **settings.to_env(), "LOOPAI_LOG_LEVEL": "INFO",
           "LOOPAI_SANDBOX_PROCESSES": str(max(1, (os.cpu_count() or 1) // workers))}
    if workers == 1:
        await produce(settings, count)
    processes, logs = [], []
    for n in range(workers):
        logs.append(log_dir / f"worker-{settings.topic_prefix}{n}.log")
        log = open(logs[-1], "wb")  # noqa: SIM115 - the worker writes it until the end
        processes.append(subprocess.Popen([sys.executable, "-m", "app.cli", "worker"],
                                          # HTTP on, each its own port: the metrics' counting is measured too
                                          env={**env, "LOOPAI_WORKER_ID": f"bench-{n}",
                                               "LOOPAI_WEB_PORT": str(free_port())},
                                          stdout=log, stderr=subprocess.STDOUT))
    try:
        if workers > 1:
            await wait_for_stable_group(logs, topics_for(settings.topic_prefix).execution_requests.partitions)
            await produce(settings, count)
        caught_up = asyncio.ensure_future(analytics_caught_up(settings, count, 600))
        await wait_for_commits(settings, f"{settings.app_id}-executors", count, 600)
        span, last_result = await executed_span(settings, count, 60)
        analytics_at, changes = await caught_up
        analytics_lag = (analytics_at - last_result).total_seconds()
        say(f"  daily analytics held all {count} executions {analytics_lag:.2f} s after the last result "
            f"({changes} changelog records)")
        latencies = sorted(await latency(settings, rate, 5.0)) if rate else []
        return count / span, latencies, analytics_lag
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


async def bench(count: int, rate: int) -> None:
    log_dir = Path(tempfile.mkdtemp(prefix="loopai-bench-"))
    cores = os.cpu_count() or 1
    with EmbeddedBroker(log_file=log_dir / "broker.log") as broker:
        def settings_for(prefix: str) -> Settings:
            return Settings.load(None, bootstrap_servers=broker.bootstrap_servers, topic_prefix=prefix,
                                 **EMBEDDED_TIMINGS)

        settings = settings_for("bench.")
        topics = topics_for(settings.topic_prefix)
        partitions = topics.execution_requests.partitions
        say(f"producing {count} requests to {topics.execution_requests.name} ({partitions} partitions)...")
        await provision(settings)
        started = time.perf_counter()
        await produce(settings, count)
        say(f"  {count / (time.perf_counter() - started):,.0f} msg/s produced")
        admin = AIOKafkaAdminClient(**settings.kafka_client_args())
        await admin.start()
        outputs = ("plain", "plain-alo", "quix")
        await admin.create_topics([NewTopic(f"bench.{name}-out", partitions, 1) for name in outputs])
        await admin.close()
        rates: dict[str, float] = {}

        say("plain aiokafka loop (in-process, no isolation)...")
        seconds = await plain_loop(settings, topics.execution_requests.name, "bench.plain-out", count, False)
        rates["plain aiokafka loop"] = count / seconds
        say("plain aiokafka loop, at-least-once (acks awaited and offsets committed per batch)...")
        seconds = await plain_loop(settings, topics.execution_requests.name, "bench.plain-alo-out", count, True)
        rates["plain loop, at-least-once"] = count / seconds

        if quix_available():
            say("Quix Streams (orjson serde, in-process, no isolation)...")
            program = log_dir / "program.py"
            program.write_text(program_source(PROGRAM))
            job = subprocess.run(
                [str(QUIX_VENV / "bin" / "python"), str(HERE / "quix_job.py"), broker.bootstrap_servers,
                 topics.execution_requests.name, "bench.quix-out", str(count), "bench-quix", str(program)],
                capture_output=True, text=True, timeout=600)
            if job.returncode == 0:
                rates["Quix Streams"] = count / json.loads(job.stdout.strip().splitlines()[-1])["seconds"]
            else:
                say(f"  Quix job failed: {job.stderr[-800:]}")

        say("loopai pipeline, 1 worker process (+ its sandbox pool)...")
        single = settings_for("bench-1.")
        await provision(single)
        rates["loopai pipeline, 1 worker"], lat, lag = await pipeline(single, count, 1, log_dir, rate)
        lags = {"loopai pipeline, 1 worker": lag}
        if cores > 1:
            say(f"loopai pipeline, {cores} worker processes (requests produced once their group settles)...")
            multi = settings_for("bench-multi.")
            await provision(multi)
            name = f"loopai pipeline, {cores} workers"
            rates[name], _, lags[name] = await pipeline(multi, count, cores, log_dir, None)

    say("")
    say(f"{'job':<32}{'msg/s':>10}{'vs plain':>10}{'vs Quix':>9}")
    for name, value in rates.items():
        vs_quix = f"{value / rates['Quix Streams']:.2f}" if "Quix Streams" in rates else "-"
        say(f"{name:<32}{value:>10,.0f}{value / rates['plain aiokafka loop']:>10.2f}{vs_quix:>9}")
    say("targets: pipeline >= 0.50 x plain loop, >= 1.00 x Quix Streams")
    for name, lag in lags.items():
        say(f"{name}: daily analytics complete {lag:.2f} s after the last result")
    if lat:
        p50 = statistics.median(lat)
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        say(f"request->result latency, 1 worker at {rate} req/s: p50 {p50:.1f} ms, p99 {p99:.1f} ms "
            f"({len(lat)} requests)")
    print(json.dumps({"requests": count, "rates": rates, "analytics_lag_s": lags,
                      "latency_ms": {"p50": p50, "p99": p99} if lat else None}))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--rate", type=int, default=2000, help="requests/s for the latency phase")
    args = parser.parse_args()
    asyncio.run(bench(args.requests, args.rate))


if __name__ == "__main__":
    main()
