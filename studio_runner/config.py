"""Runner options: one table, three sources.

Every option is a command-line flag (``--cache-dir``), an environment variable (``CACHE_DIR``: upper case,
dashes to underscores, as the Go runner does) and a key in a TOML file given with ``--config`` (the flag's
name, dashes or underscores). Precedence: flag > environment > file > default. Unknown keys and bad values
are errors that name the key and where it came from. Values from every source go through the same parser,
so ``--max-attempts 3``, ``MAX_ATTEMPTS=3`` and ``max-attempts = 3`` mean the same.

The table is the single source for ``--help``, ``config.example.toml`` (``studio-runner config-example``
prints it) and the README's option list.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio_runner import units
from studio_runner.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


def _studioml_home() -> Path:
    return Path(os.environ.get("STUDIOML_HOME") or Path.home() / ".studioml")


def _default_cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "studio-runner"


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _int(text: str) -> int:
    value = int(text.strip())
    if value < 0:
        raise ValueError(f"expected a non-negative integer, got {text!r}")
    return value


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {text!r}: {exc}") from None
    return text


def _level(text: str) -> str:
    level = text.strip().upper()
    aliases = {"WARN": "WARNING", "DBG": "DEBUG", "CRIT": "CRITICAL"}
    level = aliases.get(level, level)
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"expected debug, info, warning or error, got {text!r}")
    return level


def _path(text: str) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(text)))


def _optional_path(text: str) -> Path | None:
    return _path(text) if text.strip() else None


def _path_list(text: str) -> list[Path]:
    return [_path(part) for part in text.split(os.pathsep) if part.strip()]


@dataclass(frozen=True)
class Option:
    name: str
    parse: Callable[[str], Any]
    default: Callable[[], str] | str
    help: str
    kind: str = "str"
    """How the value is written in TOML/--help: str, int, bool, size, duration, path."""
    secret: bool = False
    """Never print the value (broker URLs with passwords)."""
    doc_default: str | None = None
    """How a machine-dependent default is written in docs (``~/.studioml/queue``)."""

    @property
    def env(self) -> str:
        return self.name.upper().replace("-", "_").replace(".", "_")

    @property
    def attr(self) -> str:
        return self.name.replace("-", "_")

    def default_text(self) -> str:
        return self.default() if callable(self.default) else self.default


OPTIONS: tuple[Option, ...] = (
    # -- where work comes from
    Option("queue-root", _path, lambda: str(_studioml_home() / "queue"),
           "Root of the local directory queues (StudioML local mode: $STUDIOML_HOME/queue). Used when no "
           "broker is configured, or always when set explicitly. Default: $STUDIOML_HOME/queue when "
           "STUDIOML_HOME is set.", "path", doc_default="~/.studioml/queue"),
    Option("queue-match", _regex, r"^(rmq|sqs|local)_.*$",
           "Serve only queues whose name matches this regex."),
    Option("queue-mismatch", _regex, "", "Never serve queues whose name matches this regex (empty: none)."),
    Option("amqp-url", str, "", "RabbitMQ URL (amqp://user:pass@host:5672/vhost); empty disables RabbitMQ.",
           secret=True),
    Option("amqp-mgt-url", str, "", "RabbitMQ management API URL; default: the AMQP host, port + 10000.",
           secret=True),
    Option("amqp-consumer-timeout", units.parse_duration, "30m",
           "The broker's delivery-acknowledgement timeout (RabbitMQ consumer_timeout). On brokers that "
           "ignore the per-consumer timeout (before 3.11.15), experiments whose deadline exceeds it get a "
           "warning: the broker will requeue their message while they run.", "duration"),
    Option("poll-interval", units.parse_duration, "0.2s",
           "How often idle queues are polled for new messages.", "duration"),
    Option("rescan-interval", units.parse_duration, "10s",
           "How often the set of queues is listed again (new queues served, deleted ones dropped).",
           "duration"),
    Option("abort-check-interval", units.parse_duration, "10s",
           "How often the queue of a running experiment is checked; deleting the queue aborts it.",
           "duration"),
    # -- where work happens
    Option("working-dir", _path, lambda: os.environ.get("TMPDIR") or "/tmp",
           "Directory for experiment directories; its filesystem is the disk pool. Default: $TMPDIR when "
           "set.", "path", doc_default="/tmp"),
    Option("hostname", str, socket.gethostname,
           "Name of this runner in attempt ids, metadata and logs. Default: this host's name.",
           doc_default="gpu-box-1"),
    Option("debug", _bool, "false", "Keep experiment directories after each attempt.", "bool"),
    Option("log-level", _level, "info", "Runner log level: debug, info, warning, error."),
    # -- python environments
    Option("env-cache-dir", _path, lambda: str(_default_cache_home() / "envs"),
           "Cache of built Python environments, keyed by interpreter and requirements.", "path",
           doc_default="~/.cache/studio-runner/envs"),
    Option("env-cache-size", units.parse_size, "20GiB",
           "Size bound of the environment cache; least recently used environments are evicted.", "size"),
    Option("uv-cache-dir", _optional_path, "",
           "uv's package cache (default: uv's own). Keep it on the env cache's filesystem so installs are "
           "hardlinks, not copies.", "path"),
    Option("python-search-path", _path_list, "",
           f"Extra interpreters or directories to search for pythonver, separated by '{os.pathsep}'.", "str"),
    Option("python-downloads", _bool, "false",
           "Let uv download a managed interpreter when none installed matches pythonver.", "bool"),
    Option("strict-python", _bool, "false",
           "Fail an attempt whose pythonver matches no interpreter instead of using the default one.",
           "bool"),
    Option("index-url", str, "", "Package index for environment builds (default: uv's, i.e. PyPI)."),
    # -- artifacts
    Option("cache-dir", _optional_path, "",
           "Download cache for immutable artifacts; empty disables the cache.", "path"),
    Option("cache-size", units.parse_size, "10GiB", "Size bound of the artifact cache.", "size"),
    Option("allow-env-secrets", _bool, "false",
           "Use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY from a request's config.env for artifacts that carry "
           "no credentials.", "bool"),
    Option("s3-ca", _optional_path, "", "PEM CA bundle for S3 endpoints; turns TLS on.", "path"),
    Option("s3-cert", _optional_path, "", "Client certificate for S3 endpoints (with --s3-key).", "path"),
    Option("s3-key", _optional_path, "", "Client key for S3 endpoints (with --s3-cert).", "path"),
    # -- lifecycle policies
    Option("max-attempts", _int, "3",
           "Attempts per message for runner-side failures before it is set aside.", "int"),
    Option("max-lifetime", units.parse_duration, "96h", "Hard cap on any experiment's run time.", "duration"),
    Option("grace-period", units.parse_duration, "10s",
           "Time between SIGTERM and SIGKILL when an experiment is stopped.", "duration"),
    Option("min-checkpoint-interval", units.parse_duration, "1m",
           "Floor for a request's saveWorkspaceFrequency (mutable artifacts are uploaded that often).",
           "duration"),
    Option("default-checkpoint-interval", units.parse_duration, "10m",
           "Checkpoint interval when a request sets no saveWorkspaceFrequency.", "duration"),
    Option("drain-timeout", units.parse_duration, "0s",
           "On SIGINT/SIGTERM, how long running experiments may finish before they are stopped and handed "
           "back. A second signal stops them at once.", "duration"),
    Option("schema-logs", _bool, "true",
           "Record every non-JSON output line in the metadata's studioml.log.", "bool"),
)

_BY_NAME = {option.name: option for option in OPTIONS}


class Settings:
    """Resolved option values, as attributes (``settings.cache_dir``), plus where each came from."""

    def __init__(self, values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
        self._values = dict(values)
        self.sources = dict(sources)
        for name, value in values.items():
            setattr(self, name.replace("-", "_"), value)

    def explicitly_set(self, name: str) -> bool:
        return self.sources.get(name, "default") != "default"

    def describe(self) -> list[str]:
        """Lines naming each option, its value (secrets masked) and source, for `--debug` start-up logs."""
        lines = []
        for option in OPTIONS:
            value = self._values[option.name]
            shown = "****" if option.secret and value else value
            lines.append(f"{option.name} = {shown!s} ({self.sources[option.name]})")
        return lines

    # attribute access is dynamic; these annotations document the common ones for type checkers
    def __getattr__(self, name: str) -> Any:  # pragma: no cover - only reached for typos
        raise AttributeError(f"no option named {name.replace('_', '-')!r}")


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per option; defaults stay None so we can tell 'not given' from 'given'."""
    group = parser.add_argument_group("runner options (also as environment variables and TOML keys)")
    group.add_argument("--config", metavar="FILE", help="TOML file with option values (keys as the flags).")
    for option in OPTIONS:
        metavar = option.kind.upper()
        default = option.doc_default or option.default_text()
        if option.secret and default:
            default = "****"
        help_text = f"{option.help} [env {option.env}; default: {default or 'empty'}]"
        if option.kind == "bool":
            group.add_argument(f"--{option.name}", nargs="?", const="true", default=None, metavar="BOOL",
                               help=help_text)
        else:
            group.add_argument(f"--{option.name}", default=None, metavar=metavar, help=help_text)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"--config: file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {path} is not valid TOML: {exc}") from None
    result: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("_", "-")
        if name not in _BY_NAME:
            raise ConfigError(f"{path}: unknown key {key!r} (see config.example.toml for the valid keys)")
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, list):
            value = os.pathsep.join(str(item) for item in value)
        elif isinstance(value, dict):
            raise ConfigError(f"{path}: key {key!r} must be a plain value, not a table")
        result[name] = str(value)
    return result


