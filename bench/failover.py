"""Failover under steady load: two workers serve a steady stream while one is stopped and restarted, in turn by
SIGKILL and SIGTERM; out, each stop's longest gap without a result, and the requests lost (must be 0), duplicated
and validated. `--help` says how to run it, on any broker."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from app.contract.records import (
    ExecutionRequest,
    ExecutionResult,
    OracleKind,
    OracleSpec,
    OracleVerdict,
    TaskSpec,
    Validation,
    ValidationRequest,
    utc_now,
)
from app.contract.topics import TopicSpec, topics_for
from app.control.plane import ControlPlane
from app.kafka.clients import apply_topics, make_consumer
from app.kafka.loop_client import RequestSender, follow, request_from
from app.settings import Settings
from devtools.broker import EmbeddedBroker
from devtools.oracle import canonical, serve_oracle

TASKS = [f"failover-{i}" for i in range(12)]  # their keys spread over the request partitions
INPUTS = 1000  # inputs cycle through {"i": 0..999}: the oracle knows each one's answer
PROGRAM = "def run(input):\n    return input['i'] * 3\n"
SAMPLING_RATE = 0.1
ORACLE_TIMEOUT_S = 20.0  # a sample the oracle answers is never near it; a false expiry shows after it


@dataclass
class Stop:
    at: float  # wall clock
    signal: str
    victim: str
    survivor_log: Path
    restarted_at: float = 0.0


@dataclass
class Observed:
    sent: dict[str, ExecutionRequest] = field(default_factory=dict)
    results: list[ExecutionResult] = field(default_factory=list)
    validations: list[Validation] = field(default_factory=list)
    asked: set[str] = field(default_factory=set)  # execution ids on oracle-requests
    answered: set[str] = field(default_factory=set)  # execution ids on oracle-verdicts
    # execution id -> (record timestamp, what): its oracle requests and verdicts, and the join's table changes
    history: dict[str, list[tuple[float, str]]] = field(default_factory=lambda: defaultdict(list))


class Worker:
    """`loopai worker` in a subprocess, its output in a log file."""

    def __init__(self, settings: Settings, log_dir: Path, worker_id: str) -> None:
        self._env = {**os.environ, **settings.to_env(), "LOOPAI_WORKER_ID": worker_id}
        self.log_path = log_dir / f"{worker_id}.log"
        self.worker_id = worker_id
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self, timeout_s: float = 120) -> None:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], env=self._env, stdout=log,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while f"worker {self.worker_id} serving".encode() not in self.log_path.read_bytes()[offset:]:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"worker {self.worker_id} did not start; see {self.log_path}")
            await asyncio.sleep(0.2)

    async def stop(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)
        code = await asyncio.to_thread(self.process.wait, 60)
        if sig == signal.SIGTERM and code != 0:
            print(f"  {self.worker_id} exited {code} after SIGTERM; see {self.log_path}", flush=True)


async def provision(settings: Settings) -> None:
    await apply_topics(settings, topics_for(settings.topic_prefix))
    oracle = OracleSpec(kind=OracleKind.EXTERNAL, timeout_s=ORACLE_TIMEOUT_S)
    async with ControlPlane(settings) as control:
        for task in TASKS:
            await control.put_task(TaskSpec(name=task, sampling_rate=SAMPLING_RATE, oracle=oracle,
                                            updated_at=utc_now()))
            await control.publish(task, PROGRAM, activate=True)


async def produce(settings: Settings, rate: int, until: float, observed: Observed) -> None:
    """`rate` requests a second, in 20 waves a second, until the monotonic time `until`."""
    per_wave, interval = max(1, rate // 20), 0.05
    async with RequestSender(settings) as sender:
        n, next_at = 0, time.monotonic()
        while next_at < until:
            wave = [request_from(TASKS[(n + k) % len(TASKS)], {"i": (n + k) % INPUTS}) for k in range(per_wave)]
            await sender.send(wave)
            observed.sent.update((r.request_id, r) for r in wave)
            n += per_wave
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))


async def collect(settings: Settings, observed: Observed) -> None:
    topics = topics_for(settings.topic_prefix)

    async def results() -> None:
        async for _, _, record in follow(settings, topics.execution_results):
            if isinstance(record, ExecutionResult):
                observed.results.append(record)

    async def validations() -> None:
        async for _, _, record in follow(settings, topics.validations):
            if isinstance(record, Validation):
                observed.validations.append(record)

    async def oracle(spec: TopicSpec, seen: set[str], what: str) -> None:
        async for tp, offset, record in follow(settings, spec):
            if isinstance(record, ValidationRequest | OracleVerdict):
                seen.add(record.execution_id)
                made = record.requested_at if isinstance(record, ValidationRequest) else record.answered_at
                observed.history[record.execution_id].append((made.timestamp(), f"{what} ({tp.partition}:{offset})"))

    async def table_changes() -> None:
        """The join's table as its changelog has it, raw (a tombstone has no value)."""
        consumer = make_consumer(settings)
        await consumer.start()
        try:
            consumer.subscribe([topics.oracle_pending.name])
            async for message in consumer:
                change = json.loads(message.value) if message.value is not None else None
                what = "tombstone" if change is None else \
                    f"decided {change['decided']}" if "decided" in change else \
                    "waits with its request" if "request" in change else "waits with a verdict"
                observed.history[message.key.decode()].append(
                    (message.timestamp / 1000, f"table: {what} ({message.partition}:{message.offset})"))
        finally:
            await consumer.stop()

    await asyncio.gather(results(), validations(), oracle(topics.oracle_requests, observed.asked, "request"),
                         oracle(topics.oracle_verdicts, observed.answered, "verdict"), table_changes())


