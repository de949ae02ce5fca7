"""Artifacts in and out of an experiment directory (lifecycle.md §4 and §8).

Inputs are downloaded whole to a scratch directory, unpacked there (:mod:`studio_runner.archives`) and only
then put in ``<expdir>/<label>/`` with one rename, so a refused, broken, over-budget or interrupted
(cancelled) restore never leaves any of its content where a later upload of a mutable artifact would pick it
up and overwrite the stored work with less (spec README, "Stored work is never reduced").
:func:`fetch_artifact` says exactly what happened (:class:`Restored`) and raises on every failure; the
caller uploads a mutable artifact only after ``PLACED`` or ``ABSENT``. Outputs are packed to a scratch file
and put to their locator only when they changed since the last download or upload.

What moved is counted in the :class:`TransferStats` bound to the attempt (:func:`bind_transfer_stats`): bytes
per label downloaded, served by the cache, uploaded, and the downloads in flight (where their bytes land and
how big they are), so the runner's log can say what a slow download is doing without any store knowing.

Faults say whether another attempt can help: content that can never be used (corrupt, not an archive,
unsafe, over the request's ``hdd``) is ``ArtifactRejected``/``ArchiveUnsafe`` (FAIL); a locator this runner
must not touch (a local path outside its storage roots) is ``LocatorRefused`` (the message is set aside;
:func:`check_locators` finds it before anything moves); storage trouble, a full disk (``DiskFull``) and
other I/O errors are retried. Every path a request's strings become stays inside the experiment directory:
the label is one plain name (:func:`_label_dir`), a downloaded file is named after the last segment of its
key (:func:`_object_name`), and archive members are filtered (:func:`~studio_runner.archives.safe_extract`).
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import errno
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import trio

from studio_runner.archives import (  # noqa: F401  (re-exported: the artifact API in one place)
    ENTRY_COST,
    MAX_ENTRIES,
    SINGLE_FILE_LABELS,
    detect_compression,
    dir_fingerprint,
    pack_dir,
    safe_extract,
)
from studio_runner.errors import (
    ArchiveTooManyEntries,
    ArtifactError,
    ArtifactTooLarge,
    DiskFull,
    ObjectNotFound,
    RequestInvalid,
    is_disk_full,
)
from studio_runner.request import Artifact
from studio_runner.storage import Stores, redact_url
from studio_runner.storage.base import Credentials, LocatorRefused, ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

METADATA_LABEL = "_metadata"


class Restored(enum.Enum):
    """What :func:`fetch_artifact` did; every failure raises instead.

    A mutable artifact may be uploaded later only after ``PLACED`` or ``ABSENT``: anything else would
    replace the stored object with less. Truthy only for ``PLACED`` (content was put in place).
    """

    PLACED = "placed"
    """The whole object is in ``<expdir>/<label>/`` (unpacked, or as one file)."""
    ABSENT = "absent"
    """A mutable artifact that does not exist yet: its directory is empty and starts from nothing."""
    SKIPPED = "skipped"
    """Nothing to fetch: the artifact has no locator, or is ``_metadata`` (written by the runner)."""

    def __bool__(self) -> bool:
        return self is Restored.PLACED


class DownloadCache(Protocol):
    """What ``fetch_artifact`` needs of the download cache (studio_runner.cache.ArtifactCache)."""

    async def fetch(
        self, store: ObjectStore, url: str, credentials: Credentials | None, dest: Path
    ) -> ObjectInfo: ...


class DiskBudget:
    """The ``hdd`` download budget: every byte an attempt writes while placing its inputs counts, and every
    unpacked entry :data:`ENTRY_COST` on top.

    ``limit`` of None or 0 (``hdd`` absent) means no limit. Going over the request's ``hdd`` is the
    request's fault (``ArtifactTooLarge``, FAIL); with ``free_space`` the limit is the free disk space
    instead, and going over it is ``DiskFull`` (RETRY: another runner, or this one later, may have room).
    """

    def __init__(self, limit: int | None, *, free_space: bool = False) -> None:
        self.limit = limit or None
        self.remaining: int = limit if limit else sys.maxsize
        self.free_space = free_space and bool(limit)

    @classmethod
    def for_request(cls, hdd: int, where: Path) -> DiskBudget:
        """The request's ``hdd`` when it names one, else the space free at ``where`` now."""
        if hdd:
            return cls(hdd)
        return cls(shutil.disk_usage(where).free, free_space=True)

    def check(self, n: int, what: str) -> None:
        """Raise unless ``n`` more bytes fit."""
        if n > self.remaining:
            raise self.exceeded(f"{what} needs {n} bytes; only {self.remaining} of the {self._name} are left")

    def take(self, n: int, what: str = "download") -> None:
        """Charge ``n`` bytes (after ``check``)."""
        self.check(n, what)
        self.remaining -= n

    @property
    def _name(self) -> str:
        return "free disk space" if self.free_space else "hdd budget"

    def exceeded(self, message: str) -> ArtifactError | DiskFull:
        """The error for going over this budget: the request's fault, or a full disk."""
        if self.free_space:
            return DiskFull(f"{message}: the disk is too full for this experiment's inputs")
        return ArtifactTooLarge(
            f"{message}: raise the request's hdd (resources_needed) or make the artifact smaller"
        )


