"""`python -m bench`: one broker, the contenders interleaved round by round, then the latency phase; prints the
report and writes the --json figures, or --profile listings. `--help` says how each figure is measured."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import say
from bench.contenders import CONTENDERS, HERE, Bench, Run, latency_floor, pipeline, quix_available
from bench.report import report
from bench.workload import provision
from devtools.broker import EmbeddedBroker

_HELP = """\
One broker and the same job (decode -> spam_v1 -> encode -> produce) for five contenders, interleaved round by
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
"""  # what --help prints


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
    parser = argparse.ArgumentParser(prog="python -m bench", description=_HELP,
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
