"""Runner options: one table, three sources.

Every option is a command-line flag (``--cache-dir``), an environment variable ``STUDIO_RUNNER_<NAME>``
(``STUDIO_RUNNER_CACHE_DIR``: upper case, dashes to underscores) and a key in a TOML file given with
``--config`` (the flag's name, dashes or underscores). Precedence: flag > environment > file > default.
Unknown keys and bad values are errors that name the key and where it came from. Values from every source go
through the same parser, so ``--max-attempts 3``, ``STUDIO_RUNNER_MAX_ATTEMPTS=3`` and ``max-attempts = 3``
mean the same.

Why a prefix: bare names such as ``DEBUG``, ``LOG_LEVEL``, ``HOSTNAME`` or ``POLL_INTERVAL`` are set by shells
and other tools, and used to stop the runner, keep every experiment directory or move its root. The bare
name is still read for the options the Go runner has (``AMQP_URL``, ``QUEUE_MATCH``, ``CACHE_DIR``, ...,
spec/options.md §2), listed explicitly as ``go_env`` in the table, so Go deployments (Kubernetes ConfigMaps)
keep working; the prefixed name wins over it. Where such a Go name is also common outside StudioML
(``DEBUG``, ``WORKING_DIR``, ``CACHE_DIR``, ``CACHE_SIZE``, ``S3_KEY``), a value that does not parse is
ignored with a warning, and a value that takes effect is announced: both come back in ``Settings.warnings``
for the caller to log once logging is set up.

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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from studio_runner import units
from studio_runner.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

ENV_PREFIX = "STUDIO_RUNNER_"
"""Every option is read from ``STUDIO_RUNNER_<NAME>``; bare names only where ``Option.go_env`` says so."""

HOSTNAME_MAX = 64
"""POSIX HOST_NAME_MAX; keeps ``studio-runner-<hostname>-<pid>-<hex>`` and metadata file names short."""


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
    raise ValueError("expected true or false (also: yes/no, on/off, 1/0)")


def _int(text: str) -> int:
    """A whole number, 0 or more; the message says so in words (``int()``'s names a base and a literal)."""
    stripped = text.strip()
    if not re.fullmatch(r"[+-]?[0-9]+", stripped):
        raise ValueError("expected a whole number such as 0, 1 or 8")
    value = int(stripped)
    if value < 0:
        raise ValueError("expected a whole number, 0 or more")
    return value


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression ({exc})") from None
    return text


def _level(text: str) -> str:
    level = text.strip().upper()
    aliases = {"WARN": "WARNING", "DBG": "DEBUG", "CRIT": "CRITICAL"}
    level = aliases.get(level, level)
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("expected debug, info, warning or error")
    return level


def _log_format(text: str) -> str:
    value = text.strip().lower()
    if value not in ("text", "json"):
        raise ValueError("expected text or json")
    return value


def _address(text: str) -> str:
    """``HOST:PORT`` (``:PORT`` = loopback) or empty; the port must be a number from 0 to 65535."""
    value = text.strip()
    if not value:
        return ""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError("expected HOST:PORT with a port from 0 to 65535 (e.g. 127.0.0.1:9090 or :9090)")
    return f"{host.strip('[]') or '127.0.0.1'}:{int(port)}"


def _isolation(text: str) -> str:
    value = text.strip().lower()
    if value not in ("none", "bwrap"):
        raise ValueError(f"expected none or bwrap, got {text!r}")
    return value


def _path(text: str) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(text)))


def _required_path(text: str) -> Path:
    if not text.strip():
        raise ValueError("must not be empty")
    return _path(text)


def _optional_path(text: str) -> Path | None:
    return _path(text) if text.strip() else None


def _path_list(text: str) -> list[Path]:
    return [_path(part) for part in text.split(os.pathsep) if part.strip()]


def _names(text: str) -> list[str]:
    names = [part for part in re.split(r"[,:\s]+", text) if part]
    for name in names:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"{name!r} is not an environment variable name")
    return names


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise ValueError("expected a whole number, 1 or more")
    return value