# --------------------------------------------------------------------------- what moved


@dataclass
class InFlight:
    """One download under way: the store writes its bytes in ``directory`` (a temporary name, then the
    final one), so their sum there is how far it got. ``total`` is the object's size once known."""

    label: str
    store: ObjectStore
    url: str
    credentials: Credentials | None
    directory: Path | None = None
    total: int | None = None


@dataclass
class TransferStats:
    """Bytes one attempt moved, per artifact label (for its log lines), and its downloads under way."""

    downloaded: dict[str, int] = field(default_factory=dict)
    """Fetched from storage."""
    cached: dict[str, int] = field(default_factory=dict)
    """Served by the download cache (nothing fetched)."""
    uploaded: dict[str, int] = field(default_factory=dict)
    """Packed and put (unchanged directories are not uploaded and not counted)."""
    in_flight: dict[str, InFlight] = field(default_factory=dict)


_stats: contextvars.ContextVar[TransferStats | None] = contextvars.ContextVar("transfer_stats", default=None)


def bind_transfer_stats(stats: TransferStats | None) -> None:
    """Count this task's transfers (and those of the tasks it starts from now on) in ``stats``."""
    _stats.set(stats)


def current_transfer_stats() -> TransferStats | None:
    return _stats.get()


class _Watched:
    """``store`` as :func:`fetch_artifact` hands it on: records where a download lands and how big it is in
    ``flight``, and whether the store was asked at all (a cache hit never gets)."""

    def __init__(self, store: ObjectStore, flight: InFlight) -> None:
        self.store, self.flight, self.fetched = store, flight, False

    def handles(self, url: str) -> bool:
        return self.store.handles(url)

    async def get(self, url: str, dest: Path, credentials: Credentials | None = None) -> ObjectInfo:
        self.fetched = True
        self.flight.directory = Path(dest).parent
        return await self.store.get(url, dest, credentials)

    async def put(self, src: Path, url: str, credentials: Credentials | None = None) -> ObjectInfo:
        return await self.store.put(src, url, credentials)

    async def stat(self, url: str, credentials: Credentials | None = None) -> ObjectInfo | None:
        info = await self.store.stat(url, credentials)
        if info is not None and info.size >= 0 and url == self.flight.url:
            self.flight.total = info.size
        return info

    async def list(self, prefix_url: str, credentials: Credentials | None = None) -> list[ObjectInfo]:
        return await self.store.list(prefix_url, credentials)


def bytes_in(directory: Path) -> int:
    """Sum of the sizes of the files directly in ``directory`` (a download's partial and final file)."""
    total = 0
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
    except OSError:
        pass
    return total


# --------------------------------------------------------------------------- transfers


def _label_dir(expdir: Path, label: str) -> Path:
    if not label or label in (".", "..") or any(c in label for c in "/\\\0"):
        raise RequestInvalid(f"artifact label {label!r} is not a plain name", field=f"artifacts.{label}")
    return expdir / label


def _refused(artifact: Artifact, exc: LocatorRefused) -> LocatorRefused:
    """``exc`` naming the artifact it is about (a set-aside reason the experimenter can act on)."""
    return LocatorRefused(f"artifact {artifact.label!r}: {exc}",
                          field=f"experiment.artifacts.{artifact.label}")


def check_locators(chosen: Mapping[str, Artifact], stores: Stores) -> dict[str, LocatorRefused]:
    """The artifacts whose locator this runner must not touch, by label, each with its reason (blocking:
    local locators are resolved on the file system). Run before anything is downloaded, so that a request
    naming ``/etc/passwd`` or ``~/.ssh`` is set aside without a byte read or written there."""
    found: dict[str, LocatorRefused] = {}
    for label, artifact in sorted(chosen.items()):
        url = artifact.locator
        if not url:
            continue
        try:
            stores.check(url)
        except LocatorRefused as exc:
            found[label] = _refused(artifact, exc)
    return found


def _object_name(artifact: Artifact, url: str) -> str:
    name = (artifact.key or urlsplit(url).path).rstrip("/").rsplit("/", 1)[-1]
    return name if name not in ("", ".", "..") else artifact.label


