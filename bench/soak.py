"""Soak: a million requests through one worker on the embedded broker, produced a backlog ahead of it; out, the
resident memory of the worker and of its sandbox processes, sampled as it goes, as a table with a curve."""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from aiokafka import TopicPartition

from app.contract.topics import topics_for
from app.kafka.clients import make_consumer
from app.kafka.loop_client import RequestSender, request_from
from app.settings import Settings
from bench.workload import provision
from devtools.broker import EMBEDDED_TIMINGS, EmbeddedBroker
from devtools.samples import SPAM_TEXTS

CHUNK = 10_000


@dataclass(frozen=True)
class Sample:
    seconds: float
    done: int  # requests whose offsets the worker has committed
    worker_mb: float
    sandbox_mb: list[float]  # one per sandbox process alive at the time


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as found:
        return [int(child) for child in found.read().split()]


async def committed(settings: Settings) -> int:
    spec = topics_for(settings.topic_prefix).execution_requests
    probe = make_consumer(settings, group_id=f"{settings.app_id}-executors")
    await probe.start()
    try:
        return sum([await probe.committed(TopicPartition(spec.name, p)) or 0 for p in range(spec.partitions)])
    finally:
        await probe.stop()


async def produce(settings: Settings, count: int, backlog: int, done: list[int]) -> None:
    """`count` requests in chunks, never more than `backlog` ahead of what the worker has committed."""
    async with RequestSender(settings) as sender:
        for start in range(0, count, CHUNK):
            while start - done[0] > backlog:
                await asyncio.sleep(0.05)
            await sender.send(request_from("spam-filter", {"text": f"{SPAM_TEXTS[i % len(SPAM_TEXTS)]} {i}"})
                              for i in range(start, min(count, start + CHUNK)))


async def soak(count: int, interval_s: float, backlog: int) -> list[Sample]:
    log_dir = Path(tempfile.mkdtemp(prefix="loopai-soak-"))
    with EmbeddedBroker(log_file=log_dir / "broker.log") as broker:
        settings = Settings.load(None, bootstrap_servers=broker.bootstrap_servers, topic_prefix="soak.",
                                 **EMBEDDED_TIMINGS)
        await provision(settings)
        env = {**os.environ, **settings.to_env(), "LOOPAI_WORKER_ID": "soak-1"}
        with open(log_dir / "worker.log", "wb") as log:
            worker = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], env=env, stdout=log,
                                      stderr=subprocess.STDOUT)
        print(f"worker pid {worker.pid}, logs in {log_dir}; {count:,} requests, backlog {backlog:,}", flush=True)
        try:
            while b" serving" not in (log_dir / "worker.log").read_bytes():
                if worker.poll() is not None:
                    raise SystemExit(f"the worker exited with {worker.returncode}; see {log_dir}")
                await asyncio.sleep(0.2)
            done = [0]
            producer = asyncio.ensure_future(produce(settings, count, backlog, done))
            samples: list[Sample] = []
            started = time.monotonic()
            print(f"{'s':>6} {'done':>10} {'worker MB':>10} {'sandbox MB (each)':>24}", flush=True)
            while True:
                done[0] = await committed(settings)
                sample = Sample(time.monotonic() - started, done[0], rss_mb(worker.pid),
                                [rss_mb(child) for child in children(worker.pid)])
                samples.append(sample)
                each = " ".join(f"{mb:6.1f}" for mb in sample.sandbox_mb)
                print(f"{sample.seconds:6.0f} {sample.done:>10,} {sample.worker_mb:>10.1f} {each:>24}", flush=True)
                if sample.done >= count:
                    break
                if worker.poll() is not None:
                    raise SystemExit(f"the worker exited with {worker.returncode}; see {log_dir}")
                await asyncio.sleep(interval_s)
            await producer
            return samples
        finally:
            worker.terminate()
            worker.wait(timeout=30)


def report(samples: list[Sample], count: int) -> None:
    """The curves, and the change in median RSS from the second fifth of the requests (warm) to the last."""
    last = samples[-1]
    seconds = last.seconds or 1.0
    print(f"\n{count:,} requests in {seconds:.0f} s ({count / seconds:,.0f}/s, producing included)")
    worker = [s.worker_mb for s in samples]
    sandbox = [sum(s.sandbox_mb) for s in samples]
    print(f"worker RSS, {min(worker):.0f}..{max(worker):.0f} MB:  {curve(worker)}")
    print(f"sandbox RSS (sum), {min(sandbox):.0f}..{max(sandbox):.0f} MB:  {curve(sandbox)}")
    warm = [s for s in samples if count // 5 <= s.done < 2 * count // 5]
    end = [s for s in samples if s.done >= 4 * count // 5]
    if warm and end:
        for name, of in (("worker", lambda s: s.worker_mb), ("sandboxes", lambda s: sum(s.sandbox_mb))):
            before, after = statistics.median(map(of, warm)), statistics.median(map(of, end))
            print(f"{name}: median {before:.1f} MB over the second fifth of the requests, {after:.1f} MB over "
                  f"the last fifth ({after - before:+.1f} MB)")


def curve(values: list[float]) -> str:
    """One character per sample, from the lowest value seen to the highest."""
    bars = "▁▂▃▄▅▆▇█"
    low, span = min(values), (max(values) - min(values)) or 1.0
    return "".join(bars[round((v - low) / span * (len(bars) - 1))] for v in values)


_HELP = """\
Soak: a million requests (--requests) through one `loopai worker` on the embedded broker, produced a
backlog ahead of it, while the resident memory (RSS) of the worker and of its sandbox processes is sampled.
Prints the samples as a table with a curve; both should stay flat once warm. Not a test: run it by hand,

    python -m bench.soak [--requests N] [--interval SECONDS] [--backlog N]
"""  # what --help prints


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("--backlog", type=int, default=50_000, help="requests produced ahead of the worker")
    args = parser.parse_args()
    report(asyncio.run(soak(args.requests, args.interval, args.backlog)), args.requests)


if __name__ == "__main__":
    main()
