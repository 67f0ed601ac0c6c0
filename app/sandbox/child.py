"""A sandbox process: forked by the zygote (app/sandbox/zygote.py) for one task, it reads batches of calls on its
channel, runs them one by one, and writes their answers on the same channel."""

from __future__ import annotations

import ctypes
import mmap
import os
import resource
import signal
import struct
import time
from collections.abc import Callable
from typing import Any

import orjson

from app.domain.programs import ProgramCompiler, ProgramRejected
from app.sandbox.seccomp import load_filter

# It holds two fds of its own (the channel, a stream socket, and its progress page, a memfd) and locks down before
# it reads anything. Protocol. In, JSON lines, each the calls of one program version:
# {"batch": n, "load": [[key, source], ...], "key": key, "run": [[timeout_s, input], ...]}.
# Out: first {"hello": {...protections}}, then frames of answers, one per call in order, flushed every few
# milliseconds: a JSON line [[status, output_length, error, latency_ms, memory_mb], ...] followed by the
# outputs' JSON bytes (output_length -1: no output).
# Before and after each call it writes (batch, call index, start time or 0) to the shared progress page, so the
# pool knows which call was running if it has to kill the process. It serves one program version only (the pool's rule)
# and exits after a batch in which a call timed out or ran out of memory, or when its CPU budget runs low.
# Each call is held to its timeout by SIGALRM from one interval timer kept armed across a batch's calls.

PROGRESS = struct.Struct("qqq")  # batch, call index, start (monotonic ns; 0 when no call is running)
_FLUSH_S = 0.002
_RETIRE_CPU_SHARE = 0.8
MAX_ERROR_CHARS = 2000  # an error text is cut to this; the pool refuses a longer one as no process of ours wrote it


class _CallTimeout(BaseException):
    """Raised inside a program when its time is up (BaseException so `except Exception` cannot eat it)."""


_in_call = False
_last_output_size = 0  # bytes of the last call's encoded output: answers are flushed before a line gets long
# The call timer is armed lazily: two setitimer calls per call cost more than a small program. The running
# call's deadline is kept here; the timer, once armed, stays armed across calls and fires at `_armed_at`
# (perf_counter seconds, inf when disarmed) or earlier. When it fires for a call that still has time left (an
# earlier call's deadline), it is re-armed for the rest; a call whose deadline is earlier than the armed one
# re-arms it at its start. So a call is never interrupted before its own deadline, nor later than it.
_deadline = 0.0
_armed_at = float("inf")
_timed_out = False  # the timer fired during the running call (even where the program swallowed it)
# Freed memory is kept for the next batch (boundary.MALLOC_ENVIRONMENT), but not by a process left idle: this long
# after its last batch, the timer fires once more and the heap's free pages go back to the system. The next batch
# faults them in again, a cost a second of idleness makes up for (docs/design.md, Sandbox, has the figures).
_IDLE_TRIM_S = 1.0
_idle = False
_malloc_trim = ctypes.CDLL(None).malloc_trim


def _arm(at: float, now: float) -> None:
    global _armed_at
    signal.setitimer(signal.ITIMER_REAL, max(at - now, 1e-6))
    _armed_at = at


def _disarm() -> None:
    global _armed_at
    signal.setitimer(signal.ITIMER_REAL, 0)
    _armed_at = float("inf")


def _on_alarm(signum: int, frame: Any) -> None:
    global _armed_at, _timed_out, _idle
    _armed_at = float("inf")
    if not _in_call:
        if _idle:  # waiting for a batch since _IDLE_TRIM_S
            _idle = False
            _malloc_trim(0)
        return  # or armed for a call that has ended: the next call arms it again if it must
    now = time.perf_counter()
    if now < _deadline:
        _arm(_deadline, now)
        return
    _timed_out = True
    raise _CallTimeout()


