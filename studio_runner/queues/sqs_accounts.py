"""SQS accounts: the ``--sqs-certs`` directory (one account per subdirectory, read afresh at every rescan),
each account's clients, and the account-level calls of :mod:`studio_runner.queues.sqs` (set-aside queue,
sweeping continued messages back to their queues, message attribute helpers).

Layout (spec/queues.md §2.2, the Go runner's): ``DIR/<label>/`` holds an AWS shared-credentials file and an
AWS config file. Files named ``credentials`` and ``config`` are taken as such; otherwise the folder must hold
exactly two non-hidden regular files and the one with a ``region = ...`` line is the config file (this fits a
Kubernetes secret mount, whose keys may have any names; hidden entries such as ``..data`` are ignored and
symlinks are followed). Profile ``default`` is read from both (``[default]`` or ``[profile default]`` in the
config file). The config file may carry ``endpoint_url`` so an SQS-compatible server (moto, ElasticMQ, a VPC
endpoint) is used instead of AWS.

Why the files are parsed here rather than handed to botocore: botocore's credential chain puts the process
environment (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``) before a credentials file, so one stray variable would
silently make every account the same one. Each account's client is built from explicit values on an
isolated botocore session that reads no configuration of its own.

Errors name the label and the problem, never a value from the files (parse errors of ``configparser`` quote
the offending line, which may hold a secret, so they are reworded).
"""

from __future__ import annotations

import configparser
import hashlib
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import botocore.session
from botocore.config import Config

log = logging.getLogger(__name__)


class AccountError(Exception):
    """An account folder that cannot be used; the message is safe to log."""


@dataclass(frozen=True)
class AccountFiles:
    """What one account folder says. ``fingerprint`` changes whenever either file's content does."""

    label: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    session_token: str | None = field(repr=False)
    region: str
    endpoint_url: str | None
    fingerprint: str = field(repr=False)


# -- message helpers shared with the backend --

ATTEMPT_ATTR = "studio-runner-attempt"
ORIGIN_ID_ATTR = "studio-runner-origin-id"
ORIGIN_QUEUE_ATTR = "studio-runner-origin-queue"
REASON_ATTR = "studio-runner-reason"
CONTINUED_AT_ATTR = "studio-runner-continued-at"
OWN_PREFIX = "studio-runner-"
SET_ASIDE_QUEUE = "studio-runner-set-aside"
HOLD_PREFIX = "studio-runner-hold-"
RETENTION = "1209600"  # 14 days, SQS's maximum
GONE = {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"}
BAD_RECEIPT = {"ReceiptHandleIsInvalid", "InvalidParameterValue", "MessageNotInflight",
                "AWS.SimpleQueueService.MessageNotInflight"}


def error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def message_attributes(message: dict[str, Any]) -> dict[str, str]:
    return {k: str(v.get("StringValue", "")) for k, v in (message.get("MessageAttributes") or {}).items()}


def _string(value: object) -> dict[str, str]:
    return {"DataType": "String", "StringValue": str(value)}


def send(client: Any, url: str, body: str, attributes: dict[str, object]) -> None:
    kwargs: dict[str, Any] = {"QueueUrl": url, "MessageBody": body,
                              "MessageAttributes": {k: _string(v) for k, v in attributes.items()}}
    if url.endswith(".fifo"):
        kwargs.update(MessageGroupId="studio-runner", MessageDeduplicationId=uuid.uuid4().hex)
    client.send_message(**kwargs)


def receive(client: Any, url: str, visibility: float, wait: float = 0,
             count: int = 1) -> list[dict[str, Any]]:
    reply = client.receive_message(QueueUrl=url, MaxNumberOfMessages=count, VisibilityTimeout=int(visibility),
                                   WaitTimeSeconds=int(wait), AttributeNames=["All"],
                                   MessageAttributeNames=["All"])
    return list(reply.get("Messages", []))


def as_int(text: str | None, default: int) -> int:
    try:
        return int(text) if text else default
    except ValueError:
        return default


def attempt_of(message: dict[str, Any]) -> int:
    receives = as_int((message.get("Attributes") or {}).get("ApproximateReceiveCount"), 1)
    return as_int(message_attributes(message).get(ATTEMPT_ATTR), 1) + max(receives - 1, 0)



_REGION_LINE = re.compile(rb"^\s*region\s*=\s*\S", re.MULTILINE)


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())


