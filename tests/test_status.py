"""The status server and its /status document: the JSON schema (the TUI's contract), output tails, the HTTP
behaviour (routes, keep-alive, limits, garbage, loopback-only control) over real sockets, and a real runner
watched while a real experiment runs."""

from __future__ import annotations

import errno
import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import trio
from support.studioml_client import cache_root

from studio_runner import config, runtime, statusserver
from studio_runner.attempt import Action, Outcome, Phase, Status
from studio_runner.events import Registry
from studio_runner.gpus import GpuPool, open_gpu_backend
from studio_runner.resources import Capacity, Ledger
from studio_runner.status import TAIL_LINE_CHARS, TAIL_LINES, OutputTails, StatusApp, status_schema
from studio_runner.statusserver import is_loopback, serve_status
from studio_runner.submit import Submission, submit

STATES = ("Running", "DrainAndSuspend", "DrainAndTerminate", "ShuttingDown")


class FakeSupervisor:
    """The attributes StatusApp reads of the Supervisor, with a registry of its own."""

    def __init__(self, registry: Registry, ledger: Ledger | None = None) -> None:
        self.registry = registry
        self.intake_state, self.intake_reason, self.intake_since = "Running", "", time.time()
        self.calls: list[tuple[str, str]] = []
        self.ledger = ledger

    def set_intake_state(self, state: str, reason: str) -> None:
        if state not in STATES:
            raise ValueError(f"unknown intake state {state!r}")
        self.calls.append((state, reason))
        self.intake_state, self.intake_reason, self.intake_since = state, reason, time.time()

    def served_queues(self) -> list[dict[str, object]]:
        return [{"backend": "local", "name": "local_q", "paused_for_s": None, "note": ""},
                {"backend": "local", "name": "local_big", "paused_for_s": 12.5, "note": "can never fit"}]


def validate(document: dict[str, Any]) -> None:
    jsonschema.validate(document, status_schema(), cls=jsonschema.Draft202012Validator)


def gpu_ledger(tmp_path: Path) -> Ledger:
    fake = tmp_path / "gpus.json"
    fake.write_text(json.dumps([{"uuid": "GPU-a", "memory": "16GiB", "used": "1GiB", "utilisation": 40,
                                 "slots": 4}, {"uuid": "GPU-b", "memory": "8GiB"}]))
    pool = GpuPool(open_gpu_backend(False, str(fake), None))
    return Ledger(Capacity(cores=8, ram=16 << 30, disk_cap=100 << 30), tmp_path, pool)


def test_the_document_matches_the_schema_and_the_runner_state(tmp_path: Path) -> None:
    registry = Registry("host-s")
    ledger = gpu_ledger(tmp_path)
    app = StatusApp(FakeSupervisor(registry), ledger=ledger)  # type: ignore[arg-type]
    empty = app.document()
    validate(empty)
    assert empty["running"] == [] and empty["totals"] == {"completed": 0, "succeeded": 0, "failed": 0}
    assert empty["caches"] == {"artifacts": None, "envs": None}

    live = registry.claim("local_q", "local", "m1", 2)
    registry.identify(live, "exp_live", "proj")
    registry.reserved(live, 2, 1 << 30, "GPU-a")
    ledger.reserve(live.attempt_id, __import__("studio_runner.resources", fromlist=["Demand"]).Demand(
        2, 1 << 30, 1 << 20))
    registry.phase(live, Phase.RUNNING)
    registry.usage(live, 97.52, 123456, {4321})
    registry.output(live, "step 1")
    registry.output(live, "step 2")
    done = registry.claim("local_q", "local", "m2", 1)
    registry.identify(done, "exp_done", "")
    registry.finish(done, Outcome(key="exp_done", status=Status.FAILED, action=Action.ACK, reason="exit 3"))
    registry.settle(done, Action.ACK)

    doc = app.document()
    validate(doc)
    [running] = doc["running"]
    assert running["key"] == "exp_live" and running["phase"] == "running" and running["attempt"] == 2
    assert running["output_tail"] == ["step 1", "step 2"]
    assert (running["cores"], running["ram"], running["gpus"], running["cpu_percent"]) == (2, 1 << 30,
                                                                                          "GPU-a", 97.5)
    [finished] = doc["finished"]
    assert (finished["key"], finished["status"], finished["action"], finished["reason"]) == (
        "exp_done", "failed", "ack", "exit 3")
    assert doc["totals"] == {"completed": 1, "succeeded": 0, "failed": 1}
    assert doc["resources"]["cores"] == {"total": 8, "free": 6}
    assert doc["resources"]["disk"]["total"] == 100 << 30
    assert [c["uuid"] for c in doc["gpus"]["cards"]] == ["GPU-a", "GPU-b"]
    assert doc["gpus"]["backend"] == "fake" and doc["gpus"]["cards"][0]["utilisation"] == 40
    assert doc["queues"][1] == {"backend": "local", "name": "local_big", "paused_for_s": 12.5,
                                "note": "can never fit"}
    bad = dict(doc, intake={"state": "Sleeping", "reason": "", "since": 0.0})
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)  # the schema is strict enough to catch a wrong state
    with pytest.raises(jsonschema.ValidationError):
        validate({k: v for k, v in doc.items() if k != "gpus"})  # and a missing key


