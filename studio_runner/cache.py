"""Host-wide download cache for immutable artifacts (lifecycle.md §4.2, with its Recommended changes).

Only immutable inputs belong here — that is the caller's choice (``artifacts.py`` passes mutable artifacts
straight to the store). Blobstore keys are content-addressed by the client, so a cached copy never goes
stale; the entry key is still sha256(URL without credentials, ETag, size) — or size+mtime when the store has
no ETag — so a replaced object is a miss and bare ETags never collide across buckets.

Layout under ``root`` (dedicated to the cache; the directory itself is the index, so several runner processes
on one host can share it):

* ``<key>``                 a complete entry (64 hex chars), mode 0444; its mtime is its LRU stamp.
* ``.partial/<key>.<rand>/`` a download in progress; renamed into place only when complete, so a runner that
  dies mid-download never leaves an entry that is served. Leftovers are swept at start-up.
* ``.locks/<key>``          flock held while one process downloads ``<key>``; others poll it (cancellably).

Entries reach ``dest`` as hardlinks (copy across file systems), so reuse costs no I/O and an experiment's
copy stays valid after eviction. The link shares the entry's inode and its 0444 mode: callers must treat
``dest`` as read-only (unpack it, or copy it before handing it to code that may write it).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import trio

from studio_runner.errors import DiskFull, ObjectNotFound, StorageError, is_disk_full
from studio_runner.storage.base import Credentials, ObjectInfo, ObjectStore
from studio_runner.units import format_size

log = logging.getLogger(__name__)

_KEY = re.compile(r"[0-9a-f]{64}")
_SIGNING_PARAMS = {"signature", "awsaccesskeyid", "expires", "x-goog-signature", "sig", "se", "sv", "token"}
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES}


def public_url(url: str) -> str:
    """``url`` without user-info or pre-signing query parameters: it names the object, not the caller."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    query = [
        (k, v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
        if not k.lower().startswith("x-amz-") and k.lower() not in _SIGNING_PARAMS
    ]
    return parts._replace(netloc=netloc, query=urlencode(query), fragment="").geturl()


def cache_key(url: str, info: ObjectInfo) -> str:
    """Entry name for this version of the object at ``url``."""
    version = f"etag={info.etag}" if info.etag else f"mtime={info.mtime!r}"
    return hashlib.sha256(f"{public_url(url)}\n{version}\nsize={info.size}".encode()).hexdigest()


def _place(src: Path, dest: Path) -> None:
    """Put ``src`` at ``dest`` atomically: hardlink when possible, else copy."""
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.link")
    try:
        try:
            os.link(src, tmp)
        except OSError as exc:
            if exc.errno not in _NO_LINK:
                raise
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


