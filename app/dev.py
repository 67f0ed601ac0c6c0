"""`loopai dev`: the whole loop on an embedded broker. Starts the broker, applies topics, publishes the sample
tasks and programs, starts a worker process, sends traffic, prints results live, switches spam-filter
from v1 to v2 halfway, and prints a summary."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from app.broker import EMBEDDED_TIMINGS, EmbeddedBroker
from app.client import RequestSender, follow, request_from
from app.control import ControlPlane
from app.kafka import apply_topics
from app.records import ExecutionResult
from app.samples import SAMPLE_PROGRAMS, program_source, sample_tasks, sample_traffic
from app.settings import Settings
from app.topics import topics_for


def _say(text: str) -> None:
    print(text, flush=True)


async def run_dev(duration_s: float, rate: float) -> int:
    """Run the demo; returns an exit code (0 when every request got its result)."""
    log_dir = Path(tempfile.mkdtemp(prefix="loopai-dev-"))
    with EmbeddedBroker(log_file=log_dir / "broker.log") as broker:
        settings = Settings.load(None, bootstrap_servers=broker.bootstrap_servers, **EMBEDDED_TIMINGS)
        _say(f"embedded broker on {broker.bootstrap_servers} (logs in {log_dir})")
        for outcome in await apply_topics(settings, topics_for(settings.topic_prefix)):
            _say(f"  topic {outcome.name}: {'created' if outcome.created else 'exists'}")
        async with ControlPlane(settings) as control:
            for task in sample_tasks():
                await control.put_task(task)
            for task_id, program, activate in SAMPLE_PROGRAMS:
                artifact = await control.publish(task_id, program_source(program), activate=activate)
                _say(f"  published {task_id} v{artifact.version}{' (active)' if activate else ''}")
        worker = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker"],
            env={**os.environ, **settings.to_env(), "LOOPAI_WORKER_ID": "dev-worker-1"},
            stdout=open(log_dir / "worker.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        try:
            await _wait_until_serving(worker, log_dir / "worker.log")
            _say(f"worker serving (pid {worker.pid}); sending {rate:g} requests/s; Ctrl-C stops")
            return await _traffic_and_results(settings, duration_s, rate, worker, log_dir)
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                worker.kill()
            _say(f"worker stopped (exit {worker.returncode}); broker stopping")


async def _wait_until_serving(worker: subprocess.Popen[bytes], log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise SystemExit(f"the worker exited (code {worker.returncode}); see {log}")
        if b" serving" in log.read_bytes():
            return
        await asyncio.sleep(0.1)
    raise SystemExit(f"the worker did not start within {timeout_s:.0f}s; see {log}")


async def _traffic_and_results(
    settings: Settings, duration_s: float, rate: float, worker: subprocess.Popen[bytes], log_dir: Path
) -> int:
    sent: set[str] = set()
    seen: dict[str, str] = {}  # request_id -> "task vN status"
    printer = asyncio.ensure_future(_print_results(settings, seen))
    traffic = sample_traffic()
    started = time.monotonic()
    switched = False
    sender = RequestSender(settings)
    await sender.__aenter__()
    try:
        while duration_s <= 0 or time.monotonic() - started < duration_s:
            if not switched and duration_s > 0 and time.monotonic() - started >= duration_s / 2:
                async with ControlPlane(settings) as control:
                    await control.activate("spam-filter", 2)
                _say(">>> spam-filter: version 2 activated (live, no restart)")
                switched = True
            if worker.poll() is not None:
                _say(f"the worker exited (code {worker.returncode}); see {log_dir / 'worker.log'}")
                return 1
            task_id, value = next(traffic)
            request = request_from(task_id, value)
            sent.add(request.request_id)
            await sender.send([request])
            await asyncio.sleep(1 / rate)
        deadline = time.monotonic() + 30
        while not sent <= seen.keys() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    finally:
        await sender.__aexit__(None, None, None)
        printer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await printer
    missing = len(sent - seen.keys())
    _say(f"summary: {len(sent)} sent, {len(sent & seen.keys())} results, {missing} missing")
    if missing:
        _say(f"  missing request ids: {sorted(sent - seen.keys())[:5]}")
    for label, count in sorted(Counter(seen.values()).items()):
        _say(f"  {label:<32} {count}")
    return 0 if missing == 0 else 1


async def _print_results(settings: Settings, seen: dict[str, str]) -> None:
    spec = topics_for(settings.topic_prefix).execution_results
    async for _, _, result in follow(settings, spec):
        if not isinstance(result, ExecutionResult):
            continue
        label = f"{result.task_id} v{result.version}"
        seen[result.request_id] = f"{label} {result.status.value}"
        _say(f"{label:<22} {result.status.value:<8} {result.latency_ms:6.3f} ms  {result.output}")
