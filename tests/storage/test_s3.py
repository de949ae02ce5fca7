# ruff: noqa: F811  (pytest fixtures imported from support.s3server are re-bound as test parameters)
"""S3Store against a real S3-protocol server (moto's standalone server over HTTP, IAM enforced)."""

from __future__ import annotations

import logging
import os
import traceback
from pathlib import Path

import pytest
import trio
from botocore.exceptions import ReadTimeoutError
from support.s3server import S3Bucket, s3_bucket, s3_open_server, s3_server  # noqa: F401

from studio_runner.errors import ObjectNotFound, StorageError
from studio_runner.storage.base import Credentials, ObjectStore
from studio_runner.storage.s3 import S3Store, aws_region, parse_s3_url, qualified_with_key

MiB = 1024 * 1024


def _write(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# -- URL and connection rules (no server needed) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://127.0.0.1:9000/bucket/blobstore/abc.tar", ("127.0.0.1:9000", "bucket", "blobstore/abc.tar")),
        ("s3://minio.example.com/b/k", ("minio.example.com", "b", "k")),
        ("s3://MinIO.Example.com:443/b/dir/", ("minio.example.com:443", "b", "dir/")),
        ("s3://host/bucket", ("host", "bucket", "")),
        ("s3://host/bucket/", ("host", "bucket", "")),
        ("s3://user:pw@host:9000/b/k", ("host:9000", "b", "k")),
        ("s3://[::1]:9000/b/k", ("[::1]:9000", "b", "k")),
        ("s3://s3-us-west-2.amazonaws.com/b/a/b/c", ("s3-us-west-2.amazonaws.com", "b", "a/b/c")),
    ],
)
def test_parse_s3_url(url: str, expected: tuple[str, str, str]) -> None:
    assert parse_s3_url(url) == expected


@pytest.mark.parametrize(
    "url", ["http://host/b/k", "s3:///b/k", "s3://host", "s3://host/", "s3://host:x/b/k"]
)
def test_parse_s3_url_rejects(url: str) -> None:
    with pytest.raises(StorageError):
        parse_s3_url(url)


def test_qualified_with_key_prefers_the_key_field() -> None:
    qualified = "s3://10.0.0.1:9000/bucket/old/path.tar"
    assert qualified_with_key(qualified, "blobstore/sha.tar") == "s3://10.0.0.1:9000/bucket/blobstore/sha.tar"
    assert qualified_with_key(qualified, "") == qualified
    assert qualified_with_key(qualified, None) == qualified


@pytest.mark.parametrize(
    ("endpoint", "region"),
    [
        ("s3-us-west-2.amazonaws.com", "us-west-2"),
        ("s3.eu-central-1.amazonaws.com", "eu-central-1"),
        ("s3.amazonaws.com", ""),
        ("s3-external-1.amazonaws.com", "us-east-1"),
        ("s3.amazonaws.com.evil.example", None),
        ("minio:9000", None),
        ("127.0.0.1:9000", None),
    ],
)
def test_aws_region(endpoint: str, region: str | None) -> None:
    assert aws_region(endpoint) == region


def test_tls_rule() -> None:
    plain = S3Store(tls_endpoints={"secure.example:9000"})
    assert plain.endpoint_url("minio:9000") == "http://minio:9000"
    assert plain.endpoint_url("secure.example:9000") == "https://secure.example:9000"
    assert plain.endpoint_url("s3-us-west-2.amazonaws.com") is None  # boto3's own https regional endpoint
    assert S3Store(ca_bundle="/etc/ca.pem").endpoint_url("minio:9000") == "https://minio:9000"
    assert S3Store(client_cert=("c.pem", "k.pem")).endpoint_url("minio:9000") == "https://minio:9000"


def test_clients_follow_the_rules() -> None:
    """The boto3 clients really get the scheme and region the rules pick (building one needs no network)."""
    store = S3Store(default_region="us-west-1")
    creds = Credentials("AKIAEXAMPLE", "s3cr3t", region="eu-west-1")
    aws = store._client("s3.us-west-2.amazonaws.com", creds)
    assert aws.meta.endpoint_url.startswith("https://") and aws.meta.region_name == "us-west-2"
    minio = store._client("minio:9000", creds)
    assert minio.meta.endpoint_url == "http://minio:9000" and minio.meta.region_name == "eu-west-1"
    anon = store._client("minio:9000", None)
    assert anon.meta.region_name == "us-west-1" and anon is not minio
    assert store._client("minio:9000", creds) is minio  # cached
    assert store._client("minio:9000", Credentials("AKIAEXAMPLE", "other", region="eu-west-1")) is not minio


