"""RabbitMQ management API and URL helpers for the RabbitMQ backend.

The AMQP protocol cannot list queues or tell a deleted queue from a network fault, so discovery, the
abort watch (queue deleted) and the broker version come from the management plugin's HTTP API, exactly
as the Go runner did. Everything here is blocking (httpx sync client); the backend runs it in
``trio.to_thread`` workers.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import httpx
import pika.adapters.utils.connection_workflow as cw
import pika.exceptions as pex

from studio_runner.redact import mask_patterns

EXCHANGE = "StudioML.topic"
ROUTING_PREFIX = "StudioML."
RESPONSE_SUFFIX = "_response"

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class MgmtError(Exception):
    """The management API could not answer (unreachable, refused, unexpected status or body)."""


def expand_env(text: str, env: Mapping[str, str] | None = None) -> str:
    """Expand ``${VAR}`` from the runner environment, so credentials can stay out of the command line.

    Unknown variables expand to the empty string, as Go's ``os.ExpandEnv`` does.
    """
    values = os.environ if env is None else env
    return _VAR.sub(lambda m: values.get(m.group(1), ""), text)


def mask_url(url: str) -> str:
    """The URL with its password masked: the only form of a broker URL we ever log."""
    return mask_patterns(url)


def _innermost(exc: BaseException) -> BaseException:
    """The cause inside pika's wrappers, whose own str() is empty (AMQPConnectionError(
    AMQPConnectorSocketConnectError(ConnectionRefusedError())) prints as '')."""
    for _ in range(10):  # wrappers nest a few levels at most
        if isinstance(exc, pex.AMQPConnectionError) and exc.args and isinstance(exc.args[0], BaseException):
            exc = exc.args[0]
        elif isinstance(exc, cw.AMQPConnectionWorkflowFailed) and exc.exceptions:
            exc = exc.exceptions[-1]
        elif isinstance(exc, cw.AMQPConnectorPhaseErrorBase) and exc.exception is not None:
            exc = exc.exception
        else:
            break
    return exc


def describe_amqp_error(exc: BaseException, host: str, port: int) -> str:
    """Why connecting to (or talking with) the broker at ``host:port`` failed, in plain words with any
    credentials masked: 'connection refused by 127.0.0.1:1', never the empty text pika's errors print."""
    cause = _innermost(exc)
    where = f"{host}:{port}"
    if isinstance(cause, (pex.ProbableAuthenticationError, pex.AuthenticationError)):
        text = f"{where} refused the user name or password"
    elif isinstance(cause, pex.ProbableAccessDeniedError):
        text = f"{where} denied access; may the user use this virtual host?"
    elif isinstance(cause, ConnectionRefusedError):
        text = f"connection refused by {where}; is a broker running on that port?"
    elif isinstance(cause, socket.gaierror):
        text = f"cannot resolve host {host!r} ({cause.strerror or cause})"
    elif isinstance(cause, (TimeoutError, socket.timeout, cw.AMQPConnectorStackTimeout)):
        text = f"timed out connecting to {where}"
    elif isinstance(cause, ssl.SSLError):
        text = f"TLS handshake with {where} failed ({cause.reason or cause})"
    elif isinstance(cause, pex.IncompatibleProtocolError):
        text = f"{where} does not speak AMQP 0-9-1; is that the broker's AMQP port?"
    elif isinstance(cause, pex.ConnectionClosedByBroker):
        text = f"{where} closed the connection ({cause.reply_code} {cause.reply_text})"
    elif isinstance(cause, OSError) and cause.strerror:
        text = f"{cause.strerror.lower()} ({where})"
    else:
        detail = str(cause) or repr(cause)
        text = f"{type(cause).__name__}: {detail}" if type(cause).__name__ not in detail else detail
    return mask_patterns(text)


def amqp_vhost(amqp_url: str) -> str:
    """The virtual host of an AMQP URL (pika's rule: first path segment, unquoted; default ``/``)."""
    path = urlsplit(amqp_url).path
    if len(path) > 1:
        return unquote(path.split("/")[1])
    return "/"


def amqp_credentials(amqp_url: str) -> tuple[str, str]:
    """User and password of an AMQP URL (pika's default guest/guest when absent)."""
    parts = urlsplit(amqp_url)
    if parts.username is None:
        return "guest", "guest"
    return unquote(parts.username), unquote(parts.password or "")


