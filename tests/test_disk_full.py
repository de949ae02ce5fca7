# ruff: noqa: F811  (pytest fixtures imported from support.s3server are re-bound as test parameters)
"""A full disk anywhere the runner writes is ``DiskFull`` (RETRY), never a failed experiment (item 14).

Each case runs the real code in a child process that sees a small tmpfs, mounted in its own mount namespace
(``unshare -rm``: nothing outside the child sees it, nothing to clean up), so the disk really fills up and
the kernel answers ENOSPC. Skipped where unprivileged mount namespaces are not available.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.s3server import REGION, MotoS3, s3_server  # noqa: F401

REPO = Path(__file__).resolve().parents[1]

_PRELUDE = '''
import json, os, sys
from pathlib import Path
import trio
mnt = Path(sys.argv[1])
args = sys.argv[2:]

def report(fn):
    try:
        fn()
        out = {"error": None}
    except BaseException as exc:
        disposition = getattr(exc, "disposition", None)
        out = {"error": type(exc).__name__, "disposition": getattr(disposition, "value", None),
               "message": str(exc)}
    out["left"] = sorted(p.relative_to(mnt).as_posix() for p in mnt.rglob("*"))
    print(json.dumps(out))
'''


@functools.cache
def _private_tmpfs_works() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


pytestmark = [pytest.mark.skipif(not _private_tmpfs_works(), reason="needs unshare -rm and tmpfs mounts"),
              pytest.mark.expected_skip("needs unshare -rm and tmpfs mounts")]


def on_full_disk(tmp_path: Path, size: str, script: str, *args: str) -> dict[str, Any]:
    """Run ``script`` (after the prelude) with a fresh ``size`` tmpfs at ``mnt``; its JSON report."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir(exist_ok=True)
    mount = 'mount -t tmpfs -o size="$1" tmpfs "$2" && shift 2 && exec "$@"'
    cmd = ["unshare", "-rm", "sh", "-c", mount, "sh", size, str(mnt),
           sys.executable, "-c", _PRELUDE + script, str(mnt), *args]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_disk_full(report: dict[str, Any]) -> None:
    assert report["error"] == "DiskFull", report
    assert report["disposition"] == "retry"
    assert "no space" in report["message"].lower() or "disk" in report["message"].lower()


def big_file(path: Path, size: int = 8 << 20) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return path


_FETCH = '''
from studio_runner.artifacts import DiskBudget, fetch_artifact
from studio_runner.cache import ArtifactCache
from studio_runner.request import Artifact
from studio_runner.storage import Stores
url, unpack, expdir, cache_root = args[0], args[1] == "unpack", Path(args[2]), args[3]
cache = ArtifactCache(Path(cache_root), 1 << 30) if cache_root else None
art = Artifact("modeldir", mutable=cache is None, unpack=unpack, key="experiments/e/modeldir.tar",
               qualified=url)
report(lambda: trio.run(fetch_artifact, art, expdir, Stores(), DiskBudget(None), cache))
'''


def test_unpacking_onto_a_full_disk(tmp_path: Path) -> None:
    archive = tmp_path / "zeros.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:  # 8 MB of files from a tiny download
        for i in range(4):
            info = tarfile.TarInfo(f"zeros{i}")
            info.size = 2 << 20
            tf.addfile(info, io.BytesIO(bytes(info.size)))
    expdir = tmp_path / "small-disk" / "exp"
    report = on_full_disk(tmp_path, "4m", _FETCH, str(archive), "unpack", str(expdir), "")
    assert_disk_full(report)
    assert "unpacking" in report["message"]
    assert report["left"] == ["exp", "exp/modeldir"]  # nothing placed, no scratch space left


def test_a_local_download_onto_a_full_disk(tmp_path: Path) -> None:
    source = big_file(tmp_path / "store" / "modeldir.tar")
    expdir = tmp_path / "small-disk" / "exp"
    report = on_full_disk(tmp_path, "4m", _FETCH, str(source), "raw", str(expdir), "")
    assert_disk_full(report)
    assert report["left"] == ["exp", "exp/modeldir"]