async def failover(settings: Settings, minutes: float, rate: int, every_s: float, signals: list[signal.Signals],
                   log_dir: Path) -> tuple[list[Stop], Observed]:
    await provision(settings)
    workers = {name: Worker(settings, log_dir, name) for name in ("worker-a", "worker-b")}
    for worker in workers.values():
        # One after the other: the embedded broker numbers a group's first generation 0, and aiokafka sends no
        # LeaveGroup from generation 0, so a worker stopped in it is only dropped when its session runs out.
        await worker.start()
    observed, stops = Observed(), []
    stop_oracle = asyncio.Event()
    labels = {canonical({"i": i}): i * 3 for i in range(INPUTS)}
    background = [asyncio.ensure_future(serve_oracle(settings, labels, "bench-failover", stop_oracle)),
                  asyncio.ensure_future(collect(settings, observed))]
    end = time.monotonic() + minutes * 60
    producer = asyncio.ensure_future(produce(settings, rate, end, observed))
    try:
        await asyncio.sleep(every_s)
        round_ = 0
        while time.monotonic() + every_s / 2 < end:
            victim, survivor = workers["worker-a"], workers["worker-b"]
            if round_ % 2:
                victim, survivor = survivor, victim
            sig = signals[round_ % len(signals)]
            stop = Stop(time.time(), sig.name, victim.worker_id, survivor.log_path)
            stops.append(stop)
            await victim.stop(sig)
            await asyncio.sleep(max(0.0, stop.at + every_s / 2 - time.time()))
            stop.restarted_at = time.time()
            await victim.start()
            serving_at = time.time()
            print(f"  {len(stops)}: {sig.name} {victim.worker_id} at {stop.at - stops[0].at:5.1f} s, started again "
                  f"after {stop.restarted_at - stop.at:.1f} s, serving {serving_at - stop.restarted_at:.1f} s later",
                  flush=True)
            # The next stop finds both workers settled: a worker joins three groups and reads its tables back
            # after it says it serves (15 s on the embedded broker), and a survivor still starting is slower.
            await asyncio.sleep(max(0.0, max(stop.at + every_s, serving_at + every_s / 2) - time.time()))
            round_ += 1
        await producer
        await drain(observed)
    finally:
        producer.cancel()
        stop_oracle.set()
        for task in background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for worker in workers.values():
            if worker.process is not None and worker.process.poll() is None:
                await worker.stop(signal.SIGTERM)
    return stops, observed


