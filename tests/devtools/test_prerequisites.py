"""devtools/prerequisites.py: `make test` stops at once, naming each missing system package and its install
command."""

import pytest

from devtools import prerequisites
from devtools.prerequisites import Requirement


def test_each_missing_package_is_named_with_the_command_that_installs_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    lacking = [Requirement("openjdk-17-jre-headless", "a Java 17 runtime (none on PATH)", "the export tests"),
               Requirement("chromium", "/usr/bin/chromium", "the dashboard's browser test")]
    monkeypatch.setattr(prerequisites, "missing", lambda fetch_ok=True: lacking)
    monkeypatch.setattr(prerequisites.os, "geteuid", lambda: 1000)
    assert prerequisites.main([]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "missing: a Java 17 runtime (none on PATH), for the export tests; install: sudo apt-get install -y "
        "--no-install-recommends openjdk-17-jre-headless",
        "missing: /usr/bin/chromium, for the dashboard's browser test; install: sudo apt-get install -y "
        "--no-install-recommends chromium",
        "make test stops here; all at once: sudo apt-get install -y --no-install-recommends "
        "openjdk-17-jre-headless chromium (or `make test PREREQUISITES=skip` to run anyway: the tests that need "
        "them then skip or fail)",
    ]


def test_nothing_missing_is_silent(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(prerequisites, "missing", lambda fetch_ok=True: [])
    assert prerequisites.main([]) == 0 and capsys.readouterr().err == ""


def test_the_java_version_is_read_from_java_dash_version(monkeypatch: pytest.MonkeyPatch) -> None:
    class Answer:
        stdout = ""
        stderr = ""

    for printed, major in [('openjdk version "17.0.15" 2025-04-15', 17), ('java version "1.8.0_401"', 8),
                           ('openjdk version "21" 2023-09-19', 21)]:
        Answer.stderr = printed
        monkeypatch.setattr(prerequisites.shutil, "which", lambda name: "/usr/bin/java")
        monkeypatch.setattr(prerequisites.subprocess, "run", lambda *a, **k: Answer)
        assert prerequisites._java_major() == major
    monkeypatch.setattr(prerequisites.shutil, "which", lambda name: None)
    assert prerequisites._java_major() is None
