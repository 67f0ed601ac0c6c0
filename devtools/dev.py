"""`loopai dev`: the whole loop on an embedded broker: starts the broker, a worker, the reference oracle and a
generator, publishes the sample tasks and programs, sends traffic, prints results, validations and canary decisions
live, and then a summary (each version's accuracy, the improvements, any anomaly signals)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from app.contract.records import (
    AnomalySignal,
    CanaryDecision,
    ExecutionResult,
    Validation,
    ValidationStatus,
    utc_now,
)
from app.contract.topics import topics_for
from app.control.plane import ControlPlane
from app.domain.daily_windows import DailyWindows
from app.kafka.clients import apply_topics
from app.kafka.loop_client import RequestSender, daily_stats, follow, request_from
from app.settings import Settings
from devtools import dev_improvement
from devtools.broker import EMBEDDED_TIMINGS, EmbeddedBroker, free_port, listening
from devtools.oracle import canonical, serve_oracle
from devtools.samples import INTENT_LABELS, SAMPLE_PROGRAMS, SPAM_TRUTH, program_source, sample_tasks, sample_traffic

# A quarter of the way in, spam-filter's v3 goes on canary to half of its requests and is promoted (or rolled back) on
# its validated accuracy. Meanwhile review-sentiment's v1 falls short of its target, the worker asks for a better
# version, a generator in this process (asking a fake endpoint: devtools/dev_improvement.py) publishes v2 as a canary,
# and the canary agent decides it.
# Ctrl-C (SIGINT, also SIGTERM and SIGHUP) stops it in order: the traffic, then the wait for results still due (a
# second Ctrl-C skips it), the worker, the broker, and then the summary. The broker and the worker run in sessions of
# their own, so a terminal's Ctrl-C reaches only this process and none of them dies first.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class DevFailure(Exception):
    """The demo cannot go on; the message says why."""


class _Stop:
    """Set by the first stop signal; a second one also skips the wait for outstanding results."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.hurry = asyncio.Event()

    def __call__(self) -> None:
        if self.requested.is_set():
            self.hurry.set()
        self.requested.set()

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake up as soon as a stop is requested."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.requested.wait(), seconds)


@dataclass
class _Tally:
    sent: set[str] = field(default_factory=set)
    seen: dict[str, str] = field(default_factory=dict)  # request_id -> "task vN status"
    # (task, version) -> [validated, matched, expired]
    accuracy: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    decisions: list[str] = field(default_factory=list)
    signals: list[str] = field(default_factory=list)
    improvements: list[str] = field(default_factory=list)
    daily: list[str] = field(default_factory=list)

    @property
    def missing(self) -> set[str]:
        return self.sent - self.seen.keys()

    def report(self) -> None:
        _say(f"summary: {len(self.sent)} sent, {len(self.sent & self.seen.keys())} results, "
             f"{len(self.missing)} missing")
        if self.missing:
            _say(f"  missing request ids: {sorted(self.missing)[:5]}")
        for label, count in sorted(Counter(self.seen.values()).items()):
            _say(f"  {label:<32} {count}")
        _say("validations (accuracy per version):")
        for (task, version), (validated, matched, expired) in sorted(self.accuracy.items()):
            rate = f"{matched / validated:.0%}" if validated else "-"
            label = f"{task} v{version}"
            _say(f"  {label:<32} {validated} validated, {matched} matched ({rate}), {expired} expired")
        for decision in self.decisions:
            _say(f"  canary decision: {decision}")
        for improvement in self.improvements:
            _say(f"  improvement: {improvement}")
        _say("today's analytics (running windows, all versions):")
        for line in self.daily or ["  none yet"]:
            _say(line)
        _say(f"anomaly signals: {len(self.signals) or 'none'}")
        for line in self.signals:
            _say(f"  {line}")


def _say(text: str) -> None:
    print(text, flush=True)


async def run_dev(duration_s: float, rate: float, log_dir: Path | None = None) -> int:
    """Run the demo; returns an exit code (0 when every request got its result and the worker stopped
    cleanly). The logs go to log_dir if given; else to a temporary directory, removed unless the run failed."""
    keep_logs = log_dir is not None
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="loopai-dev-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    stop = _Stop()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop)
    code = 1
    try:
        code = await _run(duration_s, rate, log_dir, stop)
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
        if code == 0 and not keep_logs:
            shutil.rmtree(log_dir, ignore_errors=True)
        else:
            _say(f"logs in {log_dir}")
    return code


