"""The contract every storage backend honours: objects addressed by URL.

Artifacts carry their own locator (``s3://host:port/bucket/key``, ``file://...``, a plain path, or an
``https://`` URL), so the runner picks a backend per URL scheme rather than per deployment. All methods are
async; backends built on blocking libraries (boto3) run them in ``trio.to_thread``.

``put`` must be atomic to readers: a reader sees the old object or the new one, never a half-written one.

A request names its own locators, so a backend that reaches the runner's own machine (local files) confines
them (:class:`Confines`) and refuses the rest with :class:`LocatorRefused`: the request's fault, so its
message is set aside at once, never retried, and never taken for a storage outage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from studio_runner.errors import RequestInvalid


class LocatorRefused(RequestInvalid):
    """A request's locator names a place this runner does not serve (a local path outside its storage roots,
    or one that is no URL at all). Its message is set aside (RequestInvalid's disposition); deliberately not a
    StorageError, which would be retried and would pause intake as if storage were down."""


@dataclass(frozen=True)
class Credentials:
    """Access keys for one object store. ``repr`` never shows the secret."""

    access_key: str
    secret_key: str
    session_token: str | None = None
    region: str | None = None

    def __repr__(self) -> str:
        return f"Credentials(access_key={self.access_key[:4]}..., region={self.region!r})"


@dataclass(frozen=True)
class ObjectInfo:
    url: str
    size: int
    etag: str | None = None
    mtime: float | None = None


@runtime_checkable
class ObjectStore(Protocol):
    """Get, put, stat and list objects by URL."""

    def handles(self, url: str) -> bool:
        """Whether this backend understands ``url``."""

    async def get(self, url: str, dest: Path, credentials: Credentials | None = None) -> ObjectInfo:
        """Download ``url`` to the file ``dest`` (written whole or not at all). Raises ObjectNotFound."""

    async def put(self, src: Path, url: str, credentials: Credentials | None = None) -> ObjectInfo:
        """Upload the file ``src`` to ``url``, atomically for readers."""

    async def stat(self, url: str, credentials: Credentials | None = None) -> ObjectInfo | None:
        """Size and version of ``url``, or None when it does not exist."""

    async def list(self, prefix_url: str, credentials: Credentials | None = None) -> list[ObjectInfo]:
        """Objects whose URL starts with ``prefix_url``."""


@runtime_checkable
class Confines(Protocol):
    """A backend that serves only some of the locators of its scheme (local files under its roots)."""

    def confine(self, url: str) -> Path:
        """The place ``url`` names, resolved (symlinks, ``..``); LocatorRefused when it is not served.
        Blocking (it asks the file system): call it from a thread in async code."""


@runtime_checkable
class WarmsUp(Protocol):
    """A backend with set-up worth doing at runner start-up (imports, parsed models, TLS contexts) instead of
    in the first experiment that uses it."""

    def warm_up(self) -> None:
        """Prepare now (blocking, thread-safe: the runner calls it from a background thread); raise if that
        fails (the caller logs it, and the first real use tries again)."""
