"""Tenants apart: a victim task's request->result latency with and without a hostile neighbour on the same worker.
In: --seconds, --rate, --rounds; out: the victim's p50/p99 beside each neighbour (a loop that swallows its timer, a
spinning finaliser, megabyte outputs) against its runs alone, and the worker's peak resident memory."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from app.contract.codecs import codec_for
from app.contract.records import ExecutionRequest, TaskSpec, utc_now
from app.contract.topics import topics_for
from app.control.plane import ControlPlane
from app.kafka.clients import (
    apply_topics,
    cancel_and_wait,
    make_consumer,
    make_producer,
    partition_for,
    stop_clients,
    widen_fetch_wait_if_starved,
)
from app.kafka.loop_client import request_from
from app.settings import Settings
from bench import say
from devtools.broker import EMBEDDED_TIMINGS, EmbeddedBroker
from devtools.samples.neighbours import FINALISER, HUGE, SPIN, VICTIM

SCENARIOS = {  # neighbour task -> its requests per second beside the victim
    "alone": ("", 0),
    "spinning (swallows its timer)": ("spin", 20),
    "spinning finaliser": ("finaliser", 20),
    "1 MB outputs": ("huge-outputs", 20),
}
# Each neighbour hashes to a partition other than the victim's (5 of 6): tasks that share a partition share its log,
# so a client reading the victim's results would read the neighbour's megabytes first, whatever the worker does.


async def provision(settings: Settings) -> None:
    await apply_topics(settings, topics_for(settings.topic_prefix))
    async with ControlPlane(settings) as control:
        for name, source in {"victim": VICTIM, "spin": SPIN, "finaliser": FINALISER, "huge-outputs": HUGE}.items():
            await control.put_task(TaskSpec(name=name, updated_at=utc_now()))
            await control.publish(name, source, activate=True)


async def steady(settings: Settings, rate: int, neighbour: str, neighbour_rate: int,
                 seconds: float) -> tuple[list[float], Counter[str]]:
    """Victim requests at `rate`/s (and the neighbour's at its rate) for `seconds`: the victim's latencies in
    ms (send to result seen), and the neighbour's result statuses."""
    topics = topics_for(settings.topic_prefix)
    encode = codec_for(ExecutionRequest, settings, topics.execution_requests).encode
    results = topics.execution_results
    # The victim's client reads the victim's partition only; the neighbour's results are counted afterwards, so
    # that reading its megabytes costs this process nothing while the victim is timed.
    consumer = await _reader(settings, partition_for(b"victim", results.partitions))
    sent_at: dict[str, float] = {}
    theirs: set[str] = set()
    latencies: list[float] = []

    async def receive() -> None:
        while True:
            fetched = await consumer.getmany(timeout_ms=100)
            if not fetched:
                await widen_fetch_wait_if_starved(consumer)
            for messages in fetched.values():
                now = time.perf_counter()
                for message in messages:
                    request_id = orjson.loads(message.value)["request_id"]
                    if request_id in sent_at:
                        latencies.append((now - sent_at.pop(request_id)) * 1000)

    receiver = asyncio.ensure_future(receive())
    producer = make_producer(settings)
    await producer.start()
    partitions = topics.execution_requests.partitions
    try:
        started = time.perf_counter()
        ticks = int(seconds * 100)
        for tick in range(ticks):
            batch = [request_from("victim", {"n": tick * 1000 + i}) for i in range(max(1, rate // 100))]
            if neighbour and tick % max(1, 100 // neighbour_rate) == 0:
                mine = [request_from(neighbour, {"n": tick * 1000 + i}) for i in range(max(1, neighbour_rate // 100))]
                theirs.update(r.request_id for r in mine)
                batch += mine
            now = time.perf_counter()
            for request in batch:
                if request.task_id == "victim":
                    sent_at[request.request_id] = now
                key = request.task_id.encode()
                await producer.send(topics.execution_requests.name, encode(request), key=key,
                                    partition=partition_for(key, partitions))
            await asyncio.sleep(max(0.0, started + (tick + 1) * 0.01 - time.perf_counter()))
        deadline = time.monotonic() + 120
        while sent_at and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    finally:
        await producer.stop()
        receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiver
        await consumer.stop()
    if sent_at:
        say(f"    {len(sent_at)} victim requests without a result after 120 s")
    statuses: Counter[str] = Counter()
    if neighbour:
        reader = await _reader(settings, partition_for(neighbour.encode(), results.partitions), from_start=True)
        deadline = time.monotonic() + 120
        try:
            while theirs and time.monotonic() < deadline:
                for messages in (await reader.getmany(timeout_ms=100)).values():
                    for message in messages:
                        result = orjson.loads(message.value)
                        if result["request_id"] in theirs:
                            theirs.discard(result["request_id"])
                            statuses[result["status"]] += 1
        finally:
            await reader.stop()
    return latencies, statuses


async def _reader(settings: Settings, partition: int, from_start: bool = False) -> AIOKafkaConsumer:
    """A consumer of one partition of execution-results, at its start, or at its true end: read to it, since the
    embedded broker's ListOffsets(latest) under-reports the end (a reader seeked there stalled)."""
    consumer = make_consumer(settings, fetch_max_wait_ms=settings.executor_fetch_max_wait_ms)
    await consumer.start()
    tp = TopicPartition(topics_for(settings.topic_prefix).execution_results.name, partition)
    consumer.assign([tp])
    await consumer.seek_to_beginning(tp)
    if not from_start:
        while await consumer.getmany(timeout_ms=300):
            pass
    return consumer


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def scenario(work: Path, rate: int, neighbour: str, neighbour_rate: int,
                   seconds: float) -> tuple[list[float], Counter[str], float]:
    """One scenario on a fresh broker and worker (the embedded broker slows as its partitions grow: a scenario run
    after others would pay for their logs): the victim's latencies, the neighbour's statuses, the worker's peak
    RSS in MB."""
    with EmbeddedBroker(log_file=work / "broker.log") as broker:
        settings = Settings(bootstrap_servers=broker.bootstrap_servers, topic_prefix="neighbours.",
                            app_id="neighbours", data_dir=work / "data", web_port=0, **EMBEDDED_TIMINGS)
        await provision(settings)
        log_path = work / "worker.log"
        env = {**settings.to_env(), "LOOPAI_WORKER_ID": "bench-neighbours", "PATH": "/usr/bin:/bin"}
        with open(log_path, "wb") as log:
            worker = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], env=env, cwd=work,
                                      stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while "serving" not in log_path.read_text(errors="replace"):
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(log_path.read_text(errors="replace")[-3000:])
                await asyncio.sleep(0.1)
            await steady(settings, rate, "", 0, 1.0)  # warm: the victim's sandbox process is started
            latencies, statuses = await steady(settings, rate, neighbour, neighbour_rate, seconds)
            return latencies, statuses, peak_rss_mb(worker.pid)
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
            lines = log_path.read_text(errors="replace").splitlines()
            late = [line for line in lines if "ran at most" in line]
            if late:
                say("    worker: " + late[-1].split("] ", 3)[-1].strip())
            for line in [line for line in lines if "ERROR" in line or "CRITICAL" in line][-10:]:
                say(f"    worker: {line[:300]}")


async def broker_alone(work: Path, rate: int, seconds: float, megabytes_per_s: int) -> list[float]:
    """No worker: small records at `rate`/s to the victim's results partition, beside `megabytes_per_s` records of
    1 MB to the huge-outputs task's, on a fresh broker: the small records' produce->seen latencies in ms (what the
    broker alone adds beside a neighbour's megabytes)."""
    with EmbeddedBroker(log_file=work / "broker.log") as broker:
        settings = Settings(bootstrap_servers=broker.bootstrap_servers, topic_prefix="alone.", app_id="alone",
                            data_dir=work / "data", web_port=0, **EMBEDDED_TIMINGS)
        topics = topics_for(settings.topic_prefix)
        await apply_topics(settings, topics)
        results = topics.execution_results
        consumer = await _reader(settings, partition_for(b"victim", results.partitions))
        sent_at: dict[bytes, float] = {}
        latencies: list[float] = []

        async def receive() -> None:
            while True:
                fetched = await consumer.getmany(timeout_ms=100)
                now = time.perf_counter()
                for messages in fetched.values():
                    for message in messages:
                        if message.value in sent_at:
                            latencies.append((now - sent_at.pop(message.value)) * 1000)

        receiver = asyncio.ensure_future(receive())
        producer, bulk = make_producer(settings), make_producer(settings)  # as the worker's main and bulk lanes
        await producer.start()
        await bulk.start()
        small_partition = partition_for(b"victim", results.partitions)
        big_partition = partition_for(b"huge-outputs", results.partitions)
        megabyte = b"x" * 999_000
        try:
            started, number = time.perf_counter(), 0
            for tick in range(int(seconds * 100)):
                for _ in range(max(1, rate // 100)):
                    value = b"%08d" % number + b"." * 300  # about a result's size
                    sent_at[value] = time.perf_counter()
                    await producer.send(results.name, value, key=b"victim", partition=small_partition)
                    number += 1
                if megabytes_per_s and tick % max(1, 100 // megabytes_per_s) == 0:
                    await bulk.send(results.name, megabyte, key=b"huge-outputs", partition=big_partition)
                await asyncio.sleep(max(0.0, started + (tick + 1) * 0.01 - time.perf_counter()))
            deadline = time.monotonic() + 30
            while sent_at and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            await stop_clients(producer, bulk)
            await cancel_and_wait(receiver)
            await consumer.stop()
        return latencies


async def run(seconds: float, rate: int, rounds: int, only: list[str]) -> None:
    say(f"victim: {rate} req/s of a trivial program for {seconds:g} s per scenario, one worker (embedded broker), "
        f"a fresh broker and worker for each scenario; {rounds} rounds, scenarios interleaved, medians of the "
        "rounds' figures")
    scenarios = {name: how for name, how in SCENARIOS.items()
                 if name == "alone" or not only or any(name.startswith(prefix) for prefix in only)}
    figures: dict[str, list[tuple[float, float, Counter[str]]]] = {name: [] for name in scenarios}
    peak = 0.0
    for round_ in range(rounds):
        for name, (task, task_rate) in scenarios.items():
            with tempfile.TemporaryDirectory() as work:
                latencies, statuses, rss = await scenario(Path(work), rate, task, task_rate, seconds)
            figures[name].append((quantile(latencies, 0.5), quantile(latencies, 0.99), statuses))
            peak = max(peak, rss)
            say(f"    round {round_ + 1}, {name}: p99 {figures[name][-1][1]:.1f} ms")
    say(f"{'neighbour':<32} {'p50 ms':>8} {'p99 ms':>8} {'p99 vs alone':>13}  p99 of each round; "
        "the neighbour's results (last round)")
    alone_p99 = statistics.median(p99 for _, p99, _ in figures["alone"])
    for name, runs in figures.items():
        p50 = statistics.median(p50 for p50, _, _ in runs)
        p99 = statistics.median(p99 for _, p99, _ in runs)
        what = ", ".join(f"{count} {status}" for status, count in sorted(runs[-1][2].items())) or "-"
        rounds_p99 = " ".join(f"{p99:.0f}" for _, p99, _ in runs)
        say(f"{name:<32} {p50:>8.1f} {p99:>8.1f} {p99 / alone_p99:>12.2f}x  [{rounds_p99}]; {what}")
    say(f"worker peak resident memory (the largest of every scenario's worker): {peak:.0f} MB")
    if "1 MB outputs" in scenarios:
        floors: dict[int, list[float]] = {0: [], 20: []}
        for _ in range(rounds):
            for megabytes_per_s, p99s in floors.items():
                with tempfile.TemporaryDirectory() as work:
                    p99s.append(quantile(await broker_alone(Path(work), rate, seconds, megabytes_per_s), 0.99))
        alone, beside = statistics.median(floors[0]), statistics.median(floors[20])
        say(f"the broker alone (no worker; small records at {rate}/s, medians): p99 {alone:.1f} ms, beside 20 records "
            f"of 1 MB a second {beside:.1f} ms ({beside / alone:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per scenario")
    parser.add_argument("--rate", type=int, default=500, help="victim requests per second")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="", help="neighbours to run beside 'alone', by the start of their names")
    args = parser.parse_args()
    asyncio.run(run(args.seconds, args.rate, args.rounds, [n for n in args.only.split(",") if n]))


if __name__ == "__main__":
    main()
