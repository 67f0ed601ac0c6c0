"""Profiles for `python -m bench --profile`: in, a `loopai worker` until SIGTERM, or a sandbox process's batch loop
(child.answer_batches, without the boundary: seccomp's cost is not in it) on CALLS spam_v1 calls; out, a cProfile
listing sorted by own time. `python -m bench.profiled worker OUT` or `sandbox OUT CALLS`."""

from __future__ import annotations

import atexit
import cProfile
import io
import mmap
import os
import pstats
import signal
import sys

import orjson

_LINES = 70
_SANDBOX_BATCH = 500  # calls per batch line: the pool's chunk size


def _dump(profile: cProfile.Profile, out: str) -> None:
    profile.disable()
    text = io.StringIO()
    stats = pstats.Stats(profile, stream=text)
    stats.sort_stats("tottime").print_stats(_LINES)
    stats.sort_stats("cumulative").print_stats(_LINES)
    with open(out, "w") as written:
        written.write(text.getvalue())


def profile_worker(out: str) -> None:
    from app.cli import cli

    profile = cProfile.Profile()
    atexit.register(_dump, profile, out)  # the worker leaves through SystemExit on SIGTERM: atexit runs
    profile.enable()
    cli.main(["worker"], prog_name="loopai")


def profile_sandbox(out: str, calls: int) -> None:
    from app.domain.programs import ProgramCompiler
    from app.sandbox import child
    from devtools.samples import SPAM_TEXTS, program_source

    lines = []
    for number, start in enumerate(range(0, calls, _SANDBOX_BATCH), 1):
        run = [[1.0, {"text": SPAM_TEXTS[i % len(SPAM_TEXTS)]}]
               for i in range(start, min(calls, start + _SANDBOX_BATCH))]
        load = [["spam-v1", program_source("spam_v1")]] if number == 1 else []
        lines.append(orjson.dumps({"batch": number, "load": load, "key": "spam-v1", "run": run}) + b"\n")
    progress = mmap.mmap(-1, child.PROGRESS.size)
    out_fd = os.open(os.devnull, os.O_WRONLY)
    compiler = ProgramCompiler()
    signal.signal(signal.SIGALRM, child._on_alarm)
    profile = cProfile.Profile()
    profile.enable()
    child.answer_batches(io.BytesIO(b"".join(lines)), out_fd, progress, compiler, 10**6, 1 << 20)
    _dump(profile, out)
    os.close(out_fd)


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        profile_worker(sys.argv[2])
    else:
        profile_sandbox(sys.argv[2], int(sys.argv[3]))