def sanitise_hostname(text: str) -> str:
    """``text`` made safe as part of a file or directory name: ASCII letters, digits, ``.``, ``_`` and ``-``
    kept, anything else (``/`` above all) turned into ``_``, no leading dot, at most HOSTNAME_MAX characters.

    The hostname is part of the runner's root directory and of metadata file names, so a value like
    ``evil/../../x`` must never become a path. Raises ValueError for an empty name."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", text.strip())[:HOSTNAME_MAX]
    if cleaned.startswith("."):
        cleaned = "_" + cleaned[1:]
    if not cleaned:
        raise ValueError("must not be empty")
    return cleaned


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
    go_env: str | None = None
    """The Go runner's bare variable for this option (spec/options.md §2), read when ``env`` is not set.
    None: only the prefixed variable is read."""
    generic: bool = False
    """``go_env`` is also common outside StudioML: a bad value there is ignored with a warning, and a value
    that changes the option is announced (see ``effect``)."""
    effect: str = ""
    """What a non-default value of a generic ``go_env`` does, for the start-up warning."""
    minimum: float | None = None
    """Smallest value accepted (durations where 0 would make a loop spin)."""
    section: str = ""
    """Heading it is listed under in --help and config.example.toml (set by ``_sectioned``)."""

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper().replace("-", "_").replace(".", "_")

    @property
    def env_names(self) -> tuple[str, ...]:
        """The variables read for this option, the one that wins first."""
        return (self.env, self.go_env) if self.go_env else (self.env,)

    @property
    def attr(self) -> str:
        return self.name.replace("-", "_")

    def default_text(self) -> str:
        return self.default() if callable(self.default) else self.default

    def parse_checked(self, raw: str) -> Any:
        """``parse`` plus the floor, so every source gets the same checks."""
        value = self.parse(raw)
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"--{self.name} must be at least {self.minimum:g}s "
                             "(smaller values make the runner spin)")
        return value


@dataclass(frozen=True)
class Section:
    """A heading of the option table: 31+ flags in one list are unreadable."""

    title: str
    blurb: str


SECTIONS: dict[str, str] = {}
"""Section title -> blurb, in table order (filled by ``_sectioned``)."""


def _sectioned(*items: Section | Option) -> tuple[Option, ...]:
    """The options, each with the title of the Section above it."""
    options: list[Option] = []
    title = ""
    for item in items:
        if isinstance(item, Section):
            title = item.title
            SECTIONS[title] = item.blurb
        else:
            options.append(replace(item, section=title))
    return tuple(options)


OPTIONS: tuple[Option, ...] = _sectioned(
    Section("Queues", "Where work comes from: local directory queues or RabbitMQ, and which of them are "
            "served."),
    Option("queue-root", _path, lambda: str(_studioml_home() / "queue"),
           "Root of the local directory queues (StudioML local mode: $STUDIOML_HOME/queue). Used when no "
           "broker is configured, or always when set explicitly. Default: $STUDIOML_HOME/queue when "
           "STUDIOML_HOME is set.", "path", doc_default="~/.studioml/queue", go_env="QUEUE_ROOT"),
    Option("queue-match", _regex, r"^(rmq|sqs|local)_.*$",
           "Serve only queues whose name matches this regex.", go_env="QUEUE_MATCH"),
    Option("queue-mismatch", _regex, "", "Never serve queues whose name matches this regex (empty: none).",
           go_env="QUEUE_MISMATCH"),
    Option("amqp-url", str, "", "RabbitMQ URL (amqp://user:pass@host:5672/vhost); empty disables RabbitMQ.",
           secret=True, go_env="AMQP_URL"),
    Option("amqp-mgt-url", str, "", "RabbitMQ management API URL; default: the AMQP host, port + 10000.",
           secret=True, go_env="AMQP_MGT_URL"),
    Option("sqs-certs", _optional_path, "",
           "Directory of AWS SQS accounts: one subdirectory per account holding an AWS credentials file and "
           "a config file (region, and endpoint_url for SQS-compatible servers); added or removed accounts "
           "are served or dropped at the next rescan. Empty disables SQS.", "path", go_env="SQS_CERTS"),
    Option("sqs-timeout", units.parse_duration, "15s", "Timeout of each SQS listing call.", "duration",
           go_env="SQS_TIMEOUT"),
    Option("certs-dir", _optional_path, "",
           "Directory of Google Cloud service-account JSON files: each file's project has its Pub/Sub "
           "subscriptions matched like queues and served; files added or removed are picked up at the next "
           "rescan. Empty: only --pubsub-project (with GOOGLE_APPLICATION_CREDENTIALS or the emulator).",
           "path"),
    Option("pubsub-project", str, "",
           "A Google Cloud project whose Pub/Sub subscriptions are served with the default credentials "
           "(GOOGLE_APPLICATION_CREDENTIALS) or, with PUBSUB_EMULATOR_HOST set, on the emulator."),
    Option("amqp-consumer-timeout", units.parse_duration, "30m",
           "The broker's delivery-acknowledgement timeout (RabbitMQ consumer_timeout). On brokers that "
           "ignore the per-consumer timeout (before 3.11.15), experiments whose deadline exceeds it get a "
           "warning: the broker will requeue their message while they run.", "duration"),
    Option("poll-interval", units.parse_duration, "0.2s",
           "How often local queues are polled where the file system reports no changes (--queue-watch "
           "off, or no inotify); otherwise an idle runner waits for file events and broker deliveries.",
           "duration", minimum=0.05),
    Option("queue-watch", _bool, "true",
           "Wait for file-system events on the local queue root instead of polling it (falls back to "
           "polling by itself when no events arrive, e.g. on some network file systems).", "bool"),
    Option("rescan-interval", units.parse_duration, "10s",
           "How often the set of queues is listed again (new queues served, deleted ones dropped).",
           "duration", minimum=1.0),
    Option("abort-check-interval", units.parse_duration, "10s",
           "How often the queue of a running experiment is checked; deleting the queue aborts it.",
           "duration", minimum=0.5),
    Section("Reports", "Where progress and results are reported besides storage."),
    Option("response-queues", _bool, "true",
           "Publish the report messages (states, log records, progress lines) of each experiment to the "
           "queue <request queue>_response when it exists.", "bool"),
    Option("slack-hook", str, "",
           "Slack incoming-webhook URL: a short message for each experiment that starts, succeeds or fails. "
           "Empty disables Slack.", secret=True, go_env="SLACK_HOOK"),
    Option("slack-room", str, "", "Slack channel (#name) or user (@name) for --slack-hook messages.",
           go_env="SLACK_ROOM"),
    Section("Message security", "Encrypted and signed requests (StudioML's public_key_path and "
            "signing_key_path), limits on what a message may be, and experiment isolation."),
    Option("clear-text-messages", _bool, "true",
           "Accept unencrypted requests. false: only encrypted (and signed) requests run; clear ones are set "
           "aside with a reason.", "bool", go_env="CLEAR_TEXT_MESSAGES"),
    Option("encrypt-dir", _path, "./certs/message",
           "Directory with the runner's RSA key for encrypted requests: encryption/ssh-privatekey (PKCS#1 or "
           "PKCS#8 PEM, encrypted or not) and passphrase/ssh-passphrase (the Kubernetes secret mounts). Read "
           "when the first encrypted request arrives.", "path", go_env="ENCRYPT_DIR"),
    Option("request-signatures-dir", _path, "./certs/queues/signing",
           "Ed25519 public keys (authorized_keys lines) that verify signed requests; the file whose name is "
           "the longest prefix of the queue name applies. Re-read while the runner runs.", "path",
           go_env="REQUEST_SIGNATURES_DIR"),
    Option("response-signatures-dir", _path, "./certs/queues/response-encrypt",
           "RSA public keys (file name = queue prefix) that encrypt the reports sent to <queue>_response.",
           "path", go_env="RESPONSE_SIGNATURES_DIR"),
    Option("max-message-size", units.parse_size, "4MiB",
           "Larger messages are refused (set aside) before they are parsed or decrypted.", "size"),
    Option("isolate", _isolation, "none",
           "Run experiments isolated from the rest of the machine: none, or bwrap (bubblewrap: the "
           "experiment directory writable, its environment read-only, the rest of the file system hidden "
           "or read-only).", "str"),
    Section("Working directory and host", "Where experiments run and what this runner is called."),
    Option("working-dir", _required_path, lambda: os.environ.get("TMPDIR") or "/tmp",
           "Directory for experiment directories; its filesystem is the disk pool. Default: $TMPDIR when "
           "set.", "path", doc_default="/tmp", go_env="WORKING_DIR", generic=True,
           effect="puts the runner's directories there"),
    Option("hostname", sanitise_hostname, socket.gethostname,
           "Name of this runner in attempt ids, metadata, logs and its directory's name; characters other "
           "than letters, digits, '.', '_' and '-' become '_'. Default: this host's name ($HOSTNAME is not "
           "read).", doc_default="gpu-box-1"),
    Option("debug", _bool, "false", "Keep experiment directories after each attempt.", "bool",
           go_env="DEBUG", generic=True, effect="keeps experiment directories"),
    Section("Logging and status", "What the runner says, and how it is watched and steered while it runs."),
    Option("log-level", _level, "info",
           "Runner log level: debug, info, warning, error. Libraries (pika, botocore, urllib3) stay at "
           "warning unless --log-libraries is set."),
    Option("log-format", _log_format, "text",
           "Log line format on stderr: text (for people) or json (one object per line, for log shippers)."),
    Option("log-libraries", _bool, "false",
           "Let the libraries' own debug logging (pika, botocore, urllib3, httpx) through at --log-level.",
           "bool"),
    Option("prom-address", _address, "127.0.0.1:9090",
           "Serve GET /metrics (Prometheus), /status (JSON) and /healthz on HOST:PORT. A bare :PORT binds "
           "to loopback; use 0.0.0.0:PORT to be reached from elsewhere (Kubernetes probes). Port 0 picks a "
           "free port; empty disables. If the default port is taken the runner starts without it.",
           go_env="PROM_ADDRESS"),
    Option("state-file", _optional_path, "",
           "File holding the runner's intake state: Running, DrainAndSuspend (finish what runs, take "
           "nothing new) or DrainAndTerminate (finish, then exit 0); a bare value or a STATE=value line. "
           "Watched while the runner runs (mount the Kubernetes state ConfigMap's STATE key here).", "path"),
    Option("schema-logs", _bool, "true",
           "Record every non-JSON output line in the metadata's studioml.log.", "bool", go_env="SCHEMA_LOGS"),
    Section("Python environments", "What experiments run in: interpreters, packages and environment "
            "variables."),
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
    Option("pass-env", _names, "",
           "Names of the runner's environment variables that experiments also get, on top of the base set "
           "(PATH, HOME, USER, LOGNAME, LANG, LANGUAGE, LC_ALL, LC_CTYPE, TZ, TERM, LD_LIBRARY_PATH and the "
           "proxy variables); separated by commas. Nothing else of the runner's environment reaches them.",
           doc_default=""),
    Section("Artifacts and storage", "Downloads, uploads and the artifact cache."),
    Option("cache-dir", _optional_path, "",
           "Download cache for immutable artifacts; empty disables the cache.", "path",
           go_env="CACHE_DIR", generic=True, effect="turns the artifact download cache on there"),
    Option("cache-size", units.parse_size, "10GiB", "Size bound of the artifact cache.", "size",
           go_env="CACHE_SIZE", generic=True, effect="sets the artifact cache's size bound"),
    Option("local-storage-roots", _path_list, lambda: str(_studioml_home() / "storage"),
           "Directories that a request's local artifact locators (file:// URLs and plain paths: StudioML's "
           f"local storage) may name, separated by '{os.pathsep}'; a request naming any other place (after "
           "symbolic links and '..' are resolved) is set aside. The artifact cache is always allowed; '/' "
           "allows everything, an empty value no local locator at all. Default: $STUDIOML_HOME/storage.",
           "str", doc_default="~/.studioml/storage"),
    Option("allow-env-secrets", _bool, "false",
           "Use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY from a request's config.env for artifacts that carry "
           "no credentials.", "bool", go_env="ALLOW_ENV_SECRETS"),
    Option("s3-ca", _optional_path, "", "PEM CA bundle for S3 endpoints; turns TLS on.", "path",
           go_env="S3_CA"),
    Option("s3-cert", _optional_path, "", "Client certificate for S3 endpoints (with --s3-key).", "path",
           go_env="S3_CERT"),
    Option("s3-key", _optional_path, "", "Client key for S3 endpoints (with --s3-cert).", "path",
           go_env="S3_KEY", generic=True, effect="is used as the client key for S3 endpoints"),
    Section("Resources and GPUs", "What this runner hands out to experiments."),
    Option("max-cores", _int, "0",
           "Cores this runner hands out to experiments (0: every core it may use, after CPU affinity and a "
           "container's CPU quota). More than the machine has is a start-up error.", "int",
           go_env="MAX_CORES"),
    Option("max-mem", units.parse_size, "0",
           "RAM this runner hands out (0: what is available at start-up, bounded by a container's memory "
           "limit). More than that is a start-up error.", "size", go_env="MAX_MEM"),
    Option("max-disk", units.parse_size, "0",
           "Disk under --working-dir this runner hands out to experiments in total (0: as free space "
           "allows, minus --disk-reserve).", "size", go_env="MAX_DISK"),
    Option("disk-reserve", units.parse_size, "1GiB",
           "Free space always kept on the working directory's filesystem: a request is taken only when its "
           "hdd (plus what running experiments reserved) fits on top of this. (The Go runner's --max-disk "
           "meant this; here --max-disk is a cap.)", "size"),
    Option("cpu-only", _bool, "false",
           "Use no GPU: NVML is not even loaded, requests that ask for a GPU are left to other runners.",
           "bool", go_env="CPU_ONLY"),
    Option("gpu-fake", _optional_path, "",
           "A JSON file describing GPU cards to use instead of NVML (for tests and demos: allocation, "
           "packing and release without a GPU). See studio_runner/gpus/fake.py for the format.", "path"),
    Option("max-running", _int, "0",
           "Experiments at once at most; 0: as many as their cores, RAM, disk and GPUs allow.", "int"),
    Section("Retries, deadlines and checkpoints", "Failures, time limits, checkpoints and shutdown."),
    Option("max-attempts", _positive_int, "3",
           "Attempts per message for runner-side failures before it is set aside.", "int"),
    Option("retry-delay", units.parse_duration, "10s",
           "After a runner-side failure the message is held this long before it goes back to its queue; the "
           "delay doubles with each attempt, up to retry-delay-max, and is randomised to 50-100% of that.",
           "duration", minimum=0.1),
    Option("retry-delay-max", units.parse_duration, "10m",
           "Cap of the delay between attempts of one message.",
           "duration", minimum=0.1),
    Option("upload-retry-window", units.parse_duration, "30m",
           "How long the final upload of a finished experiment is retried (with back-off) while storage is "
           "unreachable, before its message is handed back. New work is not taken meanwhile.", "duration"),
    Option("max-lifetime", units.parse_duration, "96h", "Hard cap on any experiment's run time.", "duration"),
    Option("grace-period", units.parse_duration, "10s",
           "Time between SIGTERM and SIGKILL when an experiment is stopped.", "duration"),
    Option("min-checkpoint-interval", units.parse_duration, "1m",
           "Floor for a request's saveWorkspaceFrequency (mutable artifacts are uploaded that often).",
           "duration", minimum=1.0),
    Option("default-checkpoint-interval", units.parse_duration, "10m",
           "Checkpoint interval when a request sets no saveWorkspaceFrequency.", "duration", minimum=1.0),
    Option("drain-timeout", units.parse_duration, "0s",
           "On SIGINT/SIGTERM, how long running experiments may finish before they are stopped and handed "
           "back. A second signal stops them at once.", "duration"),
)

_BY_NAME = {option.name: option for option in OPTIONS}


class Settings:
    """Resolved option values, as attributes (``settings.cache_dir``), plus where each came from.

    ``hostname`` is already sanitised for use in paths (``sanitise_hostname``). ``warnings`` holds what the
    caller should log at start-up (generic environment variables ignored or in effect, a hostname
    rewritten): resolving happens before logging is configured."""

    def __init__(self, values: Mapping[str, Any], sources: Mapping[str, str],
                 warnings: list[str] | None = None, origins: Mapping[str, str] | None = None) -> None:
        self._values = dict(values)
        self.sources = dict(sources)
        self.warnings: list[str] = list(warnings or [])
        self._origins = dict(origins or {})
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
            origin = self._origins.get(option.name, self.sources[option.name])
            lines.append(f"{option.name} = {shown!s} ({origin})")
        return lines

    # attribute access is dynamic; these annotations document the common ones for type checkers
    def __getattr__(self, name: str) -> Any:  # pragma: no cover - only reached for typos
        raise AttributeError(f"no option named {name.replace('_', '-')!r}")


def _env_text(option: Option) -> str:
    """``STUDIO_RUNNER_CACHE_DIR or CACHE_DIR``: the variables read, for --help and the example file."""
    return " or ".join(option.env_names)


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per option, grouped by section; defaults stay None so we can tell 'not given' from
    'given'."""
    first = parser.add_argument_group(
        "configuration", f"Every option below is also an environment variable ({ENV_PREFIX}<NAME>, plus the "
        "Go runner's bare name where one exists) and a key of the --config file. Precedence: flag > "
        "environment > file > default.")
    first.add_argument("--config", metavar="FILE", help="TOML file with option values (keys as the flags).")
    groups = {title: parser.add_argument_group(title.lower(), blurb) for title, blurb in SECTIONS.items()}
    for option in OPTIONS:
        group = groups[option.section]
        metavar = option.kind.upper()
        default = option.doc_default or option.default_text()
        if option.secret and default:
            default = "****"
        floor = f"; at least {option.minimum:g}s" if option.minimum is not None else ""
        help_text = f"{option.help} [env {_env_text(option)}; default: {default or 'empty'}{floor}]"
        # argparse expands %-formats in help texts
        help_text = help_text.replace("%", "%%")
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