def test_is_an_object_store() -> None:
    store = S3Store()
    assert isinstance(store, ObjectStore)
    assert store.handles("s3://h/b/k") and not store.handles("file:///x")


# -- against the server --------------------------------------------------------------------------------------


def test_round_trip(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    store = S3Store()
    creds = s3_bucket.credentials
    src = tmp_path / "src.bin"
    data = _write(src, 300_000)

    async def main() -> None:
        url = s3_bucket.url("experiments/e1/output.tar")
        put = await store.put(src, url, creds)
        assert put.url == url and put.size == len(data) and put.etag
        stat = await store.stat(url, creds)
        assert stat is not None and stat.size == len(data) and stat.etag == put.etag and stat.mtime
        assert await store.stat(s3_bucket.url("experiments/e1/nothing"), creds) is None

        dest = tmp_path / "out" / "got.bin"
        dest.parent.mkdir()
        dest.write_bytes(b"old content")
        got = await store.get(url, dest, creds)
        assert dest.read_bytes() == data
        assert got.etag == put.etag and got.size == len(data)
        assert _leftovers(dest.parent) == []

        await store.put(src, s3_bucket.url("experiments/e1/modeldir.tar"), creds)
        await store.put(src, s3_bucket.url("experiments/e2/output.tar"), creds)
        listed = await store.list(s3_bucket.url("experiments/e1/"), creds)
        assert sorted(o.url for o in listed) == [
            s3_bucket.url("experiments/e1/modeldir.tar"),
            s3_bucket.url("experiments/e1/output.tar"),
        ]
        assert all(o.size == len(data) and o.etag for o in listed)
        assert len(await store.list(s3_bucket.prefix, creds)) == 3

    trio.run(main)


def _requests(store: S3Store, bucket: S3Bucket) -> list[str]:
    """The S3 operations ``store``'s client for ``bucket`` sends from now on, in order."""
    sent: list[str] = []
    store._client(bucket.server.endpoint, bucket.credentials).meta.events.register(
        "before-call.s3", lambda model, **kwargs: sent.append(model.name)
    )
    return sent


def test_a_small_put_is_one_request_and_a_known_bucket_is_not_asked_again(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    """Most artifacts are a few KB: their upload is one PutObject (its ETag is the object's), and a missing
    key in a bucket seen a moment ago is one HEAD, not two."""
    store = S3Store()
    creds = s3_bucket.credentials
    src = tmp_path / "small.tar"
    _write(src, 10_000)
    sent = _requests(store, s3_bucket)

    async def main() -> None:
        put = await store.put(src, s3_bucket.url("experiments/e1/output.tar"), creds)
        assert sent == ["PutObject"]
        stat = await store.stat(s3_bucket.url("experiments/e1/output.tar"), creds)
        assert stat is not None and stat.etag == put.etag and stat.size == put.size == 10_000
        sent.clear()
        assert await store.stat(s3_bucket.url("experiments/e1/modeldir.tar"), creds) is None
        assert sent == ["HeadObject"]  # the bucket answered the put: no HeadBucket

    trio.run(main)
    fresh = S3Store()
    sent = _requests(fresh, s3_bucket)
    assert trio.run(fresh.stat, s3_bucket.url("experiments/e1/tb.tar"), creds) is None
    assert sent == ["HeadObject", "HeadBucket"]  # a bucket not seen yet is asked (missing bucket or key?)


def test_a_small_get_is_one_request_and_retries_a_broken_stream(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    store = S3Store()
    creds = s3_bucket.credentials
    data = _write(tmp_path / "small.tar", 50_000)
    url = s3_bucket.url("blobstore/small.tar")
    trio.run(store.put, tmp_path / "small.tar", url, creds)
    sent = _requests(store, s3_bucket)
    broken: list[int] = []

    def break_the_first_stream(**kwargs: object) -> None:
        if not broken:
            broken.append(1)
            raise ReadTimeoutError(endpoint_url=s3_bucket.server.http_url)

    store._client(s3_bucket.server.endpoint, creds).meta.events.register(
        "after-call.s3.GetObject", break_the_first_stream
    )
    got = trio.run(store.get, url, tmp_path / "got.tar", creds)
    assert (tmp_path / "got.tar").read_bytes() == data and got.size == len(data)
    assert sent == ["HeadObject", "GetObject", "GetObject"]  # the stat, then the GET again after the break
    assert _leftovers(tmp_path) == []


def test_a_deleted_bucket_is_noticed_by_the_next_upload(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    store = S3Store()
    creds = s3_bucket.credentials
    src = tmp_path / "small.tar"
    _write(src, 100)
    trio.run(store.put, src, s3_bucket.url("k"), creds)
    client = s3_bucket.server.client()
    client.delete_object(Bucket=s3_bucket.name, Key="k")
    client.delete_bucket(Bucket=s3_bucket.name)
    with pytest.raises(StorageError, match="does not exist"):
        trio.run(store.put, src, s3_bucket.url("k"), creds)
    with pytest.raises(StorageError, match="does not exist"):  # no longer taken to exist
        trio.run(store.stat, s3_bucket.url("other"), creds)


def test_list_paginates(s3_bucket: S3Bucket) -> None:
    client = s3_bucket.server.client()
    for i in range(7):
        client.put_object(Bucket=s3_bucket.name, Key=f"many/{i:04d}", Body=b"x")
    client.put_object(Bucket=s3_bucket.name, Key="other", Body=b"x")
    store = S3Store(list_page_size=2)
    requests: list[int] = []
    store._client(s3_bucket.server.endpoint, s3_bucket.credentials).meta.events.register(
        "before-call.s3.ListObjectsV2", lambda **kwargs: requests.append(1)
    )
    found = trio.run(store.list, s3_bucket.url("many/"), s3_bucket.credentials)
    assert sorted(o.url for o in found) == [s3_bucket.url(f"many/{i:04d}") for i in range(7)]
    assert len(requests) == 4


def test_multipart_both_ways(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    store = S3Store(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4)
    creds = s3_bucket.credentials
    src = tmp_path / "big.bin"
    data = _write(src, 12 * MiB)
    url = s3_bucket.url("blobstore/big.bin")
    client = store._client(s3_bucket.server.endpoint, creds)
    ranged: list[str] = []

    def seen(params: dict, **kwargs: object) -> None:
        if "Range" in params:
            ranged.append(params["Range"])

    client.meta.events.register("before-parameter-build.s3.GetObject", seen)

    async def main() -> None:
        put = await store.put(src, url, creds)
        assert put.etag is not None and put.etag.endswith("-3")  # a 3-part multipart upload's ETag
        await store.get(url, tmp_path / "back.bin", creds)

    trio.run(main)
    assert (tmp_path / "back.bin").read_bytes() == data
    assert len(ranged) == 3


def test_missing_key_is_object_not_found(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    url = s3_bucket.url("blobstore/missing.tar")
    dest = tmp_path / "missing.tar"
    with pytest.raises(ObjectNotFound) as info:
        trio.run(S3Store().get, url, dest, s3_bucket.credentials)
    assert url in str(info.value)
    assert not dest.exists() and list(tmp_path.iterdir()) == []


def test_missing_bucket_is_a_storage_error(s3_server, tmp_path: Path) -> None:
    url = f"s3://{s3_server.endpoint}/no-such-bucket-here/key"
    store = S3Store()
    for call in (
        lambda: store.stat(url, s3_server.credentials),
        lambda: store.get(url, tmp_path / "x", s3_server.credentials),
        lambda: store.put(tmp_path / "src", url, s3_server.credentials),
    ):
        (tmp_path / "src").write_bytes(b"data")
        with pytest.raises(StorageError) as info:
            trio.run(call)
        assert not isinstance(info.value, ObjectNotFound)
        assert "no-such-bucket-here does not exist" in str(info.value)


def test_anonymous_missing_bucket(s3_open_server, tmp_path: Path) -> None:
    url = f"s3://{s3_open_server.endpoint}/no-such-bucket/blob.tar"
    with pytest.raises(StorageError) as info:
        trio.run(S3Store().get, url, tmp_path / "blob.tar", None)
    assert not isinstance(info.value, ObjectNotFound)
    assert "does not exist" in str(info.value) and url in str(info.value)


def test_anonymous_read_of_open_bucket(s3_open_server, tmp_path: Path) -> None:
    client = s3_open_server.client()
    client.create_bucket(
        Bucket="public-bucket", CreateBucketConfiguration={"LocationConstraint": "us-west-1"}
    )
    client.put_object(Bucket="public-bucket", Key="k", Body=b"hello", ACL="public-read")
    client.put_object(Bucket="public-bucket", Key="private", Body=b"hello")
    with pytest.raises(StorageError, match="access denied"):
        trio.run(S3Store().stat, f"s3://{s3_open_server.endpoint}/public-bucket/private", None)
    info = trio.run(S3Store().get, f"s3://{s3_open_server.endpoint}/public-bucket/k", tmp_path / "k", None)
    assert (tmp_path / "k").read_bytes() == b"hello" and info.size == 5


def test_anonymous_on_a_protected_server_is_denied(s3_bucket: S3Bucket) -> None:
    with pytest.raises(StorageError, match="access denied .* with anonymous access"):
        trio.run(S3Store().stat, s3_bucket.url("k"), None)


@pytest.mark.parametrize("wrong", ["secret", "access_key"])
def test_wrong_credentials_never_leak_the_secret(
    s3_bucket: S3Bucket,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    wrong: str,
) -> None:
    real = s3_bucket.credentials
    secret = "SuperSecretValue/ThatMustNeverShow+42"
    creds = (
        Credentials(real.access_key, secret, region=real.region)
        if wrong == "secret"
        else Credentials("AKIAWRONGKEY0001", secret, region=real.region)
    )
    src = tmp_path / "src"
    src.write_bytes(b"payload")
    errors: list[BaseException] = []
    caplog.set_level(logging.DEBUG)  # botocore's DEBUG output included
    store = S3Store()
    for call in (
        lambda: store.stat(s3_bucket.url("k"), creds),
        lambda: store.get(s3_bucket.url("k"), tmp_path / "dest", creds),
        lambda: store.put(src, s3_bucket.url("k"), creds),
        lambda: store.list(s3_bucket.prefix, creds),
    ):
        with pytest.raises(StorageError) as info:
            trio.run(call)
        errors.append(info.value)
    assert len(caplog.records) > 0
    for exc in errors:
        assert "access denied" in str(exc) and creds.access_key[:8] in str(exc)
        assert creds.access_key not in str(exc)  # a prefix at most
        text = "".join(traceback.format_exception(exc)) + repr(exc) + repr(exc.__cause__)
        assert secret not in text
    assert secret not in caplog.text
    assert all(secret not in str(r.args) for r in caplog.records)


def test_connection_refused_is_a_storage_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before the request: nothing listens there
    store = S3Store(max_attempts=2, connect_timeout=2)
    with pytest.raises(StorageError, match="cannot reach"):
        trio.run(store.get, f"s3://127.0.0.1:{port}/b/k", tmp_path / "k", Credentials("AKIAX", "sec"))


def test_cancelled_download_leaves_nothing(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    """Cancel after the first part arrives: no dest, no temp file, no transfer thread left writing."""
    store = S3Store(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=1)
    creds = s3_bucket.credentials
    src = tmp_path / "big.bin"
    _write(src, 20 * MiB)
    url = s3_bucket.url("big.bin")
    out = tmp_path / "out"
    out.mkdir()
    parts: list[int] = []

    async def main() -> None:
        await store.put(src, url, creds)
        token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:

            def after_part(**kwargs: object) -> None:
                parts.append(1)
                if len(parts) == 1:
                    trio.from_thread.run_sync(scope.cancel, trio_token=token)

            store._client(s3_bucket.server.endpoint, creds).meta.events.register(
                "after-call.s3.GetObject", after_part
            )
            await store.get(url, out / "big.bin", creds)
        assert scope.cancelled_caught

    trio.run(main)
    assert list(out.iterdir()) == []
    count = len(parts)
    trio.run(trio.sleep, 0.5)
    assert len(parts) == count < 4  # the remaining parts were not fetched after we returned
