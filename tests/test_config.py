from __future__ import annotations

import os
import re
import socket
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
    env = {"STUDIO_RUNNER_MAX_ATTEMPTS": "6", "STUDIO_RUNNER_GRACE_PERIOD": "8s"}
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
        ({}, {"STUDIO_RUNNER_CACHE_SIZE": "lots"}, "STUDIO_RUNNER_CACHE_SIZE"),
        ({}, {"STUDIO_RUNNER_POLL_INTERVAL": "soon"}, "STUDIO_RUNNER_POLL_INTERVAL"),
        ({}, {"QUEUE_MATCH": "(["}, "environment variable QUEUE_MATCH"),  # a Go name, not a generic one
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
        if option.go_env:
            assert f"env: {option.env}, or {option.go_env} " in text
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
    text = " ".join(result.stdout.split())  # argparse wraps lines anywhere
    assert "--cache-dir" in text and "[env STUDIO_RUNNER_CACHE_DIR or CACHE_DIR;" in text
    assert "[env STUDIO_RUNNER_POLL_INTERVAL; default: 0.2s; at least 0.05s]" in text
    assert "[env STUDIO_RUNNER_HOSTNAME;" in text
    assert "--once" in text


def test_cli_reports_config_errors_with_exit_2(capsys):
    assert main(["run", "--max-attempts", "x"]) == 2
    assert "--max-attempts" in capsys.readouterr().err


PYTHON_INTERNALS = ("invalid literal", "base 10", "could not convert", "Traceback", "object has no attribute")


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ('max-attempts = "x"', "expected a whole number such as 0, 1 or 8"),
        ("max-attempts = 1.5", "expected a whole number such as 0, 1 or 8"),
        ("max-attempts = 0", "expected a whole number, 1 or more"),
        ("max-cores = -2", "expected a whole number, 0 or more"),
        ('cache-size = "lots"', "expected a number with an optional unit"),
        ('grace-period = "soon"', "invalid duration"),
        ("debug = 3", "expected true or false"),
        ('log-format = "xml"', "expected text or json"),
        ('prom-address = "nope"', "expected HOST:PORT"),
        ('queue-match = "(["', "not a valid regular expression"),
    ],
)
def test_a_bad_file_value_names_the_file_and_key_and_says_what_is_expected(tmp_path, toml, needle):
    path = tmp_path / "runner.toml"
    path.write_text(toml + "\n")
    key = toml.split(" ", 1)[0]
    with pytest.raises(ConfigError) as caught:
        config.resolve({}, environ={}, config_file=path)
    message = str(caught.value)
    assert f"{path}: key {key!r}: invalid value" in message
    assert needle in message
    assert not any(internal in message for internal in PYTHON_INTERNALS), message


@pytest.mark.parametrize("option", config.OPTIONS, ids=lambda o: o.name)
@pytest.mark.parametrize("raw", ["x", "-1", "1.5", "[", "99999999999999999999999"])
def test_no_parse_error_leaks_python_internals(option, raw):
    """Whatever the option, a bad value is reported in words, with the flag that carried it."""
    try:
        config.resolve({option.attr: raw}, environ={})
    except ConfigError as exc:
        assert f"--{option.name}" in str(exc)
        assert not any(internal in str(exc) for internal in PYTHON_INTERNALS), str(exc)