def _scratch_dir(parent: Path) -> Path:
    """A private directory under ``parent``, which a concurrent ``_tidy`` may remove at any moment."""
    for _ in range(10):
        try:
            # exist_ok still raises when a concurrent _tidy removes ``parent`` between mkdir and its check
            parent.mkdir(mode=0o700, exist_ok=True)
            return Path(tempfile.mkdtemp(dir=parent))
        except (FileNotFoundError, FileExistsError):
            continue
    raise ArtifactError(f"cannot create a scratch directory under {parent}")


def _tidy(scratch: Path) -> None:
    shutil.rmtree(scratch, ignore_errors=True)
    with contextlib.suppress(OSError):
        scratch.parent.rmdir()  # the shared parent goes once empty: the client lists ../ for labels


def _make_label_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _install_tree(tree: Path, label_dir: Path) -> None:
    """Make the unpacked ``tree`` the content of ``label_dir``, all of it or (on any error) none of it.

    An empty label directory (the normal case) is swapped for the tree with one rename. Otherwise the
    entries are moved one by one and, on failure, those already moved are removed again.
    """
    os.chmod(tree, 0o700)
    try:
        os.rmdir(label_dir)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    else:
        try:
            os.rename(tree, label_dir)
        except BaseException:
            _make_label_dir(label_dir)
            raise
        return
    moved: list[Path] = []
    try:
        for name in sorted(os.listdir(tree)):
            target = label_dir / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif os.path.lexists(target):
                target.unlink()
            os.replace(tree / name, target)
            moved.append(target)
    except BaseException:
        for target in moved:
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    target.unlink()
        raise


def _place_file(blob: Path, target: Path) -> None:
    """Move the download into place, or copy it when it is a hardlink to a cache entry (kept read-only)."""
    if os.stat(blob).st_nlink > 1:
        tmp = blob.with_name(blob.name + ".copy")
        shutil.copyfile(blob, tmp)
        blob = tmp
    os.replace(blob, target)


def _io_error(exc: OSError, what: str) -> DiskFull | ArtifactError:
    if is_disk_full(exc):
        return DiskFull(f"no space left while putting {what} in place: {exc}")
    return ArtifactError(f"cannot put {what} in place: {exc}")


async def fetch_artifact(
    artifact: Artifact,
    expdir: Path,
    stores: Stores,
    budget: DiskBudget,
    cache: DownloadCache | None = None,
) -> Restored:
    """Put an input artifact in ``<expdir>/<label>/`` and say what was done (:class:`Restored`).

    The directory is created (0700) in every case. A mutable artifact that does not exist yet is normal
    (``ABSENT``); a missing immutable one raises ArtifactError. Only immutable artifacts go through ``cache``.
    Every failure raises, and on failure or cancellation nothing of the artifact is in the directory: it is
    downloaded and unpacked in scratch space under ``<expdir>/.downloads`` (removed in every case) and put in
    place with one rename. Content that can never be used raises ``ArtifactRejected`` or ``ArchiveUnsafe``
    (FAIL); a full disk raises ``DiskFull``; storage and other I/O errors are retried.
    """
    what = f"artifact {artifact.label}"
    label_dir = _label_dir(expdir, artifact.label)
    url = artifact.locator
    scratch: Path | None = None
    try:
        await trio.to_thread.run_sync(_make_label_dir, label_dir)
        if artifact.label == METADATA_LABEL or not url:
            return Restored.SKIPPED
        stats = _stats.get()
        store: ObjectStore = stores.for_url(url)
        watched = None
        if stats is not None:
            flight = InFlight(artifact.label, store, url, artifact.access_credentials)
            store = watched = _Watched(store, flight)
            stats.in_flight[artifact.label] = flight
        scratch = await trio.to_thread.run_sync(_scratch_dir, expdir / ".downloads")
        blob = scratch / "object"
        try:
            if cache is not None and not artifact.mutable:
                await cache.fetch(store, url, artifact.access_credentials, blob)
            else:
                await store.get(url, blob, artifact.access_credentials)
        except ObjectNotFound:
            if artifact.mutable:
                return Restored.ABSENT
            shown = redact_url(url)
            raise ArtifactError(f"immutable artifact {artifact.label} not found at {shown}") from None
        except LocatorRefused as exc:
            raise _refused(artifact, exc) from None
        finally:
            if stats is not None:
                stats.in_flight.pop(artifact.label, None)
        size = (await trio.to_thread.run_sync(os.stat, blob)).st_size
        if stats is not None and watched is not None:
            (stats.downloaded if watched.fetched else stats.cached)[artifact.label] = size
        if not artifact.unpack:
            budget.take(size, what)
            target = label_dir / _object_name(artifact, url)
            await trio.to_thread.run_sync(_place_file, blob, target)
            return Restored.PLACED
        budget.check(size, what)
        tree = scratch / "tree"
        try:
            charged = await trio.to_thread.run_sync(
                partial(safe_extract, blob, tree, budget.remaining, check=trio.from_thread.check_cancelled)
            )
        except ArtifactTooLarge as exc:
            if budget.free_space and not isinstance(exc, ArchiveTooManyEntries):
                raise DiskFull(f"{what}: {exc}: the disk is too full for this experiment's inputs") from exc
            raise
        budget.take(charged, what)
        await trio.to_thread.run_sync(_install_tree, tree, label_dir)
        return Restored.PLACED
    except OSError as exc:
        raise _io_error(exc, what) from exc
    finally:
        if scratch is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_tidy, scratch)