@dataclass(frozen=True)
class _Candidate:
    raw: str
    source: str
    where: str
    lenient: bool = False
    """From a generic bare variable: a bad value is skipped with a warning instead of being an error."""


def _candidates(option: Option, flags: Mapping[str, Any], environ: Mapping[str, str],
                from_file: Mapping[str, str], config_file: Path | None) -> list[_Candidate]:
    """The values offered for ``option``, highest precedence first."""
    found: list[_Candidate] = []
    flag_value = flags.get(option.attr)
    if flag_value is not None:
        found.append(_Candidate(str(flag_value), "flag", f"--{option.name}"))
    if option.env in environ:
        found.append(_Candidate(environ[option.env], "environment", f"environment variable {option.env}"))
    elif option.go_env and option.go_env in environ:
        found.append(_Candidate(environ[option.go_env], "environment",
                                f"environment variable {option.go_env}", lenient=option.generic))
    if option.name in from_file:
        found.append(_Candidate(from_file[option.name], "file", f"{config_file}: key {option.name!r}"))
    found.append(_Candidate(option.default_text(), "default", f"default of --{option.name}"))
    return found


def resolve(flags: Mapping[str, Any] | argparse.Namespace | None = None,
            environ: Mapping[str, str] | None = None,
            config_file: Path | None = None) -> Settings:
    """Combine flag > environment > file > default into Settings; raise ConfigError naming the bad key.

    Warnings for the caller to log are in ``Settings.warnings``."""
    if isinstance(flags, argparse.Namespace):
        flags = vars(flags)
    flags = dict(flags or {})
    environ = os.environ if environ is None else environ
    if config_file is None and flags.get("config"):
        config_file = Path(flags["config"])
    from_file = _read_toml(config_file) if config_file else {}

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    origins: dict[str, str] = {}
    chosen: dict[str, _Candidate] = {}
    problems: list[str] = []
    warnings: list[str] = []
    for option in OPTIONS:
        for candidate in _candidates(option, flags, environ, from_file, config_file):
            try:
                values[option.name] = option.parse_checked(candidate.raw)
            except (ValueError, TypeError) as exc:
                if candidate.lenient:
                    warnings.append(f"ignored {option.go_env}={candidate.raw!r} from the environment "
                                    f"({exc}); set {option.env} to configure --{option.name}")
                    continue
                shown = "****" if option.secret else repr(candidate.raw)
                problems.append(f"{candidate.where}: invalid value {shown}: {exc}")
                break
            sources[option.name] = candidate.source
            origins[option.name] = (f"environment {candidate.where.rsplit(' ', 1)[-1]}"
                                    if candidate.source == "environment" else candidate.source)
            chosen[option.name] = candidate
            break
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    _drop_unpaired_generic_s3_key(values, sources, origins, chosen, warnings)
    for option in OPTIONS:
        candidate = chosen[option.name]
        if candidate.lenient and values[option.name] != option.parse_checked(option.default_text()):
            warnings.append(f"{option.go_env}={candidate.raw} from the environment {option.effect}; "
                            f"set {option.env} to be explicit")
    raw_hostname = chosen["hostname"].raw.strip()
    if values["hostname"] != raw_hostname:
        warnings.append(f"hostname {raw_hostname!r} is not safe in file names; using {values['hostname']!r}")
    settings = Settings(values, sources, warnings, origins)
    _check_combinations(settings)
    return settings