def test_output_tails_are_bounded_and_dropped_when_the_attempt_settles() -> None:
    registry = Registry("h")
    tails = OutputTails()
    registry.bus.subscribe(tails)
    record = registry.claim("local_q", "local", "m", 1)
    for n in range(TAIL_LINES + 30):
        registry.output(record, f"line {n}")
    registry.output(record, "x" * (TAIL_LINE_CHARS * 3))
    tail = tails.tail(record.attempt_id)
    assert len(tail) == TAIL_LINES and tail[0] == "line 31" and len(tail[-1]) == TAIL_LINE_CHARS
    registry.finish(record, Outcome(key="k", status=Status.SUCCESS, action=Action.ACK))
    registry.settle(record, Action.ACK)
    assert len(tails) == 0 and tails.tail(record.attempt_id) == []
    registry.output(record, "late line")  # a straggler after settlement never re-creates the tail
    assert len(tails) == 0


def serve(app: Any, address: str = "127.0.0.1:0"):  # type: ignore[no-untyped-def]
    """Run ``body(address)`` against a status server on ``address`` in one trio run."""

    def run(body: Any) -> Any:
        async def main() -> Any:
            async with trio.open_nursery() as nursery:
                bound = await nursery.start(serve_status, address, app)
                result = await body(bound)
                nursery.cancel_scope.cancel()
            return result

        return trio.run(main)

    return run


def fake_app(tmp_path: Path) -> tuple[StatusApp, FakeSupervisor]:
    supervisor = FakeSupervisor(Registry("h"))
    return StatusApp(supervisor, ledger=gpu_ledger(tmp_path)), supervisor  # type: ignore[arg-type]


