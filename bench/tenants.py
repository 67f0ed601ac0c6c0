"""Many tenants per worker: throughput and memory of one worker as the same traffic is spread over more tasks.
In: --requests, --tasks counts, --rounds; out: for each count, requests/s cold and warm (against one task's), CPU per
request of the worker, its sandbox processes and the broker, the worker's RSS and its sandbox processes' USS and PSS."""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app.contract.records import TaskSpec, utc_now
from app.contract.topics import topics_for
from app.control.plane import ControlPlane
from app.kafka.clients import apply_topics
from app.kafka.loop_client import request_from
from app.sandbox.process import Memory, measure_memory
from app.settings import Settings
from bench import say
from bench.cpu import tree_seconds
from bench.probes import wait_for_commits
from bench.workload import encode_requests, send_encoded
from devtools.broker import EMBEDDED_TIMINGS, EmbeddedBroker

PROGRAM = "def run(input):\n    return input['n'] % 7\n"
GONE = Memory(0, 0, 0)  # a process that ended before it was measured
MB = 1 << 20


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            kids = [int(k) for k in Path(f"/proc/{parent}/task/{parent}/children").read_text().split()]
        except OSError:
            continue
        found += kids
        todo += kids
    return found


def cpu_split(worker: int, broker: int) -> tuple[float, float, float]:
    """CPU seconds so far of the worker process, of its sandbox processes (all its descendants), and of the broker."""
    tree, own = tree_seconds([worker])
    return own, tree - own, tree_seconds([broker])[0]


async def provision(settings: Settings, tasks: list[str]) -> None:
    await apply_topics(settings, topics_for(settings.topic_prefix))
    async with ControlPlane(settings) as control:
        for name in tasks:
            await control.put_task(TaskSpec(name=name, sampling_rate=0.0, updated_at=utc_now()))
            await control.publish(name, PROGRAM, activate=True)


async def one_count(broker: EmbeddedBroker, work: Path, count: int, requests: int,
                    rounds: int) -> list[tuple[float, ...]]:
    """A cold run (the tasks' processes start), then `rounds` warm ones."""
    prefix = f"tenants{count}."
    settings = Settings(bootstrap_servers=broker.bootstrap_servers, topic_prefix=prefix, app_id=f"tenants{count}",
                        data_dir=work / f"data{count}", web_port=0, sandbox_processes=count + 16,
                        **EMBEDDED_TIMINGS)
    tasks = [f"task-{i}" for i in range(count)]
    await provision(settings, tasks)
    log_path = work / f"worker{count}.log"
    env = {**settings.to_env(), "LOOPAI_WORKER_ID": f"tenants-{count}", "PATH": "/usr/bin:/bin"}
    with open(log_path, "wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], env=env, cwd=work, stdout=log,
                                  stderr=subprocess.STDOUT)
    runs = []
    try:
        deadline = time.monotonic() + 120
        while "serving" not in log_path.read_text(errors="replace"):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(log_path.read_text(errors="replace")[-3000:])
            await asyncio.sleep(0.1)
        group, done = f"{settings.app_id}-executors", 0
        for _ in range(1 + rounds):
            encoded = encode_requests(settings, [request_from(tasks[i % count], {"n": i}) for i in range(requests)])
            started, cpu_before = time.monotonic(), cpu_split(worker.pid, broker.pid)
            await send_encoded(settings, encoded)
            done += requests
            await wait_for_commits(settings, group, done, 600, poll_s=0.01)
            seconds = time.monotonic() - started
            cpu_us = [(after - before) / requests * 1e6
                      for before, after in zip(cpu_before, cpu_split(worker.pid, broker.pid), strict=True)]
            sandboxes = [measure_memory(pid) or GONE for pid in descendants(worker.pid)]
            runs.append((requests / seconds, *cpu_us, (measure_memory(worker.pid) or GONE).rss / MB,
                         sum(m.uss for m in sandboxes) / MB, sum(m.pss for m in sandboxes) / MB, len(sandboxes)))
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    return runs


async def run(requests: int, counts: list[int], rounds: int) -> None:
    with tempfile.TemporaryDirectory() as work, EmbeddedBroker(log_file=Path(work) / "broker.log") as broker:
        say(f"{requests} requests spread evenly over N tasks, one worker (embedded broker); each count cold (its "
            f"sandbox processes start), then warm: the median of {rounds} rounds, and memory after the last")
        say(f"{'tasks':>6} {'run':>5} {'req/s':>8} {'vs 1 task':>10} {'CPU µs/request: worker':>23} {'sandboxes':>10} "
            f"{'broker':>7} {'worker MB':>10} {'sandbox USS MB':>15} {'sandbox PSS MB':>15} {'processes':>10}")
        base = None
        for count in counts:
            cold, *warm = await one_count(broker, Path(work), count, requests, rounds)
            median = sorted(warm, key=lambda run: run[0])[len(warm) // 2]
            for label, (rate, worker_us, sandbox_us, broker_us, worker_mb, uss, pss, processes) in (
                    ("cold", cold), ("warm", (*median[:4], *warm[-1][4:]))):
                if label == "warm" and base is None:
                    base = rate
                ratio = f"{rate / base:.2f}" if base else "-"
                say(f"{count:>6} {label:>5} {rate:>8.0f} {ratio:>10} {worker_us:>23.1f} {sandbox_us:>10.1f} "
                    f"{broker_us:>7.1f} {worker_mb:>10.0f} {uss:>15.1f} {pss:>15.1f} "
                    f"{processes:>10}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000, help="per round")
    parser.add_argument("--tasks", default="1,16,100,1000", help="task counts, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="warm rounds per count")
    args = parser.parse_args()
    asyncio.run(run(args.requests, [int(n) for n in args.tasks.split(",")], args.rounds))


if __name__ == "__main__":
    main()
