"""Response queues (spec/queues.md §4): the real runner, in-process and wired as ``runtime.serve`` wires it,
serves a real RabbitMQ queue whose ``<queue>_response`` exists; the reports it publishes there are read back
from the broker: states in order, the JSON lines the experiment printed, runner records, no secret; a failing
experiment ends with Failed and its error; with a key in --response-signatures-dir every report is sealed and
opens with the private key. The RabbitMQ Responder is checked on its own too, and the reporter's buffer with
a responder that never answers (an experiment is never held up by reports)."""

from __future__ import annotations

import json
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import rsa
from support.rabbitmq import (  # noqa: F401
    channel,
    declare_like_studioml,
    get_one,
    publish_like_studioml,
    rabbitmq_url_fixture,
    unique_queue_fixture,
)
from support.studioml_client import cache_root

from studio_runner import config, crypto, runtime
from studio_runner.attempt import Action, Outcome, Phase, Status
from studio_runner.events import Registry
from studio_runner.queues.rabbitmq import RabbitMQQueue
from studio_runner.reports import ResponseReporter, is_progress_line, start_reporter
from studio_runner.submit import Submission, build_request, pack_workspace

SECRET = "tok-Sup3rSecret-value-81x"
STATES = ("Prestart", "Started", "Stopping", "Success", "Failed")


# --------------------------------------------------------------------------- helpers


def declare_response_queue(amqp_url: str, queue: str) -> None:
    """What an experimenter's client does to receive reports: a durable ``<queue>_response`` queue."""
    with channel(amqp_url) as ch:
        ch.queue_declare(f"{queue}_response", durable=True)


def drain(amqp_url: str, queue: str) -> list[tuple[Any, bytes]]:
    """Every message now in ``queue``: (properties, body), in order."""
    out = []
    while (got := get_one(amqp_url, queue)) is not None:
        out.append((got[1], got[2]))
    return out


def publish_experiment(amqp_url: str, queue: str, tmp_path: Path, code: str, key: str) -> None:
    ws = tmp_path / "ws"
    ws.mkdir(exist_ok=True)
    (ws / "train.py").write_text(textwrap.dedent(code))
    store = tmp_path / "store"
    workspace = pack_workspace(ws, store)
    body = build_request(Submission(script=ws / "train.py", queue=queue, experiment=key, hdd="10m", ram="64m",
                                    env={"MY_API_TOKEN": SECRET}), store, workspace)
    declare_like_studioml(amqp_url, queue)
    publish_like_studioml(amqp_url, queue, body)


def run_runner(amqp_url: str, queue: str, tmp_path: Path, **options: str) -> tuple[list[Outcome], int]:
    """Serve ``queue`` once with the reporter started as runtime.serve starts it; returns the outcomes and the
    number of reports the reporter sent."""
    (tmp_path / "work").mkdir(exist_ok=True)
    settings = config.resolve({"amqp_url": amqp_url, "queue_match": f"^{queue}$",
                               "working_dir": str(tmp_path / "work"),
                               "env_cache_dir": str(cache_root() / "envs"), "poll_interval": "0.05s",
                               "local_storage_roots": str(tmp_path),
                               "response_signatures_dir": str(tmp_path / "response-keys"), **options},
                              environ={})

    async def main() -> tuple[list[Outcome], int]:
        async with runtime.open_runner(settings) as supervisor, trio.open_nursery() as nursery:
            reporter = await start_reporter(nursery, supervisor.registry, supervisor.backends,
                                            supervisor.s.gate.keyring, settings)
            assert reporter is not None
            with trio.fail_after(300):
                outcomes = await supervisor.run(once=True, handle_signals=False)
            await reporter.flush(30)
            nursery.cancel_scope.cancel()
        return outcomes, reporter.sent

    return trio.run(main)


def states(reports: list[dict[str, Any]]) -> list[str]:
    return [r["progress"]["state"] for r in reports if "progress" in r and "json" not in r["progress"]]


