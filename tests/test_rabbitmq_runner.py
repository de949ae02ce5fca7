"""The whole runner against a real RabbitMQ broker and an S3-protocol server (moto, real HTTP).

Each test starts the real CLI (``runner.py run``) as a subprocess with ``AMQP_URL`` and ``QUEUE_MATCH`` set,
publishes requests the way the StudioML client does (their artifacts in an S3 bucket), and then breaks
something on purpose: a runner is killed with SIGKILL, the broker restarts, the broker's consumer timeout
takes a message back, the queue is deleted, a message is garbage. The checks are what an experimenter sees:
the output object in the bucket, the metadata document, the queue being empty, the set-aside queue.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest
from support.rabbitmq import (
    broker_problem,
    channel,
    declare_like_studioml,
    delete_queue,
    publish_like_studioml,
    ready_count,
    short_consumer_timeout,
)
from support.runner import REPO, Sandbox
from support.s3server import REGION, MotoS3

from studio_runner.queues.rmq_link import ATTEMPT_HEADER, QUEUE_HEADER, REASON_HEADER, SET_ASIDE_QUEUE
from studio_runner.submit import Submission, build_request

pytestmark = pytest.mark.slow

WAIT = 120.0
"""Generous bound for anything the runner does by itself (claim, env build, upload)."""
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


# --- set-up helpers -----------------------------------------------------------------------------------------


def write_script(folder: Path, body: str, name: str = "exp.py") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / name
    script.write_text(textwrap.dedent(body))
    return script


class Deployment:
    """One test's queue and bucket; requests are built like the client's, with ``s3://`` artifacts."""

    def __init__(self, server: MotoS3, amqp_url: str, queue: str) -> None:
        self.server, self.amqp_url, self.queue = server, amqp_url, queue
        self.bucket = f"rr-{uuid.uuid4().hex[:12]}"
        self.s3 = server.client()
        self.s3.create_bucket(Bucket=self.bucket, CreateBucketConfiguration={"LocationConstraint": REGION})

    def request(self, script: Path, key: str, **options: Any) -> dict[str, Any]:
        """Upload the script's workspace tar with boto3 and build a StudioML request whose artifacts all live
        in the bucket (``s3://<endpoint>/<bucket>/<key>``, with the moto credentials)."""
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            tar.add(script, arcname=script.name)
        data = buffer.getvalue()
        workspace_key = f"blobstore/{hashlib.sha256(data).hexdigest()}.tar"
        self.s3.put_object(Bucket=self.bucket, Key=workspace_key, Body=data)
        request = build_request(Submission(script=script, queue=self.queue, experiment=key, **options),
                                script.parent, workspace_key)
        creds = self.server.credentials
        aws = {"access_key": creds.access_key, "secret_access_key": creds.secret_key, "region": REGION}
        for artifact in request["experiment"]["artifacts"].values():
            artifact["qualified"] = f"s3://{self.server.endpoint}/{self.bucket}/{artifact['key']}"
            artifact["bucket"] = self.bucket
            artifact["credentials"] = {"aws": aws}
        storage = {"type": "s3", "endpoint": self.server.http_url, "bucket": self.bucket,
                   "credentials": {"aws": aws}}
        request["config"].update(storage=storage, database=dict(storage, bucket=f"{self.bucket}-db"),
                                 queue=None, cloud={"queue": {"rmq": self.amqp_url}})
        return request

    def publish(self, body: bytes | str | dict[str, Any], persistent: bool = False) -> None:
        publish_like_studioml(self.amqp_url, self.queue, body, persistent=persistent)

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    def output(self, key: str) -> str:
        """The ``output`` member of ``experiments/<key>/output.tar`` (the tar must be complete to open)."""
        body = self.s3.get_object(Bucket=self.bucket, Key=f"experiments/{key}/output.tar")["Body"].read()
        with tarfile.open(fileobj=io.BytesIO(body)) as tar:
            handle = tar.extractfile("output")
            assert handle is not None
            return handle.read().decode()

    def metadata(self, key: str) -> list[dict[str, Any]]:
        """Every metadata document of experiment ``key`` (one per attempt), oldest attempt first."""
        docs = []
        for name in self.keys("metadata/"):
            doc = json.loads(self.s3.get_object(Bucket=self.bucket, Key=name)["Body"].read())
            if doc.get("studioml", {}).get("experiment", {}).get("key") == key:
                docs.append(doc)
        return sorted(docs, key=lambda d: str(d["studioml"].get("start_time", "")))


