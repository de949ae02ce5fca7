"""The TUI's only link to a runner: its HTTP status endpoint (GET /status, POST /intake).

Why HTTP and not the runner's internals: the runner runs on trio and the TUI on asyncio (Textual), possibly
in another process or container, and a runner restart must not take the TUI down. Every failure to reach the
runner is one exception type, :class:`Unreachable`, so that the app can show "disconnected — retrying" and
simply try again on the next tick.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:9090"
POLL_INTERVAL_S = 0.5
"""Under the issue's 1 s refresh target with room for one slow answer."""

INTAKE_STATES = ("Running", "DrainAndSuspend", "DrainAndTerminate")


class Unreachable(Exception):
    """The runner did not answer (refused, timed out, restarting) or answered something that is not status."""


class Refused(Exception):
    """The runner answered a control request with an error (403 from a non-loopback address, 400)."""


@dataclass(frozen=True)
class Poll:
    """One tick of the polling loop: the status document, or why there is none this time."""

    status: dict[str, Any] | None
    error: str = ""


def _reason(exc: BaseException) -> str:
    """A short, human reason; httpx's connection errors carry the OS message ("Connection refused")."""
    text = str(exc).strip()
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx.ConnectError):
        return text.rsplit("]", 1)[-1].strip() or "connection refused"
    return text or type(exc).__name__


class StatusClient:
    """An asynchronous client of one runner's status endpoint."""

    def __init__(self, url: str = DEFAULT_URL, *, timeout: float = 2.0,
                 interval: float = POLL_INTERVAL_S) -> None:
        self.url = url.rstrip("/")
        self.interval = interval
        # No connection reuse across a runner restart matters here: httpx reconnects on the next request.
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout, trust_env=False)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> StatusClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def fetch(self) -> dict[str, Any]:
        """GET /status once; :class:`Unreachable` for anything but a JSON object with status 200."""
        try:
            response = await self._http.get("/status")
            response.raise_for_status()
            document = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise Unreachable(_reason(exc)) from exc
        if not isinstance(document, dict):
            raise Unreachable("/status did not answer a JSON object")
        return document

    async def polls(self) -> AsyncIterator[Poll]:
        """Yield a :class:`Poll` every ``interval`` seconds, forever; errors are yielded, never raised."""
        while True:
            try:
                yield Poll(await self.fetch())
            except Unreachable as exc:
                yield Poll(None, str(exc))
            await asyncio.sleep(self.interval)

    async def set_intake(self, state: str) -> dict[str, Any]:
        """POST /intake {"state": state}; returns the runner's answer ({"state", "reason"})."""
        if state not in INTAKE_STATES:
            raise ValueError(f"intake state must be one of {', '.join(INTAKE_STATES)}, not {state!r}")
        try:
            response = await self._http.post("/intake", json={"state": state})
        except httpx.HTTPError as exc:
            raise Unreachable(_reason(exc)) from exc
        if response.status_code != 200:
            raise Refused(f"{response.status_code} {response.reason_phrase}: {response.text.strip()[:200]}")
        try:
            answer = response.json()
        except ValueError:
            answer = {}
        return answer if isinstance(answer, dict) else {}


__all__ = ["DEFAULT_URL", "INTAKE_STATES", "POLL_INTERVAL_S", "Poll", "Refused", "StatusClient",
           "Unreachable"]
