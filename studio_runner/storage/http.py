"""Read-only objects behind plain http(s) URLs (``studio run --capture-once=https://...`` artifacts).

The client sends these with no credentials, so a plain GET is all there is. A synchronous httpx client runs in
a worker thread: simpler than an async client under trio, and the download streams to disk either way; it
checks for cancellation between chunks. A full disk while downloading is ``DiskFull``, not a storage fault.
Messages never show the URL's query string, which for presigned URLs holds the signature.

Each call has its own client, but all share one TLS context (loading the CA bundle took ~30 ms a client, the
first time over 100 ms), made by :meth:`HttpStore.warm_up` at runner start-up; an ``ssl.SSLContext`` is safe
to share between threads.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
import threading
from email.utils import parsedate_to_datetime
from pathlib import Path

import httpx
import trio

from studio_runner.errors import DiskFull, ObjectNotFound, StorageError, is_disk_full
from studio_runner.storage import redact_url
from studio_runner.storage.base import Credentials, ObjectInfo

_TIMEOUT = httpx.Timeout(30.0, read=300.0)
_MISSING = (404, 410)


def _mtime(response: httpx.Response) -> float | None:
    value = response.headers.get("last-modified")
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


def _check(url: str, response: httpx.Response) -> None:
    if response.status_code in _MISSING:
        raise ObjectNotFound(redact_url(url))
    if not response.is_success:
        raise StorageError(f"GET {redact_url(url)}: HTTP {response.status_code}")


class HttpStore:
    """GET-only ObjectStore for http:// and https:// URLs; ``put`` and ``list`` raise StorageError."""

    def __init__(self, timeout: httpx.Timeout = _TIMEOUT) -> None:
        self.timeout = timeout
        self._tls: ssl.SSLContext | None = None
        self._tls_lock = threading.Lock()

    def handles(self, url: str) -> bool:
        return url[:7].lower() == "http://" or url[:8].lower() == "https://"

    def warm_up(self) -> None:
        """Load the CA bundle now rather than in the first experiment's download."""
        self._tls_context()

    def _tls_context(self) -> ssl.SSLContext:
        """httpx's default verification (certifi, or SSL_CERT_FILE/SSL_CERT_DIR), made once."""
        with self._tls_lock:
            if self._tls is None:
                self._tls = httpx.create_ssl_context()
            return self._tls

    def _new_client(self) -> httpx.Client:
        return httpx.Client(timeout=self.timeout, follow_redirects=True, verify=self._tls_context())

    def _download(self, url: str, dest: Path) -> ObjectInfo:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            client = self._new_client()
            with os.fdopen(fd, "wb") as out, client, client.stream("GET", url) as response:
                _check(url, response)
                for chunk in response.iter_bytes(1 << 20):
                    trio.from_thread.check_cancelled()  # a cancelled download stops between chunks
                    out.write(chunk)
                size, etag, mtime = out.tell(), response.headers.get("etag"), _mtime(response)
            os.replace(tmp_name, dest)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            if isinstance(exc, httpx.HTTPError):
                raise StorageError(f"GET {redact_url(url)} failed: {type(exc).__name__}: {exc}") from None
            if isinstance(exc, OSError) and is_disk_full(exc):
                raise DiskFull(f"no space left while downloading {redact_url(url)} to {dest}: {exc}") from exc
            if isinstance(exc, OSError):
                raise StorageError(f"cannot save {redact_url(url)} to {dest}: {exc}") from exc
            raise
        return ObjectInfo(url, size, etag, mtime)

    def _head(self, url: str) -> ObjectInfo | None:
        try:
            with self._new_client() as client:
                response = client.head(url)
        except httpx.HTTPError as exc:
            raise StorageError(f"HEAD {redact_url(url)} failed: {type(exc).__name__}: {exc}") from None
        if response.status_code in _MISSING:
            return None
        _check(url, response)
        length = response.headers.get("content-length")
        size = int(length) if length and length.isdigit() else -1
        return ObjectInfo(url, size, response.headers.get("etag"), _mtime(response))

    async def get(self, url: str, dest: Path, credentials: Credentials | None = None) -> ObjectInfo:
        return await trio.to_thread.run_sync(self._download, url, Path(dest))

    async def put(self, src: Path, url: str, credentials: Credentials | None = None) -> ObjectInfo:
        raise StorageError(f"{redact_url(url)}: http(s) locators are read-only")

    async def stat(self, url: str, credentials: Credentials | None = None) -> ObjectInfo | None:
        """HEAD the URL; ``size`` is -1 when the server sends no Content-Length."""
        return await trio.to_thread.run_sync(self._head, url)

    async def list(self, prefix_url: str, credentials: Credentials | None = None) -> list[ObjectInfo]:
        raise StorageError(f"{redact_url(prefix_url)}: http(s) locators are read-only and cannot be listed")