def test_the_artifact_cache_on_a_full_disk(tmp_path: Path) -> None:
    source = big_file(tmp_path / "store" / "blob.bin")
    report = on_full_disk(tmp_path, "4m", _FETCH, str(source), "raw", str(tmp_path / "exp"),
                          str(tmp_path / "small-disk" / "cache"))
    assert_disk_full(report)
    assert not any(p.startswith("cache/.partial/") for p in report["left"])  # the partial entry is gone
    assert os.listdir(tmp_path / "exp" / "modeldir") == []


def test_the_artifact_cache_serving_onto_a_full_disk(tmp_path: Path) -> None:
    """Cache on a roomy disk, experiment on a full one: the cross-device copy of the entry fails."""
    source = big_file(tmp_path / "store" / "blob.bin")
    report = on_full_disk(tmp_path, "4m", _FETCH, str(source), "raw", str(tmp_path / "small-disk" / "exp"),
                          str(tmp_path / "cache"))
    assert_disk_full(report)
    assert "caching" in report["message"]
    assert report["left"] == ["exp", "exp/modeldir"]


_S3_GET = '''
from studio_runner.storage.base import Credentials
from studio_runner.storage.s3 import S3Store
url, key, secret, region = args
creds = Credentials(key, secret, region=region)
report(lambda: trio.run(S3Store().get, url, mnt / "object", creds))
'''


def test_an_s3_download_onto_a_full_disk(tmp_path: Path, s3_server: MotoS3) -> None:
    bucket = f"full-{uuid.uuid4().hex[:12]}"
    client = s3_server.client()
    client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    client.put_object(Bucket=bucket, Key="big.bin", Body=os.urandom(8 << 20))
    creds = s3_server.credentials
    report = on_full_disk(tmp_path, "4m", _S3_GET, f"s3://{s3_server.endpoint}/{bucket}/big.bin",
                          creds.access_key, creds.secret_key, REGION)
    assert_disk_full(report)
    assert report["left"] == []  # the partial file is gone
    client.delete_object(Bucket=bucket, Key="big.bin")
    client.delete_bucket(Bucket=bucket)


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


_HTTP_GET = '''
from studio_runner.storage.http import HttpStore
report(lambda: trio.run(HttpStore().get, args[0], mnt / "object"))
'''


def test_an_http_download_onto_a_full_disk(tmp_path: Path, http_dir: tuple[str, Path]) -> None:
    base, root = http_dir
    big_file(root / "big.bin")
    report = on_full_disk(tmp_path, "4m", _HTTP_GET, f"{base}/big.bin")
    assert_disk_full(report)
    assert report["left"] == []


_ENV_BUILD = '''
from studio_runner.envs import EnvCache

async def build():
    async with EnvCache(mnt / "envs", 0).acquire("", [], [], lambda line: None):
        raise AssertionError("built on a full disk")

report(lambda: trio.run(build))
'''


@pytest.mark.slow
def test_an_environment_build_on_a_full_disk(tmp_path: Path) -> None:
    """uv's "No space left on device" was an EnvBuildFailed, and the experiment was reported failed."""
    report = on_full_disk(tmp_path, "3m", _ENV_BUILD)
    assert_disk_full(report)
    assert "uv venv ran out of disk space" in report["message"]
    assert [p for p in report["left"] if p != "envs"] == []  # no half-built environment, no lock file


_PACK = '''
from studio_runner.artifacts import upload_artifact
from studio_runner.request import Artifact
from studio_runner.storage import Stores
expdir = mnt / "exp"
(expdir / "modeldir").mkdir(parents=True)
(expdir / "modeldir" / "weights.bin").write_bytes(os.urandom(3 << 20))
art = Artifact("modeldir", mutable=True, unpack=True, key="m.tar", qualified=args[0])
report(lambda: trio.run(upload_artifact, art, expdir, Stores(), None))
'''


def test_packing_an_upload_on_a_full_disk(tmp_path: Path) -> None:
    target = tmp_path / "store" / "m.tar"
    report = on_full_disk(tmp_path, "4m", _PACK, str(target))
    assert_disk_full(report)
    assert report["left"] == ["exp", "exp/modeldir", "exp/modeldir/weights.bin"]
    assert not target.exists()
