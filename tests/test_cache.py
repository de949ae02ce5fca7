# ruff: noqa: F811  (pytest fixtures imported from support.s3server are re-bound as test parameters)
"""ArtifactCache over the real S3Store and a real S3-protocol server (moto's standalone server)."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import trio
from support.s3server import S3Bucket, s3_bucket, s3_server  # noqa: F401

from studio_runner.cache import ArtifactCache, cache_key, public_url
from studio_runner.errors import ObjectNotFound
from studio_runner.storage.base import Credentials, ObjectInfo
from studio_runner.storage.s3 import S3Store

KiB = 1024


class CountingStore:
    """The real S3Store, counting downloads (and optionally slowing them so fetches overlap)."""

    def __init__(self, inner: S3Store, delay: float = 0.0) -> None:
        self.inner, self.delay, self.gets = inner, delay, 0

    def handles(self, url: str) -> bool:
        return self.inner.handles(url)

    async def stat(self, url: str, credentials: Credentials | None = None) -> ObjectInfo | None:
        return await self.inner.stat(url, credentials)

    async def get(self, url: str, dest: Path, credentials: Credentials | None = None) -> ObjectInfo:
        self.gets += 1
        await trio.sleep(self.delay)
        return await self.inner.get(url, dest, credentials)

    async def put(self, src: Path, url: str, credentials: Credentials | None = None) -> ObjectInfo:
        return await self.inner.put(src, url, credentials)

    async def list(self, prefix_url: str, credentials: Credentials | None = None) -> list[ObjectInfo]:
        return await self.inner.list(prefix_url, credentials)


def _upload(bucket: S3Bucket, key: str, data: bytes) -> str:
    bucket.server.client().put_object(Bucket=bucket.name, Key=key, Body=data)
    return bucket.url(key)


@pytest.fixture
def store() -> CountingStore:
    return CountingStore(S3Store())


def test_miss_then_hit_is_a_hardlink(s3_bucket: S3Bucket, store: CountingStore, tmp_path: Path) -> None:
    data = os.urandom(100 * KiB)
    url = _upload(s3_bucket, "blobstore/a.tar", data)
    cache = ArtifactCache(tmp_path / "cache", 10 * 1024 * KiB)
    creds = s3_bucket.credentials
    first, second = tmp_path / "exp1" / "a.tar", tmp_path / "exp2" / "a.tar"
    first.parent.mkdir()
    second.parent.mkdir()
    second.write_bytes(b"stale")  # replaced, like store.get does

    async def main() -> None:
        info1 = await cache.fetch(store, url, creds, first)
        assert (cache.misses, cache.hits, store.gets) == (1, 0, 1)
        info2 = await cache.fetch(store, url, creds, second)
        assert (cache.misses, cache.hits, store.gets) == (1, 1, 1)
        assert info1.etag == info2.etag and info1.size == len(data)

    trio.run(main)
    assert first.read_bytes() == second.read_bytes() == data
    [entry] = cache.entries()
    assert os.path.samefile(second, tmp_path / "cache" / entry)
    assert os.path.samefile(first, second)
    assert first.stat().st_mode & 0o777 == 0o444  # shared inode: read-only for everyone
    assert cache.bytes_served == len(data)
    assert [p.name for p in second.parent.iterdir()] == ["a.tar"]


def test_concurrent_fetches_download_once(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    data = os.urandom(64 * KiB)
    url = _upload(s3_bucket, "blobstore/b.tar", data)
    store = CountingStore(S3Store(), delay=0.3)
    cache = ArtifactCache(tmp_path / "cache", 10 * 1024 * KiB)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(cache.fetch, store, url, s3_bucket.credentials, tmp_path / f"d{i}")

    trio.run(main)
    assert store.gets == 1
    assert (cache.misses, cache.hits) == (1, 5)
    assert all((tmp_path / f"d{i}").read_bytes() == data for i in range(6))


def test_two_caches_on_one_root_download_once(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    """Two instances stand in for two runner processes: only the flock keeps them apart."""
    data = os.urandom(64 * KiB)
    url = _upload(s3_bucket, "blobstore/c.tar", data)
    store = CountingStore(S3Store(), delay=0.3)
    caches = [ArtifactCache(tmp_path / "cache", 10 * 1024 * KiB) for _ in range(2)]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for i, cache in enumerate(caches):
                nursery.start_soon(cache.fetch, store, url, s3_bucket.credentials, tmp_path / f"d{i}")

    trio.run(main)
    assert store.gets == 1
    assert sorted((c.misses, c.hits) for c in caches) == [(0, 1), (1, 0)]
    assert (tmp_path / "d0").read_bytes() == (tmp_path / "d1").read_bytes() == data
    assert list((tmp_path / "cache" / ".locks").iterdir()) == []  # lock files are removed by their holder


def test_waiting_on_another_process_is_cancellable(
    s3_bucket: S3Bucket,
    store: CountingStore,
    tmp_path: Path,
) -> None:
    url = _upload(s3_bucket, "blobstore/d.tar", b"d" * 100)
    cache = ArtifactCache(tmp_path / "cache", 10 * 1024 * KiB)

    async def main() -> None:
        info = await store.stat(url, s3_bucket.credentials)
        assert info is not None
        lock = tmp_path / "cache" / ".locks" / cache_key(url, info)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)  # "another process" is downloading this key
        try:
            start = time.monotonic()
            with trio.move_on_after(0.5) as scope:
                await cache.fetch(store, url, s3_bucket.credentials, tmp_path / "dest")
            assert scope.cancelled_caught and time.monotonic() - start < 1.5
        finally:
            os.close(fd)
        assert store.gets == 0
        await cache.fetch(store, url, s3_bucket.credentials, tmp_path / "dest")  # lock gone: goes ahead
        assert store.gets == 1

    trio.run(main)


def test_partial_download_is_never_served_and_is_swept(
    s3_bucket: S3Bucket,
    store: CountingStore,
    tmp_path: Path,
) -> None:
    data = os.urandom(32 * KiB)
    url = _upload(s3_bucket, "blobstore/e.tar", data)
    root = tmp_path / "cache"
    info = trio.run(store.stat, url, s3_bucket.credentials)
    assert info is not None
    key = cache_key(url, info)
    dead = root / ".partial" / f"{key}.deadbeef"
    dead.mkdir(parents=True)
    (dead / "data").write_bytes(data[:1000])  # a runner died mid-download
    live = root / ".partial" / f"{'f' * 64}.cafe"
    live.mkdir()
    (live / "data").write_bytes(b"in progress")
    (root / ".locks").mkdir()
    fd = os.open(root / ".locks" / ("f" * 64), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # ...while another runner is still downloading this one
    try:
        cache = ArtifactCache(root, 10 * 1024 * KiB)
        assert not dead.exists()
        assert live.exists()  # not ours to sweep
    finally:
        os.close(fd)
    trio.run(cache.fetch, store, url, s3_bucket.credentials, tmp_path / "dest")
    assert (cache.misses, store.gets) == (1, 1)
    assert (tmp_path / "dest").read_bytes() == data
    assert list((root / ".partial").iterdir()) == [live]


def test_entries_are_adopted_at_start(s3_bucket: S3Bucket, store: CountingStore, tmp_path: Path) -> None:
    url = _upload(s3_bucket, "blobstore/f.tar", b"f" * 5000)
    trio.run(
        ArtifactCache(tmp_path / "cache", 10 * 1024 * KiB).fetch,
        store,
        url,
        s3_bucket.credentials,
        tmp_path / "d1",
    )
    again = ArtifactCache(tmp_path / "cache", 10 * 1024 * KiB)  # a restarted runner
    trio.run(again.fetch, store, url, s3_bucket.credentials, tmp_path / "d2")
    assert (again.hits, again.misses, store.gets) == (1, 0, 1)
    assert (tmp_path / "d2").read_bytes() == b"f" * 5000


def test_lru_eviction(s3_bucket: S3Bucket, store: CountingStore, tmp_path: Path) -> None:
    size = 40 * KiB
    urls = {name: _upload(s3_bucket, f"blobstore/{name}", os.urandom(size)) for name in "abc"}
    cache = ArtifactCache(tmp_path / "cache", int(2.5 * size))
    creds = s3_bucket.credentials

    async def fetch(name: str, dest: str) -> ObjectInfo:
        info = await cache.fetch(store, urls[name], creds, tmp_path / dest)
        await trio.sleep(0.02)  # distinct LRU stamps
        return info

    async def main() -> dict[str, str]:
        keys = {}
        for name in "ab":
            keys[name] = cache_key(urls[name], await fetch(name, f"{name}1"))
        await fetch("a", "a2")  # a is now more recent than b
        keys["c"] = cache_key(urls["c"], await fetch("c", "c1"))
        return keys

    keys = trio.run(main)
    assert set(cache.entries()) == {keys["a"], keys["c"]}
    assert cache.evictions == 1
    assert (tmp_path / "b1").stat().st_size == size  # the experiment's copy outlives the entry
    trio.run(cache.fetch, store, urls["b"], creds, tmp_path / "b2")
    assert cache.misses == 4 and store.gets == 4


class OldFileStore(CountingStore):
    """Gives downloads an ancient mtime, as a store that preserves the source's mtime would."""

    async def get(self, url: str, dest: Path, credentials: Credentials | None = None) -> ObjectInfo:
        info = await super().get(url, dest, credentials)
        os.utime(dest, (0, 0))
        return info


