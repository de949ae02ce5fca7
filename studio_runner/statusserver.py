"""The status server: ``GET /metrics``, ``GET /status``, ``GET /healthz`` and ``POST /intake`` over HTTP/1.1.

trio + h11, the way trio's documentation serves HTTP (h11's trio example), in the runner's own loop: the
handlers read the runner's objects in the trio thread, where they are consistent, and never block it for
long (building the status document or the metrics costs well under a millisecond per running attempt).

It faces the network when bound to ``0.0.0.0`` for Kubernetes probes, so it is defensive: request heads are
bounded (:data:`MAX_HEAD`), bodies too (:data:`MAX_BODY`, 413 beyond), a client gets :data:`REQUEST_TIMEOUT`
seconds to send a request once it started and :data:`KEEP_ALIVE` seconds of silence between requests, at most
:data:`MAX_CONNECTIONS` connections are served at once (more are closed at once), and garbage is answered
with 400 and a closed connection, never with an exception in the runner. ``POST /intake`` (drain / resume)
is answered only for loopback clients (403 otherwise): control must never be reachable from the network.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import h11
import trio

from studio_runner.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

log = logging.getLogger("studio_runner.statusserver")

MAX_HEAD = 16 * 1024
MAX_BODY = 64 * 1024
REQUEST_TIMEOUT = 10.0
KEEP_ALIVE = 60.0
MAX_CONNECTIONS = 64
LINGER = 1.0
"""Seconds a closing connection drains what the client still sends (see _close)."""
_SERVER = b"studio-runner"
_ROUTES = {"/metrics": ("GET", "HEAD"), "/status": ("GET", "HEAD"), "/healthz": ("GET", "HEAD"),
           "/intake": ("POST",)}


class StatusSource(Protocol):
    """What the server serves (:class:`studio_runner.status.StatusApp`)."""

    def document(self) -> dict[str, Any]: ...

    def metrics_text(self) -> bytes: ...

    def set_intake(self, state: str, reason: str) -> dict[str, str]: ...


@dataclass
class _Reply:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    extra: tuple[tuple[str, str], ...] = ()


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``; empty host = loopback) into host and port; ValueError if malformed."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


async def serve_status(address: str, app: StatusSource, *,
                       task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` on ``address`` (``HOST:PORT``; port 0 picks a free port) until cancelled.

    Use it with ``await nursery.start(serve_status, address, app)``, which returns the bound ``host:port``.
    Binding fails with an OSError naming the address (port taken, unknown host): the caller decides whether
    the runner starts without the endpoint."""
    host, port = split_address(address)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        message = f"cannot serve status and metrics on {address}: {exc.strerror or exc}"
        raise (OSError(exc.errno, message) if exc.errno else OSError(message)) from exc
    bound = listeners[0].socket.getsockname()
    where = join_address(host, bound[1])
    log.debug("status and metrics on http://%s/ (GET /metrics, /status, /healthz)", where)
    task_status.started(where)
    slots = trio.Semaphore(MAX_CONNECTIONS)
    await trio.serve_listeners(partial(_connection, app, slots), listeners)


async def _connection(app: StatusSource, slots: trio.Semaphore, stream: trio.SocketStream) -> None:
    """One client connection: requests one after another (keep-alive) until it closes or misbehaves."""
    try:
        slots.acquire_nowait()
    except trio.WouldBlock:
        await stream.aclose()
        return
    try:
        peer = _peer(stream)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        while True:
            try:
                got = await _read_request(conn, stream)
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    status = exc.error_status_hint if 400 <= exc.error_status_hint < 600 else 400
                    await _send(conn, stream, None, _Reply(status, f"bad request: {exc}\n".encode()))
                return
            if got is None:
                return  # closed, or silent past the keep-alive / request timeout
            request, body = got
            if body is None:
                await _send(conn, stream, request, _Reply(413, b"request body too large\n"), close=True)
                return
            await _send(conn, stream, request, _respond(app, request, body, peer))
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, h11.LocalProtocolError):
        pass  # the client went away, or broke the protocol past the point of an answer
    except Exception:  # never let a client take the server (or the runner) down
        log.exception("status server: error serving a client")
    finally:
        slots.release()
        await _close(stream)


