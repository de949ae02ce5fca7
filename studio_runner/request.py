"""Typed StudioML request model and its parser (no I/O).

The client (studioml 0.0.49) is loose about types: ``gpuCount`` arrives as int or numeric string, sizes as
strings or numbers, ``unpack`` may be null, ``config.env`` values may be YAML numbers. The parser accepts
exactly what the real client sends (see ../shared/spec/message.md) and turns everything else into a
:class:`~studio_runner.errors.RequestInvalid` that names the field and the (masked) value.

Decisions others rely on:

* ``config.env`` values are stringified the way the user wrote them in YAML: ``true``/``false`` for booleans,
  ``"4"`` for 4 and 4.0, ``repr`` for other floats, ``""`` for null. Objects and lists are refused.
* Durations: a bare number (``90``, ``"90"``) is seconds (units.py). ``max_duration`` that cannot be read
  makes the request invalid — a limit we cannot read must not run unbounded. ``"0"`` parses to ``0.0``; what
  a zero limit means is the scheduler's call. ``experimentLifetime`` / ``saveWorkspaceFrequency`` that cannot
  be read become None plus a line in ``Request.warnings``.
* ``unpack: null`` (from ``--reuse``) is True when the key or locator looks like a tar archive.
* Artifact labels become directory names, so ``""``, ``.``, ``..`` and labels with ``/``, ``\\`` or NUL are
  refused. Strings that reach a command line, a path or the environment may not hold NUL or lone surrogates.
* ``pythonenv``/``config.pip`` lines that make the installer read a file (``-r``, ``-c``, ``-f`` ...) are
  refused: it runs on the runner's side.
* An envelope (``{"message": {"payload": ...}}``) is refused with ``field="message"``; the intake gate
  (gate.py) verifies and decrypts it first and hands the plaintext to this parser.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

from studio_runner.errors import RequestInvalid
from studio_runner.redact import Redactor, describe, is_placeholder, is_secret_name, looks_secret
from studio_runner.storage.base import Credentials
from studio_runner.units import parse_duration, parse_size


@dataclass(frozen=True)
class Resources:
    """``experiment.resources_needed``; sizes in bytes, 0 when absent."""

    cpus: int = 0
    ram: int = 0
    hdd: int = 0
    gpus: int = 0
    gpu_mem: int = 0
    gpu_count: int = 0


@dataclass(frozen=True)
class Artifact:
    label: str
    mutable: bool
    unpack: bool
    """Resolved: True/False as sent; null becomes True when the key looks like a tar archive."""
    key: str | None = None
    qualified: str | None = None
    url: str | None = None
    bucket: str | None = None
    credentials: Credentials | None = None
    """As sent (None when the artifact carries none)."""
    storage_credentials: Credentials | None = field(default=None, compare=False, repr=False)
    """``config.storage``'s key pair, set only when ``credentials`` is None and ``qualified`` is an ``s3://``
    URL on the same host and port as ``config.storage.endpoint``: the client sends ``--reuse`` artifacts and
    completion-service tasks without credentials of their own, although they live in that very store."""
    env_region: str | None = field(default=None, compare=False)
    """``config.env``'s ``AWS_DEFAULT_REGION``, set at parse time: the region for credentials naming none."""

    @property
    def locator(self) -> str | None:
        """Where to fetch/put the object: ``qualified`` wins, then ``url``. For an ``s3://`` locator the
        ``key`` field wins over the path in ``qualified`` (message.md, qualified-URL rules)."""
        if self.qualified and self.key and self.qualified[:5].lower() == "s3://":
            return _s3_with_key(self.qualified, self.key)
        return self.qualified or self.url

    @property
    def access_credentials(self) -> Credentials | None:
        """The key pair to use for this artifact: its own, else the storage's (same endpoint), else none.

        Their region, when they name none, is ``config.env``'s ``AWS_DEFAULT_REGION`` (:attr:`env_region`);
        the store still prefers an AWS host's own region and falls back to its default.
        """
        creds = self.credentials or self.storage_credentials
        if creds is not None and not creds.region and self.env_region:
            return replace(creds, region=self.env_region)
        return creds


@dataclass(frozen=True)
class Experiment:
    key: str
    filename: str
    args: list[str]
    """As sent: each element already shell-quoted by the client."""
    pythonver: str
    pythonenv: list[str]
    project: str | None
    resources: Resources
    artifacts: dict[str, Artifact]
    time_added: float | None
    max_duration: float | None
    """Seconds, None when absent."""


