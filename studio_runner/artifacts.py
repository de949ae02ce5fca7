"""Artifacts in and out of an experiment directory (lifecycle.md §4 and §8).

Inputs are downloaded whole to a scratch directory, unpacked there (:mod:`studio_runner.archives`) and only
then moved into ``<expdir>/<label>/``, so a refused or broken archive never leaves half its content where a
later upload of a mutable artifact would pick it up. Outputs are packed to a scratch file and put to their
locator only when they changed since the last download or upload.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import trio

from studio_runner.archives import (  # noqa: F401  (re-exported: the artifact API in one place)
    SINGLE_FILE_LABELS,
    detect_compression,
    dir_fingerprint,
    pack_dir,
    safe_extract,
)
from studio_runner.errors import ArtifactError, ObjectNotFound, RequestInvalid
from studio_runner.request import Artifact
from studio_runner.storage import Stores, redact_url
from studio_runner.storage.base import Credentials, ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

METADATA_LABEL = "_metadata"
class DownloadCache(Protocol):
    """What ``fetch_artifact`` needs of the download cache (studio_runner.cache.ArtifactCache)."""

    async def fetch(
        self, store: ObjectStore, url: str, credentials: Credentials | None, dest: Path
    ) -> ObjectInfo: ...


class DiskBudget:
    """The ``hdd`` download budget: every byte an attempt writes while placing its inputs counts.

    ``limit`` of None or 0 (``hdd`` absent) means no limit.
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit or None
        self.remaining: int = limit if limit else sys.maxsize

    def check(self, n: int, what: str) -> None:
        if n > self.remaining:
            raise ArtifactError(f"{what} needs {n} bytes; only {self.remaining} of the hdd budget are left")

    def take(self, n: int, what: str = "download") -> None:
        self.check(n, what)
        self.remaining -= n


# --------------------------------------------------------------------------- transfers


def _label_dir(expdir: Path, label: str) -> Path:
    if not label or label in (".", "..") or any(c in label for c in "/\\\0"):
        raise RequestInvalid(f"artifact label {label!r} is not a plain name", field=f"artifacts.{label}")
    return expdir / label


def _object_name(artifact: Artifact, url: str) -> str:
    name = (artifact.key or urlsplit(url).path).rstrip("/").rsplit("/", 1)[-1]
    return name if name not in ("", ".", "..") else artifact.label


def _scratch_dir(parent: Path) -> Path:
    """A private directory under ``parent``, which a concurrent ``_tidy`` may remove at any moment."""
    for _ in range(10):
        parent.mkdir(mode=0o700, exist_ok=True)
        try:
            return Path(tempfile.mkdtemp(dir=parent))
        except FileNotFoundError:
            continue
    raise ArtifactError(f"cannot create a scratch directory under {parent}")


def _tidy(scratch: Path) -> None:
    shutil.rmtree(scratch, ignore_errors=True)
    with contextlib.suppress(OSError):
        scratch.parent.rmdir()  # the shared parent goes once empty: the client lists ../ for labels


def _make_label_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _move_contents(tree: Path, label_dir: Path) -> None:
    for name in sorted(os.listdir(tree)):
        target = label_dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif os.path.lexists(target):
            target.unlink()
        os.replace(tree / name, target)


def _place_file(blob: Path, target: Path) -> None:
    """Move the download into place, or copy it when it is a hardlink to a cache entry (kept read-only)."""
    if os.stat(blob).st_nlink > 1:
        tmp = blob.with_name(blob.name + ".copy")
        shutil.copyfile(blob, tmp)
        blob = tmp
    os.replace(blob, target)


async def fetch_artifact(
    artifact: Artifact,
    expdir: Path,
    stores: Stores,
    budget: DiskBudget,
    cache: DownloadCache | None = None,
) -> bool:
    """Put an input artifact in ``<expdir>/<label>/``; True when content was placed.

    The directory is created (0700) in every case. A mutable artifact that does not exist yet is normal
    (False); a missing immutable one raises ArtifactError. Only immutable artifacts go through ``cache``.
    """
    label_dir = _label_dir(expdir, artifact.label)
    await trio.to_thread.run_sync(_make_label_dir, label_dir)
    url = artifact.locator
    if artifact.label == METADATA_LABEL or not url:
        return False
    store = stores.for_url(url)
    scratch = await trio.to_thread.run_sync(_scratch_dir, expdir / ".downloads")
    try:
        blob = scratch / "object"
        try:
            if cache is not None and not artifact.mutable:
                await cache.fetch(store, url, artifact.access_credentials, blob)
            else:
                await store.get(url, blob, artifact.access_credentials)
        except ObjectNotFound:
            if artifact.mutable:
                return False
            shown = redact_url(url)
            raise ArtifactError(f"immutable artifact {artifact.label} not found at {shown}") from None
        size = (await trio.to_thread.run_sync(os.stat, blob)).st_size
        what = f"artifact {artifact.label}"
        if not artifact.unpack:
            budget.take(size, what)
            target = label_dir / _object_name(artifact, url)
            await trio.to_thread.run_sync(_place_file, blob, target)
            return True
        budget.check(size, what)
        tree = scratch / "tree"
        written = await trio.to_thread.run_sync(safe_extract, blob, tree, budget.remaining)
        budget.take(written, what)
        await trio.to_thread.run_sync(_move_contents, tree, label_dir)
        return True
    finally:
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
    except BaseException:
        _tidy(scratch)
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
        await store.put(packed, url, artifact.access_credentials)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_tidy, packed.parent)
    return fingerprint