def derive_mgmt_url(amqp_url: str) -> str:
    """Go's rule: same host, AMQP port + 10000, ``http`` for ``amqp`` and ``https`` for ``amqps``; where that
    is past 65535 (Go's rule breaks), the management plugin's default port 15672.

    The credentials are not copied into the result; :class:`RabbitMgmt` takes them from the AMQP URL.
    """
    parts = urlsplit(amqp_url)
    tls = parts.scheme.lower() == "amqps"
    port = parts.port or (5671 if tls else 5672)
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    mgmt_port = port + 10000 if port + 10000 <= 65535 else 15672
    return f"{'https' if tls else 'http'}://{host}:{mgmt_port}"


def parse_version(text: str) -> tuple[int, ...]:
    """``"3.11.15"`` → ``(3, 11, 15)``; suffixes such as ``-rc.1`` or ``+build`` are ignored."""
    numbers: list[int] = []
    for piece in re.split(r"[.\-+]", text.strip()):
        if not piece.isdigit():
            break
        numbers.append(int(piece))
    return tuple(numbers)


def honours_consumer_timeout_arg(version: tuple[int, ...]) -> bool:
    """Whether the broker applies the per-consumer ``x-consumer-timeout`` argument (3.11.15+, 3.12+).

    Measured on 3.10.8: the argument is accepted and ignored (node timeout 3 s, argument 600 s: the channel
    was closed after 3 s).
    """
    if len(version) < 2:
        return False
    if version[:2] >= (3, 12):
        return True
    return version[:2] == (3, 11) and len(version) > 2 and version[2] >= 15


def studio_queues(bindings: list[dict[str, Any]]) -> list[str]:
    """Queue names bound to ``StudioML.topic`` with a ``StudioML.`` routing key, minus ``*_response``."""
    names: set[str] = set()
    for binding in bindings:
        if not isinstance(binding, dict):
            continue
        name = binding.get("destination")
        if (
            binding.get("source") == EXCHANGE
            and binding.get("destination_type") == "queue"
            and str(binding.get("routing_key", "")).startswith(ROUTING_PREFIX)
            and isinstance(name, str)
            and name
            and not name.endswith(RESPONSE_SUFFIX)
        ):
            names.add(name)
    return sorted(names)


class RabbitMgmt:
    """A small blocking client for the few management endpoints the runner needs."""

    def __init__(self, mgmt_url: str, amqp_url: str, timeout: float = 10.0) -> None:
        parts = urlsplit(mgmt_url)
        if parts.username is not None:
            auth = (unquote(parts.username), unquote(parts.password or ""))
        else:
            auth = amqp_credentials(amqp_url)
        host = parts.hostname or "localhost"
        if ":" in host:
            host = f"[{host}]"
        netloc = host + (f":{parts.port}" if parts.port else "")
        self.base_url = urlunsplit((parts.scheme or "http", netloc, parts.path.rstrip("/"), "", ""))
        self._client = httpx.Client(base_url=self.base_url, auth=auth, timeout=timeout)

    def _get(self, path: str) -> httpx.Response:
        try:
            return self._client.get(path)
        except httpx.HTTPError as exc:
            raise MgmtError(f"management API {self.base_url}{path}: {type(exc).__name__}: {exc}") from None

    def _json(self, path: str) -> Any:
        response = self._get(path)
        if response.status_code != 200:
            raise MgmtError(f"management API {self.base_url}{path}: HTTP {response.status_code}")
        try:
            return response.json()
        except ValueError:
            raise MgmtError(f"management API {self.base_url}{path}: answer is not JSON") from None

    def overview(self) -> dict[str, Any]:
        """``GET /api/overview`` (holds ``rabbitmq_version``)."""
        data = self._json("/api/overview")
        if not isinstance(data, dict):
            raise MgmtError("management API /api/overview: answer is not an object")
        return data

    def bindings(self, vhost: str) -> list[dict[str, Any]]:
        """``GET /api/bindings/<vhost>``."""
        data = self._json(f"/api/bindings/{quote(vhost, safe='')}")
        if not isinstance(data, list):
            raise MgmtError("management API /api/bindings: answer is not a list")
        return data

    def queue(self, vhost: str, name: str) -> dict[str, Any] | None:
        """``GET /api/queues/<vhost>/<name>``: the queue's description, or None when it does not exist."""
        path = f"/api/queues/{quote(vhost, safe='')}/{quote(name, safe='')}"
        response = self._get(path)
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise MgmtError(f"management API {self.base_url}{path}: HTTP {response.status_code}")
        try:
            data = response.json()
        except ValueError:
            raise MgmtError(f"management API {self.base_url}{path}: answer is not JSON") from None
        return data if isinstance(data, dict) else {}

    def close(self) -> None:
        self._client.close()