EXPERIMENT = """\
    import json, os, sys
    print("plain line, not a report")
    print(json.dumps({"epoch": 1, "loss": 0.5}))
    print(json.dumps([{"op": "add", "path": "/metrics", "value": {"acc": 0.9}}]))
    print(json.dumps({"token": os.environ["MY_API_TOKEN"]}))
    print(json.dumps({"epoch": 2, "loss": 0.25}), flush=True)
    sys.exit(int(os.environ.get("EXIT", "0")))
    """


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_a_response_queue_receives_the_states_and_progress_lines_in_order(rabbitmq_url: str,
                                                                           unique_queue: str,
                                                                           tmp_path: Path) -> None:
    key = f"exp_reports_{uuid.uuid4().hex[:8]}"
    publish_experiment(rabbitmq_url, unique_queue, tmp_path, EXPERIMENT, key)
    declare_response_queue(rabbitmq_url, unique_queue)

    outcomes, sent = run_runner(rabbitmq_url, unique_queue, tmp_path)
    assert [o.status for o in outcomes] == [Status.SUCCESS], outcomes

    messages = drain(rabbitmq_url, f"{unique_queue}_response")
    assert len(messages) == sent
    for props, body in messages:
        assert props.delivery_mode == 2 and props.content_type == "application/json"
        assert SECRET.encode() not in body
    reports = [json.loads(body) for _, body in messages]
    for report in reports:
        assert report["experimentId"] == key
        assert report["uniqueId"] == outcomes[0].attempt_id
        assert report["executorId"] and report["time"].endswith("Z")
    assert states(reports) == ["Prestart", "Started", "Stopping", "Success"]

    lines = [r["progress"]["json"] for r in reports if "json" in r.get("progress", {})]
    assert [json.loads(line) for line in lines] == [
        {"epoch": 1, "loss": 0.5}, [{"op": "add", "path": "/metrics", "value": {"acc": 0.9}}],
        {"token": "****"}, {"epoch": 2, "loss": 0.25}]
    assert all(r["progress"]["state"] == "Started" for r in reports if "json" in r.get("progress", {}))
    assert not any("plain line" in json.dumps(r) for r in reports)
    assert not any("studioml" in r.get("progress", {}).get("json", "") for r in reports)  # runner's own lines

    # order: Prestart, then the "start" record, Started, the lines, Stopping, the "stop" record, Success
    kinds = [r["progress"]["state"] if "progress" in r and "json" not in r["progress"]
             else "line" if "progress" in r else r["logging"]["message"] for r in reports]
    assert kinds[:3] == ["Prestart", "start", "Started"]
    assert kinds[-3:] == ["Stopping", "stop", "Success"]
    assert kinds[3:-3] == ["line"] * 4
    start = next(r["logging"] for r in reports if r.get("logging", {}).get("message") == "start")
    assert start["severity"] == "Info" and start["fields"]["queue"] == unique_queue
    stop = next(r["logging"] for r in reports if r.get("logging", {}).get("message") == "stop")
    assert stop["severity"] == "Info" and stop["fields"]["success"] == "True"
    assert stop["fields"]["exit_code"] == "0"


@pytest.mark.slow
def test_a_failing_experiment_ends_with_failed_and_its_error(rabbitmq_url: str, unique_queue: str,
                                                             tmp_path: Path) -> None:
    key = f"exp_reports_fail_{uuid.uuid4().hex[:8]}"
    code = EXPERIMENT.replace('os.environ.get("EXIT", "0")', '"3"')
    publish_experiment(rabbitmq_url, unique_queue, tmp_path, code, key)
    declare_response_queue(rabbitmq_url, unique_queue)

    outcomes, _ = run_runner(rabbitmq_url, unique_queue, tmp_path)
    assert [o.status for o in outcomes] == [Status.FAILED], outcomes

    reports = [json.loads(body) for _, body in drain(rabbitmq_url, f"{unique_queue}_response")]
    assert states(reports) == ["Prestart", "Started", "Stopping", "Failed"]
    last = reports[-1]["progress"]
    assert last["error"]["code"] == 3
    assert "3" in last["error"]["msg"]
    stop = next(r["logging"] for r in reports if r.get("logging", {}).get("message") == "stop")
    assert stop["severity"] == "Error" and stop["fields"]["success"] == "False"
    assert stop["fields"]["status"] == "failed" and stop["fields"]["error"]
    assert len([r for r in reports if "json" in r.get("progress", {})]) == 4


