"""Object storage: one backend per locator scheme, chosen per artifact URL.

Artifacts name their own location (``s3://``, ``file:``/plain path, ``http(s)://``), so a single experiment
may touch several backends. Backends are registered by scheme (:func:`register_scheme`): a new store (GCS's
``gs://``) plugs in with one call, and :class:`Stores` hands out one lazily created backend per kind.

Every transfer goes through a thin observer that (a) counts bytes against the attempt the calling task works
for (:func:`studio_runner.events.current_attempt`) and (b) keeps :class:`StorageHealth` up to date, so the
supervisor can pause intake while results cannot be saved instead of burning other messages' attempts.

:meth:`Stores.warm_up` creates every backend at runner start-up (boto3 alone takes a quarter of a second to
import and parse its S3 model), so the first experiment of a runner costs what the others do.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import trio

from studio_runner.errors import ObjectNotFound, StorageError
from studio_runner.redact import mask_patterns
from studio_runner.storage.base import Confines, Credentials, LocatorRefused, ObjectInfo, ObjectStore, WarmsUp

log = logging.getLogger(__name__)

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def redact_url(url: str) -> str:
    """The URL without user info, query or fragment, for messages: presigned URLs carry secrets there."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if not parts.scheme or parts.scheme == "file":
        return mask_patterns(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


# --------------------------------------------------------------------------- the scheme registry


@dataclass(frozen=True)
class StoreOptions:
    """Runner-wide settings a backend may need (TLS material for S3, roots confining local paths)."""

    s3: dict[str, Any]
    local_roots: list[str | Path] | None = None


@dataclass(frozen=True)
class _Registration:
    kind: str
    factory: Callable[[StoreOptions], ObjectStore]


_SCHEMES: dict[str, _Registration] = {}


def register_scheme(schemes: tuple[str, ...], kind: str,
                    factory: Callable[[StoreOptions], ObjectStore]) -> None:
    """Serve locators of ``schemes`` with one backend of ``kind`` made by ``factory`` (lazily, once)."""
    for scheme in schemes:
        _SCHEMES[scheme.lower()] = _Registration(kind, factory)


def _local(options: StoreOptions) -> ObjectStore:
    from studio_runner.storage.local import LocalStore

    return LocalStore(roots=options.local_roots)


def _http(options: StoreOptions) -> ObjectStore:
    from studio_runner.storage.http import HttpStore

    return HttpStore()


def _s3(options: StoreOptions) -> ObjectStore:
    from studio_runner.storage.s3 import S3Store  # boto3 is imported only when an s3:// locator shows up

    return S3Store(**options.s3)


def _gcs(options: StoreOptions) -> ObjectStore:
    try:  # google-cloud-storage is imported only once a gs:// locator shows up, and is an optional extra
        from studio_runner.storage.gcs import GcsStore
    except ImportError as exc:
        raise StorageError(f"gs:// locators need google-cloud-storage (studio-runner[gcp]): {exc}") from None
    return GcsStore()


register_scheme(("file",), "local", _local)
register_scheme(("http", "https"), "http", _http)
register_scheme(("s3",), "s3", _s3)
register_scheme(("gs",), "gcs", _gcs)


def scheme_of(url: str) -> str:
    """The locator's scheme, lower case (``file`` for a plain absolute path); StorageError otherwise."""
    if url.startswith("/"):
        return "file"
    match = _SCHEME.match(url)
    if not match:
        raise StorageError(f"locator {redact_url(url)!r} is neither a URL nor an absolute path")
    return match.group(1).lower()


def endpoint_of(url: str) -> str:
    """What an outage is about: ``s3://host:port``, ``https://host``, or ``local`` for file locators."""
    try:
        scheme = scheme_of(url)
        if scheme == "file":
            return "local storage"
        return f"{scheme}://{urlsplit(url).netloc.rpartition('@')[2]}"
    except (StorageError, ValueError):
        return "storage"


# --------------------------------------------------------------------------- health and observation


class StorageHealth:
    """Whether results can be saved now: an endpoint is failing from a failed upload until an upload to it
    succeeds (or whoever kept retrying gives up). The supervisor takes no new work while one fails."""

    def __init__(self) -> None:
        self._failing: dict[str, str] = {}
        self._changed = trio.Event()

    @property
    def outage(self) -> str | None:
        """A description of what is failing, or None when every store we wrote to works."""
        if not self._failing:
            return None
        return "; ".join(f"{endpoint}: {error}" for endpoint, error in sorted(self._failing.items()))

    def upload_failed(self, url: str, error: BaseException) -> None:
        endpoint = endpoint_of(url)
        first = endpoint not in self._failing
        self._failing[endpoint] = str(error)[:300]
        if first:
            log.warning("cannot save results to %s (%s): no new work is taken until it answers again",
                        endpoint, self._failing[endpoint])
            self._notify()

    def upload_succeeded(self, url: str) -> None:
        endpoint = endpoint_of(url)
        if self._failing.pop(endpoint, None) is not None:
            log.info("%s takes uploads again: taking new work", endpoint)
            self._notify()

    def forget(self, url: str) -> None:
        """Nobody retries uploads to ``url``'s endpoint any more: stop holding intake for it."""
        if self._failing.pop(endpoint_of(url), None) is not None:
            self._notify()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


TransferCallback = Callable[[str, int, str], None]
"""``(direction, nbytes, url)``, direction ``down`` or ``up``."""


class _Observed:
    """An ObjectStore that reports transfers and upload health; everything else is the backend's."""

    def __init__(self, backend: ObjectStore, health: StorageHealth,
                 on_transfer: TransferCallback | None) -> None:
        self._backend = backend
        self._health = health
        self._on_transfer = on_transfer

    def handles(self, url: str) -> bool:
        return self._backend.handles(url)

    async def get(self, url: str, dest: Path, credentials: Credentials | None = None) -> ObjectInfo:
        info = await self._backend.get(url, dest, credentials)
        if self._on_transfer is not None:
            self._on_transfer("down", _size(dest, info.size), url)
        return info

    async def put(self, src: Path, url: str, credentials: Credentials | None = None) -> ObjectInfo:
        try:
            info = await self._backend.put(src, url, credentials)
        except ObjectNotFound:
            raise
        except StorageError as exc:
            self._health.upload_failed(url, exc)
            raise
        self._health.upload_succeeded(url)
        if self._on_transfer is not None:
            self._on_transfer("up", _size(src, info.size), url)
        return info

    async def stat(self, url: str, credentials: Credentials | None = None) -> ObjectInfo | None:
        return await self._backend.stat(url, credentials)

    async def list(self, prefix_url: str, credentials: Credentials | None = None) -> list[ObjectInfo]:
        return await self._backend.list(prefix_url, credentials)

    @property
    def backend(self) -> ObjectStore:
        return self._backend


def _size(path: Path, fallback: int) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return fallback


class Stores:
    """Picks (and caches) the backend for a locator URL.

    ``s3_options`` are passed as keyword arguments to ``S3Store``; ``local_roots``, when given, confines
    ``file:`` locators to those directories (see :class:`~studio_runner.storage.local.LocalStore`; the runner
    gives ``--local-storage-roots`` plus its artifact cache, :meth:`check` refuses the rest up front);
    ``on_transfer`` is told about every completed get and put (the runtime counts bytes per attempt).
    """

    def __init__(
        self, s3_options: dict[str, Any] | None = None, local_roots: list[str | Path] | None = None,
        *, health: StorageHealth | None = None, on_transfer: TransferCallback | None = None,
    ) -> None:
        self.options = StoreOptions(dict(s3_options or {}), local_roots)
        self.health = health if health is not None else StorageHealth()
        self._on_transfer = on_transfer
        self._backends: dict[str, _Observed] = {}
        self._backends_lock = threading.Lock()  # warm_up creates backends in a thread

    def for_url(self, url: str) -> ObjectStore:
        """The backend for ``url``; raises StorageError for unsupported schemes (dockerhub://...)."""
        registration = _SCHEMES.get(scheme_of(url))
        if registration is None:
            raise StorageError(f"unsupported locator scheme {scheme_of(url)!r} in {redact_url(url)!r}")
        return self._backend(registration)

    def check(self, url: str) -> None:
        """Refuse (LocatorRefused) a locator this runner must not touch, before anything is fetched: one that
        is neither a URL nor an absolute path, or one its backend confines (local paths outside the storage
        roots). Blocking for confined backends (it resolves paths): run it in a thread. An unsupported
        scheme passes: whether another runner can serve it is for the transfer to find out, as before."""
        try:
            scheme = scheme_of(url)
        except StorageError as exc:
            raise LocatorRefused(str(exc)) from None
        registration = _SCHEMES.get(scheme)
        if registration is None:
            return
        backend = self._backend(registration).backend
        if isinstance(backend, Confines):
            backend.confine(url)

    def _backend(self, registration: _Registration) -> _Observed:
        with self._backends_lock:
            backend = self._backends.get(registration.kind)
            if backend is None:
                backend = self._backends[registration.kind] = _Observed(
                    registration.factory(self.options), self.health, self._on_transfer)
            return backend

    def warm_up(self, kinds: Sequence[str] | None = None) -> None:
        """Create the backends of ``kinds``, in that order (default: every registered one), and let each
        prepare (:class:`WarmsUp`), so the runner's first experiment does not pay for imports and models.

        Blocking: the runner calls it from a background thread at start-up; an experiment that needs a
        backend meanwhile waits for that one (the same locks), never builds it twice. Never raises: a backend
        that cannot be prepared is logged, and its first real use tries again."""
        registered = {registration.kind: registration for registration in _SCHEMES.values()}
        for kind in sorted(registered) if kinds is None else kinds:
            registration = registered.get(kind)
            if registration is None:
                continue
            try:
                backend = self._backend(registration).backend
                if isinstance(backend, WarmsUp):
                    backend.warm_up()
            except Exception as exc:
                log.warning("could not prepare %s storage at start-up (its first use tries again): %s: %s",
                            kind, type(exc).__name__, exc)


__all__ = ["Confines", "Credentials", "LocatorRefused", "ObjectInfo", "ObjectStore", "StorageHealth",
           "StoreOptions", "Stores", "WarmsUp", "endpoint_of", "redact_url", "register_scheme", "scheme_of"]
