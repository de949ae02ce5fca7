"""The Google Cloud Pub/Sub emulator for tests: ``gcloud beta emulators pubsub start`` on a free port.

Import the fixture into a test module::

    from support.pubsub_emulator import pubsub_emulator_fixture  # noqa: F401

``pubsub_emulator`` (session) starts one emulator per pytest process (its own data directory, its own
process group, stopped at the end) and sets ``PUBSUB_EMULATOR_HOST`` for this process, so the client library
and the code under test talk to it. Tests that use it carry ``@pytest.mark.expected_skip``: a machine without
gcloud or the emulator component skips them, except under CI (env ``CI`` set), where that fails instead.
The emulator ignores credentials and serves any project name.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

PROJECT = "test-project"
NEEDS = "needs gcloud with the Pub/Sub emulator (Debian package google-cloud-cli-pubsub-emulator) and Java"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def emulator_problem() -> str | None:
    """Why the emulator cannot start here, or None."""
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        return "gcloud is not installed"
    if shutil.which("java") is None:
        return "java is not installed"
    roots = [Path(os.path.realpath(gcloud)).parents[1], Path("/usr/lib/google-cloud-sdk"),
             Path("/usr/share/google-cloud-sdk")]
    if not any((root / "platform" / "pubsub-emulator").is_dir() for root in roots):
        return "the gcloud Pub/Sub emulator component is not installed"
    return None


@dataclass
class PubSubEmulator:
    """A running emulator: ``host`` is ``127.0.0.1:PORT`` (the value of ``PUBSUB_EMULATOR_HOST``)."""

    host: str
    project: str
    process: subprocess.Popen[bytes] = field(repr=False)
    log_path: str = ""
    _clients: tuple[Any, Any] | None = field(default=None, repr=False)

    def clients(self) -> tuple[Any, Any]:
        """(publisher, subscriber): plain clients for set-up and checks (not the code under test)."""
        if self._clients is None:
            from google.cloud import pubsub_v1

            self._clients = (pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient())
        return self._clients

    def topic(self, name: str, project: str | None = None) -> str:
        return f"projects/{project or self.project}/topics/{name}"

    def subscription(self, name: str, project: str | None = None) -> str:
        return f"projects/{project or self.project}/subscriptions/{name}"

    def create(self, name: str, *, project: str | None = None, ack_deadline: int = 10,
               dead_letter: bool = True) -> str:
        """Topic ``name`` and subscription ``name`` on it (a dead-letter policy numbers deliveries, as the
        runner's docs recommend). Returns the subscription path."""
        from google.api_core.exceptions import AlreadyExists

        publisher, subscriber = self.clients()
        topic = self.topic(name, project)
        with contextlib.suppress(AlreadyExists):
            publisher.create_topic(name=topic)
        request: dict[str, Any] = {"name": self.subscription(name, project), "topic": topic,
                                   "ack_deadline_seconds": ack_deadline}
        if dead_letter:
            dead = self.topic(f"{name}_dead", project)
            with contextlib.suppress(AlreadyExists):
                publisher.create_topic(name=dead)
            request["dead_letter_policy"] = {"dead_letter_topic": dead, "max_delivery_attempts": 100}
        subscriber.create_subscription(request=request)
        return request["name"]

    def publish(self, name: str, body: bytes, project: str | None = None, **attributes: str) -> str:
        publisher, _ = self.clients()
        return str(publisher.publish(self.topic(name, project), body, **attributes).result(timeout=30))

    def delete_subscription(self, name: str, project: str | None = None) -> None:
        from google.api_core.exceptions import NotFound

        with contextlib.suppress(NotFound):
            self.clients()[1].delete_subscription(subscription=self.subscription(name, project))

    def pull_all(self, name: str, project: str | None = None, ack: bool = True) -> list[Any]:
        """Every message now waiting in subscription ``name`` (acked unless ``ack`` is false)."""
        from google.api_core.exceptions import NotFound

        _, subscriber = self.clients()
        path = self.subscription(name, project)
        found: list[Any] = []
        while True:
            try:
                response = subscriber.pull(request={"subscription": path, "max_messages": 100,
                                                    "return_immediately": True}, timeout=10)
            except NotFound:
                return found
            if not response.received_messages:
                return found
            found.extend(r.message for r in response.received_messages)
            ids = [r.ack_id for r in response.received_messages]
            if ack:
                subscriber.acknowledge(subscription=path, ack_ids=ids)
            else:
                subscriber.modify_ack_deadline(subscription=path, ack_ids=ids, ack_deadline_seconds=0)
                return found

    def unique(self, prefix: str = "pubsub_t") -> str:
        return f"{prefix}_{uuid.uuid4().hex[:12]}"


def _stop(process: subprocess.Popen[bytes]) -> None:
    """gcloud runs the emulator as a child (java): end the whole process group."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _answers(host: str, project: str) -> bool:
    from google.cloud import pubsub_v1

    client = pubsub_v1.PublisherClient()
    try:
        list(client.list_topics(project=f"projects/{project}", timeout=2))
        return True
    except Exception:  # noqa: BLE001 - not up yet
        return False
    finally:
        client.transport.close()


@pytest.fixture(scope="session", name="pubsub_emulator")
def pubsub_emulator_fixture() -> Iterator[PubSubEmulator]:
    problem = emulator_problem()
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{problem}; CI must provide it ({NEEDS})")
        pytest.skip(f"{problem} ({NEEDS})")
    host = f"127.0.0.1:{_free_port()}"
    data_dir = tempfile.mkdtemp(prefix="pubsub-emulator-")
    log_path = os.path.join(data_dir, "emulator.log")
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            ["gcloud", "beta", "emulators", "pubsub", "start", f"--host-port={host}", f"--project={PROJECT}",
             f"--data-dir={data_dir}", "--quiet"],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    atexit.register(_stop, process)
    previous = os.environ.get("PUBSUB_EMULATOR_HOST")
    os.environ["PUBSUB_EMULATOR_HOST"] = host
    emulator = PubSubEmulator(host, PROJECT, process, log_path)
    try:
        deadline = time.monotonic() + 90
        while not _answers(host, PROJECT):
            if process.poll() is not None or time.monotonic() > deadline:
                text = Path(log_path).read_text(errors="replace")[-3000:]
                pytest.fail(f"the Pub/Sub emulator did not start on {host}:\n{text}")
            time.sleep(0.3)
        yield emulator
    finally:
        if emulator._clients is not None:
            for client in emulator._clients:
                with contextlib.suppress(Exception):
                    client.transport.close()
        _stop(process)
        if previous is None:
            os.environ.pop("PUBSUB_EMULATOR_HOST", None)
        else:
            os.environ["PUBSUB_EMULATOR_HOST"] = previous
        shutil.rmtree(data_dir, ignore_errors=True)


__all__ = ["PROJECT", "NEEDS", "PubSubEmulator", "emulator_problem", "pubsub_emulator_fixture"]
