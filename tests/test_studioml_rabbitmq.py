"""The reference deployment, judged by the real client: ``studio run --queue=rmq_<name>`` with studioml 0.0.49
publishes to RabbitMQ and uploads to an S3-protocol server (moto, real HTTP); studio-runner runs the
experiment; its output and metadata appear in the bucket and the message is gone from the queue."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import textwrap
import uuid
from pathlib import Path

import pytest
from support.rabbitmq import ready_count
from support.runner import Sandbox
from support.s3server import REGION, MotoS3
from support.studioml_client import studio_run

pytestmark = pytest.mark.slow


def rmq_s3_config(path: Path, server: MotoS3, bucket: str, amqp_url: str, extra: str = "") -> Path:
    creds = server.credentials
    aws = (f"{{access_key: '{creds.access_key}', secret_access_key: '{creds.secret_key}', "
           f"region: {REGION}}}")
    path.write_text(textwrap.dedent(f"""\
        database:
            type: s3
            endpoint: {server.http_url}
            bucket: {bucket}-db
            authentication: none
            credentials: {{aws: {aws}}}
        storage:
            type: s3
            endpoint: {server.http_url}
            bucket: {bucket}
            credentials: {{aws: {aws}}}
        cloud:
            queue:
                rmq: {amqp_url}
        server:
            authentication: none
        verbose: error
        saveWorkspaceFrequency: 1m
        experimentLifetime: 30m
        resources_needed: {{cpus: 1, ram: 1g, hdd: 2g, gpus: 0}}
        """) + extra)
    return path


class Deployment:
    """One test's bucket, queue and client configuration."""

    def __init__(self, server: MotoS3, amqp_url: str, queue: str, base: Path) -> None:
        self.server, self.amqp_url, self.queue, self.base = server, amqp_url, queue, base
        self.bucket = f"b-{uuid.uuid4().hex[:12]}"
        self.s3 = server.client()
        for name in (self.bucket, f"{self.bucket}-db"):
            self.s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": REGION})
        self.config = rmq_s3_config(base / "config.yaml", server, self.bucket, amqp_url)

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    def member(self, key: str, member: str) -> str:
        body = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        with tarfile.open(fileobj=io.BytesIO(body)) as tar:
            handle = tar.extractfile(member)
            assert handle is not None
            return handle.read().decode()

    def metadata(self, experiment: str) -> dict:
        for key in self.keys("metadata/"):
            doc = json.loads(self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read())
            if doc.get("studioml", {}).get("experiment", {}).get("key") == experiment:
                return doc
        raise AssertionError(f"no metadata document for {experiment} in {self.keys('metadata/')}")

    def run_runner(self, box: Sandbox, timeout: float = 900, **env: str) -> subprocess.CompletedProcess[str]:
        return box.run_once(timeout=timeout, AMQP_URL=self.amqp_url, QUEUE_MATCH=f"^{self.queue}$", **env)


@pytest.fixture
def deployment(s3_server: MotoS3, rabbitmq_url: str, unique_queue: str, tmp_path: Path) -> Deployment:
    return Deployment(s3_server, rabbitmq_url, unique_queue, tmp_path)


def test_studio_run_over_rabbitmq_and_s3(deployment: Deployment, sandbox: Sandbox, studioml_bin, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "hello.py").write_text(textwrap.dedent("""\
        import json, os, sys
        print("hello over rabbitmq", sys.argv[1:])
        print(json.dumps({"experiment": {"transport": "rmq"}}))
        os.makedirs("../modeldir", exist_ok=True)
        open("../modeldir/model.txt", "w").write("weights")
        for i in range(500):
            print("line", i)
        sys.stdout.write("tail without newline")
        """))
    key = studio_run(studioml_bin, deployment.config, tmp_path / "home", project,
                     f"--queue={deployment.queue}", "hello.py", "a b")
    assert ready_count(deployment.amqp_url, deployment.queue) == 1

    result = deployment.run_runner(sandbox)
    assert result.returncode == 0, result.stderr[-5000:]

    output = deployment.member(f"experiments/{key}/output.tar", "output")
    assert "hello over rabbitmq ['a b']" in output
    assert "line 499" in output and "tail without newline" in output
    assert deployment.member(f"experiments/{key}/modeldir.tar", "model.txt") == "weights"
    doc = deployment.metadata(key)
    assert doc["experiment"] == {"transport": "rmq"}
    assert doc["studioml"]["outcome"]["status"] == "success"
    assert ready_count(deployment.amqp_url, deployment.queue) == 0
    secret = deployment.server.credentials.secret_key
    assert secret not in output and secret not in json.dumps(doc) and secret not in result.stderr
