# ruff: noqa: F811  (pytest fixtures imported from support.gcs_emulator are re-bound as test parameters)
"""``gs://`` artifacts against the real gcp-storage-emulator on loopback: the store's contract (put, get,
stat, list, the generation as ETag), a big object streamed both ways, how errors are classified, the artifact
cache, and a whole experiment through the runner whose workspace comes from and whose results go to GCS."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import socket
import tarfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import google_crc32c
import pytest
import trio
from support.gcs_emulator import GcsBucket, GcsEmulator, gcs_bucket, gcs_emulator  # noqa: F401
from support.runner import Sandbox, read_member

from studio_runner.artifacts import DiskBudget, Restored, fetch_artifact, upload_artifact
from studio_runner.cache import ArtifactCache
from studio_runner.errors import ArtifactError, ObjectNotFound, StorageError
from studio_runner.queues.localdir import LocalDirQueue
from studio_runner.request import parse_request
from studio_runner.storage import Stores
from studio_runner.storage.base import Credentials, ObjectStore
from studio_runner.storage.gcs import GcsStore, parse_gs_url

MiB = 1024 * 1024


@pytest.fixture
def store(gcs_emulator: GcsEmulator) -> GcsStore:
    return GcsStore(emulator_host=gcs_emulator.host, retry_deadline=10)


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


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # nothing listens there once the socket is closed


# --------------------------------------------------------------------------- the store's contract


def test_parse_gs_url_keeps_object_names_raw() -> None:
    assert parse_gs_url("gs://bkt/a/b?c#d.tar").key == "a/b?c#d.tar"
    assert parse_gs_url("GS://bkt").key == ""
    for bad in ("gs:///key", "gs://user@bkt/key", "s3://host/bkt/key"):
        with pytest.raises(StorageError):
            parse_gs_url(bad)


def test_put_stat_get_list_and_generations(store: GcsStore, gcs_bucket: GcsBucket, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"epoch 1")
    url = gcs_bucket.url("experiments/e1/modeldir.tar")

    async def main() -> None:
        assert await store.stat(url) is None  # not there yet: None, not an error
        put = await store.put(src, url)
        server_blob = gcs_bucket.bucket().get_blob("experiments/e1/modeldir.tar")
        assert put.size == 7 and put.etag == str(server_blob.generation)
        stat = await store.stat(url)
        assert stat is not None and (stat.url, stat.size, stat.etag) == (url, 7, put.etag)
        assert stat.mtime is not None and abs(stat.mtime - time.time()) < 300

        dest = tmp_path / "dest"
        got = await store.get(url, dest)
        assert dest.read_bytes() == b"epoch 1" and got == stat
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left

        # every write is a new generation, even of the same bytes: the ETag names one write exactly
        again = await store.put(src, url)
        assert again.etag != put.etag
        src.write_bytes(b"epoch 2, longer")
        changed = await store.put(src, url)
        assert changed.etag not in (put.etag, again.etag) and changed.size == 15
        assert (await store.get(url, dest)).etag == changed.etag and dest.read_bytes() == b"epoch 2, longer"

        await store.put(src, gcs_bucket.url("experiments/e2/output.tar"))
        await store.put(src, gcs_bucket.url("elsewhere/x"))
        listed = await store.list(gcs_bucket.url("experiments/"))
        assert sorted(i.url for i in listed) == [url, gcs_bucket.url("experiments/e2/output.tar")]
        assert {i.url: i.etag for i in listed}[url] == changed.etag
        assert len(await store.list(gcs_bucket.prefix)) == 3  # a bare bucket lists everything
        assert await store.list(gcs_bucket.url("nothing/here/")) == []

    trio.run(main)


def test_the_store_is_registered_for_gs_urls(gcs_emulator: GcsEmulator,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.host.removeprefix("http://"))  # bare host works
    stores = Stores()
    backend = stores.for_url("gs://bucket/key").backend  # type: ignore[attr-defined]  # behind the observer
    assert isinstance(backend, GcsStore) and isinstance(backend, ObjectStore)
    assert stores.for_url("GS://other/key").backend is backend  # type: ignore[attr-defined]
    assert backend._emulator() == gcs_emulator.host
    stores.check("gs://bucket/key")  # not confined: GCS URLs name no place on this machine


def test_a_big_object_streams_both_ways_in_chunks(gcs_emulator: GcsEmulator, gcs_bucket: GcsBucket,
                                                  tmp_path: Path) -> None:
    chunk = MiB
    store = GcsStore(emulator_host=gcs_emulator.host, chunk_size=chunk, retry_deadline=10)
    size = 21 * MiB + 12345  # not a multiple of the chunk: the last one is short
    src = tmp_path / "big"
    with open(src, "wb") as out:
        for i in range(size // MiB + 1):
            out.write(hashlib.sha256(str(i).encode()).digest() * (MiB // 32))
        out.truncate(size)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    url = gcs_bucket.url("blobstore/big.tar")
    dest = tmp_path / "back"

    async def main() -> tuple[int, int]:
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            put = await store.put(src, url)  # resumable: 22 chunks
            up_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.reset_peak()
            got = await store.get(url, dest)  # 22 ranged GETs
            down_peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert put.size == got.size == size and put.etag == got.etag
        return up_peak, down_peak

    up_peak, down_peak = trio.run(main)
    # Neither direction holds the object in memory: a few chunks at most, far below its 21 MiB.
    assert up_peak < 6 * chunk, up_peak
    assert down_peak < 6 * chunk, down_peak
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == digest
    server = gcs_bucket.bucket().get_blob("blobstore/big.tar")
    assert server.size == size
    assert server.crc32c == base64.b64encode(google_crc32c.Checksum(src.read_bytes()).digest()).decode()

    # the default chunk size (8 MiB: three chunks each way) round-trips it too
    default = GcsStore(emulator_host=gcs_emulator.host, retry_deadline=10)
    trio.run(default.put, src, gcs_bucket.url("blobstore/big2.tar"))
    trio.run(default.get, gcs_bucket.url("blobstore/big2.tar"), dest)
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == digest


def test_an_empty_object_round_trips(store: GcsStore, gcs_bucket: GcsBucket, tmp_path: Path) -> None:
    src = tmp_path / "empty"
    src.write_bytes(b"")
    dest = tmp_path / "dest"
    dest.write_bytes(b"old content")
    info = trio.run(store.put, src, gcs_bucket.url("empty"))
    assert info.size == 0 and info.etag
    assert trio.run(store.get, gcs_bucket.url("empty"), dest).size == 0
    assert dest.read_bytes() == b""


def test_aws_credentials_of_a_request_are_not_sent_to_google(store: GcsStore, gcs_bucket: GcsBucket,
                                                             tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"x")
    aws = Credentials("AKIAEXAMPLE", "not-for-google")
    assert trio.run(store.put, src, gcs_bucket.url("k"), aws).size == 1
    assert trio.run(store.get, gcs_bucket.url("k"), tmp_path / "d", aws).size == 1
    assert (tmp_path / "d").read_bytes() == b"x"


# --------------------------------------------------------------------------- errors


def test_a_missing_object_is_object_not_found(store: GcsStore, gcs_bucket: GcsBucket, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    with pytest.raises(ObjectNotFound, match="object not found: gs://"):
        trio.run(store.get, gcs_bucket.url("no/such/object"), dest)
    assert not dest.exists() and list(tmp_path.iterdir()) == []


def test_a_missing_bucket_is_a_storage_error_not_a_missing_object(store: GcsStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"x")
    url = "gs://no-such-bucket-here/key"
    for call in (lambda: store.stat(url), lambda: store.get(url, tmp_path / "d"), lambda: store.list(url),
                 lambda: store.put(src, url)):
        with pytest.raises(StorageError) as caught:
            trio.run(call)
        assert not isinstance(caught.value, ObjectNotFound), caught.value


def test_an_unreachable_endpoint_is_a_storage_error(tmp_path: Path) -> None:
    store = GcsStore(emulator_host=f"http://127.0.0.1:{_closed_port()}", retry_deadline=1)
    src = tmp_path / "src"
    src.write_bytes(b"x")
    for call in (lambda: store.stat("gs://b/k"), lambda: store.get("gs://b/k", tmp_path / "d"),
                 lambda: store.put(src, "gs://b/k"), lambda: store.list("gs://b/")):
        started = time.monotonic()
        with pytest.raises(StorageError, match="cannot reach Google Cloud Storage for gs://b/") as caught:
            trio.run(call)
        assert not isinstance(caught.value, ObjectNotFound)
        assert time.monotonic() - started < 30  # retried within the deadline, then given up


def test_a_failed_upload_marks_the_endpoint_as_failing(gcs_emulator: GcsEmulator, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.host)
    stores = Stores()
    src = tmp_path / "src"
    src.write_bytes(b"x")
    with pytest.raises(StorageError):
        trio.run(stores.for_url("gs://no-such-bucket-x/k").put, src, "gs://no-such-bucket-x/k")
    assert stores.health.outage is not None and "gs://no-such-bucket-x" in stores.health.outage


def test_missing_artifacts_through_fetch_artifact(gcs_emulator: GcsEmulator, gcs_bucket: GcsBucket,
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.host)
    doc = {"experiment": {"key": "e1", "filename": "train.py", "artifacts": {
        "modeldir": {"mutable": True, "unpack": True, "key": "experiments/e1/modeldir.tar",
                     "qualified": gcs_bucket.url("experiments/e1/modeldir.tar")},
        "data": {"mutable": False, "unpack": True, "key": "blobstore/none.tar",
                 "qualified": gcs_bucket.url("blobstore/none.tar")}}}, "config": {"env": {}}}
    artifacts = parse_request(json.dumps(doc)).experiment.artifacts
    stores, expdir = Stores(), tmp_path / "exp"
    restored = trio.run(fetch_artifact, artifacts["modeldir"], expdir, stores, DiskBudget(None))
    assert restored is Restored.ABSENT
    with pytest.raises(ArtifactError, match="immutable artifact data not found at gs://"):
        trio.run(fetch_artifact, artifacts["data"], expdir, stores, DiskBudget(None))

    (expdir / "modeldir" / "weights.txt").write_bytes(b"epoch 1")  # the experiment created it
    trio.run(upload_artifact, artifacts["modeldir"], expdir, stores, None)
    stored = gcs_bucket.bucket().blob("experiments/e1/modeldir.tar").download_as_bytes()
    assert _members(stored) == {"weights.txt": b"epoch 1"}


# --------------------------------------------------------------------------- the artifact cache


def test_the_cache_serves_an_unchanged_object_and_refetches_a_changed_one(
        store: GcsStore, gcs_bucket: GcsBucket, tmp_path: Path) -> None:
    gcs_bucket.bucket().blob("blobstore/ws.tar").upload_from_string(b"version one")
    url = gcs_bucket.url("blobstore/ws.tar")
    cache = ArtifactCache(tmp_path / "cache", 1 << 30)
    fetched: list[str] = []

    class Counting:
        """The store, counting the downloads that reach it."""

        def handles(self, url: str) -> bool:
            return store.handles(url)

        async def get(self, url: str, dest: Path, credentials: Any = None) -> Any:
            fetched.append(url)
            return await store.get(url, dest, credentials)

        async def put(self, src: Path, url: str, credentials: Any = None) -> Any:
            return await store.put(src, url, credentials)

        async def stat(self, url: str, credentials: Any = None) -> Any:
            return await store.stat(url, credentials)

        async def list(self, prefix_url: str, credentials: Any = None) -> Any:
            return await store.list(prefix_url, credentials)

    counting = Counting()

    async def main() -> None:
        first = await cache.fetch(counting, url, None, tmp_path / "a")
        second = await cache.fetch(counting, url, None, tmp_path / "b")
        assert first.etag == second.etag
        assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes() == b"version one"
        assert (cache.hits, cache.misses, len(fetched)) == (1, 1, 1)

        # same size, new content: the new generation misses, and the new bytes are served
        gcs_bucket.bucket().blob("blobstore/ws.tar").upload_from_string(b"version two")
        third = await cache.fetch(counting, url, None, tmp_path / "c")
        assert third.etag != first.etag
        assert (tmp_path / "c").read_bytes() == b"version two"
        assert (cache.hits, cache.misses, len(fetched)) == (1, 2, 2)
        await cache.fetch(counting, url, None, tmp_path / "d")
        assert (cache.hits, cache.misses, len(fetched)) == (2, 2, 2)

    trio.run(main)


# --------------------------------------------------------------------------- a whole experiment


def test_an_experiment_reads_its_workspace_from_gcs_and_writes_results_there(
        sandbox: Sandbox, gcs_emulator: GcsEmulator, gcs_bucket: GcsBucket, tmp_path: Path) -> None:
    script = (b"import json, os\n"
              b"print('data says', open('../data/numbers.txt').read().strip())\n"
              b"print(json.dumps({'experiment': {'accuracy': 0.91}}))\n"
              b"os.makedirs('../modeldir', exist_ok=True)\n"
              b"open('../modeldir/weights.txt', 'w').write('trained')\n")
    bucket = gcs_bucket.bucket()
    bucket.blob("blobstore/ws.tar").upload_from_string(_tar({"train.py": script}))
    bucket.blob("blobstore/data.tar").upload_from_string(_tar({"numbers.txt": b"4 8 15 16 23 42\n"}))
    key = "gcs_e2e"
    artifacts: dict[str, dict[str, Any]] = {}
    for label, object_key, mutable in (
            ("workspace", "blobstore/ws.tar", False), ("data", "blobstore/data.tar", False),
            ("modeldir", f"experiments/{key}/modeldir.tar", True),
            ("output", f"experiments/{key}/output.tar", True),
            ("_metadata", f"experiments/{key}/_metadata.tar", True)):
        artifacts[label] = {"unpack": True, "mutable": mutable, "key": object_key,
                            "qualified": gcs_bucket.url(object_key)}
    request = {"experiment": {"key": key, "filename": "train.py", "args": [], "pythonenv": [],
                              "artifacts": artifacts, "resources_needed": {"cpus": 1, "hdd": "1g"},
                              "time_added": time.time()},
               "config": {"env": {}, "storage": {"type": "gcloud", "bucket": gcs_bucket.name},
                          "resources_needed": {"cpus": 1, "hdd": "1g"}}}
    (sandbox.queue_root / "local_gcs").mkdir()
    trio.run(LocalDirQueue(sandbox.queue_root, "test").enqueue, "local_gcs", json.dumps(request).encode())

    cache = tmp_path / "artifact-cache"
    result = sandbox.run_once(STORAGE_EMULATOR_HOST=gcs_emulator.host, STUDIO_RUNNER_CACHE_DIR=str(cache),
                              STUDIO_RUNNER_CACHE_SIZE="1GiB")
    assert result.returncode == 0, result.stdout + result.stderr
    assert sandbox.pending("local_gcs") == [] and sandbox.set_aside("local_gcs") == []

    output_tar = tmp_path / "output.tar"
    output_tar.write_bytes(bucket.blob(f"experiments/{key}/output.tar").download_as_bytes())
    output = read_member(output_tar, "output")
    assert "data says 4 8 15 16 23 42" in output, output
    modeldir = _members(bucket.blob(f"experiments/{key}/modeldir.tar").download_as_bytes())
    assert modeldir == {"weights.txt": b"trained"}
    scrapes = [b.name for b in bucket.list_blobs(prefix="metadata/scrape-host-")]
    assert len(scrapes) == 1, scrapes  # at the bucket's root, like S3's
    document = json.loads(bucket.blob(scrapes[0]).download_as_bytes())
    assert document["experiment"]["accuracy"] == 0.91
    # the immutable inputs went through the artifact cache, keyed by their generations
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2


def test_a_cancelled_transfer_stops_between_chunks_and_leaves_nothing(
        gcs_emulator: GcsEmulator, gcs_bucket: GcsBucket, tmp_path: Path) -> None:
    store = GcsStore(emulator_host=gcs_emulator.host, chunk_size=256 * 1024, retry_deadline=10)
    src = tmp_path / "big"
    src.write_bytes(os.urandom(32 * MiB))  # 128 chunks each way
    url = gcs_bucket.url("big")
    trio.run(store.stat, url)  # the client exists: a cancel below lands in the transfer itself

    async def upload_cancelled_after(delay: float) -> tuple[bool, float]:
        started = trio.current_time()
        with trio.move_on_after(delay) as scope:
            await store.put(src, url)
        return scope.cancelled_caught, trio.current_time() - started

    # An upload cancelled part-way never creates the object: the thread stops at its next chunk (without
    # that check it would run to the end and the object would exist) and the resumable session is ended.
    for delay in (0.05, 0.02, 0.01):
        cancelled, took = trio.run(upload_cancelled_after, delay)
        assert cancelled, "the upload ran to its end despite the cancel"
        assert took < delay + 2.0
        assert trio.run(store.stat, url) is None

    trio.run(store.put, src, url)
    folder = tmp_path / "out"
    folder.mkdir()

    async def download_cancelled_midway() -> int:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.get, url, folder / "dest")
            while True:  # cancel once some, not all, of the object is on disk
                parts = [p.stat().st_size for p in folder.iterdir() if p.name.endswith(".part")]
                if parts and parts[0] > 0:
                    nursery.cancel_scope.cancel()
                    return parts[0]
                await trio.sleep(0.001)
        raise AssertionError("unreachable")

    written = trio.run(download_cancelled_midway)
    assert 0 < written < 32 * MiB
    assert list(folder.iterdir()) == []  # neither dest nor the partial file


def test_no_google_credentials_at_all_is_a_storage_error(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))  # no gcloud login either
    monkeypatch.setenv("NO_GCE_CHECK", "True")  # and not a GCE machine (no metadata server probe)
    store = GcsStore(retry_deadline=1)
    with pytest.raises(StorageError, match="no Google credentials for gs://b/k: set GOOGLE_APPLICATION_"):
        trio.run(store.stat, "gs://b/k")
    src = tmp_path / "src"
    src.write_bytes(b"x")
    with pytest.raises(StorageError, match="no Google credentials"):
        trio.run(store.put, src, "gs://b/k")
    assert store._client is None  # not cached: credentials installed later are used by the next attempt
