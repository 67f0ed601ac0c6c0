"""`loopai worker` (a worker's whole life is tests/test_worker.py): before faust starts, a registry it cannot use
is one line of error and exit 1."""

from devtools.broker import free_port
from tests.cli.conftest import loopai


def test_a_worker_that_cannot_register_its_schemas_says_so_in_one_line(env: dict[str, str]) -> None:
    registry = f"http://127.0.0.1:{free_port()}"
    done = loopai({**env, "LOOPAI_WIRE_FORMAT": "avro", "LOOPAI_REGISTRY_URL": registry}, "worker", timeout=60)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "cannot reach the registry" in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
