"""The runner serving AWS SQS, as a user runs it: the real CLI in a subprocess with ``--sqs-certs`` naming an
account folder whose config points at the moto server (over HTTP), S3 storage on the same server, real
experiment processes. Checks (issue 10): an experiment published on a matching queue runs, its output lands
in S3 and its message is gone; a queue that does not match is never read; a runner killed with -9 mid-run
lets the message come back, and another runner completes it; an account folder added at run time is served
within a rescan interval, and removing it stops new work from its queues."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import tarfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest
from support.runner import Sandbox
from support.s3server import REGION, MotoS3, S3Bucket

from studio_runner.submit import Submission, build_request, pack_workspace

pytestmark = pytest.mark.slow

OTHER_REGION = "eu-west-1"  # moto keeps each region's queues apart: a second account with its own queues


class SqsDeployment:
    """One test's account folders, queues and bucket on the moto server."""

    def __init__(self, server: MotoS3, bucket: S3Bucket, base: Path) -> None:
        self.server, self.bucket, self.base = server, bucket, base
        self.certs = base / "sqs-certs"
        self.certs.mkdir(parents=True)
        self.s3 = server.client()
        self.prefix = f"sqs_{uuid.uuid4().hex[:8]}"
        """This test's queues are ``<prefix>_*`` and the runner serves only those (``--queue-match``): the
        moto server is shared with other tests, whose queues must not be served here."""

    def sqs(self, region: str = REGION) -> Any:
        import boto3

        creds = self.server.credentials
        return boto3.session.Session().client("sqs", endpoint_url=self.server.sqs_endpoint_url,
                                              region_name=region, aws_access_key_id=creds.access_key,
                                              aws_secret_access_key=creds.secret_key)

    def queue(self, name: str | None = None, region: str = REGION) -> tuple[str, str]:
        """A queue the runner serves, or (with ``name``) one named as given."""
        name = name or f"{self.prefix}_{uuid.uuid4().hex[:6]}"
        return name, self.sqs(region).create_queue(QueueName=name)["QueueUrl"]

    def request(self, key: str, queue: str, script: str) -> str:
        """A StudioML request whose artifacts live in the S3 bucket (workspace uploaded here)."""
        folder = self.base / key
        folder.mkdir()
        (folder / "train.py").write_text(textwrap.dedent(script))
        packed = self.base / f"pack-{key}"
        workspace_key = pack_workspace(folder, packed)
        self.s3.put_object(Bucket=self.bucket.name, Key=workspace_key,
                           Body=(packed / workspace_key).read_bytes())
        doc = build_request(Submission(script=folder / "train.py", queue=queue, experiment=key), packed,
                            workspace_key)
        creds = self.server.credentials
        aws = {"aws": {"access_key": creds.access_key, "secret_access_key": creds.secret_key,
                       "region": REGION}}
        for artifact in doc["experiment"]["artifacts"].values():
            artifact.update(qualified=self.bucket.url(artifact["key"]), bucket=self.bucket.name,
                            credentials=aws)
        storage = {"type": "s3", "endpoint": self.server.http_url, "bucket": self.bucket.name,
                   "credentials": aws}
        doc["config"].update(storage=storage, database=dict(storage, authentication="none"))
        return json.dumps(doc)

    def publish(self, url: str, body: str, region: str = REGION) -> None:
        self.sqs(region).send_message(QueueUrl=url, MessageBody=body)

    def counts(self, url: str, region: str = REGION) -> tuple[int, int]:
        """(visible, in flight) messages of a queue."""
        attrs = self.sqs(region).get_queue_attributes(
            QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages",
                                          "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        return int(attrs["ApproximateNumberOfMessages"]), int(attrs["ApproximateNumberOfMessagesNotVisible"])

    def output(self, key: str) -> str | None:
        try:
            body = self.s3.get_object(Bucket=self.bucket.name, Key=f"experiments/{key}/output.tar")["Body"]
        except self.s3.exceptions.NoSuchKey:
            return None
        with tarfile.open(fileobj=io.BytesIO(body.read())) as tar:
            member = tar.extractfile("output")
            assert member is not None
            return member.read().decode()

    def env(self, sandbox: Sandbox, **extra: str) -> dict[str, str]:
        return sandbox.runner_env(STUDIO_RUNNER_SQS_CERTS=str(self.certs), STUDIO_RUNNER_RESCAN_INTERVAL="1s",
                                  STUDIO_RUNNER_QUEUE_MATCH=f"^{self.prefix}_", **extra)


@pytest.fixture
def deployment(s3_server: MotoS3, s3_bucket: S3Bucket, tmp_path: Path) -> SqsDeployment:
    return SqsDeployment(s3_server, s3_bucket, tmp_path / "deploy")


def run_once(sandbox: Sandbox, deployment: SqsDeployment,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*runner_command(), "run", "--once"], env=deployment.env(sandbox),
                          capture_output=True, text=True, timeout=timeout)


