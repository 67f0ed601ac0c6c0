import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.settings import ConfigError, Settings, substitute_env


def test_defaults_need_no_configuration() -> None:
    settings = Settings.load()
    assert settings.bootstrap_servers == "127.0.0.1:9092"
    assert settings.wire_format == "json"


def test_yaml_file_with_env_substitution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_HOST", "kafka.internal:9093")
    config = tmp_path / "loopai.yaml"
    config.write_text("bootstrap_servers: ${KAFKA_HOST}\nsandbox_processes: ${WORKERS:-3}\nwire_format: avro\n"
                      "registry_url: http://registry:8081\n")
    settings = Settings.load(config)
    assert settings.bootstrap_servers == "kafka.internal:9093"
    assert settings.sandbox_processes == 3  # string from substitution, converted
    assert settings.wire_format == "avro"


def test_the_avro_wire_format_needs_a_registry() -> None:
    with pytest.raises(ConfigError, match=r"wire_format avro .* needs registry_url"):
        Settings.load(wire_format="avro")


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "loopai.yaml"
    config.write_text("topic_prefix: from-file.\n")
    monkeypatch.setenv("LOOPAI_TOPIC_PREFIX", "from-env.")
    assert Settings.load(config).topic_prefix == "from-env."


def test_invalid_value_names_the_field(tmp_path: Path) -> None:
    config = tmp_path / "loopai.yaml"
    config.write_text("sandbox_processes: 0\n")
    with pytest.raises(ConfigError, match=r"invalid setting 'sandbox_processes': .*greater than or equal to 1"):
        Settings.load(config)


def test_unknown_field_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "loopai.yaml"
    config.write_text("bootstrap_server: x:1\n")
    with pytest.raises(ConfigError, match="invalid setting 'bootstrap_server'"):
        Settings.load(config)


def test_unset_variable_without_default_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"\$\{NOPE\}"):
        substitute_env("a: ${NOPE}", {})


def test_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    config = tmp_path / "loopai.yaml"
    config.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        Settings.load(config)


def test_secret_is_hidden_but_reaches_the_client_args() -> None:
    settings = Settings.load(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN",
                             sasl_username="u", sasl_password="s3cret")
    assert "s3cret" not in repr(settings)
    assert settings.kafka_client_args()["sasl_plain_password"] == "s3cret"


def test_to_env_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    original = Settings.load(topic_prefix="x.", sandbox_processes=3, session_timeout_s=4.0)
    for name, value in original.to_env().items():
        monkeypatch.setenv(name, value)
    assert Settings.load() == original


def test_group_defaults_suit_apache_kafka() -> None:
    settings = Settings.load()
    assert settings.session_timeout_s >= 6  # group.min.session.timeout.ms: Apache Kafka refuses less
    assert settings.heartbeat_interval_s * 3 <= settings.session_timeout_s


def test_a_heartbeat_too_slow_for_the_session_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"heartbeat_interval_s \(3\) must be at most a third of session_timeout_s"):
        Settings.load(session_timeout_s=6, heartbeat_interval_s=3)


def test_anomaly_settings_are_the_detectors_thresholds() -> None:
    settings = Settings.load(None, anomaly_zscore_raise=8.0, anomaly_rearm_minutes=5)
    thresholds = settings.anomaly_thresholds()
    assert (thresholds.zscore_raise, thresholds.rearm_minutes, thresholds.baseline_minutes) == (8.0, 5, 60)


def test_anomaly_thresholds_that_make_no_sense_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"anomaly_\* settings: a re-arm threshold above its raise threshold"):
        Settings.load(None, anomaly_ewma_raise=2.0, anomaly_ewma_rearm=3.0)


def test_task_suspend_settings_are_the_workers_timeout_budget() -> None:
    defaults = Settings.load(None, worker_id="w7").timeout_budget()
    assert (defaults.max_timeouts, defaults.window_s, defaults.cooldown_s) == (10, 60.0, 300.0)
    off = Settings.load(None, task_suspend_timeouts=0, task_suspend_window_s=5, task_suspend_cooldown_s=30)
    budget = off.timeout_budget()
    assert (budget.max_timeouts, budget.window_s, budget.cooldown_s) == (0, 5.0, 30.0)
    assert all(budget.charge("t") is None for _ in range(50))  # 0 turns suspension off
    with pytest.raises(ConfigError, match="invalid setting 'task_suspend_cooldown_s'"):
        Settings.load(None, task_suspend_cooldown_s=0)


def test_an_unknown_yaml_key_is_an_error_naming_the_closest_setting(tmp_path: Path) -> None:
    config = tmp_path / "loopai.yaml"
    config.write_text("sandbox_procesess: 4\n")
    with pytest.raises(ConfigError) as raised:
        Settings.load(config)
    assert str(raised.value) == (f"invalid setting 'sandbox_procesess' in config file {config}: not a setting; "
                                 "did you mean sandbox_processes?")
    config.write_text("colour: red\n")  # nothing close: where the settings are listed
    with pytest.raises(ConfigError, match=r"'colour' .*not a setting \(the settings: README, Configuration"):
        Settings.load(config)


def test_an_unknown_environment_variable_is_a_warning_naming_the_closest_setting(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("LOOPAI_SANDBOX_PROCESES", "4")
    monkeypatch.setenv("LOOPAI_EXPORT_FILE", "/tmp/x.jsonl")  # read by the Kafka Connect files, not a setting
    monkeypatch.setenv("LOOPAI_WEB_PORT", "0")
    with caplog.at_level(logging.WARNING, logger="app.settings"):
        settings = Settings.load()
    assert settings.sandbox_processes == 16 and settings.web_port == 0
    assert [r.getMessage() for r in caplog.records] == [
        "unknown environment variable LOOPAI_SANDBOX_PROCESES ignored: not a setting; did you mean "
        "LOOPAI_SANDBOX_PROCESSES (sandbox_processes)?"]


def test_the_cli_shows_both_on_stderr(tmp_path: Path) -> None:
    config = tmp_path / "loopai.yaml"
    config.write_text("bootstrap_server: x:1\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPAI_")}
    done = subprocess.run([sys.executable, "-m", "app.cli", "--config", str(config), "task", "list"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 1 and done.stderr == (f"Error: invalid setting 'bootstrap_server' in config file "
                                                    f"{config}: not a setting; did you mean bootstrap_servers?\n")
    done = subprocess.run([sys.executable, "-m", "app.cli", "--bootstrap-servers", "127.0.0.1:1", "task", "list"],
                          capture_output=True, text=True,
                          timeout=60, env={**env, "LOOPAI_BOOTSTRAP_SERVER": "x:1", "LOOPAI_CONNECT_TIMEOUT_S": "0.5"})
    assert done.stderr.splitlines()[0] == ("unknown environment variable LOOPAI_BOOTSTRAP_SERVER ignored: not a "
                                           "setting; did you mean LOOPAI_BOOTSTRAP_SERVERS (bootstrap_servers)?")