async def _close(stream: trio.SocketStream) -> None:
    """Close gracefully: closing a socket with unread input sends a reset, which can destroy the error
    response still in flight (a 413, a 400), so half-close first and drain what the client still sends."""
    with trio.move_on_after(LINGER):
        try:
            await stream.send_eof()
            drained = 0
            while drained < MAX_BODY * 16 and (chunk := await stream.receive_some(MAX_HEAD)):
                drained += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    with trio.move_on_after(1):
        await stream.aclose()


def _peer(stream: trio.SocketStream) -> str:
    try:
        name = stream.socket.getpeername()
    except OSError:
        return ""
    return str(name[0]) if isinstance(name, tuple) else str(name)


async def _read_request(conn: h11.Connection, stream: trio.SocketStream
                        ) -> tuple[h11.Request, bytes | None] | None:
    """The next request and its body (None for a body over :data:`MAX_BODY`), or None when the client
    closed or stayed silent too long."""
    deadline = trio.current_time() + KEEP_ALIVE
    started = False
    request: h11.Request | None = None
    chunks: list[bytes] = []
    size = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            with trio.move_on_at(deadline):
                data = await stream.receive_some(MAX_HEAD)
                if not started and data:
                    started = True
                    deadline = min(deadline, trio.current_time() + REQUEST_TIMEOUT)
                conn.receive_data(data)
                continue
            return None  # too slow
        if isinstance(event, h11.Request):
            request = event
            length = _content_length(event)
            if length is not None and length > MAX_BODY:
                return event, None
        elif isinstance(event, h11.Data):
            size += len(event.data)
            if size > MAX_BODY:
                assert request is not None
                return request, None
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return request, b"".join(chunks)
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None


def _content_length(request: h11.Request) -> int | None:
    for name, value in request.headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _respond(app: StatusSource, request: h11.Request, body: bytes, peer: str) -> _Reply:
    path = request.target.split(b"?", 1)[0].decode("ascii", "replace")
    method = request.method.decode("ascii", "replace")
    allowed = _ROUTES.get(path)
    if allowed is None:
        return _Reply(404, b"not found: try /status, /metrics or /healthz\n")
    if method not in allowed:
        return _Reply(405, b"method not allowed\n", extra=(("allow", ", ".join(allowed)),))
    try:
        if path == "/healthz":
            return _Reply(200, b"ok\n")
        if path == "/metrics":
            return _Reply(200, app.metrics_text(), METRICS_CONTENT_TYPE)
        if path == "/status":
            return _json(200, app.document())
        return _intake(app, body, peer)
    except Exception as exc:
        log.exception("status server: %s %s failed", method, path)
        return _json(500, {"error": f"{type(exc).__name__}: {exc}"})


def _intake(app: StatusSource, body: bytes, peer: str) -> _Reply:
    if not is_loopback(peer):
        log.warning("status server: refused POST /intake from %s (loopback clients only)", peer)
        return _json(403, {"error": "intake control is only accepted from loopback clients"})
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return _json(400, {"error": 'expected a JSON body such as {"state": "DrainAndSuspend"}'})
    if not isinstance(payload, dict) or not isinstance(payload.get("state"), str):
        return _json(400, {"error": 'expected a JSON object with a "state" string'})
    reason = payload.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        reason = f"POST /intake from {peer}"
    try:
        result = app.set_intake(payload["state"], reason[:200])
    except ValueError as exc:
        return _json(400, {"error": str(exc)})
    return _json(200, result)


def _json(status: int, document: object) -> _Reply:
    return _Reply(status, json.dumps(document).encode() + b"\n", "application/json")


async def _send(conn: h11.Connection, stream: trio.SocketStream, request: h11.Request | None, reply: _Reply,
                close: bool = False) -> None:
    headers = [("content-type", reply.content_type), ("cache-control", "no-store"),
               ("server", _SERVER.decode()), ("content-length", str(len(reply.body))), *reply.extra]
    if close or request is None:
        headers.append(("connection", "close"))
    data = conn.send(h11.Response(status_code=reply.status, headers=headers))
    if request is None or request.method != b"HEAD":
        data = (data or b"") + (conn.send(h11.Data(data=reply.body)) or b"")
    data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
    with trio.move_on_after(REQUEST_TIMEOUT):
        await stream.send_all(data)
        return
    raise trio.BrokenResourceError("client too slow to read its response")


__all__ = ["serve_status", "split_address", "join_address", "is_loopback", "StatusSource"]