def test_the_cli_names_the_file_of_a_bad_value(tmp_path):
    path = tmp_path / "runner.toml"
    path.write_text('max-attempts = "x"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("STUDIO_RUNNER_")}
    done = subprocess.run([sys.executable, str(ROOT / "runner.py"), "run", "--once", "--config", str(path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr == ("studio-runner: invalid configuration:\n"
                           f"  {path}: key 'max-attempts': invalid value 'x': "
                           "expected a whole number such as 0, 1 or 8\n")


def test_an_environment_value_names_the_variable():
    with pytest.raises(ConfigError, match="environment variable STUDIO_RUNNER_MAX_RUNNING: invalid value "
                       "'many': expected a whole number"):
        config.resolve({}, environ={"STUDIO_RUNNER_MAX_RUNNING": "many"})


# -------------------------------------------------------------------- environment variables (issue item 12)

GO_NAMES = {"SQS_CERTS", "SQS_TIMEOUT", "SLACK_HOOK", "SLACK_ROOM",
            "CLEAR_TEXT_MESSAGES", "ENCRYPT_DIR", "REQUEST_SIGNATURES_DIR", "RESPONSE_SIGNATURES_DIR",
            "PROM_ADDRESS", "QUEUE_ROOT", "QUEUE_MATCH", "QUEUE_MISMATCH", "AMQP_URL", "AMQP_MGT_URL",
            "WORKING_DIR", "DEBUG", "CACHE_DIR", "CACHE_SIZE", "ALLOW_ENV_SECRETS", "S3_CA", "S3_CERT",
            "S3_KEY", "SCHEMA_LOGS", "MAX_CORES", "MAX_MEM", "MAX_DISK", "CPU_ONLY"}
"""The options of spec/options.md §2 that we have, by the Go runner's variable name."""


def test_go_resource_variables_set_the_caps():
    settings = config.resolve({}, environ={"MAX_CORES": "1", "MAX_MEM": "2gb", "MAX_DISK": "10GiB",
                                           "CPU_ONLY": "true"})
    assert (settings.max_cores, settings.max_mem, settings.max_disk) == (1, 2 * 10**9, 10 * 2**30)
    assert settings.cpu_only is True and settings.max_running == 0  # resources decide how many at once
    prefixed = config.resolve({}, environ={"MAX_CORES": "1", "STUDIO_RUNNER_MAX_CORES": "2"})
    assert prefixed.max_cores == 2


def test_every_option_has_a_prefixed_variable_and_only_go_options_a_bare_one():
    assert {o.go_env for o in config.OPTIONS if o.go_env} == GO_NAMES
    for option in config.OPTIONS:
        assert option.env == "STUDIO_RUNNER_" + option.name.upper().replace("-", "_")
        if option.go_env:
            assert option.go_env == option.name.upper().replace("-", "_")
    generic = {o.go_env for o in config.OPTIONS if o.generic}
    assert generic == {"DEBUG", "WORKING_DIR", "CACHE_DIR", "CACHE_SIZE", "S3_KEY"}


@pytest.mark.parametrize("option", [o for o in config.OPTIONS if not o.go_env], ids=lambda o: o.name)
def test_bare_names_of_non_go_options_are_not_read(option):
    """LOG_LEVEL=trace, POLL_INTERVAL=0, HOSTNAME=..., MAX_ATTEMPTS=x set for other tools change nothing."""
    bare = option.name.upper().replace("-", "_")
    settings = config.resolve({}, environ={bare: "not-a-value/../x"})
    assert settings.sources[option.name] == "default"


def test_generic_shell_variables_do_not_stop_the_runner():
    environ = {"LOG_LEVEL": "trace", "DEBUG": "verbose", "HOSTNAME": "evil/../../x", "POLL_INTERVAL": "0",
               "CACHE_SIZE": "lots", "WORKING_DIR": ""}
    settings = config.resolve({}, environ=environ)
    assert settings.log_level == "INFO" and settings.debug is False and settings.poll_interval == 0.2
    assert settings.hostname == config.sanitise_hostname(socket.gethostname())
    assert settings.cache_size == 10 * 1024**3 and settings.working_dir != Path("")
    assert all(settings.sources[name] == "default" for name in ("debug", "cache-size", "working-dir"))
    ignored = "\n".join(settings.warnings)
    assert "ignored DEBUG='verbose' from the environment" in ignored and "STUDIO_RUNNER_DEBUG" in ignored
    assert "ignored CACHE_SIZE='lots'" in ignored and "ignored WORKING_DIR=''" in ignored


def test_a_generic_go_variable_in_effect_is_announced():
    settings = config.resolve({}, environ={"DEBUG": "1"})
    assert settings.debug is True and settings.sources["debug"] == "environment"
    assert settings.warnings == ["DEBUG=1 from the environment keeps experiment directories; "
                                 "set STUDIO_RUNNER_DEBUG to be explicit"]
    assert "debug = True (environment DEBUG)" in settings.describe()
    assert config.resolve({}, environ={"DEBUG": "0"}).warnings == []  # no effect, nothing to say
    explicit = config.resolve({}, environ={"STUDIO_RUNNER_DEBUG": "1"})
    assert explicit.debug is True and explicit.warnings == []


def test_the_prefixed_name_wins_over_the_go_name():
    settings = config.resolve({}, environ={"DEBUG": "1", "STUDIO_RUNNER_DEBUG": "false",
                                           "QUEUE_MATCH": "^rmq_a$", "STUDIO_RUNNER_QUEUE_MATCH": "^rmq_b$"})
    assert settings.debug is False and settings.queue_match == "^rmq_b$" and settings.warnings == []
    with pytest.raises(ConfigError, match="STUDIO_RUNNER_DEBUG"):  # the prefixed name is never lenient
        config.resolve({}, environ={"STUDIO_RUNNER_DEBUG": "verbose"})


def test_go_deployments_still_configure_the_runner_by_bare_names(tmp_path):
    environ = {"AMQP_URL": "amqp://u:p@broker:5672/", "QUEUE_MATCH": "^rmq_team$",
               "QUEUE_ROOT": str(tmp_path), "CACHE_DIR": str(tmp_path / "c"), "CACHE_SIZE": "2GiB",
               "ALLOW_ENV_SECRETS": "true", "SCHEMA_LOGS": "false"}
    settings = config.resolve({}, environ=environ)
    assert settings.amqp_url == "amqp://u:p@broker:5672/" and settings.queue_match == "^rmq_team$"
    assert settings.queue_root == tmp_path and settings.explicitly_set("queue-root")
    assert settings.cache_dir == tmp_path / "c" and settings.cache_size == 2 * 1024**3
    assert settings.allow_env_secrets is True and settings.schema_logs is False
    assert any(w.startswith("CACHE_DIR=") for w in settings.warnings)  # generic: announced


def test_a_stray_s3_key_without_a_certificate_is_ignored():
    """S3_KEY is a common name for an AWS access key; it must not stop a runner that uses no client cert."""
    settings = config.resolve({}, environ={"S3_KEY": "AKIAEXAMPLE"})
    assert settings.s3_key is None and settings.sources["s3-key"] == "default"
    assert any("ignored S3_KEY" in w for w in settings.warnings)
    paired = config.resolve({}, environ={"S3_KEY": "/k.pem", "S3_CERT": "/c.pem"})
    assert paired.s3_key == Path("/k.pem") and paired.s3_cert == Path("/c.pem")
    with pytest.raises(ConfigError, match="--s3-cert and --s3-key"):
        config.resolve({}, environ={"STUDIO_RUNNER_S3_KEY": "/k.pem"})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("evil/../../x", "evil_.._.._x"),
        ("..", "_."),
        (".hidden", "_hidden"),
        ("gpu-box_1.example.com", "gpu-box_1.example.com"),
        ("caf\u00e9 box", "caf__box"),
        ("a" * 300, "a" * config.HOSTNAME_MAX),
    ],
)
def test_hostnames_are_safe_in_paths(raw, expected, tmp_path):
    settings = config.resolve({}, environ={"STUDIO_RUNNER_HOSTNAME": raw})
    assert settings.hostname == expected
    assert (settings.warnings != []) == (raw != expected)
    root = tmp_path / f"studio-runner-{settings.hostname}-123-abcdef"
    assert root.resolve().parent == tmp_path.resolve() and len(root.name) < 255


def test_an_empty_hostname_is_an_error():
    with pytest.raises(ConfigError, match="--hostname"):
        config.resolve({"hostname": " "}, environ={})


@pytest.mark.parametrize(
    ("name", "floor"),
    [("poll-interval", 0.05), ("rescan-interval", 1.0), ("abort-check-interval", 0.5),
     ("min-checkpoint-interval", 1.0), ("default-checkpoint-interval", 1.0)],
)
def test_intervals_have_a_floor(name, floor, tmp_path):
    """0 made the poller burn a core; every source is checked, and the error names the option and floor."""
    attr = name.replace("-", "_")
    assert config.resolve({attr: f"{floor}s"}, environ={}).__getattribute__(attr) == floor
    too_small = f"{floor / 2}s"
    toml = tmp_path / "runner.toml"
    toml.write_text(f'{name} = "{too_small}"\n')
    env_name = "STUDIO_RUNNER_" + attr.upper()
    for flags, environ, config_file in (({attr: too_small}, {}, None), ({}, {env_name: "0"}, None),
                                        ({}, {}, toml)):
        with pytest.raises(ConfigError, match=f"--{name} must be at least {floor:g}s"):
            config.resolve(flags, environ=environ, config_file=config_file)


def test_the_cli_starts_despite_generic_variables_and_stays_in_its_working_dir(tmp_path):
    """`runner.py run --once` with LOG_LEVEL=trace DEBUG=verbose HOSTNAME=evil/../../x: starts, exits 0, and
    creates nothing outside --working-dir (the hostname is part of a directory name)."""
    base = tmp_path / "base"
    queue_root, work, home = base / "queue", base / "deep" / "work", base / "home"
    for folder in (queue_root, work, home):
        folder.mkdir(parents=True)
    before = sorted(base.rglob("*"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("STUDIO_RUNNER_")}
    env.update(LOG_LEVEL="trace", DEBUG="verbose", HOSTNAME="evil/../../x", HOME=str(home),
               XDG_CACHE_HOME=str(home / ".cache"), PYTHONPATH=str(ROOT),
               STUDIO_RUNNER_QUEUE_ROOT=str(queue_root), STUDIO_RUNNER_WORKING_DIR=str(work),
               STUDIO_RUNNER_ENV_CACHE_DIR=str(work / "envs"))
    result = subprocess.run([sys.executable, str(ROOT / "runner.py"), "run", "--once"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    uv_cache = home / ".cache" / "uv"  # uv's own cache (--uv-cache-dir's default), touched by the warm-up
    created = [p for p in sorted(base.rglob("*")) if p not in before and not p.is_relative_to(uv_cache)]
    assert all(p.is_relative_to(work) for p in created if p not in (home / ".cache",)), created
    assert [p.name for p in work.iterdir()] == ["envs"]  # DEBUG=verbose ignored: the root went on exit

    # the same hostname given on purpose is sanitised: the kept (--debug) root sits right in the working dir
    env.update(STUDIO_RUNNER_HOSTNAME="evil/../../x", STUDIO_RUNNER_DEBUG="true")
    result = subprocess.run([sys.executable, str(ROOT / "runner.py"), "run", "--once"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    created = [p for p in sorted(base.rglob("*")) if p not in before and not p.is_relative_to(uv_cache)]
    assert all(p.is_relative_to(work) for p in created if p not in (home / ".cache",)), created
    [root] = [p for p in work.iterdir() if p.name != "envs"]
    assert root.name.startswith("studio-runner-evil_.._.._x-") and root.parent == work


# ---------------------------------------------- the test run's own configuration: tests/conftest.py (item 16)

_INNER_CONFTEST = """
import importlib.util
spec = importlib.util.spec_from_file_location("suite_conftest", {path!r})
suite = importlib.util.module_from_spec(spec)
spec.loader.exec_module(suite)
hooks = {{k: v for k, v in vars(suite).items() if k.startswith("pytest_") and k != "pytest_plugins"}}
globals().update(hooks)
"""

_INNER_TESTS = """
import pytest

@pytest.fixture
def broker():
    pytest.skip("no broker answers")

def test_passes():
    pass

@pytest.mark.expected_skip("only some machines have a second file system")
def test_declared():
    pytest.skip("declared skip")

@pytest.mark.xfail(reason="known bug")
def test_known_bug():
    assert False

def test_undeclared(broker):
    pass

@pytest.mark.skipif(True, reason="tool missing")
def test_skipif_undeclared():
    pass
"""


def test_undeclared_skips_fail_the_run_and_are_listed(tmp_path):
    """The suite's conftest hooks, on a throw-away suite: only skips marked expected_skip may pass."""
    (tmp_path / "conftest.py").write_text(_INNER_CONFTEST.format(path=str(ROOT / "tests" / "conftest.py")))
    (tmp_path / "test_inner.py").write_text(_INNER_TESTS)

    def inner(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)

    result = inner()
    assert result.returncode == 1, result.stdout
    summary = result.stdout[result.stdout.index("unexpected skips"):]
    assert "2 skipped without @pytest.mark.expected_skip" in summary
    assert "test_inner.py::test_undeclared: no broker answers" in summary
    assert "test_inner.py::test_skipif_undeclared: tool missing" in summary
    assert "test_declared" not in summary and "test_known_bug" not in summary

    result = inner("-k", "not undeclared")  # declared skips and xfails alone keep the run green
    assert result.returncode == 0, result.stdout
    assert "unexpected skips" not in result.stdout