class Runner:
    """One ``studio-runner run`` subprocess; its log goes to a file (a pipe nobody reads would fill up)."""

    def __init__(self, box: Sandbox, log_path: Path, once: bool, env: dict[str, str]) -> None:
        self.box = box
        self.log_path = log_path
        self._log_file = open(log_path, "w")
        argv = [sys.executable, str(REPO / "runner.py"), "run"] + (["--once"] if once else [])
        self.proc = subprocess.Popen(argv, env=box.runner_env(**env), stdout=self._log_file,
                                     stderr=subprocess.STDOUT, text=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, condition: Callable[[str], bool] | str, what: str, timeout: float = WAIT) -> str:
        """Poll the log until ``condition`` holds (a substring or a predicate on the whole log)."""
        check = (lambda text: condition in text) if isinstance(condition, str) else condition
        deadline = time.monotonic() + timeout
        while True:
            text = self.log()
            if check(text):
                return text
            assert self.proc.poll() is None, \
                f"runner exited ({self.proc.returncode}) before {what}:\n{text[-6000:]}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{text[-6000:]}"
            time.sleep(0.1)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (no experiment should be running), wait, return the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"runner did not stop after SIGTERM:\n{self.log()[-6000:]}")

    def wait(self, timeout: float = WAIT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"runner --once did not finish in {timeout:.0f}s:\n{self.log()[-6000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._log_file.close()


@pytest.fixture
def own_queue(rabbitmq_url: str) -> Iterator[str]:
    """A fresh queue name outside the runner's default ``^(rmq|sqs|local)_.*$``: a runner that another test
    (or person) left serving every ``rmq_*`` queue of the shared broker must not take these messages."""
    name = f"rrtest_{uuid.uuid4().hex}"
    yield name
    delete_queue(rabbitmq_url, name)


@pytest.fixture
def deployment(s3_server: MotoS3, rabbitmq_url: str, own_queue: str) -> Deployment:
    return Deployment(s3_server, rabbitmq_url, own_queue)


@pytest.fixture
def start_runner(deployment: Deployment, tmp_path: Path) -> Iterator[Callable[..., Runner]]:
    """``start_runner(name, once=False, **env)``: a runner with its own sandbox (working dir, queue root),
    serving only this test's queue. Every runner still alive at the end is killed."""
    runners: list[Runner] = []

    def start(name: str = "runner", once: bool = False, **env: str) -> Runner:
        box = Sandbox(tmp_path / name)
        box.queue_root.mkdir(parents=True)
        box.work.mkdir()
        settings = {"AMQP_URL": deployment.amqp_url, "QUEUE_MATCH": f"^{deployment.queue}$",
                    "STUDIO_RUNNER_POLL_INTERVAL": "0.25s", "STUDIO_RUNNER_ABORT_CHECK_INTERVAL": "1s"}
        settings.update(env)
        runner = Runner(box, tmp_path / f"{name}.log", once, settings)
        runners.append(runner)
        return runner

    yield start
    for runner in runners:
        runner.kill()


def summaries(log: str, key: str) -> list[str]:
    """One supervisor line per finished attempt of ``key``: ``experiment <key> on <queue>: <status> ...``.
    Releases of a redelivered copy while the first attempt still runs (``deferred``: never run) are not
    counted."""
    return [status for status in re.findall(rf"experiment {re.escape(key)} on \S+: (\w+)", log)
            if status != "deferred"]


def acked_successes(log: str, key: str) -> int:
    """Successful attempts of ``key`` that were acknowledged (not followed by the lost-claim skip)."""
    lost = log.count(f"experiment {key}: the queue took its message back while it ran; not acknowledging")
    return summaries(log, key).count("success") - lost


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def process_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# --- 1. crash safety ----------------------------------------------------------------------------------------


def test_kill_9_runner_mid_experiment_then_the_other_runner_completes_it(deployment: Deployment,
                                                                        start_runner, tmp_path: Path):
    marker = tmp_path / "started.txt"
    script = write_script(tmp_path / "crash", f"""\
        import os, pathlib, time
        marker = pathlib.Path({str(marker)!r})
        earlier = marker.read_text().splitlines() if marker.exists() else []
        with marker.open("a") as handle:
            handle.write(f"{{os.getpid()}} {{os.environ['STUDIOML_HOME']}}\\n")
        print("run", len(earlier) + 1, "begins", flush=True)
        if not earlier:
            time.sleep(300)  # the first run dies with its runner long before this ends
        for step in range(3):
            print("step", step, flush=True)
            time.sleep(0.1)
        print("finished the work: final line")
        """)
    key = f"crash_{uuid.uuid4().hex[:8]}"
    deployment.publish(deployment.request(script, key))
    runners = {name: start_runner(name) for name in ("alpha", "beta")}

    wait_until(marker.exists, "the experiment to start on one of the runners")
    pid_text, home = marker.read_text().splitlines()[0].split(" ", 1)
    victim_name = next(name for name, r in runners.items() if home.startswith(str(r.box.work) + os.sep))
    victim = runners[victim_name]
    survivor = runners["beta" if victim_name == "alpha" else "alpha"]
    assert f"-{victim.pid}-" in Path(home).name, (home, victim.pid)  # the runner id names the runner's pid
    experiment_pid = int(pid_text)
    assert experiment_pid in [p.pid for p in psutil.Process(victim.pid).children(recursive=True)]

    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(30)
    wait_until(lambda: process_gone(experiment_pid), "the orphaned experiment to die", timeout=30)

    # RabbitMQ sees the connection drop and redelivers the unacknowledged message to the other runner.
    survivor.wait_for(lambda log: acked_successes(log, key) == 1, "the survivor to complete the experiment")
    runs = marker.read_text().splitlines()
    assert len(runs) == 2, runs
    assert runs[1].split(" ", 1)[1].startswith(str(survivor.box.work) + os.sep), runs
    output = deployment.output(key)
    assert output.rstrip().splitlines()[-1].startswith('{"studioml":{"outcome"'), output[-2000:]
    assert "finished the work: final line" in output and "run 2 begins" in output
    assert f"attempt 2 of experiment {key}" in output  # the redelivery was counted
    assert [d["studioml"]["outcome"]["status"] for d in deployment.metadata(key)] == ["success"]

    assert survivor.stop() == 0
    assert ready_count(deployment.amqp_url, deployment.queue) == 0  # nothing unacked came back either


# --- 2. broker restart --------------------------------------------------------------------------------------


def restart_broker(amqp_url: str) -> None:
    """``rabbitmqctl stop_app`` + ``start_app``; the broker is up again afterwards whatever happens."""
    ctl = ["rabbitmqctl", "-q"]
    try:
        subprocess.run(ctl + ["stop_app"], check=True, capture_output=True, timeout=120)
    finally:
        subprocess.run(ctl + ["start_app"], check=False, capture_output=True, timeout=120)
        subprocess.run(ctl + ["await_startup"], check=False, capture_output=True, timeout=120)
        broker_problem.cache_clear()
        deadline = time.monotonic() + 60
        while broker_problem() is not None and time.monotonic() < deadline:
            broker_problem.cache_clear()
            time.sleep(0.5)
        assert broker_problem() is None, broker_problem()


def held_script(folder: Path, marker: Path, go: Path, rest: str) -> Path:
    """An experiment that appends a line to ``marker`` on every run; its first run waits for ``go`` (at
    most 90 s) before running ``rest``, so a test can act on the broker while it is in progress."""
    return write_script(folder, textwrap.dedent(f"""\
        import pathlib, time
        marker, go = pathlib.Path({str(marker)!r}), pathlib.Path({str(go)!r})
        first = not marker.exists()
        with marker.open("a") as handle:
            handle.write("run\\n")
        print("run begins", flush=True)
        deadline = time.time() + 90
        while first and not go.exists() and time.time() < deadline:
            time.sleep(0.1)
        """) + textwrap.dedent(rest))


@pytest.mark.expected_skip("restarting the broker needs rabbitmqctl and the test broker on this machine")
def test_broker_restart_mid_experiment(deployment: Deployment, start_runner, tmp_path: Path):
    if shutil.which("rabbitmqctl") is None or urlsplit(deployment.amqp_url).hostname not in LOCAL_HOSTS:
        pytest.skip("restarting the broker needs rabbitmqctl and the test broker on this machine")
    marker, go = tmp_path / "started.txt", tmp_path / "go"
    script = held_script(tmp_path / "restart", marker, go, """\
        for step in range(5):
            print("step", step, flush=True)
            time.sleep(0.1)
        print("experiment complete: final line")
        """)
    key = f"restart_{uuid.uuid4().hex[:8]}"
    declare_like_studioml(deployment.amqp_url, deployment.queue, persistent=True)
    deployment.publish(deployment.request(script, key), persistent=True)
    runner = start_runner("solo")
    wait_until(marker.exists, "the experiment to start")
    try:
        restart_broker(deployment.amqp_url)
    finally:
        go.touch()  # the first run finishes after the broker came back (or after the restart failed)

    runner.wait_for(lambda log: acked_successes(log, key) >= 1, "an acknowledged successful run")
    log = runner.log()
    assert "lost the RabbitMQ connection" in log
    assert "is not durable" not in log
    outcomes = summaries(log, key)
    assert outcomes and set(outcomes) == {"success"}, outcomes
    # Either the first ack went through (one run) or it was lost with the connection and the redelivered
    # message ran again: in both cases every run uploaded complete results.
    assert len(outcomes) == len(marker.read_text().splitlines()) == len(deployment.metadata(key))
    if len(outcomes) == 2:
        first, second = deployment.metadata(key)
        assert "claim_lost" in first["studioml"]["events"], first["studioml"]
        assert "connection" in first["studioml"]["events"]["claim_lost"]
        assert second["studioml"]["outcome"]["status"] == "success"
        assert any(entry["msg"].startswith(f"studio-runner: attempt 2 of experiment {key}")
                   for entry in second["studioml"]["log"]), second["studioml"]["log"]
    output = deployment.output(key)  # a complete tar: opening it is the check that it is not half-written
    assert "experiment complete: final line" in output
    assert output.rstrip().splitlines()[-1].startswith('{"studioml":{"outcome"')

    assert runner.stop() == 0
    assert ready_count(deployment.amqp_url, deployment.queue) == 0


# --- 3. consumer timeout ------------------------------------------------------------------------------------


def test_consumer_timeout_takes_the_message_back_while_the_experiment_runs(deployment: Deployment,
                                                                         start_runner, tmp_path: Path):
    marker, go = tmp_path / "started.txt", tmp_path / "go"
    script = held_script(tmp_path / "long", marker, go, """\
        print("still running after the broker took the message back" if go.exists() else "no go")
        print("final line of the experiment")
        """)
    key = f"ctimeout_{uuid.uuid4().hex[:8]}"
    deployment.publish(deployment.request(script, key))
    with short_consumer_timeout(timeout_ms=3000, tick_ms=1000) as restore_timeout:
        runner = start_runner("solo", once=True)
        # The delivery's channel is open once the experiment starts: it keeps the short timeout; every
        # channel opened from now on (other tests', the redelivery's) gets the node's usual one again.
        runner.wait_for(f"experiment {key} from rabbitmq {deployment.queue} (attempt 1) starting",
                        "the runner to claim the message")
        restore_timeout()
        log = runner.wait_for("lost the claim on message", "the runner to notice the consumer timeout")
    assert "timed out" in log.split("lost the claim on message", 1)[1].splitlines()[0]
    assert summaries(log, key) == [], "the runner noticed only after the experiment ended"
    go.touch()

    assert runner.wait() == 0  # --once: both runs succeeded, then the queue was empty
    log = runner.log()
    assert summaries(log, key) == ["success", "success"], log[-6000:]
    assert f"experiment {key} from rabbitmq {deployment.queue} (attempt 2) starting" in log
    # the redelivered copy did not run beside the first attempt: it waited for it
    assert log.index(f"experiment {key} on {deployment.queue}: success") < log.index(
        f"experiment {key} from rabbitmq {deployment.queue} (attempt 2) starting")
    assert len(marker.read_text().splitlines()) == 2

    first, second = deployment.metadata(key)
    assert "timed out" in first["studioml"]["events"]["claim_lost"], first["studioml"]
    assert first["studioml"]["outcome"]["status"] == "success"
    messages = [entry["msg"] for entry in first["studioml"]["log"]]
    note = next(i for i, m in enumerate(messages) if m.startswith("studio-runner: the queue took"))
    kept_running = messages.index("still running after the broker took the message back")
    assert note < kept_running < messages.index("final line of the experiment"), messages
    assert "events" not in second["studioml"] and second["studioml"]["outcome"]["status"] == "success"
    assert f"studio-runner: attempt 2 of experiment {key} on " in "\n".join(
        entry["msg"] for entry in second["studioml"]["log"])
    assert "final line of the experiment" in deployment.output(key)
    assert ready_count(deployment.amqp_url, deployment.queue) == 0


# --- 4. deleting the queue aborts ---------------------------------------------------------------------------


def test_deleting_the_queue_aborts_its_experiment(deployment: Deployment, start_runner, tmp_path: Path):
    marker = tmp_path / "pid.txt"
    script = write_script(tmp_path / "abort", f"""\
        import os, pathlib, signal, sys, time
        def stop(signum, frame):
            print("got SIGTERM, stopping", flush=True)
            sys.exit(3)
        signal.signal(signal.SIGTERM, stop)
        print("output before the abort", flush=True)
        pathlib.Path({str(marker)!r}).write_text(str(os.getpid()))
        time.sleep(300)
        print("never printed")
        """)
    key = f"abort_{uuid.uuid4().hex[:8]}"
    deployment.publish(deployment.request(script, key))
    runner = start_runner("solo")
    wait_until(marker.exists, "the experiment to start")
    experiment_pid = int(marker.read_text())
    delete_queue(deployment.amqp_url, deployment.queue)

    log = runner.wait_for(lambda text: summaries(text, key) != [], "the aborted attempt to end", timeout=60)
    assert f"queue {deployment.queue} was deleted: aborting its experiment" in log
    assert summaries(log, key) == ["aborted"]
    assert process_gone(experiment_pid)
    output = deployment.output(key)
    assert "output before the abort" in output and "got SIGTERM, stopping" in output
    assert f"aborted: queue {deployment.queue} was deleted" in output
    assert "never printed" not in output
    (doc,) = deployment.metadata(key)
    assert doc["studioml"]["outcome"]["status"] == "aborted"

    time.sleep(1.5)  # a few more polls of the now missing queue
    assert runner.proc.poll() is None, runner.log()[-6000:]
    assert runner.stop() == 0
    assert "Traceback" not in runner.log()


# --- 5. malformed messages ----------------------------------------------------------------------------------


def take_set_aside(amqp_url: str, queue: str) -> list[tuple[Any, bytes]]:
    """Remove and return ``(properties, body)`` of the set-aside messages that came from ``queue``; messages
    of other queues (other tests) are left where they are."""
    mine: list[tuple[Any, bytes]] = []
    with channel(amqp_url) as ch:
        ch.queue_declare(SET_ASIDE_QUEUE, durable=True)
        tags = []
        while True:
            method, props, body = ch.basic_get(SET_ASIDE_QUEUE, auto_ack=False)
            if method is None:
                break
            if (props.headers or {}).get(QUEUE_HEADER) == queue:
                mine.append((props, body))
                tags.append(method.delivery_tag)
        for tag in tags:
            ch.basic_ack(tag)
    return mine  # closing the channel puts the others back


def test_malformed_messages_are_set_aside_and_the_next_one_runs(deployment: Deployment, start_runner,
                                                               tmp_path: Path):
    script = write_script(tmp_path / "good", "print('the good message ran')\n")
    key = f"good_{uuid.uuid4().hex[:8]}"
    not_json = b"this is not JSON {"
    not_a_request = json.dumps({"experiment": {"key": 12, "secret_access_key": "SHOULD-NOT-LEAK"}})
    deployment.publish(not_json)
    deployment.publish(not_a_request)
    deployment.publish(deployment.request(script, key))

    runner = start_runner("solo", once=True)
    assert runner.wait() == 1  # --once exits 1 when a message did not succeed (two were invalid)
    log = runner.log()
    assert log.count("is not a valid request, setting it aside") == 2, log[-6000:]
    assert summaries(log, key) == ["success"]
    assert "the good message ran" in deployment.output(key)
    assert ready_count(deployment.amqp_url, deployment.queue) == 0

    aside = take_set_aside(deployment.amqp_url, deployment.queue)
    assert sorted(body for _, body in aside) == sorted([not_json, not_a_request.encode()])
    for props, _body in aside:
        reason = props.headers[REASON_HEADER]
        assert reason.startswith("invalid: ") and len(reason) > len("invalid: "), reason
        assert props.headers[ATTEMPT_HEADER] == 1  # set aside on the first delivery, never redelivered
        assert props.delivery_mode == 2
        assert "SHOULD-NOT-LEAK" not in reason
    reasons = {body: props.headers[REASON_HEADER] for props, body in aside}
    assert "experiment.key" in reasons[not_a_request.encode()]
    assert "SHOULD-NOT-LEAK" not in log


# --- re-runs ------------------------------------------------------------------------------------------------


def test_a_rerun_uploads_its_own_output_over_an_earlier_attempts(deployment: Deployment, start_runner,
                                                                tmp_path: Path):
    """Every re-run above (lost claim, broker restart, a checkpoint before a crash) starts with the earlier
    attempt's output.tar in the bucket; the re-run's output must still reach it."""
    script = write_script(tmp_path / "rerun", "print('output of the re-run')\n")
    key = f"rerun_{uuid.uuid4().hex[:8]}"
    request = deployment.request(script, key)
    earlier = io.BytesIO()
    with tarfile.open(fileobj=earlier, mode="w") as tar:
        text = b"output of the earlier attempt\n"
        info = tarfile.TarInfo("output")
        info.size, info.mtime = len(text), int(time.time()) - 60
        tar.addfile(info, io.BytesIO(text))
    deployment.s3.put_object(Bucket=deployment.bucket, Key=f"experiments/{key}/output.tar",
                             Body=earlier.getvalue())
    deployment.publish(request)

    runner = start_runner("solo", once=True)
    assert runner.wait() == 0, runner.log()[-6000:]
    (doc,) = deployment.metadata(key)
    assert doc["studioml"]["outcome"]["status"] == "success"
    assert "output of the re-run" in deployment.output(key)
