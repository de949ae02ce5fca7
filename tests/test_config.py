from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from studio_runner import config
from studio_runner.cli import main
from studio_runner.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_parse():
    settings = config.resolve({}, environ={})
    assert settings.max_attempts == 3
    assert settings.env_cache_size == 20 * 1024**3
    assert settings.poll_interval == pytest.approx(0.2)
    assert settings.queue_match == r"^(rmq|sqs|local)_.*$"
    assert settings.debug is False
    assert settings.sources["max-attempts"] == "default"


def test_precedence_flag_over_env_over_file_over_default(tmp_path):
    toml = tmp_path / "runner.toml"
    toml.write_text('max-attempts = 5\ngrace_period = "7s"\ncache-size = "2GiB"\ndebug = true\n')
    env = {"MAX_ATTEMPTS": "6", "GRACE_PERIOD": "8s"}
    settings = config.resolve({"max_attempts": "7", "config": str(toml)}, environ=env)
    assert settings.max_attempts == 7 and settings.sources["max-attempts"] == "flag"
    assert settings.grace_period == 8.0 and settings.sources["grace-period"] == "environment"
    assert settings.cache_size == 2 * 1024**3 and settings.sources["cache-size"] == "file"
    assert settings.debug is True
    assert settings.sources["log-level"] == "default"


def test_unknown_toml_key_is_named(tmp_path):
    toml = tmp_path / "runner.toml"
    toml.write_text("cache-sise = 3\n")
    with pytest.raises(ConfigError, match="cache-sise"):
        config.resolve({}, environ={}, config_file=toml)


@pytest.mark.parametrize(
    ("flags", "environ", "needle"),
    [
        ({"max_attempts": "many"}, {}, "--max-attempts"),
        ({}, {"CACHE_SIZE": "lots"}, "CACHE_SIZE"),
        ({}, {"POLL_INTERVAL": "soon"}, "POLL_INTERVAL"),
        ({"queue_match": "(["}, {}, "--queue-match"),
        ({"debug": "maybe"}, {}, "--debug"),
        ({"max_attempts": "0"}, {}, "--max-attempts"),
    ],
)
def test_bad_values_name_the_key(flags, environ, needle):
    with pytest.raises(ConfigError, match=needle.replace("-", r"\-")):
        config.resolve(flags, environ=environ)


def test_secret_values_are_not_echoed():
    settings = config.resolve({"amqp_url": "amqp://user:hunter22@broker:5672/"}, environ={})
    described = "\n".join(settings.describe())
    assert "hunter22" not in described
    assert "amqp-url = ****" in described


def test_bad_toml_is_a_config_error(tmp_path):
    toml = tmp_path / "broken.toml"
    toml.write_text("max-attempts = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.resolve({}, environ={}, config_file=toml)


def test_example_file_documents_every_option_and_loads():
    text = config.example_toml()
    for option in config.OPTIONS:
        assert f"# {option.name} = " in text, option.name
        assert f"env: {option.env}" in text
    committed = (ROOT / "config.example.toml").read_text()
    assert committed.strip() == text.strip(), "stale config.example.toml: run `studio-runner config-example`"


def test_example_values_uncommented_are_valid(tmp_path):
    """Every documented default, uncommented, must parse (machine-specific placeholders aside)."""
    lines = []
    for line in config.example_toml().splitlines():
        match = re.match(r"^# ([a-z0-9-]+) = ", line)
        if match:
            assert match.group(1) in {o.name for o in config.OPTIONS}
            lines.append(line[2:])
    toml = tmp_path / "all.toml"
    toml.write_text("\n".join(lines) + "\n")
    settings = config.resolve({}, environ={}, config_file=toml)
    assert settings.sources["max-attempts"] == "file"


def test_cli_help_lists_options_and_env_names():
    result = subprocess.run([sys.executable, str(ROOT / "runner.py"), "run", "--help"],
                            capture_output=True, text=True, check=True)
    assert "--cache-dir" in result.stdout and "CACHE_DIR" in result.stdout
    assert "--once" in result.stdout


def test_cli_reports_config_errors_with_exit_2(capsys):
    assert main(["run", "--max-attempts", "x"]) == 2
    assert "--max-attempts" in capsys.readouterr().err