def lock_down(memory_mb: int, cpu_s: int, open_files: int, seccomp_filter: bytes) -> dict[str, Any]:
    """Set the rlimits, then load the seccomp filter (irreversible). Returns what is in force; raises if the
    filter cannot be loaded (the pool refuses such a process)."""
    limits = {
        resource.RLIMIT_AS: (memory_mb << 20, memory_mb << 20),
        resource.RLIMIT_CPU: (cpu_s, cpu_s + 1),  # past the soft limit SIGXCPU, past the hard one SIGKILL
        resource.RLIMIT_FSIZE: (0, 0),
        resource.RLIMIT_CORE: (0, 0),
        resource.RLIMIT_NPROC: (0, 0),
        resource.RLIMIT_NOFILE: (open_files, open_files),
        resource.RLIMIT_MEMLOCK: (0, 0),
        resource.RLIMIT_MSGQUEUE: (0, 0),
    }
    for limit, value in limits.items():
        resource.setrlimit(limit, value)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file write fails instead of killing us
    load_filter(seccomp_filter)
    return {"uid": os.getuid(), "pid": os.getpid(), "seccomp": True, "memory_mb": memory_mb, "cpu_s": cpu_s}


def _run_one(program: Callable[[dict[str, Any]], Any] | str, call: list[Any],
             max_output: int) -> tuple[list[Any], bool]:
    """One call's answer, and whether the process should retire after it. The call's input (and its output, once
    encoded) are freed while its timer still runs, so a finaliser the program hung on them is charged to it."""
    global _in_call, _last_output_size, _deadline, _timed_out
    _last_output_size = 0
    timeout_s, value = call
    call[1] = None
    if isinstance(program, str):
        return ["error", None, program[:MAX_ERROR_CHARS], 0.0, None], False
    status, output, error, retire, encoded = "ok", None, None, False, b""
    started = time.perf_counter()
    _deadline = started + timeout_s
    if _deadline < _armed_at:
        _arm(_deadline, started)
    _timed_out = False
    _in_call = True
    try:
        output = program(value)
        value = None
        try:
            encoded = orjson.dumps(output)
        except (TypeError, orjson.JSONEncodeError) as exc:
            status, error = "error", f"output is not JSON-serialisable: {exc}"[:MAX_ERROR_CHARS]
        except MemoryError:
            status, error, retire = "error", "output too large to serialise", True
        output = None
    except _CallTimeout:
        status, error, retire = "timeout", f"program exceeded its timeout of {timeout_s * 1000:.0f} ms", True
    except MemoryError:
        status, error, retire = "error", "program ran out of memory", True
    except RecursionError:
        status, error = "error", "program exceeded the maximum recursion depth"
    except BaseException as exc:  # the program's own failure, whatever it raised
        status, error = "error", f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
    finally:
        value = output = None  # what the program left on them runs now, still under the call's timer
        _in_call = False  # the timer stays armed: the next call of the batch re-uses it
    latency_ms = (time.perf_counter() - started) * 1000
    if _timed_out and status != "timeout":  # the timer fired where the program swallowed it (a finaliser)
        status, error, retire = "timeout", f"program exceeded its timeout of {timeout_s * 1000:.0f} ms", True
    if status != "ok":
        return [status, None, error, latency_ms, None], retire
    if len(encoded) > max_output:
        return ["error", None, f"output is {len(encoded)} bytes; the limit is {max_output}", latency_ms, None], False
    _last_output_size = len(encoded)
    return [status, encoded, None, latency_ms, None], False


def _load(compiler: ProgramCompiler, source: str, timeout_s: float) -> Callable[[dict[str, Any]], Any] | str:
    """Compile a program (its module-level code runs here, so under the same timer as a call)."""
    global _in_call, _deadline
    started = time.perf_counter()
    _deadline = started + timeout_s
    _arm(_deadline, started)
    _in_call = True
    try:
        return compiler.compile(source)
    except ProgramRejected as exc:
        return f"program rejected: {exc}"
    except _CallTimeout:
        return f"program did not finish loading within {timeout_s * 1000:.0f} ms"
    except BaseException as exc:  # loading ran program code: anything may come out
        return f"program failed while loading: {type(exc).__name__}: {exc}"
    finally:
        _in_call = False
        _disarm()