@pytest.mark.slow
def test_reports_are_sealed_for_the_response_key(rabbitmq_url: str, unique_queue: str,
                                                 tmp_path: Path) -> None:
    """A key whose file name prefixes ``<queue>_response``: every report is the hybrid seal of message.md §7
    (``b64(RSA-OAEP(k)),b64(nonce‖box)``) and opens with the experimenter's private key."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    keys = tmp_path / "response-keys"
    keys.mkdir()
    pem = private.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.PKCS1)
    (keys / unique_queue).write_bytes(pem)
    key = f"exp_reports_sealed_{uuid.uuid4().hex[:8]}"
    publish_experiment(rabbitmq_url, unique_queue, tmp_path, EXPERIMENT, key)
    declare_response_queue(rabbitmq_url, unique_queue)

    outcomes, _ = run_runner(rabbitmq_url, unique_queue, tmp_path)
    assert [o.status for o in outcomes] == [Status.SUCCESS], outcomes

    messages = drain(rabbitmq_url, f"{unique_queue}_response")
    assert messages
    reports = []
    for props, body in messages:
        assert props.content_type == "text/plain"
        text = body.decode("ascii")
        assert text.count(",") == 1 and key.encode() not in body and b"epoch" not in body
        reports.append(json.loads(crypto.decrypt_payload(private, text)))
    assert states(reports) == ["Prestart", "Started", "Stopping", "Success"]
    assert {"epoch": 2, "loss": 0.25} in [json.loads(r["progress"]["json"]) for r in reports
                                          if "json" in r.get("progress", {})]


@pytest.mark.slow
def test_no_response_queue_no_reports(rabbitmq_url: str, unique_queue: str, tmp_path: Path) -> None:
    key = f"exp_reports_none_{uuid.uuid4().hex[:8]}"
    publish_experiment(rabbitmq_url, unique_queue, tmp_path, EXPERIMENT, key)
    outcomes, sent = run_runner(rabbitmq_url, unique_queue, tmp_path)
    assert [o.status for o in outcomes] == [Status.SUCCESS] and sent == 0


# --------------------------------------------------------------------------- the RabbitMQ Responder


def test_the_rabbitmq_responder(rabbitmq_url: str, unique_queue: str) -> None:
    async def main() -> None:
        async with RabbitMQQueue(rabbitmq_url) as backend:
            assert await backend.response_queue_exists(unique_queue) is False
            with pytest.raises(RuntimeError, match="does not exist"):
                await backend.publish_response(unique_queue, b'{"a":1}')
            declare_response_queue(rabbitmq_url, unique_queue)
            assert await backend.response_queue_exists(unique_queue) is True
            await backend.publish_response(unique_queue, b'{"a":1}')
            await backend.publish_response(unique_queue, b"sealed,text")

    trio.run(main)
    got = drain(rabbitmq_url, f"{unique_queue}_response")
    assert [(p.content_type, p.delivery_mode, b) for p, b in got] == [
        ("application/json", 2, b'{"a":1}'), ("text/plain", 2, b"sealed,text")]


# --------------------------------------------------------------------------- the buffer


class StuckResponder:
    """A backend whose broker takes reports but never confirms them (as a blocked RabbitMQ does)."""

    kind = "stuck"

    def __init__(self) -> None:
        self.published: list[bytes] = []
        self.checked = 0

    async def response_queue_exists(self, queue: str) -> bool:
        self.checked += 1
        return True

    async def publish_response(self, queue: str, body: bytes) -> None:
        self.published.append(body)
        await trio.sleep_forever()


def test_a_stuck_broker_never_holds_up_the_attempt_and_the_buffer_is_bounded() -> None:
    responder = StuckResponder()
    registry = Registry("host-r")
    reporter = ResponseReporter(registry, [responder], host="host-r", capacity=5,  # type: ignore[list-item]
                                publish_timeout=0.2, warn_every=0)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(reporter.run)
            record = registry.claim("q_stuck", "stuck", "m1", 1)
            registry.identify(record, "exp_stuck", None)
            began = time.monotonic()
            registry.phase(record, Phase.DOWNLOADING)
            registry.phase(record, Phase.RUNNING)
            for n in range(200):
                registry.output(record, json.dumps({"n": n}))
            registry.phase(record, Phase.UPLOADING)
            registry.finish(record, Outcome(key="exp_stuck", status=Status.SUCCESS, action=Action.ACK))
            registry.settle(record, Action.ACK)
            assert time.monotonic() - began < 0.5  # the subscriber never waits on the broker
            await reporter.flush(10)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert reporter.dropped > 0
    assert responder.checked == 1  # asked once per queue, not per report
    last = json.loads(responder.published[-1])
    assert last["progress"]["state"] == "Success"  # the newest survive, the oldest are dropped


class RecordingResponder:
    kind = "recording"

    def __init__(self) -> None:
        self.published: list[bytes] = []

    async def response_queue_exists(self, queue: str) -> bool:
        return True

    async def publish_response(self, queue: str, body: bytes) -> None:
        self.published.append(body)


@pytest.mark.parametrize("with_key", [False, True])
def test_without_clear_text_messages_reports_need_a_key(with_key: bool) -> None:
    """--clear-text-messages=false: a queue without a response key gets no report at all, never clear text."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    responder = RecordingResponder()
    registry = Registry("host-r")
    reporter = ResponseReporter(registry, [responder],  # type: ignore[list-item]
                                lambda queue: private.public_key() if with_key else None,
                                require_encryption=True)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(reporter.run)
            record = registry.claim("q_enc", "recording", "m1", 1)
            registry.identify(record, "exp_enc", None)
            registry.phase(record, Phase.RUNNING)
            registry.finish(record, Outcome(key="exp_enc", status=Status.SUCCESS, action=Action.ACK))
            registry.settle(record, Action.ACK)
            await reporter.flush(10)
            nursery.cancel_scope.cancel()

    trio.run(main)
    if not with_key:
        assert responder.published == []
        return
    opened = [json.loads(crypto.decrypt_payload(private, body.decode())) for body in responder.published]
    assert states(opened) == ["Prestart", "Started", "Success"]


@pytest.mark.parametrize(("line", "progress"), [
    ('{"loss": 1}', True), ('  [{"op": "add", "path": "/x", "value": 1}]', True), ("{not json}", False),
    ('{"studioml": {"host": "h"}}', False),
    ('[{"op": "add", "path": "/studioml/log/-", "value": {}}]', False),
    ("plain", False), ("[1, 2]", True), ("{}", False), ('"text"', False)])
def test_which_lines_are_progress(line: str, progress: bool) -> None:
    assert is_progress_line(line) is progress


def test_no_reporter_without_a_responder_backend(tmp_path: Path) -> None:
    settings = config.resolve({"queue_root": str(tmp_path / "q"), "working_dir": str(tmp_path)}, environ={})

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            assert await start_reporter(nursery, Registry("h"), [], None, settings) is None

    trio.run(main)
