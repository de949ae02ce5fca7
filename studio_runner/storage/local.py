"""Objects stored as files on a local (or mounted) file system: the client's ``storage: {type: local}`` mode.

Three locator forms are accepted: a plain absolute path, a proper ``file:///abs/path`` URL, and the client's
own ``'file:/' + store_root + '/' + key``, which for an absolute store root reads ``file://tmp/store/key`` —
the first path segment sits where a URL host would. All three are read as absolute paths (leading slashes
collapsed, no host, no percent-decoding: the client never encodes its keys).

Confinement: a runner built with storage roots (``--local-storage-roots``: StudioML's local store and the
artifact cache) serves only locators under them. Each locator is resolved first (symlinks followed, ``..``
applied: :func:`os.path.realpath`), checked, and the resolved path is what is read or written; a read also
checks the file it actually opened (``/proc/self/fd``), so a symlink swapped in after the check cannot lead
it out. Everything else is :class:`~studio_runner.storage.base.LocatorRefused` (the request's fault).

Reads copy (never hardlink: an experiment editing its input in place must not change the store); writes go
to a temporary file beside the target and are renamed over it, so readers see the old or the new object.
Copies check for cancellation between chunks, so cancelling a large transfer stops it promptly and leaves
no temporary file; a full disk while downloading is ``DiskFull`` (retried), not a storage fault.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path

import trio

from studio_runner.errors import DiskFull, ObjectNotFound, StorageError, is_disk_full
from studio_runner.redact import mask_patterns
from studio_runner.storage.base import Credentials, LocatorRefused, ObjectInfo

_CHUNK = 1 << 20


def _url_to_str(url: str) -> str:
    if url.startswith("/"):
        return url
    if url[:5].lower() == "file:":
        return "/" + url[5:].lstrip("/")
    raise StorageError(f"not a local locator: {url!r}")


def url_to_path(url: str) -> Path:
    """The absolute path a local locator names (plain path, ``file:///abs`` or the client's ``file://abs``)."""
    return Path(_url_to_str(url))


_SHOWN_MAX = 240


def _shown(url: str) -> str:
    """The locator for a refusal: masked (pattern rules), quoted with control characters escaped, and cut
    only when very long (the experimenter needs its end, the file name, to see what was refused)."""
    text = repr(mask_patterns(url))
    return text if len(text) <= _SHOWN_MAX else text[: _SHOWN_MAX // 2 - 2] + "..." + text[-_SHOWN_MAX // 2:]


def _info(url: str, st: os.stat_result) -> ObjectInfo:
    return ObjectInfo(url=url, size=st.st_size, etag=f"{st.st_size}-{st.st_mtime_ns}", mtime=st.st_mtime)


def _atomic_copy(src: Path, dest: Path, check: Callable[[], None] | None = None,
                 opened: Callable[[int], None] | None = None) -> os.stat_result:
    """Copy ``src`` to ``dest`` through a temporary sibling and a rename; returns the source's stat.

    ``check`` runs before each chunk (``trio.from_thread.check_cancelled`` makes the copy cancellable);
    ``opened`` is given the source's descriptor before anything is read (it may refuse the file).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_name = str(dest.parent / f".{dest.name}.{secrets.token_hex(8)}.tmp")
    # 0o666 less the umask, like the client's own copy: mkstemp's 0o600 would lock out other users.
    fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fdst, open(src, "rb") as fsrc:
            if opened is not None:
                opened(fsrc.fileno())
            st = os.fstat(fsrc.fileno())
            while True:
                if check is not None:
                    check()
                chunk = fsrc.read(_CHUNK)
                if not chunk:
                    break
                fdst.write(chunk)
            fdst.flush()
            os.fsync(fdst.fileno())
        os.replace(tmp_name, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    return st


class LocalStore:
    """ObjectStore over local paths. ``roots``, when given, confines every locator to those directories (an
    empty list refuses every local locator); None serves any path (tests, tools)."""

    def __init__(self, roots: list[str | Path] | None = None) -> None:
        self.roots = None if roots is None else [Path(os.path.realpath(r)) for r in roots]

    def handles(self, url: str) -> bool:
        return url.startswith("/") or url[:5].lower() == "file:"

    def _inside(self, real: str | Path) -> bool:
        path = Path(real)
        return self.roots is None or any(path == root or root in path.parents for root in self.roots)

    def _refuse(self, url: str) -> LocatorRefused:
        allowed = ", ".join(str(root) for root in self.roots or ()) or "none"
        return LocatorRefused(f"local locator {_shown(url)} is outside the storage roots this runner "
                              f"serves ({allowed}; --local-storage-roots)")

    def confine(self, url: str) -> Path:
        """The resolved path ``url`` names (as written when unconfined); LocatorRefused outside the roots."""
        path = url_to_path(url)
        if self.roots is None:
            return path
        real = Path(os.path.realpath(path))
        if not self._inside(real):
            raise self._refuse(url)
        return real

    def _path(self, url: str) -> Path:
        return self.confine(url)

    def _opened(self, url: str) -> Callable[[int], None] | None:
        """A check of the file a read actually opened, when confined: what the path led to after the check."""
        if self.roots is None:
            return None

        def verify(fd: int) -> None:
            try:
                real = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                return  # no /proc: the check of the resolved path stands alone
            if not self._inside(real):
                raise self._refuse(url)

        return verify

    async def get(self, url: str, dest: Path, credentials: Credentials | None = None) -> ObjectInfo:
        src = await trio.to_thread.run_sync(self._path, url)
        opened = self._opened(url)

        def work() -> ObjectInfo:
            try:
                return _info(url, _atomic_copy(src, Path(dest), trio.from_thread.check_cancelled, opened))
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
                if not src.is_file():
                    raise ObjectNotFound(url) from exc
                raise StorageError(f"cannot copy {url} to {dest}: {exc}") from exc
            except OSError as exc:
                if is_disk_full(exc):
                    raise DiskFull(f"no space left while downloading {url} to {dest}: {exc}") from exc
                raise StorageError(f"cannot read {url}: {exc}") from exc

        return await trio.to_thread.run_sync(work)

    async def put(self, src: Path, url: str, credentials: Credentials | None = None) -> ObjectInfo:
        target = await trio.to_thread.run_sync(self._path, url)

        def work() -> ObjectInfo:
            try:
                _atomic_copy(Path(src), target, trio.from_thread.check_cancelled)
                return _info(url, os.stat(target))
            except OSError as exc:
                raise StorageError(f"cannot write {url}: {exc}") from exc

        return await trio.to_thread.run_sync(work)

    async def stat(self, url: str, credentials: Credentials | None = None) -> ObjectInfo | None:
        path = await trio.to_thread.run_sync(self._path, url)

        def work() -> ObjectInfo | None:
            try:
                st = os.stat(path)
            except (FileNotFoundError, NotADirectoryError):
                return None
            except OSError as exc:
                raise StorageError(f"cannot stat {url}: {exc}") from exc
            return _info(url, st) if os.path.isfile(path) else None

        return await trio.to_thread.run_sync(work)

    async def list(self, prefix_url: str, credentials: Credentials | None = None) -> list[ObjectInfo]:
        """Files whose path starts with the prefix's path; URLs keep the prefix's spelling. Confined, the
        prefix is resolved first and links that lead outside the roots are left out."""
        resolved = str(await trio.to_thread.run_sync(self._path, prefix_url))
        if prefix_url.endswith("/") and not resolved.endswith("/"):
            resolved += "/"
        prefix = resolved
        root = prefix if prefix.endswith("/") else os.path.dirname(prefix)

        def work() -> list[ObjectInfo]:
            found: list[ObjectInfo] = []
            for dirpath, _dirs, files in os.walk(root):
                for name in files:
                    full = os.path.join(dirpath, name)
                    if not full.startswith(prefix):
                        continue
                    if self.roots is not None and os.path.islink(full) \
                            and not self._inside(os.path.realpath(full)):
                        continue
                    try:
                        st = os.stat(full)
                    except FileNotFoundError:
                        continue
                    except OSError as exc:
                        raise StorageError(f"cannot list {prefix_url}: {exc}") from exc
                    found.append(_info(prefix_url + full[len(prefix) :], st))
            return sorted(found, key=lambda info: info.url)

        return await trio.to_thread.run_sync(work)
