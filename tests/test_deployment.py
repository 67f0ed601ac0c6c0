"""docker-compose.yml stays true to the code: it validates with the compose client, its settings exist and
validate, its commands are real, the workers are probed and scraped where they serve, the image is not root."""

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from click.testing import CliRunner

from app.cli import cli
from app.settings import Settings
from devtools.compose import ComposeUnavailable, compose_command

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


def _loopai_services() -> dict[str, dict[str, Any]]:
    """The services running the loopai image (the repository's Dockerfile): they read LOOPAI_* as Settings."""
    image = _compose()["x-loopai-image"]
    return {name: service for name, service in _compose()["services"].items() if service.get("image") == image}


def _defaults(value: Any) -> str:
    """A value with each ${VAR:-default} as compose resolves it when VAR is not set."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))


def _compose_config(path: Path) -> subprocess.CompletedProcess[str]:
    try:
        command = compose_command()
    except ComposeUnavailable as exc:
        pytest.skip(f"NO COMPOSE CLIENT: docker-compose.yml was not validated by compose ({exc})")
    return subprocess.run([*command, "-f", str(path), "config", "--format", "json"],
                          capture_output=True, text=True, timeout=60, cwd=path.parent)


def test_compose_accepts_the_file() -> None:
    answer = _compose_config(COMPOSE_FILE)
    assert answer.returncode == 0, answer.stderr
    services = json.loads(answer.stdout)["services"]
    assert set(services) == {"kafka", "topics", "worker", "export", "prometheus"}  # no registry for JSON
    assert services["worker"]["deploy"]["replicas"] == 2
    # Every published port is on the host's loopback unless the operator says otherwise.
    published = [(name, port) for name, service in services.items() for port in service.get("ports", [])]
    assert {name for name, _ in published} == {"kafka", "worker", "prometheus"}
    assert all(port["host_ip"] == "127.0.0.1" for _, port in published), published
    # One image, built once under one name, run by topics and the workers.
    built = {name: service["image"] for name, service in services.items()
             if Path(service.get("build", {}).get("context", "/")) == ROOT}
    assert built == {"topics": "loopai-stream:local"} and services["worker"]["image"] == "loopai-stream:local"
    assert "build" not in services["worker"]


def test_the_schema_registry_runs_only_with_the_avro_profile() -> None:
    try:
        command = compose_command()
    except ComposeUnavailable as exc:
        pytest.skip(f"NO COMPOSE CLIENT: {exc}")
    answer = subprocess.run([*command, "-f", str(COMPOSE_FILE), "--profile", "avro", "config", "--format", "json"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT,
                            env={"PATH": "/usr/bin:/bin", "LOOPAI_WIRE_FORMAT": "avro"})
    assert answer.returncode == 0, answer.stderr
    services = json.loads(answer.stdout)["services"]
    assert "schema-registry" in services and services["schema-registry"]["ports"][0]["host_ip"] == "127.0.0.1"
    assert services["worker"]["environment"]["LOOPAI_WIRE_FORMAT"] == "avro"
    Settings(**{key.removeprefix("LOOPAI_").lower(): value
                for key, value in services["worker"]["environment"].items()})  # avro with its registry_url
    for name in ("topics", "worker", "export"):  # they wait for it when it runs, and start without it otherwise
        assert services[name]["depends_on"]["schema-registry"] == {"condition": "service_healthy",
                                                                    "required": False}, name


def test_every_long_running_service_has_a_health_check() -> None:
    for name, service in _compose()["services"].items():
        if service.get("restart") != "no":  # topics runs once
            assert "healthcheck" in service, name
    export = _compose()["services"]["export"]
    # Its REST listener on every interface of its container: the health check and the network reach it.
    assert "echo listeners=http://0.0.0.0:$$LOOPAI_CONNECT_REST_PORT >> /tmp/worker.properties" in export["command"][-1]
    assert "http://localhost:$$LOOPAI_CONNECT_REST_PORT/connectors?expand=status" in export["healthcheck"]["test"][1]
    assert "apk add --no-cache curl" in (ROOT / "deploy" / "connect" / "Dockerfile").read_text()


def test_the_readme_paths_reach_the_container_where_commands_run() -> None:
    topics = _compose()["services"]["topics"]
    mounts = {target.removesuffix(":ro"): source for source, target in
              (volume.split(":", 1) for volume in (_defaults(v) for v in topics["volumes"]))}
    workdir = _dockerfile_instruction(ROOT / "Dockerfile", "WORKDIR")
    assert mounts == {f"{workdir}/examples": "./examples"}
    header = COMPOSE_FILE.read_text().split("services:", 1)[0]
    suggested = re.findall(r"docker compose run --rm topics .*?(examples/\S+)", header)
    assert suggested and all((ROOT / path).is_file() for path in suggested), suggested


def test_compose_refuses_a_broken_file(tmp_path: Path) -> None:
    """The check above can fail: the same file with a dependency condition compose does not know."""
    broken = COMPOSE_FILE.read_text().replace("service_completed_successfully", "service_finished", 1)
    (tmp_path / "docker-compose.yml").write_text(broken)
    for folder in ("connect", "deploy"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    answer = _compose_config(tmp_path / "docker-compose.yml")
    assert answer.returncode != 0
    assert "services.worker.depends_on.topics.condition" in answer.stderr


def test_every_loopai_variable_is_a_setting_with_a_valid_value() -> None:
    services = _loopai_services()
    assert set(services) == {"topics", "worker"}
    for name, service in services.items():
        env = service["environment"]
        fields = {key.removeprefix("LOOPAI_").lower(): _defaults(value) for key, value in env.items()}
        assert all(key.startswith("LOOPAI_") for key in env), name
        assert set(fields) <= set(Settings.model_fields), (name, set(fields) - set(Settings.model_fields))
        Settings(**fields)  # raises if a value does not validate


def test_service_commands_are_loopai_commands() -> None:
    runner = CliRunner()
    for name, service in _loopai_services().items():
        result = runner.invoke(cli, [*service["command"], "--help"])
        assert result.exit_code == 0, (name, result.output)


def test_the_workers_start_after_topics_apply_has_succeeded() -> None:
    services = _compose()["services"]
    assert services["topics"]["command"] == ["topics", "apply"]
    assert _dockerfile_instruction(ROOT / "Dockerfile", "ENTRYPOINT") == '["loopai"]'
    for name in ("worker", "export"):
        assert services[name]["depends_on"]["topics"] == {"condition": "service_completed_successfully"}, name


def test_the_workers_health_check_asks_their_http_port_for_health() -> None:
    worker = _compose()["services"]["worker"]
    port = int(worker["environment"]["LOOPAI_WEB_PORT"])
    assert worker["environment"]["LOOPAI_WEB_HOST"] == "0.0.0.0"  # reachable from Prometheus, not loopback only
    urls = re.findall(r"https?://[^'\" ]+", " ".join(worker["healthcheck"]["test"]))
    assert [(urlsplit(url).port, urlsplit(url).path) for url in urls] == [(port, "/health")]
    assert any(mapping.endswith(f":{port}") for mapping in worker["ports"])


def test_prometheus_scrapes_every_worker_on_its_metrics_port() -> None:
    services = _compose()["services"]
    mounts = dict(volume.split(":")[1::-1] for volume in services["prometheus"]["volumes"])
    config = yaml.safe_load((ROOT / mounts["/etc/prometheus/prometheus.yml"]).read_text())
    port = int(services["worker"]["environment"]["LOOPAI_WEB_PORT"])
    targets = {(name, sd["port"], job.get("metrics_path", "/metrics"))
               for job in config["scrape_configs"] for sd in job.get("dns_sd_configs", []) for name in sd["names"]}
    assert targets == {("worker", port, "/metrics")}


def test_the_images_run_as_a_user_that_is_not_root() -> None:
    # The sandbox maps its uid to the worker's own (docs/security.md); root would also ignore RLIMIT_NPROC.
    for dockerfile in (ROOT / "Dockerfile", ROOT / "deploy" / "connect" / "Dockerfile"):
        user = _dockerfile_instruction(dockerfile, "USER")
        assert user not in (None, "root", "0") and not user.startswith(("root:", "0:")), dockerfile


def test_containers_and_the_host_each_reach_kafka_through_an_advertised_listener() -> None:
    env = _compose()["services"]["kafka"]["environment"]
    advertised = dict(item.split("://") for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    bootstrap = _compose()["services"]["worker"]["environment"]["LOOPAI_BOOTSTRAP_SERVERS"]
    assert bootstrap in advertised.values()
    published = {_defaults(mapping).split(":")[1] for mapping in _compose()["services"]["kafka"]["ports"]}
    assert {address.split(":")[1] for address in advertised.values() if address.startswith("localhost:")} == published


def test_kafka_does_not_auto_create_topics() -> None:
    # Faust and the workers expect topics applied up front with their partitions and configs.
    assert _compose()["services"]["kafka"]["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def _dockerfile_instruction(path: Path, instruction: str) -> str | None:
    """The argument of the last `instruction` line of a Dockerfile (of its final stage), or None."""
    found = None
    for line in path.read_text().splitlines():
        if line.startswith("FROM "):
            found = None  # a new stage: what an earlier stage said does not reach the image
        if line.startswith(f"{instruction} "):
            found = line.removeprefix(f"{instruction} ").strip()
    return found