async def _run(duration_s: float, rate: float, log_dir: Path, stop: _Stop) -> int:
    tally = _Tally()
    failure: str | None = None
    worker_code = 0
    with EmbeddedBroker(log_file=log_dir / "broker.log") as broker:
        # A demo's few seconds of traffic: canaries and improvement requests decide on 20 validations.
        settings = Settings.load(None, bootstrap_servers=broker.bootstrap_servers, canary_min_validations=20,
                                 improvement_min_validations=20, generator_canary_percent=50.0,
                                 data_dir=log_dir / "worker-data", **EMBEDDED_TIMINGS)
        _say(f"embedded broker on {broker.bootstrap_servers}")
        if settings.web_port and listening(settings.web_port):  # a dev loop should not fail over a busy port
            settings = settings.model_copy(update={"web_port": free_port()})
        if settings.web_port:
            _say(f"dashboard on http://{settings.web_host}:{settings.web_port}/")
        await _set_up(settings)
        if not stop.requested.is_set():
            worker = _start_worker(settings, log_dir / "worker.log")
            try:
                if await _wait_until_serving(worker, log_dir / "worker.log", stop):
                    _say(f"worker serving (pid {worker.pid}); sending {rate:g} requests/s; Ctrl-C stops")
                    await _traffic_and_results(settings, duration_s, rate, worker, stop, tally)
            except DevFailure as exc:
                failure = str(exc)
            finally:
                worker_code = await _stop_worker(worker)
                _say(f"worker stopped (exit {worker_code}); stopping the broker")
    _say("broker stopped")
    tally.report()
    if failure:
        _say(failure)
    # -SIGTERM: our SIGTERM came before the worker set up its own handling (a stop during its start-up).
    clean_stop = worker_code in (0, -signal.SIGTERM)
    return 0 if failure is None and clean_stop and not tally.missing else 1


async def _set_up(settings: Settings) -> None:
    for outcome in await apply_topics(settings, topics_for(settings.topic_prefix)):
        _say(f"  topic {outcome.name}: {'created' if outcome.created else 'exists'}")
    async with ControlPlane(settings) as control:
        for task in sample_tasks():
            await control.put_task(task)
        for task_id, program, activate in SAMPLE_PROGRAMS:
            artifact = await control.publish(task_id, program_source(program), activate=activate)
            _say(f"  published {task_id} v{artifact.version}{' (active)' if activate else ''}")
        await control.put_task(dev_improvement.sentiment_task())
        await control.publish(dev_improvement.TASK, dev_improvement.sentiment_source(), activate=True)
        _say(f"  published {dev_improvement.TASK} v1 (active; the generator is to do better)")


def _start_worker(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker"],
            env={**os.environ, **settings.to_env(), "LOOPAI_WORKER_ID": "dev-worker-1"},
            stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # stopped by us, after the traffic and before the broker
        )


async def _stop_worker(worker: subprocess.Popen[bytes], timeout_s: float = 15) -> int:
    """SIGTERM (the worker drains and commits), then SIGKILL if it takes longer than timeout_s."""
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while worker.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if worker.poll() is None:
            worker.kill()
    return worker.wait()


