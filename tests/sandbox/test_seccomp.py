"""The OS layer on its own: a process with the filter installed cannot fork, exec, open sockets,
signal others or write files, but can still read and compute."""

import json
import platform
import subprocess
import sys

import pytest

from app.sandbox.seccomp import build_filter

PROBE = r"""
import json, os, socket, subprocess
from app.sandbox.seccomp import install_filter
assert install_filter()
outcomes = {}
def attempt(name, fn):
    try:
        fn(); outcomes[name] = "allowed"
    except PermissionError:
        outcomes[name] = "denied"
attempt("fork", os.fork)
attempt("subprocess", lambda: subprocess.run(["true"]))
attempt("socket", socket.socket)
attempt("kill_parent", lambda: os.kill(os.getppid(), 0))
attempt("write_file", lambda: open(os.path.join(os.environ["SCRATCH"], "f"), "w"))
attempt("append_file", lambda: open(os.path.join(os.environ["SCRATCH"], "g"), "a"))
attempt("mkdir", lambda: os.mkdir(os.path.join(os.environ["SCRATCH"], "d")))
attempt("read_file", lambda: open("/etc/hostname").read())
attempt("compute", lambda: sum(range(1000)))
print(json.dumps(outcomes))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"),
                    reason="seccomp filter is built for Linux x86_64/aarch64")
def test_filter_denies_escapes_and_allows_computation(tmp_path) -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=30,
                          env={"SCRATCH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "fork": "denied", "subprocess": "denied", "socket": "denied", "kill_parent": "denied",
        "write_file": "denied", "append_file": "denied", "mkdir": "denied",
        "read_file": "allowed", "compute": "allowed",
    }
    assert list(tmp_path.iterdir()) == []


def test_filter_program_is_well_formed() -> None:
    for machine in ("x86_64", "aarch64"):
        program = build_filter(machine)
        assert len(program) % 8 == 0 and len(program) // 8 < 4096  # kernel limit BPF_MAXINSNS