async def raw(address: str, data: bytes, read_for: float = 2.0) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it (or ``read_for`` passes)."""
    host, port = statusserver.split_address(address)
    stream = await trio.open_tcp_stream(host, port)
    got = b""
    async with stream:
        await stream.send_all(data)
        with trio.move_on_after(read_for):
            try:
                while chunk := await stream.receive_some(65536):
                    got += chunk
            except trio.BrokenResourceError:  # a reset: what arrived before it is the answer
                pass
    return got


def test_routes_methods_and_intake_control(tmp_path: Path) -> None:
    app, supervisor = fake_app(tmp_path)

    async def body(address: str) -> None:
        async with httpx.AsyncClient(base_url=f"http://{address}", timeout=5) as client:
            health = await client.get("/healthz")
            assert (health.status_code, health.text) == (200, "ok\n")
            status = await client.get("/status?pretty=1")
            assert status.headers["content-type"] == "application/json"
            validate(status.json())
            metrics = await client.get("/metrics")
            assert "runner_resource_gpu_free_slots" in metrics.text
            assert (await client.get("/nope")).status_code == 404
            wrong = await client.post("/status", content=b"{}")
            assert wrong.status_code == 405 and wrong.headers["allow"] == "GET, HEAD"
            assert (await client.get("/intake")).status_code == 405
            head = await client.head("/status")
            assert head.status_code == 200 and head.content == b""
            drain = await client.post("/intake", json={"state": "DrainAndSuspend"})
            assert drain.status_code == 200, drain.text
            assert drain.json() == {"state": "DrainAndSuspend", "reason": "POST /intake from 127.0.0.1"}
            assert (await client.get("/status")).json()["intake"]["state"] == "DrainAndSuspend"
            resume = await client.post("/intake", json={"state": "Running", "reason": "tui"})
            assert resume.json() == {"state": "Running", "reason": "tui"}
            for bad in (b"not json", b"[]", b'{"state": 3}', b'{"state": "Sleeping"}'):
                reply = await client.post("/intake", content=bad)
                assert reply.status_code == 400, bad
                assert "error" in reply.json()

    serve(app)(body)
    assert supervisor.calls == [("DrainAndSuspend", "POST /intake from 127.0.0.1"), ("Running", "tui")]


def test_keep_alive_pipelining_and_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(statusserver, "REQUEST_TIMEOUT", 0.5)
    app, _ = fake_app(tmp_path)

    async def body(address: str) -> None:
        get = b"GET /healthz HTTP/1.1\r\nhost: x\r\n"
        two = await raw(address, get + b"\r\n" + get + b"connection: close\r\n\r\n")
        assert two.count(b"HTTP/1.1 200") == 2  # two requests answered on one connection, then closed
        huge_head = await raw(address, get + b"x-pad: " + b"a" * 40000 + b"\r\n\r\n")
        assert huge_head.startswith(b"HTTP/1.1 4")
        big_body = await raw(address, b"POST /intake HTTP/1.1\r\nhost: x\r\ncontent-length: 9999999\r\n\r\n{")
        assert big_body.startswith(b"HTTP/1.1 413")
        start = trio.current_time()
        slow = await raw(address, b"GET /status HTTP/1.1\r\nhost: x\r\n", read_for=5)  # never finishes
        assert slow == b"" and trio.current_time() - start < 3  # dropped after REQUEST_TIMEOUT
        async with httpx.AsyncClient(base_url=f"http://{address}") as client:
            assert (await client.get("/healthz")).status_code == 200

    serve(app)(body)


def test_garbage_never_takes_the_server_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random bytes, truncated and malformed requests: each is answered with a 4xx or dropped (incomplete
    ones after the request timeout), and the server keeps serving."""
    import random

    monkeypatch.setattr(statusserver, "REQUEST_TIMEOUT", 0.3)
    monkeypatch.setattr(statusserver, "KEEP_ALIVE", 0.5)  # "GET / HTTP/9.9" is valid: 404, kept alive
    app, _ = fake_app(tmp_path)
    rng = random.Random(8)
    junk = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000))) for _ in range(16)]
    junk += [b"\r\n\r\n", b"GET\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc",
             b"GET /status HTTP/1.1\r\nhost: x\r\ncontent-length: -5\r\n\r\n",
             b"POST /intake HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"]

    async def body(address: str) -> None:
        for data in junk:
            start = trio.current_time()
            got = await raw(address, data, read_for=5.0)
            assert got == b"" or got.startswith(b"HTTP/1.1 4"), got[:80]
            assert trio.current_time() - start < 2.5  # the server closed it: nothing hangs
        async with httpx.AsyncClient(base_url=f"http://{address}") as client:
            assert (await client.get("/healthz")).status_code == 200
            validate((await client.get("/status")).json())

    serve(app)(body)


def non_loopback_address() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.255.255.255", 1))  # no packet is sent: only picks the outgoing interface
            address = str(probe.getsockname()[0])
    except OSError:
        return None
    return None if is_loopback(address) or address == "0.0.0.0" else address


@pytest.mark.expected_skip("needs a non-loopback IPv4 address on this machine")
def test_intake_control_is_refused_to_non_loopback_clients(tmp_path: Path) -> None:
    ip = non_loopback_address()
    if ip is None:
        pytest.skip("no non-loopback IPv4 address")
    app, supervisor = fake_app(tmp_path)

    async def body(address: str) -> None:
        port = statusserver.split_address(address)[1]
        async with httpx.AsyncClient(base_url=f"http://{ip}:{port}") as client:
            assert (await client.get("/healthz")).status_code == 200  # probes from the network are fine
            refused = await client.post("/intake", json={"state": "DrainAndSuspend"})
            assert refused.status_code == 403

    serve(app, "0.0.0.0:0")(body)
    assert supervisor.calls == []