def resolve(flags: Mapping[str, Any] | argparse.Namespace | None = None,
            environ: Mapping[str, str] | None = None,
            config_file: Path | None = None) -> Settings:
    """Combine flag > environment > file > default into Settings; raise ConfigError naming the bad key."""
    if isinstance(flags, argparse.Namespace):
        flags = vars(flags)
    flags = dict(flags or {})
    environ = os.environ if environ is None else environ
    if config_file is None and flags.get("config"):
        config_file = Path(flags["config"])
    from_file = _read_toml(config_file) if config_file else {}

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    problems: list[str] = []
    for option in OPTIONS:
        flag_value = flags.get(option.attr)
        if flag_value is not None:
            raw, source, where = str(flag_value), "flag", f"--{option.name}"
        elif option.env in environ:
            raw, source, where = environ[option.env], "environment", f"environment variable {option.env}"
        elif option.name in from_file:
            raw, source, where = from_file[option.name], "file", f"{config_file}: key {option.name!r}"
        else:
            raw, source, where = option.default_text(), "default", f"default of --{option.name}"
        try:
            values[option.name] = option.parse(raw)
        except (ValueError, TypeError) as exc:
            shown = "****" if option.secret else repr(raw)
            problems.append(f"{where}: bad value {shown}: {exc}")
            continue
        sources[option.name] = source
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    settings = Settings(values, sources)
    _check_combinations(settings)
    return settings