def _drop_unpaired_generic_s3_key(values: dict[str, Any], sources: dict[str, str], origins: dict[str, str],
                                  chosen: dict[str, _Candidate], warnings: list[str]) -> None:
    """A bare ``S3_KEY`` (a common name for an AWS access key) without an S3 client certificate is someone
    else's variable: ignore it rather than refuse to start."""
    if chosen["s3-key"].lenient and values["s3-key"] and not values["s3-cert"]:
        option = _BY_NAME["s3-key"]
        warnings.append(f"ignored {option.go_env} from the environment (--s3-key needs --s3-cert, which is "
                        f"not set); set {option.env} to configure --s3-key")
        values["s3-key"] = option.parse(option.default_text())
        sources["s3-key"] = origins["s3-key"] = "default"
        chosen["s3-key"] = _Candidate(option.default_text(), "default", "default of --s3-key")


def _check_combinations(settings: Settings) -> None:
    if bool(settings.s3_cert) != bool(settings.s3_key):
        raise ConfigError("--s3-cert and --s3-key must be given together")


def resolve_one(name: str, flag: str | None = None,
                environ: Mapping[str, str] | None = None) -> tuple[Any, str]:
    """One option's value from ``flag`` > environment > default, and where it came from.

    For commands that need a single runner setting without resolving (and failing on) all of them:
    ``submit`` checks its queue name against the runners' --queue-match, ``tui`` finds --prom-address."""
    option = _BY_NAME[name]
    environ = os.environ if environ is None else environ
    flags = {option.attr: flag} if flag is not None else {}
    for candidate in _candidates(option, flags, environ, {}, None):
        try:
            return option.parse_checked(candidate.raw), candidate.where
        except (ValueError, TypeError) as exc:
            if not candidate.lenient:
                raise ConfigError(f"{candidate.where}: invalid value {candidate.raw!r}: {exc}") from None
    raise AssertionError("unreachable: the default always parses")  # pragma: no cover


