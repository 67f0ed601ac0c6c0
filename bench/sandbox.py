"""The sandbox pool on its own, per isolation mode: in, spam_v1 calls one at a time and in batches; out, µs per call
round trip and per call in batches of 100 and 1,000, and a process's cold and forked start (medians of rounds)."""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import time

from app.sandbox.boundary import Boundary, Limits
from app.sandbox.calls import Call
from app.sandbox.pool import SandboxPool
from app.sandbox.process import SandboxProcess
from app.sandbox.zygote_host import Zygote
from devtools.samples import program_source

SPAM = program_source("spam_v1")


def calls(count: int, task: str = "spam") -> list[Call]:
    return [Call(task, f"{task}-v1", SPAM, 1.0, {"text": "FREE prize" if i % 2 else "hello"}) for i in range(count)]


def _cpu_s() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


async def many_tasks(boundary: Boundary, tasks: int, size: int = 8, rounds: int = 5) -> dict[str, float]:
    """The worker's side of small chunks: `tasks` tasks with a process each, every one sent a chunk of `size`
    calls at once, `rounds` times: this process's CPU per chunk (user and system), as the executor pays it when
    many tasks share a fetch."""
    pool = SandboxPool(boundary, tasks + 4, spares=1)
    await pool.start()
    try:
        names = [f"task-{t}" for t in range(tasks)]
        await asyncio.gather(*(pool.run(calls(2, name)) for name in names))  # bind and warm every process
        chunks = [calls(size, name) for name in names]
        (user, system), started = _cpu_s(), time.perf_counter()
        for _ in range(rounds):
            await asyncio.gather(*(pool.run(chunk) for chunk in chunks))
        (user_after, system_after), wall = _cpu_s(), time.perf_counter() - started
        count = tasks * rounds
        return {f"{tasks} tasks: worker µs/chunk of {size}": (user_after - user + system_after - system) / count * 1e6,
                f"{tasks} tasks: of it, system µs": (system_after - system) / count * 1e6,
                f"{tasks} tasks: wall µs/chunk": wall / count * 1e6}
    finally:
        await pool.stop()


async def one_round(boundary: Boundary, processes: int) -> dict[str, float]:
    started = time.perf_counter()
    process = SandboxProcess(boundary)
    await process.start()
    cold_ms = (time.perf_counter() - started) * 1000
    await process.stop()
    zygote = Zygote(boundary)
    await zygote.start()
    forked = []
    try:
        for _ in range(20):
            started = time.perf_counter()
            process = SandboxProcess(boundary, zygote)
            await process.start()
            forked.append((time.perf_counter() - started) * 1000)
            await process.stop()
    finally:
        await zygote.stop()
    pool = SandboxPool(boundary, processes, spares=1, chunk_size=500)
    await pool.start()
    try:
        await pool.run(calls(200))  # bind and warm the task's processes
        figures = {"cold start ms": cold_ms, "start from a zygote ms": statistics.median(forked)}
        single = calls(1)
        started = time.perf_counter()
        for _ in range(300):
            await pool.run(single)
        figures["single call µs"] = (time.perf_counter() - started) / 300 * 1e6
        for size in (100, 1000):
            batch = calls(size)
            started = time.perf_counter()
            for _ in range(20):
                await pool.run(batch)
            figures[f"per call, batches of {size} µs"] = (time.perf_counter() - started) / (20 * size) * 1e6
        return figures
    finally:
        await pool.stop()


async def bench(rounds: int, processes: int, tasks: int) -> None:
    modes = {"strict": Boundary(Limits()), "weak": Boundary(Limits(), isolation="weak")}
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    for _ in range(rounds):
        for mode, boundary in modes.items():
            results[mode].append({**await one_round(boundary, processes), **await many_tasks(boundary, tasks)})
    names = list(results["strict"][0])
    print(f"sandbox pool, {processes} processes, spam_v1, median of {rounds} rounds (min-max)")
    print(f"{'figure':<30}" + "".join(f"{mode:>24}" for mode in modes))
    for name in names:
        cells = []
        for mode in modes:
            values = [r[name] for r in results[mode]]
            cells.append(f"{statistics.median(values):10.1f} ({min(values):.1f}-{max(values):.1f})")
        print(f"{name:<30}" + "".join(f"{cell:>24}" for cell in cells))
    strict = statistics.median(r["per call, batches of 1000 µs"] for r in results["strict"])
    print(f"batched calls per second, strict: {1e6 / strict:,.0f}")


_HELP = """\
The sandbox on its own: calls per second through the pool, one call at a time and in batches, with spam_v1.

    python -m bench.sandbox [--rounds N] [--processes P] [--tasks T]

Prints, per isolation mode (strict: bubblewrap + rlimits + seccomp; weak: rlimits + seccomp only), the median
over rounds of: µs for a single call round trip, µs per call in batches of 100 and 1,000, the cold start of one
sandbox process (with a zygote of its own, started for it) and the start of one forked by a running zygote
(median of 20; bench/zygote.py has more), and, with --tasks tasks (1,000) each sent a chunk of 8 calls at once,
the worker's CPU per chunk (with its system share) and the wall time per chunk. Rounds are interleaved between
modes so that drift of the machine hits both alike.
"""  # what --help prints


def main() -> None:
    parser = argparse.ArgumentParser(description=_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=1000, help="tasks for the small-chunks figures")
    args = parser.parse_args()
    asyncio.run(bench(args.rounds, args.processes, args.tasks))


if __name__ == "__main__":
    main()
