"""A sandbox process: reads batches of calls on stdin, runs them one by one, writes one result line each.

Protocol (JSON lines). In: {"load": [[key, source], ...], "run": [[key, timeout_s, input], ...],
"stream": bool}. Out: first {"hello": {...protections}}, then lists of answers, one per call, each
[status, output, error, latency_ms, memory_mb]. Answers are flushed every few milliseconds (per call when
"stream" is set, which the pool uses to find which call of a batch hung or crashed the process).
It locks itself down before reading the first batch; see lock_down().
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

from app.domain.programs import ProgramCompiler, ProgramRejected
from app.sandbox.seccomp import install_filter

_CLONE_NEWNET = 0x40000000
_FLUSH_S = 0.002


class _CallTimeout(BaseException):
    """Raised inside a program when its time is up (BaseException so `except Exception` cannot eat it)."""


_in_call = False


def _on_alarm(signum: int, frame: Any) -> None:
    if _in_call:
        raise _CallTimeout()


def lock_down(memory_mb: int, scratch: str) -> dict[str, Any]:
    """Apply every OS limit available here; returns which are active."""
    os.chdir(scratch)
    limits = {
        resource.RLIMIT_AS: memory_mb << 20,
        resource.RLIMIT_FSIZE: 0,
        resource.RLIMIT_CORE: 0,
        resource.RLIMIT_NPROC: 0,
        resource.RLIMIT_NOFILE: 32,
    }
    for limit, value in limits.items():
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(limit, (value, value))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file write fails instead of killing us
    netns = False
    with contextlib.suppress(OSError, AttributeError):
        netns = ctypes.CDLL(None, use_errno=True).unshare(_CLONE_NEWNET) == 0
    seccomp = install_filter()
    return {"pid": os.getpid(), "seccomp": seccomp, "netns": netns, "memory_mb": memory_mb}


def _run_one(
    program: Callable[[dict[str, Any]], Any] | str, timeout_s: float, value: Any, max_output: int
) -> list[Any]:
    global _in_call
    if isinstance(program, str):
        return ["error", None, program, 0.0, None]
    status, output, error = "ok", None, None
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    started = time.perf_counter()
    _in_call = True
    try:
        output = program(value)
    except _CallTimeout:
        status, error = "timeout", f"program exceeded its timeout of {timeout_s * 1000:.0f} ms"
    except MemoryError:
        status, error = "error", "program ran out of memory"
    except RecursionError:
        status, error = "error", "program exceeded the maximum recursion depth"
    except BaseException as exc:  # the program's own failure, whatever it raised
        status, error = "error", f"{type(exc).__name__}: {exc}"[:2000]
    finally:
        _in_call = False
        signal.setitimer(signal.ITIMER_REAL, 0)
    latency_ms = (time.perf_counter() - started) * 1000
    memory_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if status == "ok":
        try:
            encoded = orjson.dumps(output)
        except (TypeError, orjson.JSONEncodeError) as exc:
            return ["error", None, f"output is not JSON-serialisable: {exc}", latency_ms, memory_mb]
        except MemoryError:
            return ["error", None, "output too large to serialise", latency_ms, memory_mb]
        if len(encoded) > max_output:
            return ["error", None, f"output is {len(encoded)} bytes; the limit is {max_output}",
                    latency_ms, memory_mb]
        return [status, orjson.Fragment(encoded), None, latency_ms, memory_mb]
    return [status, None, error, latency_ms, memory_mb]


def _load(compiler: ProgramCompiler, source: str, timeout_s: float) -> Callable[[dict[str, Any]], Any] | str:
    """Compile a program (its module-level code runs here, so under the same timer as a call)."""
    global _in_call
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    _in_call = True
    try:
        return compiler.compile(source)
    except ProgramRejected as exc:
        return f"program rejected: {exc}"
    except _CallTimeout:
        return f"program did not finish loading within {timeout_s * 1000:.0f} ms"
    except BaseException as exc:  # loading ran program code: anything may come out
        return f"program failed while loading: {type(exc).__name__}: {exc}"[:2000]
    finally:
        _in_call = False
        signal.setitimer(signal.ITIMER_REAL, 0)


def serve(memory_mb: int, max_output: int, scratch: str) -> None:
    """The process's whole life: lock down, then answer batches until stdin closes."""
    reader = os.fdopen(os.dup(0), "rb")
    out_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # nothing a program does can reach the protocol pipes through these
        os.dup2(devnull, fd)
    compiler = ProgramCompiler()
    signal.signal(signal.SIGALRM, _on_alarm)
    hello = lock_down(memory_mb, scratch)
    os.write(out_fd, orjson.dumps({"hello": hello}) + b"\n")
    programs: dict[str, Callable[[dict[str, Any]], Any] | str] = {}
    for line in reader:
        batch = orjson.loads(line)
        load_timeout = min((call[1] for call in batch["run"]), default=1.0)
        for key, source in batch.get("load", ()):
            programs[key] = _load(compiler, source, load_timeout)
        stream = bool(batch.get("stream"))
        answers: list[list[Any]] = []
        flushed = time.perf_counter()
        for key, timeout_s, value in batch["run"]:
            program = programs.get(key, f"program {key} was not loaded")
            answers.append(_run_one(program, timeout_s, value, max_output))
            now = time.perf_counter()
            if stream or now - flushed > _FLUSH_S:
                os.write(out_fd, orjson.dumps(answers) + b"\n")
                answers, flushed = [], now
        if answers:
            os.write(out_fd, orjson.dumps(answers) + b"\n")


def main() -> None:
    memory_mb, max_output, scratch = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    serve(memory_mb, max_output, scratch)


if __name__ == "__main__":
    main()
