"""A real S3-protocol server for tests: moto's standalone server in a subprocess on a free loopback port.

Import the fixtures into a test module::

    from support.s3server import s3_server, s3_bucket  # noqa: F401

``s3_server`` (session) is one server per pytest process, with IAM authentication switched on, so requests
must carry the test credentials it yields (wrong keys get 403 like real S3; unsigned requests are refused).
``s3_bucket`` (function) is a fresh, empty bucket, deleted with its objects afterwards (moto keeps objects
in memory). The same server answers SQS: ``server.client("sqs")`` for set-up and checks, and
``server.write_aws_account(folder)`` for an ``--sqs-certs`` account folder that points at it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from studio_runner.storage.base import Credentials

REGION = "us-west-1"

# Runs moto's server. With IAM enforcement on, moto answers an unsigned request with a 500 (it assumes an
# Authorization header); real S3 answers 403 AccessDenied, so the server we test against does too.
_BOOT = """
import sys
from moto.iam import access_control
from moto.s3.exceptions import S3AccessDeniedError

_init = access_control.IAMRequestBase.__init__

def _unsigned_is_denied(self, *args, **kwargs):
    if isinstance(self, access_control.S3IAMRequest) and "Authorization" not in kwargs.get("headers", {}):
        raise S3AccessDeniedError()
    _init(self, *args, **kwargs)

access_control.IAMRequestBase.__init__ = _unsigned_is_denied
from moto.server import main
main(sys.argv[1:])
"""


@dataclass
class MotoS3:
    """A running moto server: ``endpoint`` is ``127.0.0.1:PORT`` as it appears in ``s3://`` URLs."""

    endpoint: str
    credentials: Credentials
    process: subprocess.Popen[bytes] = field(repr=False)
    log_path: str = ""

    @property
    def http_url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def sqs_endpoint_url(self) -> str:
        """The same server answers SQS (and IAM): the ``endpoint_url`` for boto3 or an AWS config file."""
        return self.http_url

    def write_aws_account(self, folder: Path, credentials: Credentials | None = None,
                          region: str = REGION) -> Path:
        """An ``--sqs-certs`` account folder for this server: AWS ``credentials`` and ``config`` files, the
        config naming this server as ``endpoint_url``."""
        creds = credentials or self.credentials
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "credentials").write_text(f"[default]\naws_access_key_id = {creds.access_key}\n"
                                            f"aws_secret_access_key = {creds.secret_key}\n")
        (folder / "config").write_text(f"[default]\nregion = {region}\n"
                                       f"endpoint_url = {self.sqs_endpoint_url}\n")
        return folder

    def client(self, service: str = "s3", credentials: Credentials | None = None) -> Any:
        """A plain boto3 client for set-up and checks in tests (not the code under test)."""
        creds = credentials or self.credentials
        return boto3.session.Session().client(
            service,
            endpoint_url=self.http_url,
            region_name=REGION,
            aws_access_key_id=creds.access_key,
            aws_secret_access_key=creds.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 2}),
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.log_path:
            with contextlib.suppress(OSError):
                os.unlink(self.log_path)


@dataclass
class S3Bucket:
    server: MotoS3
    name: str

    @property
    def prefix(self) -> str:
        """``s3://127.0.0.1:PORT/<bucket>``."""
        return f"s3://{self.server.endpoint}/{self.name}"

    @property
    def credentials(self) -> Credentials:
        return self.server.credentials

    def url(self, key: str) -> str:
        return f"{self.prefix}/{key}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/data.json", timeout=1):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def start_moto(auth: bool = True, timeout: float = 60.0) -> MotoS3:
    """Start moto's server on a free port; with ``auth``, create an IAM user and enforce IAM from then on."""
    for attempt in range(5):  # the free port may be taken between probing and binding
        port = _free_port()
        log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log", delete=False)
        env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="inf")
        process = subprocess.Popen(
            [sys.executable, "-c", _BOOT, "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        if _wait_listening(port, process, timeout):
            break
        process.kill()
        process.wait()
        if attempt < 4:
            os.unlink(log.name)
    else:
        raise RuntimeError(f"moto server did not start; see {log.name}")
    server = MotoS3(
        endpoint=f"127.0.0.1:{port}",
        credentials=Credentials("testing", "testing-secret", region=REGION),
        process=process,
        log_path=log.name,
    )
    if auth:
        iam = server.client("iam")
        iam.create_user(UserName="studio-test")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="studio-test", PolicyName="all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="studio-test")["AccessKey"]
        server.credentials = Credentials(key["AccessKeyId"], key["SecretAccessKey"], region=REGION)
        request = urllib.request.Request(
            f"{server.http_url}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "text/plain"},  # a form content type would hide the body from moto
        )
        with urllib.request.urlopen(request, timeout=10):
            pass
    return server


_shared: dict[bool, MotoS3] = {}


def shared_server(auth: bool = True) -> MotoS3:
    """This pytest process's server (fixtures imported into several modules share it, one per ``auth``)."""
    server = _shared.get(auth)
    if server is None or server.process.poll() is not None:
        server = _shared[auth] = start_moto(auth=auth)
        atexit.register(server.stop)
    return server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoS3]:
    """The moto server with IAM enforced: ``.endpoint`` (``127.0.0.1:PORT``), ``.credentials``, ``.client()``.

    Requests must be signed with ``.credentials``; other keys and unsigned requests get 403.
    """
    yield shared_server(auth=True)


@pytest.fixture(scope="session")
def s3_open_server() -> Iterator[MotoS3]:
    """A second moto server without IAM: any key pair is accepted, and unsigned (anonymous) requests may read
    objects uploaded with ``ACL="public-read"``, like a public bucket."""
    yield shared_server(auth=False)


@pytest.fixture
def s3_bucket(s3_server: MotoS3) -> Iterator[S3Bucket]:
    """A fresh bucket: ``.name``, ``.prefix`` (``s3://host:port/name``), ``.url(key)``, ``.credentials``."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    client = s3_server.client()
    client.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": REGION})
    yield S3Bucket(s3_server, name)
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            for obj in page.get("Contents", []):
                client.delete_object(Bucket=name, Key=obj["Key"])
        for upload in client.list_multipart_uploads(Bucket=name).get("Uploads", []):
            client.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
        client.delete_bucket(Bucket=name)
    except Exception:  # a test that broke the server must not hide its own failure behind this one
        pass