def runner_command() -> list[str]:
    import sys

    from support.runner import REPO

    return [sys.executable, str(REPO / "runner.py")]


def start(sandbox: Sandbox, deployment: SqsDeployment) -> subprocess.Popen[str]:
    return subprocess.Popen([*runner_command(), "run"], env=deployment.env(sandbox), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def stop(process: subprocess.Popen[str]) -> str:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.stdout.read() if process.stdout else ""


def wait_for(predicate: Any, timeout: float, what: str, process: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the runner exited while waiting for {what}:\n{stop(process)}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_matching_queue_is_served_into_s3_and_a_non_matching_one_is_never_read(
        sandbox: Sandbox, deployment: SqsDeployment) -> None:
    deployment.server.write_aws_account(deployment.certs / "main")
    queue, url = deployment.queue()
    ignored, ignored_url = deployment.queue(f"other_{deployment.prefix}")  # does not match
    deployment.publish(url, deployment.request("sqs_ok", queue, """\
        import json
        print("hello from sqs")
        print(json.dumps({"experiment": {"name": "sqs"}}))
        """))
    deployment.publish(ignored_url, deployment.request("sqs_ignored", ignored, "print('must not run')\n"))
    result = run_once(sandbox, deployment)
    assert result.returncode == 0, result.stdout + result.stderr
    output = deployment.output("sqs_ok")
    assert output is not None and "hello from sqs" in output, result.stdout + result.stderr
    assert deployment.counts(url) == (0, 0)  # deleted after the final upload
    assert deployment.output("sqs_ignored") is None
    raw = deployment.sqs().receive_message(QueueUrl=ignored_url, AttributeNames=["All"])["Messages"]
    assert raw[0]["Attributes"]["ApproximateReceiveCount"] == "1"  # this receive is its first: never read
    assert deployment.server.credentials.secret_key not in result.stdout + result.stderr


def test_a_runner_killed_mid_experiment_lets_another_complete_it(
        sandbox: Sandbox, deployment: SqsDeployment, tmp_path: Path) -> None:
    deployment.server.write_aws_account(deployment.certs / "main")
    queue, url = deployment.queue()
    marker = tmp_path / "started"
    deployment.publish(url, deployment.request("sqs_crash", queue, f"""\
        import pathlib, sys, time
        first = not pathlib.Path({str(marker)!r}).exists()
        pathlib.Path({str(marker)!r}).write_text("x")
        print("working", flush=True)
        time.sleep(600 if first else 0)
        print("finished the work")
        """))
    first = start(sandbox, deployment)
    try:
        wait_for(marker.exists, 180, "the first runner to start the experiment", first)
        children = [p.pid for p in psutil.Process(first.pid).children(recursive=True)]
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert deployment.counts(url) == (0, 1)  # still invisible: the dead runner's claim has not run out
    wait_for(lambda: deployment.counts(url) == (1, 0), 120, "the message to come back")
    time.sleep(0.5)
    assert all(not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
               for pid in children), "the experiment outlived its runner"
    second = run_once(sandbox, deployment)
    assert second.returncode == 0, second.stdout + second.stderr
    output = deployment.output("sqs_crash")
    assert output is not None and "finished the work" in output and "attempt 2" in output
    assert deployment.counts(url) == (0, 0)


def test_an_account_added_at_run_time_is_served_and_removing_it_stops_new_work(
        sandbox: Sandbox, deployment: SqsDeployment) -> None:
    deployment.server.write_aws_account(deployment.certs / "home")
    far_queue, far_url = deployment.queue(region=OTHER_REGION)
    deployment.publish(far_url, deployment.request("sqs_far", far_queue, "print('from the far account')\n"),
                       OTHER_REGION)
    runner = start(sandbox, deployment)
    try:
        time.sleep(3)  # a few rescans: the far account is not configured, so its queue is not served
        assert deployment.counts(far_url, OTHER_REGION) == (1, 0)
        deployment.server.write_aws_account(deployment.certs / "far", region=OTHER_REGION)
        wait_for(lambda: deployment.output("sqs_far") is not None, 120, "the far account's experiment",
                 runner)
        wait_for(lambda: deployment.counts(far_url, OTHER_REGION) == (0, 0), 30, "the far message deleted",
                 runner)
        for path in (deployment.certs / "far").iterdir():
            path.unlink()
        (deployment.certs / "far").rmdir()
        time.sleep(3)  # past the next rescan
        deployment.publish(far_url, deployment.request("sqs_late", far_queue, "print('too late')\n"),
                           OTHER_REGION)
        time.sleep(4)
        assert runner.poll() is None
        assert deployment.counts(far_url, OTHER_REGION) == (1, 0)
        assert deployment.output("sqs_late") is None
    finally:
        log = stop(runner)
    assert "from the far account" in (deployment.output("sqs_far") or "")
    assert "SQS account far added" in log and "SQS account far removed" in log, log[-3000:]