class ArtifactCache:
    """LRU cache of downloaded objects, bounded by ``max_bytes``, shared by tasks and processes on a host."""

    def __init__(self, root: Path, max_bytes: int, poll_max: float = 0.25) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.poll_max = poll_max
        self.hits = 0
        self.misses = 0
        self.bytes_served = 0
        """Bytes handed out from existing entries (hits)."""
        self.evictions = 0
        self.bytes_used = 0
        """Bytes in complete entries at the last scan (start-up, and after each download's eviction pass):
        status pages read it instead of scanning the directory on every poll."""
        self.observer: Callable[[str, bool], None] | None = None
        """Called with (ETag, or the entry key when the store has none; hit?) on every lookup: metrics
        count hits and misses by hash. Must be quick and must not raise."""
        self._partial = self.root / ".partial"
        self._locks_dir = self.root / ".locks"
        self._task_locks: dict[str, tuple[trio.Lock, int]] = {}
        self._partial.mkdir(parents=True, exist_ok=True)
        self._locks_dir.mkdir(exist_ok=True)
        self._sweep()
        self._evict(keep=None)  # adopt what a previous run left, within today's bound
        entries, used = self._usage()
        log.info("artifact cache %s: %d entries, %s", self.root, entries, format_size(used))

    # -- public --------------------------------------------------------------------------------------------

    async def fetch(
        self, store: ObjectStore, url: str, credentials: Credentials | None, dest: Path
    ) -> ObjectInfo:
        """Same contract as ``store.get(url, dest, credentials)``, served from the cache when possible.

        The object is always stat'ed with the caller's credentials first, so the cache never hands an object
        to a caller the store would refuse. No space left, in the cache or at ``dest``, raises ``DiskFull``.
        """
        try:
            return await self._fetch(store, url, credentials, Path(dest))
        except OSError as exc:
            if is_disk_full(exc):
                raise DiskFull(f"no space left while caching {public_url(url)} for {dest}: {exc}") from exc
            raise

    async def _fetch(
        self, store: ObjectStore, url: str, credentials: Credentials | None, dest: Path
    ) -> ObjectInfo:
        info = await store.stat(url, credentials)
        if info is None:
            raise ObjectNotFound(f"object not found: {public_url(url)}")
        key = cache_key(url, info)
        if info.size > self.max_bytes:  # would flush the whole cache and still not fit: bypass it
            self.misses += 1
            self._observe(info.etag or key, False)
            return await store.get(url, dest, credentials)
        if await self._serve(key, info, dest):
            return info
        async with self._task_lock(key):
            if await self._serve(key, info, dest):  # another task of ours just fetched it
                return info
            async with self._host_lock(key):
                if await self._serve(key, info, dest):  # another process just fetched it
                    return info
                return await self._download(store, url, credentials, key, dest)

    def entries(self) -> dict[str, int]:
        """Current entries and their sizes (for tests and diagnostics)."""
        return {name: size for name, size, _ in self._scan()}

    # -- hits ----------------------------------------------------------------------------------------------

    async def _serve(self, key: str, info: ObjectInfo, dest: Path) -> bool:
        entry = self.root / key

        def serve() -> bool:
            try:
                size = entry.stat().st_size
            except FileNotFoundError:
                return False
            if size != info.size:
                log.warning("cache entry %s has %d bytes, expected %d: discarding it", key, size, info.size)
                entry.unlink(missing_ok=True)
                return False
            try:
                _place(entry, dest)
            except FileNotFoundError:
                if entry.exists():
                    raise  # dest's directory is missing: the caller's problem
                return False  # evicted by another process between stat and link
            try:
                os.utime(entry)  # LRU stamp
            except OSError:
                pass
            return True

        # Not abandoned on cancel: a copy fallback may be writing dest's temp file.
        served = await trio.to_thread.run_sync(serve)
        if served:
            self.hits += 1
            self._observe(info.etag or key, True)
            self.bytes_served += info.size
            log.debug("artifact cache hit: %s (%d bytes)", key, info.size)
        return served

    # -- misses --------------------------------------------------------------------------------------------

    async def _download(
        self, store: ObjectStore, url: str, credentials: Credentials | None, key: str, dest: Path
    ) -> ObjectInfo:
        work = self._partial / f"{key}.{secrets.token_hex(8)}"
        work.mkdir()
        try:
            data = work / "data"
            got = await store.get(url, data, credentials)
            size = data.stat().st_size
            if size != got.size:
                raise StorageError(
                    f"download of {public_url(url)} has {size} bytes, the store said {got.size}"
                )
            # The object may have changed since our stat: file it under the version we actually got.
            final_key = cache_key(url, got)
            data.chmod(0o444)
            os.utime(data)  # most recently used, whatever mtime the store gave the file
            await trio.to_thread.run_sync(_place, data, dest)
            os.rename(data, self.root / final_key)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        self.misses += 1
        self._observe(got.etag or final_key, False)
        await trio.to_thread.run_sync(self._evict, final_key)
        return got

    def _observe(self, name: str, hit: bool) -> None:
        if self.observer is not None:
            try:
                self.observer(name, hit)
            except Exception:  # metrics must never fail a download
                log.exception("artifact cache observer failed")

    @asynccontextmanager
    async def _task_lock(self, key: str) -> AsyncIterator[None]:
        """One download per key among this process's tasks."""
        lock, users = self._task_locks.get(key, (trio.Lock(), 0))
        self._task_locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._task_locks[key]
            if users == 1:
                del self._task_locks[key]
            else:
                self._task_locks[key] = (lock, users - 1)

    @asynccontextmanager
    async def _host_lock(self, key: str) -> AsyncIterator[None]:
        """One download per key among processes: flock, polled without blocking so it stays cancellable."""
        delay = 0.005
        while True:
            fd = self._try_lock(key)
            if fd is not None:
                break
            await trio.sleep(delay)
            delay = min(delay * 2, self.poll_max)
        try:
            yield
        finally:
            self._unlock(key, fd)

    def _try_lock(self, key: str) -> int | None:
        """An fd holding ``.locks/<key>``, or None when another process holds it."""
        path = self._locks_dir / key
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder unlinked it after we opened it: our lock is on a dead inode
            os.close(fd)
            return None
        return fd

    def _unlock(self, key: str, fd: int) -> None:
        """Unlink the lock file while still holding it, then release (others re-check the inode)."""
        try:
            os.unlink(self._locks_dir / key)
        except FileNotFoundError:
            pass
        os.close(fd)

    # -- housekeeping --------------------------------------------------------------------------------------

    def _sweep(self) -> None:
        """Remove partial downloads and lock files that no live process holds."""
        for path in self._partial.iterdir():
            key = path.name.split(".", 1)[0]
            fd = self._try_lock(key)
            if fd is None:
                continue  # another process is downloading it right now
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                log.info("artifact cache: removed unfinished download %s", path.name)
            finally:
                self._unlock(key, fd)
        for path in self._locks_dir.iterdir():
            fd = self._try_lock(path.name)
            if fd is not None:
                self._unlock(path.name, fd)

    def _scan(self) -> list[tuple[str, int, float]]:
        found = []
        with os.scandir(self.root) as it:
            for e in it:
                if _KEY.fullmatch(e.name) and e.is_file(follow_symlinks=False):
                    try:
                        st = e.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    found.append((e.name, st.st_size, st.st_mtime))
        return found

    def _usage(self) -> tuple[int, int]:
        entries = self._scan()
        return len(entries), sum(size for _, size, _ in entries)

    def _evict(self, keep: str | None) -> None:
        """Delete least recently used entries until the total fits ``max_bytes``; never ``keep``."""
        entries = sorted(self._scan(), key=lambda e: e[2])
        total = sum(size for _, size, _ in entries)
        for name, size, _ in entries:
            if total <= self.max_bytes:
                break
            if name == keep:
                continue
            try:
                os.unlink(self.root / name)
            except FileNotFoundError:
                pass  # another process evicted it
            total -= size
            self.evictions += 1
            log.debug("artifact cache: evicted %s (%d bytes)", name, size)
        self.bytes_used = total