def _check_combinations(settings: Settings) -> None:
    if bool(settings.s3_cert) != bool(settings.s3_key):
        raise ConfigError("--s3-cert and --s3-key must be given together")
    if settings.max_attempts < 1:
        raise ConfigError("--max-attempts must be at least 1")


def example_toml() -> str:
    """config.example.toml, generated from the table so it can never drift from the code."""
    out = [
        "# studio-runner configuration (pass with --config FILE).",
        "# Every key is also a command-line flag (--key) and an environment variable (KEY in upper case,",
        "# dashes as underscores). Precedence: flag > environment > this file > default.",
        "# Each key is shown with its default, commented out. Sizes: 512mb, 4G, 2GiB (k/m/g = 1000^n,",
        "# ki/mi/gi = 1024^n). Durations: 90s, 20m, 1h30m.",
        "",
    ]
    for option in OPTIONS:
        out.extend(textwrap.wrap(option.help, 108, initial_indent="# ", subsequent_indent="# "))
        out.append(f"# env: {option.env}")
        default = option.doc_default or option.default_text()
        if option.kind in ("bool", "int"):
            out.append(f"# {option.name} = {default}")
        else:
            escaped = default.replace("\\", "\\\\")
            out.append(f'# {option.name} = "{escaped}"')
        out.append("")
    return "\n".join(out)
