"""`loopai schemas register`: every record topic's subject gets its schema, again without a new version, and an
unreachable registry is one line of error."""

from app.contract.topics import topics_for
from devtools.broker import free_port
from devtools.registry import LocalRegistry
from tests.cli.conftest import loopai


def test_schemas_register_is_idempotent_and_names_each_subject() -> None:
    with LocalRegistry() as registry:
        env = {"LOOPAI_WIRE_FORMAT": "avro", "LOOPAI_REGISTRY_URL": registry.url, "LOOPAI_TOPIC_PREFIX": "s."}
        first = loopai(env, "schemas", "register")
        assert first.returncode == 0, first.stderr
        carried = [spec for spec in topics_for("s.").all() if spec.record_name]
        lines = first.stdout.splitlines()
        assert sorted(line.split(":")[0] for line in lines) == sorted(f"{spec.name}-value" for spec in carried)
        again = loopai(env, "schemas", "register")
        assert again.returncode == 0 and again.stdout == first.stdout  # the same ids: no new versions


def test_an_unreachable_registry_is_one_line() -> None:
    env = {"LOOPAI_WIRE_FORMAT": "avro", "LOOPAI_REGISTRY_URL": f"http://127.0.0.1:{free_port()}"}
    done = loopai(env, "schemas", "register")
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "cannot reach the registry" in done.stderr and "Traceback" not in done.stderr
