"""Starting sandbox processes from a zygote: in, N processes forked one after another; out, the time to each one's
hello and first answer, the CPU a start costs, and the memory of the processes kept idle (USS, PSS, RSS)."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from app.sandbox.boundary import Boundary, Limits
from app.sandbox.calls import Call
from app.sandbox.child import _IDLE_TRIM_S
from app.sandbox.process import Memory, SandboxProcess, measure_memory
from app.sandbox.zygote_host import Zygote
from devtools.samples import program_source

SPAM = program_source("spam_v1")
_MB = 1 << 20


def cpu_ms(pid: int) -> float:
    """CPU time a host process has run (ns resolution: /proc/PID/schedstat)."""
    with open(f"/proc/{pid}/schedstat", encoding="ascii") as stats:
        return int(stats.read().split()[0]) / 1e6


def calls(count: int) -> list[Call]:
    return [Call("spam", "spam-v1", SPAM, 1.0, {"text": "FREE prize" if i % 2 else "hello"}) for i in range(count)]


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):7.2f}   p90 {statistics.quantiles(values, n=10)[-1]:7.2f}" \
           f"   min {min(values):7.2f}   max {max(values):7.2f}"


def memory_line(name: str, memories: list[Memory]) -> str:
    uss = [m.uss / _MB for m in memories]
    pss = [m.pss / _MB for m in memories]
    rss = [m.rss / _MB for m in memories]
    return (f"{name:<34} USS median {statistics.median(uss):5.2f} MB (max {max(uss):5.2f}, total {sum(uss):7.1f})"
            f"   PSS {statistics.median(pss):5.2f}   RSS {statistics.median(rss):5.2f}")


async def bench(children: int, isolation: str) -> None:
    boundary = Boundary(Limits(), isolation=isolation)
    print(f"sandbox processes from a zygote, {isolation} isolation, {children} processes, spam_v1")
    alone = []
    for _ in range(5):
        started = time.perf_counter()
        process = SandboxProcess(boundary)  # a zygote of its own: bubblewrap and an interpreter, then a fork
        await process.start()
        alone.append((time.perf_counter() - started) * 1000)
        await process.stop()
    zygote = Zygote(boundary)
    started = time.perf_counter()
    await zygote.start()
    zygote_ms = (time.perf_counter() - started) * 1000
    processes: list[SandboxProcess] = []
    to_hello, to_answer, cpu = [], [], []
    assert zygote.pid is not None
    try:
        for batch in range(children):
            zygote_cpu, worker_cpu = cpu_ms(zygote.pid), time.process_time()
            started = time.perf_counter()
            process = SandboxProcess(boundary, zygote)
            await process.start()
            hello = time.perf_counter()
            outcome = (await process.run(batch, calls(1)))[0]
            answered = time.perf_counter()
            assert outcome.status == "ok" and process.pid is not None, outcome
            cpu.append(cpu_ms(process.pid) + cpu_ms(zygote.pid) - zygote_cpu
                       + (time.process_time() - worker_cpu) * 1000)
            to_hello.append((hello - started) * 1000)
            to_answer.append((answered - started) * 1000)
            processes.append(process)
        print(f"{'zygote start ms':<34} {zygote_ms:7.1f}")
        print(f"{'own zygote + fork ms (5 starts)':<34} {spread(alone)}")
        print(f"{'fork to hello ms':<34} {spread(to_hello)}")
        print(f"{'fork to first answer ms':<34} {spread(to_answer)}")
        print(f"{'CPU ms of a start to first answer':<34} {spread(cpu)}")
        after_one = [m for m in (p.memory() for p in processes) if m is not None]
        for number, process in enumerate(processes):
            await process.run(children + number, calls(1000))
        after_batch = [m for m in (p.memory() for p in processes) if m is not None]
        await asyncio.sleep(_IDLE_TRIM_S + 0.5)
        trimmed = [m for m in (p.memory() for p in processes) if m is not None]
        print(memory_line(f"after 1 call ({len(after_one)})", after_one))
        print(memory_line(f"right after 1,000 more ({len(after_batch)})", after_batch))
        print(memory_line(f"then idle {_IDLE_TRIM_S + 0.5:.1f} s ({len(trimmed)})", trimmed))
        own = measure_memory(zygote.pid)
        assert own is not None
        print(f"{'zygote':<34} USS {own.uss / _MB:5.2f} MB   PSS {own.pss / _MB:5.2f}   RSS {own.rss / _MB:5.2f}")
        total = sum(m.uss for m in trimmed) + own.uss
        print(f"{children} idle processes and their zygote, their own memory: {total / _MB:.0f} MB "
              f"({total / max(1, len(trimmed)) / _MB:.2f} MB a process)")
    finally:
        await asyncio.gather(*(p.stop() for p in processes))
        await zygote.stop()


_HELP = """\
Starting sandbox processes from a zygote: how long a start takes and how much memory an idle one costs.

    python -m bench.zygote [--children N] [--isolation strict|weak]

Prints, in one run: the zygote's own start (bubblewrap, an interpreter, the imports of every allowed module: what
every sandbox process paid before the zygote) and the start of a process with a zygote of its own (that, plus
a fork); then, for N processes forked one after another from one zygote, the median and p90 of the time from
asking for a process to its hello (fork, lock-down) and to its first answer (plus loading spam_v1 and one
call), and the CPU time one start to first answer costs the worker, the zygote and the new process together
(wall times swell on a loaded machine; CPU time much less); then the memory of the N processes kept idle (its
own: USS, pages no other process maps; PSS; RSS) after one call, right after a batch of 1,000 more, and once
idle long enough to have trimmed their heaps (app/sandbox/child.py), and the zygote's.
"""  # what --help prints


def main() -> None:
    parser = argparse.ArgumentParser(description=_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--children", type=int, default=200)
    parser.add_argument("--isolation", choices=("strict", "weak"), default="strict")
    args = parser.parse_args()
    asyncio.run(bench(args.children, args.isolation))


if __name__ == "__main__":
    main()
