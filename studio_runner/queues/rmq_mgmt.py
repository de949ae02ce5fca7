"""RabbitMQ management API and URL helpers for the RabbitMQ backend.

The AMQP protocol cannot list queues or tell a deleted queue from a network fault, so discovery, the
abort watch (queue deleted) and the broker version come from the management plugin's HTTP API, exactly
as the Go runner did. Everything here is blocking (httpx sync client); the backend runs it in
``trio.to_thread`` workers.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import httpx

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
    """Go's rule: same host, AMQP port + 10000, ``http`` for ``amqp`` and ``https`` for ``amqps``.

    The credentials are not copied into the result; :class:`RabbitMgmt` takes them from the AMQP URL.
    """
    parts = urlsplit(amqp_url)
    tls = parts.scheme.lower() == "amqps"
    port = parts.port or (5671 if tls else 5672)
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port + 10000}"


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