@dataclass(frozen=True)
class Config:
    env: dict[str, str] = field(default_factory=dict)
    pip: list[str] = field(default_factory=list)
    save_workspace_frequency: float | None = None
    """Seconds; None when absent or unparseable (a warning is recorded in ``Request.warnings``)."""
    experiment_lifetime: float | None = None
    """Seconds; None when absent or unparseable."""
    verbose: str | None = None
    storage: dict[str, Any] = field(default_factory=dict)
    database: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    experiment: Experiment
    config: Config
    raw: dict[str, Any]
    """The decoded document, kept for re-publishing; holds secrets, never log it."""
    warnings: list[str] = field(default_factory=list)

    def credential_values(self) -> list[str]:
        """Every credential in the request: artifact keys and tokens, storage/database/queue credentials,
        passwords in any URL of the config. Masked at any length."""
        found: list[str] = []
        for artifact in self.experiment.artifacts.values():
            creds = artifact.credentials
            if creds is not None:
                found += [creds.access_key, creds.secret_key, creds.session_token or ""]
        found += _raw_credentials(self.raw)
        return _unique(found)

    def secrets(self) -> list[str]:
        """Every secret value this request carries (credentials, env values), for masking output.

        Credentials come whatever their length; a ``config.env`` value comes whatever its length when its
        name is a secret name (:func:`~studio_runner.redact.is_secret_name`: ``DB_PWD``, ``API_PASS``,
        ``X_TOKEN``...), unless it is a placeholder (``true``, ``none``, ``8``: see
        :func:`~studio_runner.redact.is_placeholder`). A :class:`Redactor` masks short ones as whole words.
        """
        env = [v for k, v in self.config.env.items() if is_secret_name(k) and not is_placeholder(v)]
        return _unique(self.credential_values() + env)

    def redactor(self) -> Redactor:
        """A :class:`Redactor` for this experiment's output (credentials masked at any length)."""
        return Redactor(self.secrets(), credentials=self.credential_values())

    def with_env_credentials(self) -> Request:
        """The runner's ``--allow-env-secrets``: artifacts that carry no credentials of their own borrow the
        AWS key pair from ``config.env``, ahead of the storage-credentials fallback of
        :attr:`Artifact.access_credentials`."""
        env = self.config.env
        if not (env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY")):
            return self
        creds = Credentials(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"],
                            env.get("AWS_SESSION_TOKEN"), env.get("AWS_DEFAULT_REGION"))
        borrowed = {label: artifact if artifact.credentials else replace(artifact, credentials=creds)
                    for label, artifact in self.experiment.artifacts.items()}
        return replace(self, experiment=replace(self.experiment, artifacts=borrowed))


_MAX_COUNT = 2**31 - 1
_TAR_SUFFIXES = (".tar", ".tgz", ".tbz", ".tbz2", ".tar.bz2")
_DESCRIPTIVE = frozenset({"region", "profile", "type"})
"""Fields inside a ``credentials`` block that are not secret."""
_URL_PASSWORD_RE = re.compile(r"//[^\s/@:]*:([^\s/]*)@")
_DIGITS_RE = re.compile(r"\s*[0-9]{1,12}\s*", re.ASCII)

Path = tuple[str | int, ...]


def is_envelope(doc: Mapping[str, Any]) -> bool:
    """Whether a decoded document is an encrypted envelope: ``message`` is an object with ``payload``."""
    message = doc.get("message")
    return isinstance(message, Mapping) and "payload" in message


def decode_body(body: bytes | str) -> Any:
    """A message body as JSON (UTF-8, no NaN/Infinity, bounded nesting); RequestInvalid when it is not.
    The intake gate decodes once, then tells an envelope from a clear request."""
    return _decode(body)


def parse_request(body: bytes | str) -> Request:
    """Parse a clear-text StudioML request. Raises RequestInvalid naming the field."""
    return parse_document(_decode(body))


def parse_document(doc: Any) -> Request:
    """Parse a decoded clear-text request (see :func:`decode_body`); RequestInvalid names the field."""
    if not isinstance(doc, dict):
        raise RequestInvalid(f"a request must be a JSON object, got {_json_type(doc)}")
    if is_envelope(doc):
        raise RequestInvalid(
            "encrypted envelope: message.payload must be decrypted before the request is parsed",
            field="message",
        )
    warnings: list[str] = []
    experiment = _experiment(_required(doc, "experiment", ()), ("experiment",))
    config_doc = doc.get("config")
    if config_doc is None:
        config_doc = {}
    elif not isinstance(config_doc, dict):
        _fail(("config",), "must be an object", config_doc)
    config = _config(config_doc, warnings)
    experiment = _with_storage_credentials(experiment, config.storage)
    experiment = _with_env_region(experiment, config.env)
    request = Request(experiment=experiment, config=config, raw=doc, warnings=warnings)
    _bounded_secrets(request)
    return request


_MAX_SECRETS = 1000
_MAX_SECRET_CHARS = 64 << 10


def _bounded_secrets(request: Request) -> None:
    """Every secret goes into the experiment's output masker, a regex built on the event loop: megabytes of
    them (one huge credential, or 100,000 secret-named env values) would cost seconds and hundreds of MB
    before the attempt starts. No real request comes near these limits."""
    secrets = request.secrets()
    total = sum(map(len, secrets))
    if len(secrets) > _MAX_SECRETS or total > _MAX_SECRET_CHARS:
        raise RequestInvalid(f"the request carries {len(secrets)} secret values, {total} characters in all "
                             f"(at most {_MAX_SECRETS} and {_MAX_SECRET_CHARS}): too many to mask")


# --- decoding and error reporting ---------------------------------------------------------------------


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a valid JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("a number too large for a float")
    return value


def _decode(body: bytes | str) -> Any:
    if isinstance(body, (bytes, bytearray, memoryview)):
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestInvalid(f"the request is not UTF-8 text (bad byte at offset {exc.start})") from None
    elif isinstance(body, str):
        text = body
    else:
        raise RequestInvalid(f"a request body must be bytes or str, not {type(body).__name__}")
    try:
        doc = json.loads(
            text.removeprefix("\ufeff"), parse_constant=_reject_constant, parse_float=_finite_float
        )
    except json.JSONDecodeError as exc:
        raise RequestInvalid(
            f"the request is not JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except RecursionError:
        raise RequestInvalid(_TOO_DEEP) from None
    except ValueError as exc:  # NaN/Infinity, 1e999, integers past Python's digit limit
        raise RequestInvalid(f"the request holds an unusable number: {str(exc)[:80]}") from None
    if _nesting_exceeds(doc, MAX_NESTING):
        raise RequestInvalid(_TOO_DEEP)
    return doc


MAX_NESTING = 64
"""Deepest nesting of objects and arrays a request may have (real ones reach 6). Checked after decoding, so
the verdict on a deep document never depends on how deep the caller's stack happens to be (json's own limit
is the interpreter's recursion limit, minus the frames already in use)."""
_TOO_DEEP = f"the request is nested too deeply to be a StudioML request (more than {MAX_NESTING} levels)"


def _nesting_exceeds(doc: Any, limit: int) -> bool:
    """Whether ``doc`` nests objects/arrays more than ``limit`` deep; iterative, so it cannot overflow."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


_PLAIN_PART = re.compile(r"[A-Za-z0-9_\-]{1,64}", re.ASCII)


def _render(path: Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_PART.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += "[" + json.dumps(part[:40]) + ("...]" if len(part) > 40 else "]")
    return out


def _secret_path(path: Path) -> bool:
    return any(isinstance(p, str) and (p == "env" or looks_secret(p)) for p in path)


_MISSING = object()


def _fail(path: Path, why: str, value: Any = _MISSING) -> NoReturn:
    name = _render(path)
    if value is _MISSING:
        raise RequestInvalid(f"{name} {why}", field=name)
    raise RequestInvalid(f"{name} {why}, got {describe(value, secret=_secret_path(path))}", field=name)


# --- field helpers --------------------------------------------------------------------------------------


def _required(doc: dict[str, Any], key: str, parent: Path) -> dict[str, Any]:
    value = doc.get(key)
    if value is None:
        _fail((*parent, key), "is required")
    if not isinstance(value, dict):
        _fail((*parent, key), "must be an object", value)
    return value


def _text(value: Any, path: Path) -> str:
    """A string that can go on a command line, into a path or the environment."""
    if not isinstance(value, str):
        _fail(path, "must be a string", value)
    if "\0" in value:
        _fail(path, "must not contain a NUL character", value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        _fail(path, "must be valid Unicode text (it holds a lone surrogate)")
    return value


def _optional_text(value: Any, path: Path) -> str | None:
    return None if value is None else _text(value, path)


def _text_list(value: Any, path: Path) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        _fail(path, "must be a list of strings", value)
    return [_text(item, (*path, i)) for i, item in enumerate(value)]


_FILE_OPTION_RE = re.compile(
    r"\s*(?:-[rcf]|--(?:requirements?|constraints?|overrides?|find-links|build-constraints?))(?:[\s=]|\S*$)"
)


def _requirements(value: Any, path: Path) -> list[str]:
    """Package lines (``pythonenv``, ``config.pip``). The installer runs on the runner's side, outside any
    isolation: a line that makes it read a file (``-r /home/u/.ssh/id_rsa``: its parse errors quote the
    content into the experiment's output) is refused."""
    lines = _text_list(value, path)
    for i, line in enumerate(lines):
        if _FILE_OPTION_RE.match(line):
            _fail((*path, i), "must name a package, not an installer option that reads files "
                              "(-r, -c, -f, --requirement, --constraint, --find-links)", line)
    return lines


def _count(value: Any, path: Path) -> int:
    if value is None:
        return 0
    if isinstance(value, bool):
        _fail(path, "must be a whole number", value)
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and _DIGITS_RE.fullmatch(value):
        number = int(value)
    else:
        _fail(path, "must be a whole number (or a string of digits)", value)
    if not 0 <= number <= _MAX_COUNT:
        _fail(path, "is out of range", value)
    return number


def _size(value: Any, path: Path) -> int:
    if value is None:
        return 0
    try:
        return parse_size(value)
    except ValueError:
        _fail(path, "must be a size such as 3g, 512mb or 2GiB (or a number of bytes)", value)


def _time_added(value: Any, path: Path) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(path, "must be a number of seconds since the epoch", value)
    try:
        return float(value)
    except OverflowError:
        _fail(path, "is out of range", value)


def _pythonver(value: Any, path: Path) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return _text(value, path).strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float):  # 3.8 -> "3.8"; JSON cannot tell 3.10 from 3.1
        return repr(value)
    _fail(path, "must be a version string such as '3.8'", value)


def _env_value(value: Any, path: Path) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e16 else repr(value)
    if isinstance(value, str):
        return _text(value, path)
    _fail(path, "must be a string, number, boolean or null", value)


# --- experiment -----------------------------------------------------------------------------------------


def _experiment(doc: dict[str, Any], path: Path) -> Experiment:
    key = doc.get("key")
    if key is None:
        _fail((*path, "key"), "is required")
    key = _text(key, (*path, "key"))
    if not key:
        _fail((*path, "key"), "must not be empty")
    if "filename" not in doc or doc["filename"] is None:
        _fail((*path, "filename"), "is required")
    project = doc.get("project")
    return Experiment(
        key=key,
        filename=_text(doc["filename"], (*path, "filename")),
        args=_text_list(doc.get("args"), (*path, "args")),
        pythonver=_pythonver(doc.get("pythonver"), (*path, "pythonver")),
        pythonenv=_requirements(doc.get("pythonenv"), (*path, "pythonenv")),
        project=_optional_text(project, (*path, "project")),
        resources=_resources(doc.get("resources_needed"), (*path, "resources_needed")),
        artifacts=_artifacts(doc, path),
        time_added=_time_added(doc.get("time_added"), (*path, "time_added")),
        max_duration=_max_duration(doc.get("max_duration"), (*path, "max_duration")),
    )


def _max_duration(value: Any, path: Path) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError:
        # A limit we cannot read must not run unbounded.
        _fail(path, "must be a duration such as 20m or 1h30m", value)


def _resources(doc: Any, path: Path) -> Resources:
    if doc is None:
        return Resources()
    if not isinstance(doc, dict):
        _fail(path, "must be an object", doc)
    return Resources(
        cpus=_count(doc.get("cpus"), (*path, "cpus")),
        ram=_size(doc.get("ram"), (*path, "ram")),
        hdd=_size(doc.get("hdd"), (*path, "hdd")),
        gpus=_count(doc.get("gpus"), (*path, "gpus")),
        gpu_mem=_size(doc.get("gpuMem"), (*path, "gpuMem")),
        gpu_count=_count(doc.get("gpuCount"), (*path, "gpuCount")),
    )


def _artifacts(experiment: dict[str, Any], parent: Path) -> dict[str, Artifact]:
    path = (*parent, "artifacts")
    doc = _required(experiment, "artifacts", parent)
    return {label: _artifact(label, value, (*path, label)) for label, value in doc.items()}


def _artifact(label: str, doc: Any, path: Path) -> Artifact:
    if label in ("", ".", "..") or any(c in label for c in "/\\\0") or not label.isprintable():
        _fail(path, "is not a usable artifact label (it names a directory and a metadata key: no slashes or "
                    "control characters)")
    _text(label, path)
    if not isinstance(doc, dict):
        _fail(path, "must be an object", doc)
    mutable = doc.get("mutable")
    if not isinstance(mutable, bool):
        _fail((*path, "mutable"), "must be true or false", mutable)
    key = _optional_text(doc.get("key"), (*path, "key"))
    qualified = _optional_text(doc.get("qualified"), (*path, "qualified"))
    url = _optional_text(doc.get("url"), (*path, "url"))
    unpack = doc.get("unpack")
    if unpack is None:
        unpack = any(_looks_like_tar(name) for name in (key, qualified, url) if name)
    elif not isinstance(unpack, bool):
        _fail((*path, "unpack"), "must be true, false or null", unpack)
    return Artifact(
        label=label,
        mutable=mutable,
        unpack=unpack,
        key=key,
        qualified=qualified,
        url=url,
        bucket=_optional_text(doc.get("bucket"), (*path, "bucket")),
        credentials=_credentials(doc.get("credentials"), (*path, "credentials")),
    )


def _looks_like_tar(name: str) -> bool:
    if "://" in name:
        try:
            name = urlsplit(name).path
        except ValueError:
            pass
    base = name.rsplit("/", 1)[-1].lower()
    return base.endswith(_TAR_SUFFIXES) or ".tar." in base


def _credentials(doc: Any, path: Path) -> Credentials | None:
    """``{"aws": {...}}`` -> Credentials; None when there is no key pair (the storage layer falls back)."""
    if doc is None:
        return None
    if not isinstance(doc, dict):
        _fail(path, "must be an object", doc)
    aws = doc.get("aws")
    if aws is None:
        return None
    if not isinstance(aws, dict):
        _fail((*path, "aws"), "must be an object", aws)
    fields: dict[str, str] = {}
    for name in ("access_key", "secret_access_key", "session_token", "region"):
        value = _optional_text(aws.get(name), (*path, "aws", name))
        if value:
            fields[name] = value
    access_key, secret_key = fields.get("access_key"), fields.get("secret_access_key")
    if access_key is None and secret_key is None:
        return None
    if access_key is None or secret_key is None:
        _fail((*path, "aws"), "needs both access_key and secret_access_key")
    return Credentials(access_key, secret_key, fields.get("session_token"), fields.get("region"))


def _endpoint_host(endpoint: str) -> str:
    """``host:port`` (lower case) of an endpoint written with or without a scheme; "" when unreadable."""
    try:
        return urlsplit(endpoint if "://" in endpoint else f"//{endpoint}").netloc.rpartition("@")[2].lower()
    except ValueError:
        return ""


def _with_storage_credentials(experiment: Experiment, storage: dict[str, Any]) -> Experiment:
    """Give ``s3://`` artifacts that came without credentials those of ``config.storage`` when they live on
    its endpoint (``Artifact.storage_credentials``). A malformed storage block simply gives none."""
    endpoint = storage.get("endpoint")
    if not isinstance(endpoint, str) or not _endpoint_host(endpoint):
        return experiment
    try:
        creds = _credentials(storage.get("credentials"), ("config", "storage", "credentials"))
    except RequestInvalid:
        return experiment
    if creds is None:
        return experiment
    host = _endpoint_host(endpoint)
    artifacts = dict(experiment.artifacts)
    for label, artifact in experiment.artifacts.items():
        qualified = artifact.qualified or ""
        if artifact.credentials is None and qualified[:5].lower() == "s3://" \
                and _endpoint_host(qualified) == host:
            artifacts[label] = replace(artifact, storage_credentials=creds)
    return replace(experiment, artifacts=artifacts)


def _s3_with_key(qualified: str, key: str) -> str:
    """``s3://host[:port]/bucket/<key>``: the bucket from ``qualified``, the object from ``key``."""
    head, _, rest = qualified[5:].partition("/")
    bucket = rest.lstrip("/").partition("/")[0]
    return f"s3://{head}/{bucket}/{key.lstrip('/')}" if head and bucket else qualified


def _with_env_region(experiment: Experiment, env: dict[str, str]) -> Experiment:
    """Record ``config.env``'s ``AWS_DEFAULT_REGION`` on each artifact (``Artifact.access_credentials``)."""
    region = env.get("AWS_DEFAULT_REGION", "").strip()
    if not region:
        return experiment
    artifacts = {label: replace(a, env_region=region) for label, a in experiment.artifacts.items()}
    return replace(experiment, artifacts=artifacts)


# --- config ---------------------------------------------------------------------------------------------


def _config(doc: dict[str, Any], warnings: list[str]) -> Config:
    path: Path = ("config",)
    env_doc = doc.get("env")
    if env_doc is None:
        env_doc = {}
    elif not isinstance(env_doc, dict):
        _fail((*path, "env"), "must be an object", env_doc)
    env: dict[str, str] = {}
    for name, value in env_doc.items():
        if not name or "=" in name:
            _fail((*path, "env", name), "is not a usable environment variable name")
        env[_text(name, (*path, "env", name))] = _env_value(value, (*path, "env", name))
    verbose = doc.get("verbose")
    return Config(
        env=env,
        pip=_requirements(doc.get("pip"), (*path, "pip")),
        save_workspace_frequency=_soft_duration(doc, "saveWorkspaceFrequency", warnings),
        experiment_lifetime=_soft_duration(doc, "experimentLifetime", warnings),
        verbose=verbose if isinstance(verbose, str) else _number_text(verbose),
        storage=_informational(doc.get("storage")),
        database=_informational(doc.get("database")),
    )


def _soft_duration(doc: dict[str, Any], key: str, warnings: list[str]) -> float | None:
    value = doc.get(key)
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError:
        warnings.append(f"config.{key}: cannot read {describe(value)} as a duration; ignored")
        return None


def _number_text(value: Any) -> str | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _informational(value: Any) -> dict[str, Any]:
    """storage/database blocks are carried, not used (artifacts hold their own locators and keys)."""
    return value if isinstance(value, dict) else {}


# --- secrets --------------------------------------------------------------------------------------------


def _unique(values: list[str]) -> list[str]:
    return list(dict.fromkeys(v for v in values if v))


def _leaves(node: Any, secret: bool) -> Iterator[tuple[str | None, Any, bool]]:
    """(key, scalar, under-a-credentials-block) for each scalar; iterative, as json allows deep nesting."""
    stack: list[tuple[str | None, Any, bool]] = [(None, node, secret)]
    while stack:
        key, value, inside = stack.pop()
        if isinstance(value, dict):
            stack.extend((str(k), v, inside or str(k) == "credentials") for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((key, v, inside) for v in value)
        else:
            yield key, value, inside


def _raw_credentials(raw: dict[str, Any]) -> list[str]:
    """Credential blocks anywhere, storage/database/queue secrets, and URL passwords in the config."""
    found: list[str] = []
    for key, value, inside in _leaves(raw.get("experiment"), False):
        if inside and key not in _DESCRIPTIVE and isinstance(value, str):
            found.append(value)
    config = raw.get("config")
    if not isinstance(config, dict):
        return found
    for section in ("storage", "database", "cloud", "server"):
        for key, value, inside in _leaves(config.get(section), False):
            secret = (inside and key not in _DESCRIPTIVE) or (key is not None and looks_secret(key))
            if secret and isinstance(value, (str, int, float)) and not isinstance(value, bool):
                found.append(str(value))
    for _key, value, _inside in _leaves(config, False):
        if isinstance(value, str) and "@" in value:
            for password in _URL_PASSWORD_RE.findall(value):
                found += [password, unquote(password)]
    cloud = config.get("cloud")
    queue = cloud.get("queue") if isinstance(cloud, dict) else None
    uri = queue.get("rmq") if isinstance(queue, dict) else None
    if isinstance(uri, str) and "@" in uri:
        found.append(uri)  # the broker URI as a whole, on top of its password
    return found
