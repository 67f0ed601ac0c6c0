"""`loopai dev` as a user runs it: the whole loop, and Ctrl-C stopping it in order."""

import os
import re
import signal
import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from app.contract.records import AnomalyMethod, AnomalyMetric, AnomalySignal
from devtools.dev import signal_line
from tests.conftest import wait_for_text


def test_dev_runs_the_whole_loop_and_leaves_nothing_behind(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "app.cli", "dev", "--duration", "12", "--rate", "30"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "spam-filter: canary v3 on 50%" in done.stdout
    assert " 0 missing" in done.stdout
    assert "spam-filter v1 ok" in done.stdout and "spam-filter v3 ok" in done.stdout
    # Validations with accuracy per version, the external oracle's answers and expiries, a canary decision.
    assert re.search(r"spam-filter v3 +\d+ validated, \d+ matched \(100%\)", done.stdout), done.stdout[-3000:]
    assert "by external: match" in done.stdout and "by label: MISMATCH" in done.stdout
    assert "canary decision: spam-filter v3 promoted by auto" in done.stdout, done.stdout[-3000:]
    # Today's analytics hold every result of the run, exactly.
    summary = done.stdout[done.stdout.rindex("summary:"):]
    spam_results = sum(int(n) for n in re.findall(r"^  spam-filter v\d+ \w+ +(\d+)$", summary, re.MULTILINE))
    daily = re.search(r"^  spam-filter +(\d+) executions, success (\d+)%", summary, re.MULTILINE)
    assert daily and int(daily.group(1)) == spam_results > 0, summary
    # A minute of traffic teaches no baseline: the one signal it can raise is a target's, spam_v1's accuracy (about
    # 67 %) below spam-filter's accuracy_target (80 %), once enough of its validations are in to be sure.
    signals = done.stdout[done.stdout.rindex("anomaly signals:"):].splitlines()
    assert signals[0] == "anomaly signals: none" or all(
        line.startswith(("  spam-filter v1 accuracy by target", "  review-sentiment v1 accuracy by target"))
        for line in signals[1:]), done.stdout[-3000:]
    # One improvement: review-sentiment's v1 falls short, the generator publishes v2 as a canary, it is promoted. (The
    # request's own line was missing once on a machine at load 19, its outcome there: cause not established; the
    # outcome names the request it answers.)
    assert "improvement: review-sentiment v1 -> v2: published" in summary, summary
    assert "canary decision: review-sentiment v2 promoted by auto" in summary, summary
    # Neither its temporary directory (logs, the worker's faust data) nor anything in the working directory.
    assert not list(tmp_path.iterdir()) and "logs in" not in done.stdout


def test_ctrl_c_stops_traffic_then_worker_then_broker_and_prints_the_summary(tmp_path: Path) -> None:
    output = tmp_path / "dev.out"
    with open(output, "wb") as out:
        # A session of its own, so that killpg() below is what a terminal's Ctrl-C does: SIGINT to the
        # whole foreground process group.
        dev = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "dev", "--duration", "0", "--rate", "50", "--log-dir", str(tmp_path)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_for_text(output, "worker serving", dev, timeout_s=90)
        # Results are flowing: 20 of them, with validations printed between them or not.
        wait_for_text(output, re.compile(r"(?s)(\bok .*?){20}"), dev, timeout_s=30)
        os.killpg(dev.pid, signal.SIGINT)
        assert dev.wait(timeout=60) == 0, output.read_text()[-3000:]
    finally:
        if dev.poll() is None:
            os.killpg(dev.pid, signal.SIGKILL)
    text = output.read_text()
    lines = [next(i for i, line in enumerate(text.splitlines()) if line.startswith(start))
             for start in ("stopping: traffic stopped", "worker stopped (exit 0)", "broker stopped", "summary:")]
    assert lines == sorted(lines), text[-2000:]
    assert re.search(r"summary: (\d+) sent, \1 results, 0 missing", text), text[-2000:]
    worker_log = (tmp_path / "worker.log").read_text()
    assert "stopped after" in worker_log
    assert [line for line in worker_log.splitlines() if "ERROR" in line or "Traceback" in line] == []
    worker_pid = int(re.search(r"worker serving \(pid (\d+)\)", text).group(1))
    assert not _alive(worker_pid)
    address = re.search(r"embedded broker on 127\.0\.0\.1:(\d+)", text).group(1)
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", int(address))) != 0  # the broker is gone too


def test_a_signal_is_one_line() -> None:
    signal = AnomalySignal(task_id="spam-filter", version=3, metric=AnomalyMetric.P99_LATENCY, value=12.5,
                           baseline=4.0, score=7.25, method=AnomalyMethod.ZSCORE,
                           hint="p99 latency jumped to 12.5 ms against 4.0 ms, its recent level",
                           detected_at=datetime(2026, 11, 22, 9, 31, tzinfo=UTC))
    assert signal_line(signal) == ("spam-filter v3 p99_latency by zscore (score 7.2) at 09:31 UTC: p99 latency "
                                   "jumped to 12.5 ms against 4.0 ms, its recent level")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