def _prepare_upload(
    label_dir: Path, scratch_parent: Path, key: str, previous: str | None, single_file: str | None = None
) -> tuple[str | None, Path | None]:
    """(fingerprint, packed file or None); fingerprint taken first so changes made while packing count."""
    if not label_dir.is_dir():
        return None, None
    fingerprint = dir_fingerprint(label_dir)
    if fingerprint == previous:
        return fingerprint, None
    scratch = _scratch_dir(scratch_parent)
    packed = scratch / "artifact.tar"
    try:
        pack_dir(label_dir, packed, key, single_file)
    except BaseException as exc:
        _tidy(scratch)
        if isinstance(exc, OSError) and is_disk_full(exc):
            raise DiskFull(f"no space left while packing {label_dir.name} for upload: {exc}") from exc
        raise
    return fingerprint, packed


async def upload_artifact(
    artifact: Artifact, expdir: Path, stores: Stores, previous_fingerprint: str | None
) -> str | None:
    """Upload ``<expdir>/<label>/`` as a tar to the artifact's locator unless unchanged.

    Returns the directory's fingerprint (to pass as ``previous_fingerprint`` next time), or None when the
    directory or the locator is missing. ``_metadata`` is not an archive: the executor uploads its files.
    """
    if artifact.label == METADATA_LABEL:
        raise ArtifactError("_metadata is uploaded file by file, not as an archive")
    url = artifact.locator
    label_dir = _label_dir(expdir, artifact.label)
    if not url:
        return None
    store = stores.for_url(url)
    key = artifact.key or urlsplit(url).path
    fingerprint, packed = await trio.to_thread.run_sync(
        _prepare_upload, label_dir, expdir / ".uploads", key, previous_fingerprint,
        artifact.label if artifact.label in SINGLE_FILE_LABELS else None,
    )
    if packed is None:
        return fingerprint
    try:
        try:
            await store.put(packed, url, artifact.access_credentials)
        except LocatorRefused as exc:
            raise _refused(artifact, exc) from None
        stats = _stats.get()
        if stats is not None:
            stats.uploaded[artifact.label] = (await trio.to_thread.run_sync(os.stat, packed)).st_size
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_tidy, packed.parent)
    return fingerprint


async def transfer_each(
    jobs: Mapping[str, Callable[[], Awaitable[None]]],
    limit: int,
    *,
    cancel_on_failure: bool,
    on_failure: Callable[[str, Exception], None] | None = None,
) -> None:
    """Run the transfers ``jobs`` (by artifact label), ``limit`` at once, and raise the failure of the first
    label in order, as itself (no exception group), once all have ended.

    With ``cancel_on_failure`` a failure cancels the others (a failed download means nothing runs); without
    it they finish and what they moved counts (uploads). ``on_failure(label, error)`` is told about the
    failure that is raised; the others are only logged. No reference cycle outlives the call: the failures'
    tracebacks hold the frames that held them, so those references are dropped before raising (an attempt's
    state would otherwise wait for a full garbage collection)."""
    limiter = trio.CapacityLimiter(limit)
    failures: dict[str, Exception] = {}

    async def run(label: str, job: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
        async with limiter:
            try:
                await job()
            except Exception as exc:  # raised below, outside the nursery
                failures[label] = exc
                if cancel_on_failure:
                    scope.cancel()

    async with trio.open_nursery() as nursery:
        for label, job in jobs.items():
            nursery.start_soon(run, label, job, nursery.cancel_scope)
    if not failures:
        return
    label = min(failures)
    error = failures.pop(label)
    for other, exc in failures.items():
        log.debug("%s failed too: %s", other, exc)
    failures.clear()
    if on_failure is not None:
        on_failure(label, error)
    try:
        raise error
    finally:
        del error