def _parse(path: Path, label: str, what: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser()
    try:
        parser.read_string(path.read_text(encoding="utf-8"), source=path.name)
    except (OSError, UnicodeDecodeError) as exc:
        raise AccountError(f"SQS account {label}: cannot read its {what} file {path.name}: "
                           f"{type(exc).__name__}") from None
    except configparser.Error as exc:  # the message quotes file lines: keep only where it went wrong
        line = getattr(exc, "lineno", None)
        where = f" (line {line})" if line else ""
        raise AccountError(f"SQS account {label}: {what} file {path.name} is not an AWS INI file{where}: "
                           f"{type(exc).__name__}") from None
    return parser


def _section(parser: configparser.RawConfigParser, *names: str) -> dict[str, str]:
    for name in names:
        if parser.has_section(name):
            return {k.lower(): v.strip() for k, v in parser.items(name)}
    return {}


def read_account(folder: Path) -> AccountFiles:
    """Read one account folder; raises :class:`AccountError` saying what is wrong."""
    label = folder.name
    try:
        files = _visible_files(folder)
    except OSError as exc:
        raise AccountError(f"SQS account {label}: cannot list its folder: {type(exc).__name__}") from None
    names = {p.name: p for p in files}
    if "credentials" in names and "config" in names:
        creds_path, config_path = names["credentials"], names["config"]
    elif len(files) == 2:
        try:
            with_region = [p for p in files if _REGION_LINE.search(p.read_bytes())]
        except OSError as exc:
            raise AccountError(f"SQS account {label}: cannot read its files: {type(exc).__name__}") from None
        if len(with_region) != 1:
            raise AccountError(f"SQS account {label}: exactly one of its two files must set region = ...")
        config_path = with_region[0]
        creds_path = next(p for p in files if p is not config_path)
    else:
        raise AccountError(f"SQS account {label}: expected a 'credentials' and a 'config' file (or exactly "
                           f"two files), found {len(files)} file(s)")
    creds = _section(_parse(creds_path, label, "credentials"), "default")
    config = _section(_parse(config_path, label, "config"), "default", "profile default")
    access_key = creds.get("aws_access_key_id", "")
    secret_key = creds.get("aws_secret_access_key", "")
    if not access_key or not secret_key:
        raise AccountError(f"SQS account {label}: its credentials file has no [default] aws_access_key_id "
                           "and aws_secret_access_key")
    region = config.get("region", "")
    if not region:
        raise AccountError(f"SQS account {label}: its config file sets no region in [default]")
    endpoint = config.get("endpoint_url") or None
    if endpoint is not None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise AccountError(f"SQS account {label}: endpoint_url must be an http(s) URL")
    digest = hashlib.sha256()
    for path in (creds_path, config_path):
        digest.update(path.read_bytes() + b"\0")
    return AccountFiles(label, access_key, secret_key, creds.get("aws_session_token") or None, region,
                        endpoint, digest.hexdigest())


def scan_certs(root: Path) -> tuple[dict[str, AccountFiles], dict[str, str]]:
    """Every account folder under ``root``: the readable ones by label, and the problem of each other one.
    A missing or unreadable root raises OSError (the caller keeps what it had)."""
    accounts: dict[str, AccountFiles] = {}
    problems: dict[str, str] = {}
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_dir():  # follows symlinks, like a secret mount
            continue
        try:
            accounts[entry.name] = read_account(Path(entry.path))
        except AccountError as exc:
            problems[entry.name] = str(exc)
    return accounts, problems


def _isolated_session(files: AccountFiles) -> boto3.session.Session:
    # session_vars without environment names: AWS_PROFILE, AWS_CONFIG_FILE etc. are not consulted
    isolated = {"profile": (None, None, None, None),
                "config_file": (None, None, os.devnull, None),
                "credentials_file": (None, None, os.devnull, None),
                "ignore_configured_endpoint_urls": (None, None, True, None)}
    core = botocore.session.Session(session_vars=isolated)
    return boto3.session.Session(aws_access_key_id=files.access_key, aws_secret_access_key=files.secret_key,
                                 aws_session_token=files.session_token, region_name=files.region,
                                 botocore_session=core)


class Account:
    """One account's SQS clients: ``client`` for short calls, ``poll_client`` for long polls (its read
    timeout outlasts ``WaitTimeSeconds``). boto3 clients are thread-safe; build this in a worker thread."""

    def __init__(self, files: AccountFiles, timeout: float, long_poll: float) -> None:
        self.files = files
        self.label = files.label
        session = _isolated_session(files)
        retries: Any = {"mode": "standard", "max_attempts": 3}

        def make(read_timeout: float) -> Any:
            config = Config(connect_timeout=min(timeout, 10.0), read_timeout=read_timeout, retries=retries,
                            max_pool_connections=50)
            return session.client("sqs", endpoint_url=files.endpoint_url, config=config)

        self.client = make(timeout)
        self.poll_client = make(long_poll + timeout)
        self._set_aside: dict[str, str] = {}

    def list_queues(self, prefix: str = "") -> dict[str, str]:
        """Queue name -> URL of every queue these credentials see (all pages). The name is the URL's last
        path segment, compared exactly (the Go runner's 2021 suffix test matched the wrong way round)."""
        kwargs: dict[str, Any] = {"MaxResults": 1000}
        if prefix:
            kwargs["QueueNamePrefix"] = prefix
        found: dict[str, str] = {}
        while True:
            page = self.client.list_queues(**kwargs)
            for url in page.get("QueueUrls", []):
                found[url.rstrip("/").rsplit("/", 1)[-1]] = url
            token = page.get("NextToken")
            if not token:
                return found
            kwargs["NextToken"] = token

    def set_aside_url(self, name: str) -> str:
        """This account's set-aside queue ``name`` (created on first use; CreateQueue is idempotent)."""
        url = self._set_aside.get(name)
        if url is None:
            url = self.client.create_queue(QueueName=name,
                                           Attributes={"MessageRetentionPeriod": RETENTION})["QueueUrl"]
            self._set_aside[name] = url
        return url

    def sweep_hold_queues(self, listing: dict[str, str], grace: float, set_aside: str) -> None:
        """Return to their queues the continued messages whose holder stopped renewing them: visible in
        their private ``studio-runner-hold-`` queue and sent there more than ``grace`` seconds ago (the
        backend's module docstring explains the design). Each private queue holds one message and goes
        with it."""
        for name, url in listing.items():
            if not name.startswith(HOLD_PREFIX):
                continue
            try:
                moved = False
                for message in receive(self.client, url, 30, count=10):
                    moved = self._return_continued(listing, url, message, grace, set_aside) or moved
                if moved:
                    self.client.delete_queue(QueueUrl=url)
            except Exception as exc:  # the next rescan tries again
                log.debug("sweeping continuation queue %s of account %s: %s", name, self.label, exc)

    def _return_continued(self, listing: dict[str, str], url: str, message: dict[str, Any], grace: float,
                          set_aside: str) -> bool:
        attrs = message_attributes(message)
        sent = float(attrs.get(CONTINUED_AT_ATTR) or 0)
        if time.time() - sent < grace:  # its holder may be about to receive it: leave it
            self.client.change_message_visibility(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"],
                                                  VisibilityTimeout=0)
            return False
        origin = attrs.get(ORIGIN_QUEUE_ATTR, "")
        attempt = as_int(attrs.get(ATTEMPT_ATTR), 1) + 1
        copy: dict[str, object] = {ATTEMPT_ATTR: attempt,
                                   ORIGIN_ID_ATTR: attrs.get(ORIGIN_ID_ATTR) or message["MessageId"]}
        target = listing.get(origin) if origin and not origin.startswith(OWN_PREFIX) else None
        if target is None:
            target = self.set_aside_url(set_aside)
            copy[REASON_ATTR] = (f"fault: its runner stopped while it ran past the SQS visibility cap and "
                                 f"its queue {origin!r} no longer exists")
            copy[ORIGIN_QUEUE_ATTR] = origin
            log.warning("a continued message of deleted queue %s (account %s) lost its runner: set aside",
                        origin, self.label)
        else:
            log.warning("a continued message of queue %s (account %s) lost its runner: back in its queue as "
                        "attempt %d", origin, self.label, attempt)
        send(self.client, target, str(message["Body"]), copy)
        self.client.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
        return True

    def close(self) -> None:
        for client in (self.client, self.poll_client):
            try:
                client.close()
            except Exception:  # closing is best effort: old botocore versions have no close()
                pass