async def drain(observed: Observed, timeout_s: float = 180) -> None:
    """Until every request has a result and every sampled execution a validation, then the oracle timeout and
    a little more: an execution validated twice or expired after its answer would show by then."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answered = {r.request_id for r in observed.results}
        sampled = {r.execution_id for r in observed.results if r.sampled_for_validation}
        if observed.sent.keys() <= answered and sampled <= {v.execution_id for v in observed.validations}:
            break
        await asyncio.sleep(0.5)
    await asyncio.sleep(ORACLE_TIMEOUT_S + 5)


def longest_gap(results: list[ExecutionResult], start: float, end: float) -> tuple[float, str]:
    """The longest time a task went without a result, over the gaps whose middle falls in [start, end) (wall
    clock): a gap is counted once, with the stop or the restart it followed."""
    by_task: dict[str, list[float]] = defaultdict(list)
    for result in results:
        by_task[result.task_id].append(result.executed_at.timestamp())
    longest, of = 0.0, ""
    for task, times in by_task.items():
        times.sort()
        for before, after in itertools.pairwise(times):
            if start <= (before + after) / 2 < end and after - before > longest:
                longest, of = after - before, task
    return longest, of


_LOG_TIME = re.compile(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


def join_holds(log_path: Path, group: str, start: float, end: float) -> float:
    """Seconds the broker held the JoinGroups of `group` that completed in [start, end) (wall clock), from a
    worker's log: each "(Re-)joining group" to its "Joined group"."""
    held, joining = 0.0, None
    for line in log_path.read_text(errors="replace").splitlines():
        match = _LOG_TIME.match(line)
        if not match:
            continue
        at = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if f"(Re-)joining group {group} " in line + " ":
            joining = at
        elif joining is not None and f"Joined group '{group}'" in line:
            if start <= at < end:
                held += at - max(joining, start)
            joining = None
    return held


def report(stops: list[Stop], observed: Observed, broker: str, minutes: float, rate: int, group: str) -> None:
    print(f"\nbroker {broker}; 2 workers, {rate} requests/s for {minutes:g} min, {len(stops)} stops")
    print(f"{'#':>3} {'signal':8} {'victim':9} {'longest gap after the stop':>28} {'survivor join held':>19} "
          f"{'after the restart':>18}")
    gaps: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for n, stop in enumerate(stops, 1):
        end = stops[n].at if n < len(stops) else float("inf")
        after_stop, task = longest_gap(observed.results, stop.at, stop.restarted_at)
        held = join_holds(stop.survivor_log, group, stop.at, stop.at + after_stop + 1)
        after_restart, _ = longest_gap(observed.results, stop.restarted_at, end)
        gaps[stop.signal].append((after_stop, after_stop - held))
        print(f"{n:>3} {stop.signal:8} {stop.victim:9} {after_stop:>22.2f} s ({task}) {held:>17.2f} s "
              f"{after_restart:>16.2f} s")
    for name, values in gaps.items():
        raw, unheld = [v[0] for v in values], [v[1] for v in values]
        print(f"{name}: longest gap median {statistics.median(raw):.2f} s, max {max(raw):.2f} s over {len(values)} "
              f"stops; without the broker's join holds median {statistics.median(unheld):.2f} s, "
              f"max {max(unheld):.2f} s")
    variants: dict[str, set[tuple[str, object]]] = defaultdict(set)
    for result in observed.results:
        variants[result.request_id].add((result.execution_id, result.output))
    lost = [rid for rid in observed.sent if rid not in variants]
    wanted = observed.sent.keys()
    duplicates = sum(r.request_id in wanted for r in observed.results) - (len(wanted) - len(lost))
    disagreeing = sum(len(variants[rid]) > 1 for rid in wanted if rid in variants)
    print(f"requests {len(wanted):,}; lost {len(lost):,}; duplicates {duplicates:,} "
          f"({'all with equal ids and outputs' if not disagreeing else f'{disagreeing} DISAGREEING'})")
    sampled = {r.execution_id for r in observed.results if r.sampled_for_validation}
    per_execution = Counter(v.execution_id for v in observed.validations if v.execution_id in sampled)
    spread = Counter(per_execution.get(e, 0) for e in sampled)
    statuses = Counter(v.status.value for v in observed.validations if v.execution_id in sampled)
    print(f"sampled executions {len(sampled):,}; validations per execution: "
          + ", ".join(f"{count}: {n:,}" for count, n in sorted(spread.items()))
          + f" (statuses: {dict(statuses)})")
    judged_again(observed, sampled, stops)
    unjudged = sampled - per_execution.keys()
    if unjudged:
        print(f"NOT VALIDATED: {len(unjudged):,}, of which {len(unjudged & observed.asked):,} reached oracle-requests "
              f"and {len(unjudged & observed.answered):,} have a verdict on oracle-verdicts")
        for execution_id in sorted(unjudged)[:3]:
            print_history(observed, execution_id, stops)
    if lost:
        print(f"LOST: {lost[:10]}")


