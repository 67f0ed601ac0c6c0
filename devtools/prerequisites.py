"""What the test suite needs beyond the Python packages, checked before `make test` starts: consumes this machine (PATH,
the dynamic linker's cache, /usr/share/java), produces one line per missing system package with the command that
installs it, and exit 1 (or, with --install, apt-get installs them)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from devtools.connect import CLASSPATH_DIR, DEFAULT_CACHE, JETTY_JARS, SYSTEM_JAVA_DIR

# The Connect jars and the compose client are fetched, not installed: devtools/connect.py and devtools/compose.py.


@dataclass(frozen=True)
class Requirement:
    package: str  # Debian's package name
    what: str
    needed_by: str


def _java_major() -> int | None:
    java = shutil.which("java")
    if java is None:
        return None
    answer = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    found = re.search(r'version "(\d+)(?:\.(\d+))?', answer.stderr + answer.stdout)
    if not found:
        return None
    major = int(found.group(1))
    return int(found.group(2) or 0) if major == 1 else major  # "1.8.0" is Java 8


def _has_library(soname: str) -> bool:
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    try:
        listed = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return False
    return soname in listed


def missing(fetch_ok: bool = True) -> list[Requirement]:
    """The system packages the tests need that this machine lacks. With fetch_ok, jetty's jars count as
    present where devtools/connect.py can take them from the .deb (apt-get download) or has already."""
    lacking = []
    if not _has_library("libseccomp.so.2"):
        lacking.append(Requirement("libseccomp2", "libseccomp", "the sandbox's seccomp filter (every worker test)"))
    major = _java_major()
    if major is None or major < 17:
        found = "none on PATH" if major is None else f"Java {major} on PATH"
        lacking.append(Requirement("openjdk-17-jre-headless", f"a Java 17 runtime ({found})",
                                   "the Kafka Connect export tests"))
    # devtools/connect.py takes the jetty jars from the package, else from its .deb (apt-get download).
    assembled = (DEFAULT_CACHE / CLASSPATH_DIR / ".complete").exists()
    fetchable = fetch_ok and (assembled or shutil.which("apt-get") is not None)
    if not (fetchable or all((SYSTEM_JAVA_DIR / jar).is_file() for jar in JETTY_JARS)):
        lacking.append(Requirement("libjetty9-java", "jetty 9.4's security and servlet jars",
                                   "Kafka Connect's REST server (the export tests)"))
    if not Path("/usr/bin/chromium").is_file():
        lacking.append(Requirement("chromium", "/usr/bin/chromium", "the dashboard's browser test"))
    return lacking


def install_command(packages: list[str]) -> list[str]:
    command = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    return command if os.geteuid() == 0 else ["sudo", *command]


def main(argv: list[str]) -> int:
    installing = "--install" in argv
    lacking = missing(fetch_ok=not installing)
    if not lacking:
        return 0
    packages = [r.package for r in lacking]
    if installing:  # CI: a fresh container, as root
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run([*install_command(packages), "-qq"], check=True)
        lacking = missing(fetch_ok=False)
        if not lacking:
            return 0
    for requirement in lacking:
        print(f"missing: {requirement.what}, for {requirement.needed_by}; install: "
              f"{' '.join(install_command([requirement.package]))}", file=sys.stderr)
    print(f"make test stops here; all at once: {' '.join(install_command(packages))} (or `make test "
          "PREREQUISITES=skip` to run anyway: the tests that need them then skip or fail)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
