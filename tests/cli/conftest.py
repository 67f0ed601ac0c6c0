"""Fixtures of the `loopai` command tests: the command run as a user would (a subprocess) on the embedded
broker."""

import os
import subprocess
import sys

import pytest

from devtools.broker import EmbeddedBroker
from tests.conftest import make_settings


def loopai(settings_env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **settings_env})


@pytest.fixture
def env(broker: EmbeddedBroker) -> dict[str, str]:
    return make_settings(broker).to_env()