_HELP = """\
Failover under steady load: two `loopai worker`s serve a steady stream of requests while one of them is stopped
every --every seconds, by SIGKILL and SIGTERM in turn, and started again halfway to the next stop. Tasks are
sampled for validation by an external oracle (a reference oracle service in this process answers every
sample), so the oracle join is failed over too. Prints, for each stop, the longest time a task went without a
result after it and after the restart; then the requests, lost ones (must be 0), duplicates (each must carry its
original's execution id and output), and validations per sampled execution (must be exactly 1), with when
each execution validated more than once was judged. Not a test: run it by hand,

    python -m bench.failover [--minutes N] [--rate R] [--every S] [--signal S] [--config FILE] [--embedded]

The broker is the one the usual settings name (LOOPAI_* variables or --config), so an operator can run it against
Apache Kafka; --embedded starts Tansu instead, which holds every JoinGroup for half the session timeout (3 s with
the defaults, docs/delivery.md): each gap is also printed without the holds of the survivor's executor-group
joins, read from its log. The group timings are the settings' own.
"""  # what --help prints


def judged_again(observed: Observed, sampled: set[str], stops: list[Stop]) -> None:
    """For each execution validated more than once: its statuses, and when its second validation was written
    after the stop before it (which path judged it again)."""
    by_execution: dict[str, list[Validation]] = defaultdict(list)
    for validation in observed.validations:
        if validation.execution_id in sampled:
            by_execution[validation.execution_id].append(validation)
    again = [vs for vs in by_execution.values() if len(vs) > 1]
    if not again:
        return
    print(f"validated more than once: {len(again)}")
    for validations in again[:20]:
        first, second = validations[0].validated_at.timestamp(), validations[1].validated_at.timestamp()
        before = [(n, s) for n, s in enumerate(stops, 1) if s.at <= second]
        after = f"{second - before[-1][1].at:.1f} s after stop {before[-1][0]} ({before[-1][1].signal})" \
            if before else "before any stop"
        print(f"  {validations[0].execution_id}: {' then '.join(v.status.value for v in validations)}, "
              f"{second - first:.1f} s apart, the second {after}")
    for validations in again[:3]:
        print_history(observed, validations[0].execution_id, stops)


def print_history(observed: Observed, execution_id: str, stops: list[Stop]) -> None:
    """An execution's oracle requests, verdicts, table entries and validations, in time."""
    origin = stops[0].at if stops else 0.0
    events = observed.history.get(execution_id, []) + [
        (v.validated_at.timestamp(), f"validation {v.status.value}") for v in observed.validations
        if v.execution_id == execution_id]
    print(f"  {execution_id}, seconds after the first stop:")
    for at, what in sorted(events):
        print(f"    {at - origin:8.2f} {what}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.failover", description=_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--rate", type=int, default=200, help="requests a second")
    parser.add_argument("--every", type=float, default=30.0, help="seconds between two stops")
    parser.add_argument("--signal", choices=["alternate", "SIGTERM", "SIGKILL"], default="alternate",
                        help="how workers are stopped: SIGKILL and SIGTERM in turn (default), or always one")
    parser.add_argument("--config", type=Path, help="settings file (else the LOOPAI_* variables)")
    parser.add_argument("--embedded", action="store_true", help="start the embedded broker (Tansu) for the run")
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="loopai-failover-"))
    prefix = f"failover-{os.getpid()}-{int(time.time())}."
    with contextlib.ExitStack() as stack:
        overrides: dict[str, object] = {"topic_prefix": prefix, "app_id": prefix.rstrip("."), "web_port": 0,
                                        "data_dir": log_dir / "data"}
        name = "as set"
        if args.embedded:
            broker = stack.enter_context(EmbeddedBroker(log_file=log_dir / "broker.log"))
            overrides["bootstrap_servers"], name = broker.bootstrap_servers, "embedded Tansu"
        settings = Settings.load(args.config, **overrides)
        print(f"logs in {log_dir}; broker {settings.bootstrap_servers} ({name}), session "
              f"{settings.session_timeout_s:g} s, heartbeat {settings.heartbeat_interval_s:g} s", flush=True)
        signals = [signal.SIGKILL, signal.SIGTERM] if args.signal == "alternate" else [signal.Signals[args.signal]]
        stops, observed = asyncio.run(failover(settings, args.minutes, args.rate, args.every, signals, log_dir))
        report(stops, observed, f"{settings.bootstrap_servers} ({name})", args.minutes, args.rate,
               f"{settings.app_id}-executors")


if __name__ == "__main__":
    main()