def _memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def serve(channel_fd: int, progress_fd: int, compiler: ProgramCompiler, memory_mb: int, cpu_s: int,
          max_output: int, open_files: int, seccomp_filter: bytes) -> None:
    """The process's whole life once forked and holding only its two fds: lock down, then answer batches until
    its channel closes or it retires. `compiler` was built by the zygote (every allowed module imported)."""
    reader = os.fdopen(channel_fd, "rb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    for fd in (0, 1, 2):  # nothing a program does can reach the protocol channel through these
        if fd != devnull:
            os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)
    progress = mmap.mmap(progress_fd, PROGRESS.size)
    os.close(progress_fd)
    signal.signal(signal.SIGALRM, _on_alarm)
    hello = lock_down(memory_mb, cpu_s, open_files, seccomp_filter)
    _write_all(channel_fd, orjson.dumps({"hello": hello}) + b"\n")
    answer_batches(reader, channel_fd, progress, compiler, cpu_s, max_output)


def answer_batches(reader: Any, out_fd: int, progress: mmap.mmap, compiler: ProgramCompiler, cpu_s: int,
                   max_output: int) -> None:
    """Answer batch lines from `reader` on `out_fd` until it ends or the process should retire (the locked-down
    part of serve(); bench/profiled.py profiles it on its own)."""
    global _idle
    programs: dict[str, Callable[[dict[str, Any]], Any] | str] = {}
    pack, perf, now_ns = PROGRESS.pack_into, time.perf_counter, time.monotonic_ns
    for line in reader:
        _idle = False
        batch = orjson.loads(line)
        del line  # the batch's inputs are not kept while idle
        number, key, calls = batch["batch"], batch["key"], batch["run"]
        for loaded, source in batch.get("load", ()):  # loading runs under the first call's timeout
            pack(progress, 0, number, 0, now_ns())
            programs[loaded] = _load(compiler, source, calls[0][0] if calls else 1.0)
        program = programs.get(key, f"program {key} was not loaded")
        answers: list[list[Any]] = []
        retire, pending, last = False, 0, len(calls) - 1
        flushed = perf()
        for index, call in enumerate(calls):
            pack(progress, 0, number, index, now_ns())
            answer, retire = _run_one(program, call, max_output)
            pack(progress, 0, number, index, 0)
            answers.append(answer)
            if retire:  # a timeout or out of memory: the rest of the batch runs again in a fresh process
                break
            pending += _last_output_size + len(answer[2] or "")
            if index < last and (perf() - flushed > _FLUSH_S or pending > max_output):
                _flush(out_fd, answers)
                answers, flushed, pending = [], perf(), 0
        batch = calls = call = None  # type: ignore[assignment]
        _flush(out_fd, answers)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        if retire or usage.ru_utime + usage.ru_stime > cpu_s * _RETIRE_CPU_SHARE:
            return  # the pool replaces a process that is gone while idle, at no call's cost
        answers = []  # not kept while idle
        _idle_from(perf())


def _idle_from(now: float) -> None:
    """Waiting for the next batch from now: one alarm, _IDLE_TRIM_S later, trims the heap unless a batch came."""
    global _idle
    _arm(now + _IDLE_TRIM_S, now)
    _idle = True


def _flush(out_fd: int, answers: list[list[Any]]) -> None:
    """One frame: a JSON line of answers whose output slot holds the output's length in bytes (-1: none),
    then the outputs' JSON, concatenated. The worker keeps outputs as bytes and never parses them."""
    if answers:
        memory_mb = _memory_mb()
        outputs = []
        for answer in answers:
            answer[4] = memory_mb
            output = answer[1]
            answer[1] = -1 if output is None else len(output)
            if output is not None:
                outputs.append(output)
        _write_all(out_fd, orjson.dumps(answers) + b"\n" + b"".join(outputs))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