async def _wait_until_serving(worker: subprocess.Popen[bytes], log: Path, stop: _Stop, timeout_s: float = 60) -> bool:
    """True once the worker serves; False if a stop was requested first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop.requested.is_set():
        if worker.poll() is not None:
            raise DevFailure(f"the worker exited (code {worker.returncode}) before serving")
        if b" serving" in log.read_bytes():
            return True
        await stop.sleep(0.1)
    if stop.requested.is_set():
        return False
    raise DevFailure(f"the worker did not start within {timeout_s:.0f}s")


async def _traffic_and_results(
    settings: Settings, duration_s: float, rate: float, worker: subprocess.Popen[bytes], stop: _Stop,
    tally: _Tally,
) -> None:
    oracle_stop = asyncio.Event()
    background = [
        asyncio.ensure_future(_print_results(settings, tally.seen)),
        asyncio.ensure_future(_print_validations(settings, tally)),
        asyncio.ensure_future(_print_decisions(settings, tally)),
        asyncio.ensure_future(_collect_signals(settings, tally)),
        asyncio.ensure_future(dev_improvement.print_improvements(settings, tally.improvements, _say)),
    ]
    labels = {canonical({"text": text}): label for text, label in INTENT_LABELS.items()}
    oracle = asyncio.ensure_future(serve_oracle(settings, labels, "devtools-labels", oracle_stop))
    traffic = sample_traffic()
    reviews = dev_improvement.sentiment_traffic()
    started = time.monotonic()
    canary = False
    try:
        async with RequestSender(settings) as sender, dev_improvement.Generator(settings):
            while not stop.requested.is_set() and (duration_s <= 0 or time.monotonic() - started < duration_s):
                if not canary and time.monotonic() - started >= (duration_s / 4 if duration_s > 0 else 5):
                    async with ControlPlane(settings) as control:
                        await control.start_canary("spam-filter", 3, 50.0)
                    _say(">>> spam-filter: canary v3 on 50% of requests (promoted or rolled back on its accuracy)")
                    canary = True
                if worker.poll() is not None:
                    raise DevFailure(f"the worker exited (code {worker.returncode})")
                task_id, value = next(traffic)
                truth = SPAM_TRUTH.get(value["text"]) if task_id == "spam-filter" else None
                request = request_from(task_id, value, expected_output=truth)
                review, label = next(reviews)
                labelled = request_from(dev_improvement.TASK, review, expected_output=label)
                tally.sent.update((request.request_id, labelled.request_id))
                await sender.send([request, labelled])
                await stop.sleep(1 / rate)
        if stop.requested.is_set():
            _say(f"stopping: traffic stopped; waiting for {len(tally.missing)} result(s) still due "
                 "(Ctrl-C again to skip)")
        await _until(lambda: not tally.missing or stop.hurry.is_set() or worker.poll() is not None, 30)
        if not stop.hurry.is_set():
            await _daily_summary(settings, tally)
    finally:
        oracle_stop.set()
        with contextlib.suppress(Exception):
            await oracle
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)


async def _daily_summary(settings: Settings, tally: _Tally, timeout_s: float = 15) -> None:
    """Today's running window of each task once the aggregator holds every result seen (partials arrive a
    moment after their results), or what it holds at the deadline."""
    results_per_task = Counter(label.split(" ")[0] for label in tally.seen.values())
    deadline = time.monotonic() + timeout_s
    while True:
        today = DailyWindows(settings.analytics_time_zone).today(utc_now()).date
        days = {key.task_id: day for key, day in (await daily_stats(settings)).items()
                if key.version is None and key.date == today}
        if (all(days[t].executions >= n for t, n in results_per_task.items() if t in days) \
                and days.keys() >= results_per_task.keys()) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    tally.daily = [
        f"  {task:<16} {day.executions} executions, success {day.success_rate:.0%}, sampled {day.sampled}, "
        f"validated {day.validated} (accuracy {'-' if day.accuracy is None else f'{day.accuracy:.0%}'}), "
        f"p50 {day.p50_latency_ms or 0:.2f} ms, p99 {day.p99_latency_ms or 0:.2f} ms"
        for task, day in sorted(days.items())]


async def _until(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def _print_results(settings: Settings, seen: dict[str, str]) -> None:
    spec = topics_for(settings.topic_prefix).execution_results
    async for _, _, result in follow(settings, spec):
        if not isinstance(result, ExecutionResult):
            continue
        label = f"{result.task_id} v{result.version}"
        seen[result.request_id] = f"{label} {result.status.value}"
        _say(f"{label:<22} {result.status.value:<8} {result.latency_ms:6.3f} ms  {result.output}")


async def _print_validations(settings: Settings, tally: _Tally) -> None:
    spec = topics_for(settings.topic_prefix).validations
    async for _, _, record in follow(settings, spec):
        if not isinstance(record, Validation):
            continue
        counts = tally.accuracy.setdefault((record.task_id, record.version), [0, 0, 0])
        if record.status is ValidationStatus.EXPIRED:
            counts[2] += 1
            verdict = "expired"
        else:
            counts[0] += 1
            counts[1] += bool(record.match)
            verdict = "match" if record.match else f"MISMATCH ({record.details})"
        _say(f"  validated {record.task_id} v{record.version} by {record.oracle_kind.value}: {verdict}")


async def _print_decisions(settings: Settings, tally: _Tally) -> None:
    spec = topics_for(settings.topic_prefix).canary_decisions
    async for _, _, record in follow(settings, spec):
        if isinstance(record, CanaryDecision):
            line = (f"{record.task_id} v{record.candidate_version} {record.action.value} by {record.decided_by}: "
                    f"{record.reason}")
            tally.decisions.append(line)
            _say(f">>> canary {line}")


def signal_line(signal: AnomalySignal) -> str:
    """One anomaly signal on one line, as the summary prints it."""
    return (f"{signal.task_id} v{signal.version} {signal.metric.value} by {signal.method.value} "
            f"(score {signal.score:.1f}) at {signal.detected_at:%H:%M} UTC: {signal.hint}")


async def _collect_signals(settings: Settings, tally: _Tally) -> None:
    spec = topics_for(settings.topic_prefix).anomaly_signals
    async for _, _, record in follow(settings, spec):
        if isinstance(record, AnomalySignal):
            tally.signals.append(signal_line(record))
