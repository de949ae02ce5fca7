"""Archives, safely: what an artifact object is (by content), unpacking it without trusting it, and
packing a directory the way the StudioML client reads it back.

Archives are recognised by content, never by name: the client has written bzip2 data under ``.tgz`` and
plain tar under ``.tar.gz`` (message.md §3.3). Extraction trusts nothing in the archive. On top of tarfile's
``data`` filter (required: without it we refuse to unpack at all) it refuses absolute names, ``..``
components, members placed through a symlink, link targets that leave the directory even lexically, hard
links to anything but a file extracted earlier, and special files. It charges every entry
:data:`ENTRY_COST` on top of its bytes against the disk budget (50,000 empty files are not free: each costs
an inode and a block) and refuses archives of more than :data:`MAX_ENTRIES` entries whatever the budget.

Faults are told apart by whether another attempt could change them: an archive that is corrupt, not an
archive at all, unsafe or too big fails the experiment (``ArchiveCorrupt``, ``ArchiveUnsafe``,
``ArtifactTooLarge``); a full disk is ``DiskFull`` and other I/O errors are ``ArtifactError``, both retried.

Outputs are packed the way the client's ``untar_artifact`` reads them (``tarfile.open(name, 'r')``, any
compression): bare relative member names, Go-style (``output.tar`` holds ``output``), except single-file
artifacts such as ``retval``, whose sole member is ``./retval`` so the client turns it back into a file.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import lzma
import math
import os
import re
import stat
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from studio_runner.errors import (
    ArchiveCorrupt,
    ArchiveTooManyEntries,
    ArchiveUnsafe,
    ArtifactError,
    ArtifactTooLarge,
    DiskFull,
    is_disk_full,
)

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_MAGIC = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),  # an empty zip
)
_TAR_READ = {"gzip": "r:gz", "bzip2": "r:bz2", "xz": "r:xz", "zstd": "r:zst", "tar": "r:"}
# gzip.BadGzipFile is an OSError: it must be caught as corruption before OSError is taken for an I/O fault.
_CORRUPT = (
    tarfile.TarError, zipfile.BadZipFile, gzip.BadGzipFile, EOFError, zlib.error, lzma.LZMAError, RuntimeError
)

ENTRY_COST = 4096
"""Bytes charged per archive entry on top of its data: roughly the inode and block every file costs."""
MAX_ENTRIES = 1_000_000
"""No archive may hold more entries than this, whatever the budget (also when the request names no hdd)."""


# --------------------------------------------------------------------------- detection and extraction


def _tar_supports(kind: str) -> bool:
    return kind in tarfile.TarFile.OPEN_METH


def detect_compression(path: Path) -> str:
    """``gzip``, ``bzip2``, ``xz``, ``zstd``, ``zip`` or ``tar``, from the magic bytes only."""
    with open(path, "rb") as f:
        head = f.read(8)
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            if kind == "zstd" and not _tar_supports("zst"):
                raise ArchiveCorrupt(
                    f"{path.name}: zstd-compressed archives cannot be read by this runner's Python; "
                    "repack it as a tar (plain, gzip, bzip2 or xz) or zip"
                )
            return kind
    if not tarfile.is_tarfile(path):
        raise ArchiveCorrupt(
            f"{path.name}: not an archive (no known compression and not a tar); send a tar or zip, or mark "
            "the artifact unpack: false to receive the file as it is"
        )
    return "tar"


def _unsafe(name: str, reason: str) -> ArchiveUnsafe:
    return ArchiveUnsafe(f"archive member {name!r}: {reason}")


def _member_parts(name: str, shown: str) -> list[str]:
    """The member's path components; refuses absolute names and ``..``. Empty for the root itself."""
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        raise _unsafe(shown, "absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _unsafe(shown, "'..' path component")
    return parts


def _check_parents(dest: Path, parts: list[str], shown: str) -> Path:
    """Refuse a member whose existing parent path under ``dest`` is anything but real directories.

    Stricter than "the real parent stays inside": archives made by tar never place members through a link,
    and refusing outright does not depend on ``realpath`` getting every symlink chain right. Returns the
    member's target path, with any symlink already at it removed (so nothing is written through it).
    """
    current = dest
    for part in parts[:-1]:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            break
        if stat.S_ISLNK(st.st_mode):
            raise _unsafe(shown, f"its parent {current.relative_to(dest)} is a symlink")
    target = dest.joinpath(*parts)
    if target.is_symlink():
        target.unlink()
    return target


def _check_symlink_target(parts: list[str], linkname: str, shown: str) -> None:
    """A relative target whose ``..`` steps (leading only) stay within the archive root, lexically."""
    if not linkname:
        raise _unsafe(shown, "symlink with an empty target")
    if linkname.startswith("/"):
        raise _unsafe(shown, f"symlink to absolute path {linkname!r}")
    depth = len(parts) - 1
    named = False
    for step in linkname.split("/"):
        if step in ("", "."):
            continue
        if step != "..":
            named = True
        elif named:
            raise _unsafe(shown, f"symlink target {linkname!r} has '..' after a name")
        else:
            depth -= 1
            if depth < 0:
                raise _unsafe(shown, f"symlink target {linkname!r} leaves the directory")


class _Charges:
    """What an extraction has cost so far: file bytes plus a fixed cost per entry, and the entry count."""

    def __init__(
        self, max_bytes: int, entry_cost: int, max_entries: int, check: Callable[[], None] | None
    ) -> None:
        self.max_bytes, self.entry_cost, self.max_entries = max_bytes, entry_cost, max_entries
        self.check = check
        self.charged = 0
        self.entries = 0

    def entry(self, shown: str, size: int) -> None:
        """Charge one entry of ``size`` data bytes before it is written; raise once over a limit."""
        if self.check is not None:
            self.check()  # e.g. trio.from_thread.check_cancelled: stop between members when cancelled
        self.entries += 1
        if self.entries > self.max_entries:
            raise ArchiveTooManyEntries(
                f"archive has more than {self.max_entries} entries, more than any archive may hold; "
                "pack the files into fewer, larger ones"
            )
        self.charged += self.entry_cost + size
        self.over(shown)

    def data(self, shown: str, n: int) -> None:
        """Charge ``n`` more data bytes of the entry being written (zip, whose sizes may lie)."""
        if self.check is not None:
            self.check()
        self.charged += n
        self.over(shown)

    def over(self, shown: str) -> None:
        if self.charged > self.max_bytes:
            raise ArtifactTooLarge(
                f"archive member {shown!r}: the archive expands beyond the budget of {self.max_bytes} bytes "
                f"(file bytes plus {self.entry_cost} bytes per entry, {self.entries} entries so far); "
                "raise the request's hdd (resources_needed) or make the artifact smaller"
            )


class _TarGuard:
    """tarfile extraction filter: our checks, then tarfile's ``data`` filter, then the budget."""

    def __init__(self, dest: Path, charges: _Charges) -> None:
        self.dest = dest
        self.charges = charges
        self.files: set[str] = set()

    def __call__(self, member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
        shown = member.name
        parts = _member_parts(member.name, shown)
        if not parts:
            self.charges.entry(shown, 0)  # counted all the same: the cap bounds time and memory too
            return None  # "./": the directory itself
        if member.isdev():
            raise _unsafe(shown, "device or FIFO")
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
            raise _unsafe(shown, f"unsupported member type {member.type!r}")
        if member.issym():
            _check_symlink_target(parts, member.linkname, shown)
        if member.islnk():
            link = member.linkname
            if link.startswith("/") or ".." in link.split("/"):
                raise _unsafe(shown, f"hard link to {link!r}, outside the directory")
            if "/".join(p for p in link.split("/") if p not in ("", ".")) not in self.files:
                raise _unsafe(shown, f"hard link to {link!r}, which is not a file extracted earlier")
        try:
            filtered = tarfile.data_filter(member, path)  # type: ignore[attr-defined]
        except tarfile.FilterError as exc:  # type: ignore[attr-defined]
            raise _unsafe(shown, str(exc)) from None
        key = "/".join(parts)
        self.charges.entry(shown, member.size if member.isreg() else 0)
        if member.isreg():
            self.files.add(key)
        else:
            self.files.discard(key)
        _check_parents(self.dest, parts, shown)
        return filtered


_END_ATTR = "_studio_runner_end"
_DRAIN_LIMIT = 64 << 20


class _EndTracker(tarfile.TarInfo):
    """Remembers why tarfile stopped reading headers.

    tarfile takes an unreadable header anywhere after the first member for the end of the archive, so a
    damaged or truncated archive would be restored in part, silently; :func:`_extract_tar` refuses that.
    """

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> Self:
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as exc:
            setattr(tf, _END_ATTR, exc)
            raise


def _extract_tar(archive: Path, dest: Path, charges: _Charges, mode: str) -> None:
    if not hasattr(tarfile, "data_filter"):
        raise ArtifactError("this Python's tarfile has no extraction filters (needs 3.10.12+/3.11.4+/3.12+)")
    guard = _TarGuard(dest, charges)
    with tarfile.open(archive, mode, tarinfo=_EndTracker) as tf:  # type: ignore[call-overload]
        tf.extractall(dest, filter=guard)  # streams: the guard sees each member as it is read
        end = getattr(tf, _END_ATTR, None)  # EOFHeaderError/EmptyHeaderError: the archive's proper end
        if type(end).__name__ in ("InvalidHeaderError", "TruncatedHeaderError"):  # not in typeshed
            raise ArchiveCorrupt(
                f"{archive.name}: damaged or truncated after {tf.offset} bytes ({end}); re-upload it"
            )
        # Read what follows the end marker, so compressed streams verify their checksums (gzip's CRC).
        drained = 0
        while drained < _DRAIN_LIMIT and (chunk := tf.fileobj.read(_CHUNK)):  # type: ignore[union-attr]
            drained += len(chunk)
            if charges.check is not None:
                charges.check()


def _zip_mode(info: zipfile.ZipInfo, shown: str) -> int:
    """Permission bits for a zip file entry; refuses symlinks and special files."""
    unix = info.external_attr >> 16 if info.create_system == 3 else 0
    kind = stat.S_IFMT(unix)
    if kind == stat.S_IFLNK:
        raise _unsafe(shown, "symlink entries are not supported in zip archives")
    if kind not in (0, stat.S_IFREG):
        raise _unsafe(shown, "special file")
    if not unix & 0o777:
        return 0o644
    mode = (unix & 0o755) | 0o600
    return mode if mode & 0o100 else mode & ~0o111


def _extract_zip(archive: Path, dest: Path, charges: _Charges) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            shown = info.filename
            parts = _member_parts(shown.replace("\\", "/"), shown)
            if not parts:
                continue
            if info.is_dir():
                charges.entry(shown, 0)
                _check_parents(dest, parts, shown).mkdir(parents=True, exist_ok=True)
                continue
            mode = _zip_mode(info, shown)
            charges.entry(shown, 0)  # the data is charged as it is written: the sizes in a zip may lie
            target = _check_parents(dest, parts, shown)
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with zf.open(info) as src, os.fdopen(fd, "wb") as out:
                while chunk := src.read(_CHUNK):
                    charges.data(shown, len(chunk))
                    out.write(chunk)
            os.chmod(target, mode)


def safe_extract(
    archive: Path,
    dest: Path,
    max_bytes: int,
    *,
    entry_cost: int = ENTRY_COST,
    max_entries: int = MAX_ENTRIES,
    check: Callable[[], None] | None = None,
) -> int:
    """Unpack a tar (plain/gz/bz2/xz) or zip into ``dest``; returns what it charged against ``max_bytes``.

    The charge is the file bytes written plus ``entry_cost`` per entry (file, directory or link). Raises
    ArchiveUnsafe for anything that could escape ``dest``, ArtifactTooLarge past ``max_bytes`` or
    ``max_entries``, ArchiveCorrupt for data that is not a readable archive, DiskFull when the disk fills up
    and ArtifactError for other I/O errors. ``check`` is called before each entry and each chunk of zip data
    (pass ``trio.from_thread.check_cancelled`` to make a worker thread's extraction cancellable). ``dest`` may
    hold partial content after a failure: unpack into scratch space.
    """
    kind = detect_compression(archive)
    dest.mkdir(parents=True, exist_ok=True)
    real_dest = Path(os.path.realpath(dest))
    charges = _Charges(max_bytes, entry_cost, max_entries, check)
    try:
        if kind == "zip":
            _extract_zip(archive, real_dest, charges)
        else:
            _extract_tar(archive, real_dest, charges, _TAR_READ[kind])
    except _CORRUPT as exc:
        raise ArchiveCorrupt(f"{archive.name}: cannot read {kind} archive ({exc}); re-upload it") from exc
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFull(f"no space left while unpacking {archive.name}: {exc}") from exc
        if exc.errno is None:  # raised by a decompressor about its data (bz2: "Invalid data stream")
            raise ArchiveCorrupt(f"{archive.name}: cannot read {kind} archive ({exc}); re-upload it") from exc
        raise ArtifactError(f"{archive.name}: unpacking failed: {exc}") from exc
    return charges.charged


# --------------------------------------------------------------------------- packing and fingerprints


def _entries(root: Path) -> list[str]:
    """Every path under ``root`` (relative, '/'-separated, sorted), without following symlinks."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        found.extend(prefix + name for name in dirnames + filenames)
    return sorted(found)


def dir_fingerprint(path: Path) -> str:
    """A hash of names, types, sizes, modes, mtimes and link targets: equal means "nothing to upload"."""
    digest = hashlib.sha256()
    for rel in _entries(path):
        full = os.path.join(path, rel)
        try:
            st = os.lstat(full)
            link = os.readlink(full) if stat.S_ISLNK(st.st_mode) else ""
        except FileNotFoundError:
            continue
        line = f"{rel}\0{st.st_mode:o}\0{st.st_size}\0{st.st_mtime_ns}\0{link}\n"
        digest.update(line.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _tar_write_mode(key: str) -> tuple[str, dict[str, int]]:
    name = key.rsplit("/", 1)[-1].lower()
    if name.endswith((".gz", ".tgz", ".gzip")):
        return "w:gz", {"compresslevel": 6}
    if name.endswith((".bz2", ".bzip2", ".tbz", ".tbz2", ".tb2")):
        return "w:bz2", {}
    if name.endswith((".xz", ".txz")):
        return "w:xz", {}
    if name.endswith((".zst", ".zstd", ".tzst")):
        if not _tar_supports("zst"):
            raise ArtifactError(f"{key}: zstd compression is not supported by this Python")
        return "w:zst", {}
    if name.endswith(".zip"):
        raise ArtifactError(f"{key}: artifacts are uploaded as tar archives, not zip")
    return "w", {}


class _Exactly:
    """Reads exactly ``size`` bytes: a file that grew is cut at ``size``, one that shrank is zero-padded.

    tarfile writes the header (with the size from stat) before the data, so a checkpoint of a file the
    experiment is rewriting must still deliver that many bytes or the archive would be corrupt.
    """

    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f, self.left, self.short = f, size, False

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = b"" if self.short else self.f.read(n)
        if len(data) < n:
            self.short = True
            data += bytes(n - len(data))
        self.left -= n
        return data


SINGLE_FILE_LABELS = frozenset({"retval"})
"""Artifacts the client reads back as one file, not a directory (spec README, "Single-file artifacts").

The completion-service stub writes its result to ``../retval/retval`` under a runner, and the client's
``untar_artifact`` turns a tar back into a file only when its sole member is ``./<name>`` (what its own
``_tar_artifact_single_file`` writes); with Go's bare ``retval`` the client gets a directory and
``CompletionService.getResults`` never returns. ``output`` keeps Go's bare name: the client's only reader of
it (the log tail) takes the first member whatever its name, and existing consumers expect ``output``.
"""


def _single_file_name(src: Path, label: str | None) -> str | None:
    """``label`` when ``src`` holds exactly one entry, a regular file named ``label``; else None."""
    if label is None:
        return None
    try:
        if os.listdir(src) != [label] or not stat.S_ISREG(os.lstat(os.path.join(src, label)).st_mode):
            return None
    except OSError:
        return None
    return label


def pack_dir(src: Path, out: Path, key: str, single_file: str | None = None) -> None:
    """Tar the contents of ``src`` into ``out``, compressed by ``key``'s extension (lifecycle.md §8).

    Members have bare relative names (``output.tar`` holds ``output``), except that when ``src`` holds only
    a regular file named ``single_file`` it is stored as ``./<single_file>``, the client's single-file form
    (see :data:`SINGLE_FILE_LABELS`); a reader that unpacks into a directory gets the same file either way.
    Files that vanish while packing are left out; a file that changes size keeps its stat size (see
    :class:`_Exactly`); sockets, FIFOs and devices are skipped.

    Every member's mtime is the packing time rounded up to the next whole second (or the file's own, if
    later): the client's ``CompletionService`` accepts a ``retval`` only when its extracted mtime is later
    than the moment it submitted the task, and tar keeps whole seconds, so a fast experiment's result
    stamped with its real (truncated) mtime would never be collected (spec README, "Completion-service
    timing").
    """
    mode, options = _tar_write_mode(key)
    lone = _single_file_name(src, single_file)
    stamp = math.ceil(time.time())
    with tarfile.open(out, mode, copybufsize=_CHUNK, **options) as tf:  # type: ignore[call-overload]
        added: set[str] = set()
        for rel in _entries(src):
            full = os.path.join(src, rel)
            try:
                info = tf.gettarinfo(full, arcname="./" + rel if rel == lone else rel)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("not packing %s: %s", full, exc)
                continue
            if info is None or not (info.isreg() or info.isdir() or info.issym() or info.islnk()):
                log.warning("not packing %s: not a file, directory or link", full)
                continue
            if info.islnk() and info.linkname not in added:  # its first name was skipped: store the data
                info.type, info.linkname = tarfile.REGTYPE, ""
            info.mtime = max(stamp, math.ceil(info.mtime))
            if info.isreg():
                try:
                    fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    log.warning("not packing %s: %s", full, exc)
                    continue
                with os.fdopen(fd, "rb") as f:
                    info.size = os.fstat(f.fileno()).st_size
                    reader = _Exactly(f, info.size)
                    tf.addfile(info, reader)  # type: ignore[arg-type]
                if reader.short:
                    log.warning("%s shrank while being packed; its tail was zero-filled", full)
            else:
                tf.addfile(info)
            added.add(rel)
    # gettarinfo() points each TarInfo back at the TarFile, which lists them all in ``members``: a reference
    # cycle that would keep every member (and the closed file object) alive until the next full garbage
    # collection, which in a long-running runner can be dozens of attempts away. Break it now.
    tf.members.clear()
