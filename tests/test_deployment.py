"""docker-compose.yml stays true to the code: its settings exist and validate, its commands are real."""

from pathlib import Path

import yaml
from click.testing import CliRunner

from app.cli import cli
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_every_loopai_variable_is_a_setting_with_a_valid_value() -> None:
    for name in ("topics", "worker"):
        env = _compose()["services"][name]["environment"]
        fields = {key.removeprefix("LOOPAI_").lower(): value for key, value in env.items()}
        assert all(key.startswith("LOOPAI_") for key in env), name
        assert set(fields) <= set(Settings.model_fields), name
        Settings(**fields)  # raises if a value does not validate


def test_service_commands_are_loopai_commands() -> None:
    runner = CliRunner()
    for name in ("topics", "worker"):
        command = _compose()["services"][name]["command"]
        result = runner.invoke(cli, [*command, "--help"])
        assert result.exit_code == 0, (name, result.output)


def test_kafka_does_not_auto_create_topics() -> None:
    # Faust and the workers expect topics applied up front with their partitions and configs.
    assert _compose()["services"]["kafka"]["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