def test_never_evicts_what_it_just_inserted(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    size = 40 * KiB
    a, b = (_upload(s3_bucket, f"blobstore/{n}", os.urandom(size)) for n in "ab")
    cache = ArtifactCache(tmp_path / "cache", int(1.5 * size))
    store = OldFileStore(S3Store())

    async def main() -> None:
        await cache.fetch(CountingStore(S3Store()), a, s3_bucket.credentials, tmp_path / "a")
        await cache.fetch(store, b, s3_bucket.credentials, tmp_path / "b")  # b's file claims to be older

    trio.run(main)
    info = trio.run(store.stat, b, s3_bucket.credentials)
    assert list(cache.entries()) == [cache_key(b, info)]


def test_larger_than_the_cache_bypasses_it(s3_bucket: S3Bucket, store: CountingStore, tmp_path: Path) -> None:
    data = os.urandom(20 * KiB)
    url = _upload(s3_bucket, "blobstore/huge.tar", data)
    cache = ArtifactCache(tmp_path / "cache", 10 * KiB)
    trio.run(cache.fetch, store, url, s3_bucket.credentials, tmp_path / "dest")
    assert (tmp_path / "dest").read_bytes() == data
    assert cache.entries() == {} and cache.misses == 1


def test_changed_object_is_a_miss(s3_bucket: S3Bucket, store: CountingStore, tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path / "cache", 10 * 1024 * KiB)
    url = _upload(s3_bucket, "blobstore/g.tar", b"version one")
    trio.run(cache.fetch, store, url, s3_bucket.credentials, tmp_path / "v1")
    _upload(s3_bucket, "blobstore/g.tar", b"version two")
    trio.run(cache.fetch, store, url, s3_bucket.credentials, tmp_path / "v2")
    assert (tmp_path / "v1").read_bytes() == b"version one"
    assert (tmp_path / "v2").read_bytes() == b"version two"
    assert (cache.misses, cache.hits, store.gets) == (2, 0, 2)


def test_damaged_entry_is_downloaded_again(s3_bucket: S3Bucket, store: CountingStore, tmp_path: Path) -> None:
    data = os.urandom(10 * KiB)
    url = _upload(s3_bucket, "blobstore/h.tar", data)
    cache = ArtifactCache(tmp_path / "cache", 10 * 1024 * KiB)
    trio.run(cache.fetch, store, url, s3_bucket.credentials, tmp_path / "d1")
    [entry] = cache.entries()
    path = tmp_path / "cache" / entry
    path.unlink()
    path.write_bytes(data[:100])  # truncated behind our back
    trio.run(cache.fetch, store, url, s3_bucket.credentials, tmp_path / "d2")
    assert (tmp_path / "d2").read_bytes() == data
    assert (cache.misses, cache.hits, store.gets) == (2, 0, 2)


def test_missing_object(s3_bucket: S3Bucket, store: CountingStore, tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path / "cache", 10 * 1024 * KiB)
    with pytest.raises(ObjectNotFound):
        trio.run(
            cache.fetch, store, s3_bucket.url("blobstore/none.tar"), s3_bucket.credentials, tmp_path / "d"
        )
    assert not (tmp_path / "d").exists()


@pytest.mark.expected_skip("needs a second file system at /dev/shm")
def test_copies_across_file_systems(s3_bucket: S3Bucket, store: CountingStore, tmp_path: Path) -> None:
    other = Path("/dev/shm")
    if not other.is_dir() or os.stat(other).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs a second file system at /dev/shm")
    data = os.urandom(10 * KiB)
    url = _upload(s3_bucket, "blobstore/x.tar", data)
    cache = ArtifactCache(tmp_path / "cache", 10 * 1024 * KiB)
    dest_dir = Path(tempfile.mkdtemp(dir=other))
    try:
        trio.run(cache.fetch, store, url, s3_bucket.credentials, dest_dir / "a")  # miss
        trio.run(cache.fetch, store, url, s3_bucket.credentials, dest_dir / "b")  # hit
        assert (dest_dir / "a").read_bytes() == (dest_dir / "b").read_bytes() == data
        assert (cache.misses, cache.hits) == (1, 1)
        assert sorted(p.name for p in dest_dir.iterdir()) == ["a", "b"]
    finally:
        shutil.rmtree(dest_dir)


class FixedStore:
    """Claims a 1 GiB object exists; refuses to download it. A hit must not need the store's data."""

    size = 1024**3

    def handles(self, url: str) -> bool:
        return True

    async def stat(self, url: str, credentials: Credentials | None = None) -> ObjectInfo | None:
        return ObjectInfo(url=url, size=self.size, etag="e" * 32)

    async def get(self, url: str, dest: Path, credentials: Credentials | None = None) -> ObjectInfo:
        raise AssertionError("a hit must not download")


def test_hit_of_a_1gib_entry_is_fast(tmp_path: Path) -> None:
    store, url = FixedStore(), "s3://h:9000/b/blobstore/big.tar"
    cache = ArtifactCache(tmp_path / "cache", 2 * 1024**3)
    entry = tmp_path / "cache" / cache_key(url, trio.run(store.stat, url))
    with open(entry, "wb") as fh:
        fh.truncate(store.size)  # sparse: costs no disk
    start = time.perf_counter()
    trio.run(cache.fetch, store, url, None, tmp_path / "dest")
    assert time.perf_counter() - start < 0.5
    assert (tmp_path / "dest").stat().st_size == store.size and cache.hits == 1


def test_cache_key_ignores_credentials_in_the_url() -> None:
    info = ObjectInfo(url="", size=10, etag="abc")
    plain = "https://host/bucket/key.tar"
    assert public_url("https://user:pw@host/bucket/key.tar?X-Amz-Signature=1&X-Amz-Credential=2") == plain
    assert cache_key("https://user:pw@host/bucket/key.tar?X-Amz-Signature=1", info) == cache_key(plain, info)
    assert cache_key(plain, info) != cache_key(plain, ObjectInfo(url="", size=10, etag="abd"))
    assert cache_key(plain, info) != cache_key("https://host/other/key.tar", info)
    no_etag = ObjectInfo(url="", size=10, mtime=1.0)
    assert cache_key(plain, no_etag) != cache_key(plain, ObjectInfo(url="", size=10, mtime=2.0))
