# ruff: noqa: F811  (pytest fixtures imported from support.s3server are re-bound as test parameters)
"""Artifacts in S3 as the request names them: the ``key`` field and the region (message.md, qualified URLs).

Against moto's S3 server with IAM enforced, through the real parser, ``fetch_artifact`` and
``upload_artifact``.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
import trio
from support.s3server import S3Bucket, s3_bucket, s3_server  # noqa: F401

from studio_runner.artifacts import DiskBudget, Restored, fetch_artifact, upload_artifact
from studio_runner.request import Artifact, parse_request
from studio_runner.storage import Stores
from studio_runner.storage.s3 import S3Store


def _tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _members(body: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(body)) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}  # type: ignore[union-attr]


def _request(artifacts: dict[str, Any], env: dict[str, str] | None = None,
             storage: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"experiment": {"key": "e1", "filename": "train.py", "artifacts": artifacts},
            "config": {"env": env or {}, "storage": storage or {}}}


def _aws(bucket: S3Bucket, region: str | None = None) -> dict[str, Any]:
    aws = {"access_key": bucket.credentials.access_key, "secret_access_key": bucket.credentials.secret_key}
    return {"aws": dict(aws, region=region) if region else aws}


def _client_regions(stores: Stores, url: str) -> set[str]:
    store = stores.for_url(url).backend  # type: ignore[attr-defined]  # the S3Store behind the observer
    assert isinstance(store, S3Store)
    return {client.meta.region_name for client in store._clients.values()}


def test_the_key_field_wins_over_the_path_in_qualified(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    s3 = s3_bucket.server.client()
    key = "experiments/e1/modeldir.tar"
    s3.put_object(Bucket=s3_bucket.name, Key=key, Body=_tar({"weights.txt": b"epoch 7"}))
    stale = _tar({"stale.txt": b"not this one"})
    s3.put_object(Bucket=s3_bucket.name, Key="old/place/modeldir.tar", Body=stale)
    doc = _request({"modeldir": {"mutable": True, "unpack": True, "key": key, "bucket": s3_bucket.name,
                                 "qualified": s3_bucket.url("old/place/modeldir.tar"),
                                 "credentials": _aws(s3_bucket)}})
    artifact = parse_request(json.dumps(doc)).experiment.artifacts["modeldir"]
    assert artifact.locator == s3_bucket.url(key)
    expdir, stores = tmp_path / "exp", Stores()

    assert trio.run(fetch_artifact, artifact, expdir, stores, DiskBudget(None)) is Restored.PLACED
    assert (expdir / "modeldir" / "weights.txt").read_bytes() == b"epoch 7"

    (expdir / "modeldir" / "weights.txt").write_bytes(b"epoch 8")
    trio.run(upload_artifact, artifact, expdir, stores, None)
    stored = s3.get_object(Bucket=s3_bucket.name, Key=key)["Body"].read()
    assert _members(stored) == {"weights.txt": b"epoch 8"}
    assert s3.get_object(Bucket=s3_bucket.name, Key="old/place/modeldir.tar")["Body"].read() == stale


def test_the_key_field_of_a_missing_mutable_artifact_is_where_it_is_created(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    key = "experiments/e1/results.tar"
    artifact = Artifact("results", mutable=True, unpack=True, key=key,
                        qualified=s3_bucket.url("elsewhere/results.tar"), credentials=s3_bucket.credentials)
    expdir, stores = tmp_path / "exp", Stores()
    assert trio.run(fetch_artifact, artifact, expdir, stores, DiskBudget(None)) is Restored.ABSENT
    (expdir / "results" / "r.txt").write_bytes(b"new")
    trio.run(upload_artifact, artifact, expdir, stores, None)
    s3 = s3_bucket.server.client()
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket.name)["Contents"]] == [key]


def test_config_env_region_reaches_the_s3_client(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    """Credentials without a region: the request's ``AWS_DEFAULT_REGION`` signs the requests, not the
    runner's default (us-west-1, also the test server's region, so it would pass unnoticed)."""
    s3 = s3_bucket.server.client()
    s3.put_object(Bucket=s3_bucket.name, Key="blobstore/data.csv", Body=b"a,b\n")
    doc = _request({"data": {"mutable": False, "unpack": False, "key": "blobstore/data.csv",
                             "qualified": s3_bucket.url("blobstore/data.csv"),
                             "credentials": _aws(s3_bucket)}},
                   env={"AWS_DEFAULT_REGION": "eu-west-3"})
    artifact = parse_request(json.dumps(doc)).experiment.artifacts["data"]
    assert artifact.access_credentials is not None and artifact.access_credentials.region == "eu-west-3"
    expdir, stores = tmp_path / "exp", Stores()

    assert trio.run(fetch_artifact, artifact, expdir, stores, DiskBudget(None)) is Restored.PLACED

    assert (expdir / "data" / "data.csv").read_bytes() == b"a,b\n"
    assert _client_regions(stores, artifact.locator or "") == {"eu-west-3"}


def test_storage_credentials_take_the_config_env_region_too(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    """``--reuse`` artifacts and completion-service tasks carry no credentials: config.storage's are used."""
    s3_bucket.server.client().put_object(Bucket=s3_bucket.name, Key="blobstore/w.bin", Body=b"w")
    storage = {"endpoint": s3_bucket.server.http_url, "credentials": _aws(s3_bucket)}
    doc = _request({"w": {"mutable": False, "unpack": False, "key": "blobstore/w.bin",
                          "qualified": s3_bucket.url("blobstore/w.bin")}},
                   env={"AWS_DEFAULT_REGION": "ap-southeast-2"}, storage=storage)
    artifact = parse_request(json.dumps(doc)).experiment.artifacts["w"]
    assert artifact.credentials is None
    stores = Stores()
    assert trio.run(fetch_artifact, artifact, tmp_path / "exp", stores, DiskBudget(None)) is Restored.PLACED
    assert _client_regions(stores, artifact.locator or "") == {"ap-southeast-2"}


@pytest.mark.parametrize(
    ("host", "credentials_region", "env_region", "expected"),
    [
        ("s3.eu-central-1.amazonaws.com", "ap-south-1", "eu-west-3", "eu-central-1"),  # the AWS host first
        ("minio:9000", "ap-south-1", "eu-west-3", "ap-south-1"),  # then the credentials' own
        ("minio:9000", None, "eu-west-3", "eu-west-3"),  # then config.env
        ("minio:9000", None, None, "us-west-1"),  # then the store's default
    ],
)
def test_region_precedence(host: str, credentials_region: str | None, env_region: str | None,
                           expected: str) -> None:
    aws: dict[str, Any] = {"access_key": "AKEXAMPLE", "secret_access_key": "example-secret"}
    if credentials_region:
        aws["region"] = credentials_region
    doc = _request({"data": {"mutable": False, "unpack": False, "key": "k",
                             "qualified": f"s3://{host}/bucket/k", "credentials": {"aws": aws}}},
                   env={"AWS_DEFAULT_REGION": env_region} if env_region else {})
    artifact = parse_request(json.dumps(doc)).experiment.artifacts["data"]
    store = S3Store()
    assert store.region_for(host, artifact.access_credentials) == expected
    assert store._client(host, artifact.access_credentials).meta.region_name == expected