def example_toml() -> str:
    """config.example.toml, generated from the table so it can never drift from the code."""
    out = [
        "# studio-runner configuration (pass with --config FILE).",
        "# Every key is also a command-line flag (--key) and an environment variable",
        f"# {ENV_PREFIX}<KEY> (upper case, dashes as underscores). Options the Go runner has are also read",
        f"# from its bare variable name (CACHE_DIR), listed below; {ENV_PREFIX}<KEY> wins over it.",
        "# Precedence: flag > environment > this file > default.",
        "# Each key is shown with its default, commented out. Sizes: 512mb, 4G, 2GiB (k/m/g = 1000^n,",
        "# ki/mi/gi = 1024^n). Durations: 90s, 20m, 1h30m.",
        "",
    ]
    section = ""
    for option in OPTIONS:
        if option.section != section:
            section = option.section
            out.extend([f"# ==== {section} " + "=" * max(4, 100 - len(section)),
                        *textwrap.wrap(SECTIONS[section], 108, initial_indent="# ", subsequent_indent="# "),
                        ""])
        out.extend(textwrap.wrap(option.help, 108, initial_indent="# ", subsequent_indent="# "))
        env_line = f"# env: {option.env}"
        if option.go_env:
            env_line += f", or {option.go_env} (the Go runner's name)"
        out.append(env_line)
        if option.minimum is not None:
            out.append(f"# at least {option.minimum:g}s")
        default = option.doc_default or option.default_text()
        if option.kind in ("bool", "int"):
            out.append(f"# {option.name} = {default}")
        else:
            escaped = default.replace("\\", "\\\\")
            out.append(f'# {option.name} = "{escaped}"')
        out.append("")
    return "\n".join(out)
