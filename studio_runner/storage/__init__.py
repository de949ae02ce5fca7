"""Object storage: one backend per locator scheme, chosen per artifact URL.

Artifacts name their own location (``s3://``, ``file:``/plain path, ``http(s)://``), so a single experiment
may touch several backends. :class:`Stores` hands out one lazily created backend per kind.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from studio_runner.errors import StorageError
from studio_runner.storage.base import Credentials, ObjectInfo, ObjectStore

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def redact_url(url: str) -> str:
    """The URL without user info, query or fragment, for messages: presigned URLs carry secrets there."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if not parts.scheme or parts.scheme == "file":
        return url
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def url_kind(url: str) -> str:
    """``local``, ``http`` or ``s3`` for a locator; StorageError for anything else."""
    if url.startswith("/"):
        return "local"
    match = _SCHEME.match(url)
    scheme = match.group(1).lower() if match else ""
    if scheme == "file":
        return "local"
    if scheme in ("http", "https"):
        return "http"
    if scheme == "s3":
        return "s3"
    if not scheme:
        raise StorageError(f"locator {redact_url(url)!r} is neither a URL nor an absolute path")
    raise StorageError(f"unsupported locator scheme {scheme!r} in {redact_url(url)!r}")


class Stores:
    """Picks (and caches) the backend for a locator URL.

    ``s3_options`` are passed as keyword arguments to ``S3Store``; ``local_roots``, when given, confines
    ``file:`` locators to those directories (see :class:`~studio_runner.storage.local.LocalStore`).
    """

    def __init__(
        self, s3_options: dict[str, Any] | None = None, local_roots: list[str | Path] | None = None
    ) -> None:
        self.s3_options: dict[str, Any] = dict(s3_options or {})
        self.local_roots = local_roots
        self._backends: dict[str, ObjectStore] = {}

    def for_url(self, url: str) -> ObjectStore:
        """The backend for ``url``; raises StorageError for unsupported schemes (gs://, dockerhub://...)."""
        kind = url_kind(url)
        backend = self._backends.get(kind)
        if backend is None:
            backend = self._backends[kind] = self._make(kind)
        return backend

    def _make(self, kind: str) -> ObjectStore:
        if kind == "local":
            from studio_runner.storage.local import LocalStore

            return LocalStore(roots=self.local_roots)
        if kind == "http":
            from studio_runner.storage.http import HttpStore

            return HttpStore()
        from studio_runner.storage.s3 import S3Store  # written separately; imported only when needed

        return S3Store(**self.s3_options)


__all__ = ["Credentials", "ObjectInfo", "ObjectStore", "Stores", "redact_url", "url_kind"]