def test_loopback_addresses() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("10.0.0.1") and not is_loopback("::ffff:10.0.0.1") and not is_loopback("")
    assert statusserver.join_address("::1", 80) == "[::1]:80"
    assert statusserver.split_address("[::1]:9090") == ("::1", 9090)
    assert statusserver.split_address(":9090") == ("127.0.0.1", 9090)


def test_binding_a_taken_port_raises_an_oserror_naming_the_address(tmp_path: Path) -> None:
    app, _ = fake_app(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"

        async def main() -> OSError | None:
            async with trio.open_nursery() as nursery:
                try:
                    await nursery.start(serve_status, address, app)
                except OSError as exc:
                    return exc
                nursery.cancel_scope.cancel()
            return None

        error = trio.run(main)
    assert error is not None and address in str(error) and error.errno == errno.EADDRINUSE


def test_a_real_runner_watched_while_its_experiment_runs(tmp_path: Path) -> None:
    """A real experiment prints lines and waits: /status (schema-valid) shows it running with its output
    tail, POST /intake drains and resumes the real supervisor, and the finished list and totals follow."""
    queue_root, work, store = tmp_path / "queue", tmp_path / "work", tmp_path / "store"
    queue_root.mkdir()
    work.mkdir()
    go = tmp_path / "go"
    script = tmp_path / "ws" / "train.py"
    script.parent.mkdir()
    script.write_text("import os, time\n"
                      "for n in range(60):\n    print('tick', n, flush=True)\n"
                      f"while not os.path.exists({str(go)!r}):\n    time.sleep(0.05)\n"
                      "print('done', flush=True)\n")
    key = f"exp_status_{int(time.time())}"
    submit(Submission(script=script, queue="local_status", experiment=key, project="proj_s", hdd="10m",
                      ram="64m"), queue_root, store)
    settings = config.resolve({"queue_root": str(queue_root), "working_dir": str(work),
                               "env_cache_dir": str(cache_root() / "envs"), "poll_interval": "0.05s",
                               "local_storage_roots": str(tmp_path)},
                              environ={})
    seen: list[dict[str, Any]] = []

    async def main() -> dict[str, Any]:
        async with runtime.open_runner(settings) as supervisor, trio.open_nursery() as nursery:
            app = StatusApp(supervisor, host=settings.hostname)
            address = await nursery.start(serve_status, "127.0.0.1:0", app)
            nursery.start_soon(supervisor.run)
            async with httpx.AsyncClient(base_url=f"http://{address}", timeout=10) as client:
                with trio.fail_after(120):
                    while True:
                        doc = (await client.get("/status")).json()
                        seen.append(doc)
                        tail = doc["running"][0]["output_tail"] if doc["running"] else []
                        if "tick 59" in tail:
                            break
                        await trio.sleep(0.1)
                validate(doc)
                drain = await client.post("/intake", json={"state": "DrainAndSuspend"})
                assert drain.json()["state"] == "DrainAndSuspend"
                assert supervisor.intake_state == "DrainAndSuspend"
                assert (await client.post("/intake", json={"state": "Running"})).json()["state"] == "Running"
                go.write_text("")
                with trio.fail_after(60):
                    while not (doc := (await client.get("/status")).json())["finished"]:
                        await trio.sleep(0.1)
                validate(doc)
            supervisor.shutdown()
            nursery.cancel_scope.cancel()
        return doc

    doc = trio.run(main)
    running = [d["running"][0] for d in seen if d["running"]]
    last = running[-1]
    assert last["key"] == key and last["project"] == "proj_s" and last["queue"] == "local_status"
    assert last["phase"] == "running" and last["pid"] is not None and last["cores"] >= 1
    assert last["output_tail"][-1] == "tick 59" and len(last["output_tail"]) == TAIL_LINES
    assert last["bytes_downloaded"] > 0
    assert doc["running"] == [] and doc["finished"][-1]["key"] == key
    assert doc["finished"][-1]["status"] == "success" and doc["totals"]["succeeded"] == 1
    assert doc["queues"] and doc["queues"][0]["name"] == "local_status"
    assert doc["caches"]["envs"]["dir"] == str(cache_root() / "envs")
    assert doc["uptime_s"] > 0 and doc["resources"]["cores"]["total"] >= 1
