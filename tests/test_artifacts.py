"""Artifact download, safe unpacking, packing and upload, on real files and real archives."""

from __future__ import annotations

import bz2
import gc
import gzip
import io
import lzma
import math
import os
import shutil
import stat
import subprocess
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest
import trio

from studio_runner.artifacts import (
    ENTRY_COST,
    MAX_ENTRIES,
    DiskBudget,
    Restored,
    detect_compression,
    dir_fingerprint,
    fetch_artifact,
    pack_dir,
    safe_extract,
    upload_artifact,
)
from studio_runner.cache import ArtifactCache
from studio_runner.errors import (
    ArchiveCorrupt,
    ArchiveTooManyEntries,
    ArchiveUnsafe,
    ArtifactError,
    ArtifactTooLarge,
    DiskFull,
    Disposition,
)
from studio_runner.request import Artifact
from studio_runner.storage import Stores

BIG = 1 << 40

# ----------------------------------------------------------------------------------------------- helpers


def reg(name: str, data: bytes = b"", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def node(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info, None


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def tree(root: Path) -> dict[str, object]:
    """Relative path → file bytes, ('link', target) or 'dir', for comparing directories."""
    found: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if full.is_symlink():
                found[rel] = ("link", os.readlink(full))
            elif full.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = full.read_bytes()
    return found


def disk_bytes(root: Path) -> int:
    return sum(len(v) for v in tree(root).values() if isinstance(v, bytes))


Members = list[tuple[tarfile.TarInfo, "bytes | None"]]


def extract(members: Members, tmp_path: Path, max_bytes: int = BIG) -> Path:
    dest = tmp_path / "dest"
    safe_extract(make_tar(tmp_path / "a.tar", members), dest, max_bytes, entry_cost=0)
    return dest


# ----------------------------------------------------------------------------------- unsafe archives


def test_dotdot_member_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ArchiveUnsafe, match=r"\.\./evil") as caught:
        extract([reg("ok", b"1"), reg("../evil", b"x")], tmp_path)
    assert caught.value.disposition is Disposition.FAIL
    assert not (tmp_path / "evil").exists()
    with pytest.raises(ArchiveUnsafe, match="'..'"):
        extract([reg("a/../../evil2", b"x")], tmp_path)
    assert not (tmp_path / "evil2").exists()


def test_absolute_member_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "abs-evil"
    with pytest.raises(ArchiveUnsafe, match="absolute"):
        extract([reg(str(target), b"x")], tmp_path)
    assert not target.exists()
    assert not (tmp_path / "dest" / str(target).lstrip("/")).exists()


def test_symlink_escape_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ArchiveUnsafe, match="link"):
        extract([node("link", tarfile.SYMTYPE, "/etc"), reg("link/passwd", b"pwned")], tmp_path)
    assert not (tmp_path / "dest" / "link").exists()
    outside = tmp_path / "outside"
    outside.mkdir()
    for i, linkname in enumerate(["../outside", "..", "sub/../../outside", "a/b/../../.."]):
        with pytest.raises(ArchiveUnsafe):
            extract([node(f"l{i}", tarfile.SYMTYPE, linkname), reg(f"l{i}/evil", b"x")], tmp_path)
    assert list(outside.iterdir()) == []


def test_symlink_targets_are_checked_lexically_too(tmp_path: Path) -> None:
    """Not only by realpath: '..' may only lead a target, so 'p/..' never depends on where p points."""
    with pytest.raises(ArchiveUnsafe, match="after a name"):
        extract([node("sub", tarfile.DIRTYPE), node("l", tarfile.SYMTYPE, "sub/../x")], tmp_path)
    dest = extract(
        [node("sub", tarfile.DIRTYPE), node("sub/l", tarfile.SYMTYPE, "../x"), reg("x", b"1")], tmp_path
    )
    assert (dest / "sub" / "l").read_bytes() == b"1"


def test_member_through_an_existing_symlink_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "link").symlink_to(outside)
    with pytest.raises(ArchiveUnsafe, match="outside|symlink"):
        safe_extract(make_tar(tmp_path / "a.tar", [reg("link/evil", b"x")]), dest, BIG)
    assert list(outside.iterdir()) == []
    # An archive's own symlink, even pointing inside, is never used as a parent directory.
    with pytest.raises(ArchiveUnsafe, match="symlink"):
        extract([node("self", tarfile.SYMTYPE, "."), reg("self/f", b"x")], tmp_path)


def test_file_over_an_extracted_symlink_replaces_the_link(tmp_path: Path) -> None:
    members = [reg("real", b"keep"), node("alias", tarfile.SYMTYPE, "real"), reg("alias", b"new")]
    dest = extract(members, tmp_path)
    assert (dest / "real").read_bytes() == b"keep"
    assert not (dest / "alias").is_symlink() and (dest / "alias").read_bytes() == b"new"


def test_hardlink_escape_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"s")
    for linkname in (str(secret), "../secret", "missing", "sym"):
        members = [node("sym", tarfile.SYMTYPE, "x"), node("h", tarfile.LNKTYPE, linkname)]
        with pytest.raises(ArchiveUnsafe, match="hard link"):
            extract(members, tmp_path)
    assert secret.stat().st_nlink == 1


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_devices_and_fifos_are_refused(tmp_path: Path, kind: bytes) -> None:
    with pytest.raises(ArchiveUnsafe, match="'dev'"):
        extract([node("dev", kind)], tmp_path)
    assert not os.path.lexists(tmp_path / "dest" / "dev")


def test_setuid_setgid_sticky_bits_are_stripped(tmp_path: Path) -> None:
    dest = extract([reg("tool", b"#!/bin/sh\n", mode=0o6755), reg("plain", b"", mode=0o1666)], tmp_path)
    assert stat.S_IMODE((dest / "tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "plain").stat().st_mode) & 0o7000 == 0


def test_tar_bomb_over_budget_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for i in range(8):
            info = tarfile.TarInfo(f"zeros{i}")
            info.size = 4 << 20
            tf.addfile(info, io.BytesIO(bytes(info.size)))
    assert archive.stat().st_size < 200_000
    with pytest.raises(ArtifactTooLarge, match="budget") as caught:
        safe_extract(archive, tmp_path / "dest", 10 << 20)
    assert caught.value.disposition is Disposition.FAIL
    assert disk_bytes(tmp_path / "dest") <= 10 << 20
    assert safe_extract(archive, tmp_path / "dest2", 32 << 20, entry_cost=0) == 32 << 20
    assert safe_extract(archive, tmp_path / "dest3", BIG) == (32 << 20) + 8 * ENTRY_COST


def test_lying_tar_header_cannot_exceed_budget(tmp_path: Path) -> None:
    info = tarfile.TarInfo("huge")
    info.size = 10**12  # claims a terabyte, carries ten bytes
    archive = tmp_path / "liar.tar"
    archive.write_bytes(info.tobuf(tarfile.GNU_FORMAT) + b"0123456789" + bytes(502 + 1024))
    with pytest.raises(ArtifactTooLarge, match="budget"):
        safe_extract(archive, tmp_path / "dest", 1 << 20)
    assert disk_bytes(tmp_path / "dest") == 0


def test_pax_and_gnu_long_names_leave_no_metadata_files(tmp_path: Path) -> None:
    long = "d" * 120 + "/" + "f" * 150
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        archive = tmp_path / f"long{fmt}.tar"
        with tarfile.open(archive, "w", format=fmt) as tf:
            info, data = reg(long, b"deep")
            info.pax_headers = {"comment": "metadata only"} if fmt == tarfile.PAX_FORMAT else {}
            tf.addfile(info, io.BytesIO(data))
        dest = tmp_path / f"dest{fmt}"
        assert safe_extract(archive, dest, BIG, entry_cost=0) == 4
        assert tree(dest) == {"d" * 120: "dir", long: b"deep"}


# ------------------------------------------------------------------------------ detection by content


def plain_tar_bytes(tmp_path: Path) -> bytes:
    return make_tar(tmp_path / "plain.tar", [reg("hello.txt", b"hello")]).read_bytes()


@pytest.mark.parametrize(
    ("name", "compress", "kind"),
    [
        ("model.tgz", bz2.compress, "bzip2"),  # the client's mislabelled bzip2
        ("data.tar.gz", lambda b: b, "tar"),  # compression trap: plain tar named .tar.gz
        ("x.tar.gz", gzip.compress, "gzip"),
        ("x.bin", lzma.compress, "xz"),
    ],
)
def test_archives_are_recognised_by_content(tmp_path: Path, name: str, compress, kind: str) -> None:
    archive = tmp_path / name
    archive.write_bytes(compress(plain_tar_bytes(tmp_path)))
    assert detect_compression(archive) == kind
    assert safe_extract(archive, tmp_path / "dest", BIG, entry_cost=0) == 5
    assert (tmp_path / "dest" / "hello.txt").read_bytes() == b"hello"


def test_non_archives_are_rejected(tmp_path: Path) -> None:
    text = tmp_path / "notes.tar"
    text.write_bytes(b"just some text, not a tar\n" * 40)
    with pytest.raises(ArchiveCorrupt, match="not an archive.*unpack: false") as caught:
        detect_compression(text)
    assert caught.value.disposition is Disposition.FAIL
    zstd = tmp_path / "x.tar.zst"
    zstd.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(64))
    if "zst" not in tarfile.TarFile.OPEN_METH:
        with pytest.raises(ArchiveCorrupt, match="zstd"):
            detect_compression(zstd)
    corrupt = tmp_path / "corrupt.tgz"
    corrupt.write_bytes(gzip.compress(plain_tar_bytes(tmp_path))[:60])
    with pytest.raises(ArchiveCorrupt):
        safe_extract(corrupt, tmp_path / "dest", BIG)


def _damaged(tmp_path: Path, compress, name: str) -> Path:
    """A compressed tar whose stream is damaged past its first member, so the damage shows mid-extraction."""
    text = b"".join(f"line {i} of the weights {i * 7919 % 10007}\n".encode() for i in range(20_000))
    members = [reg("first.txt", b"first"), reg("big.txt", text), reg("last.txt", b"last")]
    data = bytearray(compress(make_tar(tmp_path / f"{name}.src", members).read_bytes()))
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xFF
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    ("name", "compress"),
    [("damaged.tgz", gzip.compress), ("damaged.tbz", bz2.compress), ("damaged.txz", lzma.compress)],
)
def test_corrupt_data_is_a_deterministic_failure_not_a_retry(tmp_path: Path, name: str, compress) -> None:
    """Damage found mid-extraction fails the experiment: it used to be retried three times (gzip's and bz2's
    errors are OSErrors, taken for I/O faults), or, where the damage read as an invalid tar header, the part
    before it was restored as if it were the whole archive."""
    with pytest.raises(ArchiveCorrupt, match="re-upload") as caught:
        safe_extract(_damaged(tmp_path, compress, name), tmp_path / "dest", BIG)
    assert caught.value.disposition is Disposition.FAIL


def test_a_damaged_or_cut_plain_tar_is_not_restored_in_part(tmp_path: Path) -> None:
    """tarfile reads an unreadable header after the first member as the end of the archive: the members
    before it would be restored as if they were all of it."""
    members = [reg("a.txt", b"a" * 600), reg("b.txt", b"b"), reg("c.txt", b"c")]
    whole = make_tar(tmp_path / "whole.tar", members)
    data = whole.read_bytes()
    second = 512 + 1024  # a's header and its two data blocks
    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes(data[:second] + b"\xff" * 512 + data[second + 512:])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: second + 100])  # the download stopped inside b's header
    for archive in (damaged, cut):
        with pytest.raises(ArchiveCorrupt, match="damaged or truncated") as caught:
            safe_extract(archive, tmp_path / archive.stem, BIG)
        assert caught.value.disposition is Disposition.FAIL
    assert safe_extract(whole, tmp_path / "whole", BIG, entry_cost=0) == 602


# ----------------------------------------------------------------------------------------------- zip


def make_zip(path: Path, entries: list[tuple[str, bytes, int | None]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if mode is not None:
                info.create_system = 3
                info.external_attr = mode << 16
            zf.writestr(info, data)
    return path


def test_zip_extracts_files_dirs_and_modes(tmp_path: Path) -> None:
    archive = make_zip(
        tmp_path / "a.zip",
        [("top.txt", b"top", None), ("sub/", b"", None), ("sub/run.sh", b"#!/bin/sh\n", 0o104755)],
    )
    assert detect_compression(archive) == "zip"
    assert safe_extract(archive, tmp_path / "dest", BIG, entry_cost=0) == 13
    assert tree(tmp_path / "dest") == {"top.txt": b"top", "sub": "dir", "sub/run.sh": b"#!/bin/sh\n"}
    assert stat.S_IMODE((tmp_path / "dest" / "sub" / "run.sh").stat().st_mode) == 0o755


@pytest.mark.parametrize(
    ("name", "mode", "reason"),
    [
        ("../evil", None, "'..'"),
        ("/tmp/zip-evil", None, "absolute"),
        ("..\\evil", None, "'..'"),
        ("link", 0o120777, "symlink"),
        ("fifo", 0o010644, "special"),
    ],
)
def test_zip_unsafe_entries_are_refused(tmp_path: Path, name: str, mode: int | None, reason: str) -> None:
    archive = make_zip(tmp_path / "bad.zip", [("fine", b"ok", None), (name, b"/etc", mode)])
    with pytest.raises(ArchiveUnsafe, match=reason):
        safe_extract(archive, tmp_path / "dest", BIG)
    assert not (tmp_path / "evil").exists() and not Path("/tmp/zip-evil").exists()


def test_zip_bomb_and_lying_sizes_stay_within_budget(tmp_path: Path) -> None:
    bomb = make_zip(tmp_path / "bomb.zip", [("zeros", bytes(20 << 20), None)])
    with pytest.raises(ArtifactTooLarge, match="budget"):
        safe_extract(bomb, tmp_path / "dest", 1 << 20)
    assert disk_bytes(tmp_path / "dest") <= 1 << 20

    data = bytearray(make_zip(tmp_path / "liar.zip", [("f", bytes(5000), None)]).read_bytes())
    local, central = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
    data[local + 22 : local + 26] = (1).to_bytes(4, "little")  # uncompressed size: 1 byte
    data[central + 24 : central + 28] = (1).to_bytes(4, "little")
    (tmp_path / "liar.zip").write_bytes(bytes(data))
    with pytest.raises(ArtifactError):
        safe_extract(tmp_path / "liar.zip", tmp_path / "dest2", 100)
    assert disk_bytes(tmp_path / "dest2") <= 100


# ------------------------------------------------------------------------------------ pack and unpack


def build_workdir(root: Path) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "a.txt").write_bytes(b"alpha")
    (root / "sub" / "b.bin").write_bytes(os.urandom(3000))
    (root / "sub" / "deeper" / "c").write_bytes(b"c")
    (root / "sub" / "link-to-a").symlink_to("../a.txt")
    (root / "run.sh").write_bytes(b"#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    return root


@pytest.mark.parametrize("key", ["x/output.tar", "x/o.tar.gz", "x/o.tgz", "x/o.tar.bz2", "x/o.tar.xz"])
def test_pack_unpack_round_trip(tmp_path: Path, key: str) -> None:
    src = build_workdir(tmp_path / "src")
    packed = tmp_path / "packed"
    pack_dir(src, packed, key)
    expected = {"output.tar": "tar", "o.tar.gz": "gzip", "o.tgz": "gzip", "o.tar.bz2": "bzip2"}
    assert detect_compression(packed) == expected.get(key.rsplit("/", 1)[1], "xz")
    with tarfile.open(packed) as tf:
        names = tf.getnames()
    assert names == sorted(names) and "." not in names and not any(n.startswith("./") for n in names)
    assert {"sub", "sub/deeper", "empty"} <= set(names)
    safe_extract(packed, tmp_path / "back", BIG)
    assert tree(tmp_path / "back") == tree(src)
    assert os.access(tmp_path / "back" / "run.sh", os.X_OK)


def test_output_tar_holds_exactly_the_member_output(tmp_path: Path) -> None:
    src = tmp_path / "output"
    src.mkdir()
    (src / "output").write_bytes(b"log line\n")
    pack_dir(src, tmp_path / "output.tar", "experiments/e/output.tar")
    with tarfile.open(tmp_path / "output.tar") as tf:
        assert tf.getnames() == ["output"]


def test_pack_skips_fifos_and_keeps_hardlinks(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "data").write_bytes(b"shared")
    os.link(src / "data", src / "same")
    os.mkfifo(src / "pipe")
    pack_dir(src, tmp_path / "p.tar", "k.tar")
    with tarfile.open(tmp_path / "p.tar") as tf:
        kinds = {m.name: m.type for m in tf.getmembers()}
    assert kinds == {"data": tarfile.REGTYPE, "same": tarfile.LNKTYPE}
    safe_extract(tmp_path / "p.tar", tmp_path / "back", BIG)
    assert (tmp_path / "back" / "same").read_bytes() == b"shared"


def test_pack_survives_files_changing_underneath(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A checkpoint packs files the experiment is rewriting: each archive must still read back whole."""
    src = tmp_path / "src"
    src.mkdir()
    stop = threading.Event()
    payload = os.urandom(4 << 20)

    def churn() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            (src / "ckpt").write_bytes(payload[: (4 << 20) >> (n % 3)])  # truncates, then grows
            (src / f"tmp{n % 5}").write_bytes(b"t")
            (src / f"tmp{(n + 2) % 5}").unlink(missing_ok=True)

    thread = threading.Thread(target=churn)
    thread.start()
    out = tmp_path / "p.tar.gz"
    try:
        for _ in range(150):  # until a file has shrunk under the packer a few times
            pack_dir(src, out, "k.tar.gz")
            with tarfile.open(out) as tf:
                for member in tf:  # every member's data is intact and readable
                    if member.isreg():
                        assert len(tf.extractfile(member).read()) == member.size  # type: ignore[union-attr]
            if caplog.text.count("shrank") >= 3:
                break
    finally:
        stop.set()
        thread.join()


@pytest.mark.parametrize("key", ["experiments/e/output.tar", "experiments/e/modeldir.tar.gz"])
def test_the_studioml_client_reads_our_archives(tmp_path: Path, key: str, studioml_bin: Path) -> None:
    src = build_workdir(tmp_path / "src")
    (src / "output").write_bytes(b"final line\n")
    packed = tmp_path / "packed"
    pack_dir(src, packed, key)
    local = tmp_path / "client" / "output"
    script = (
        "import logging, sys\n"
        "from studio.storage.storage_util import untar_artifact\n"
        "untar_artifact(sys.argv[1], sys.argv[2], logging.getLogger('t'))\n"
    )
    subprocess.run([str(studioml_bin / "python"), "-c", script, str(local), str(packed)], check=True,
                   timeout=60)
    assert tree(local) == tree(src)


# -------------------------------------------------------------------------------------- fingerprints


def test_fingerprint_changes_on_modification_only(tmp_path: Path) -> None:
    src = build_workdir(tmp_path / "src")
    first = dir_fingerprint(src)
    (src / "a.txt").read_bytes()
    pack_dir(src, tmp_path / "p.tar", "p.tar")
    assert dir_fingerprint(src) == first

    changes = [
        lambda: (src / "a.txt").write_bytes(b"alphabet"),
        lambda: os.utime(src / "sub" / "deeper" / "c", ns=(0, 1_000_000_000)),
        lambda: (src / "run.sh").chmod(0o700),
        lambda: (src / "empty" / "new").write_bytes(b""),
        lambda: (src / "sub" / "b.bin").rename(src / "sub" / "b2.bin"),
        lambda: ((src / "sub" / "link-to-a").unlink(), (src / "sub" / "link-to-a").symlink_to("deeper/c")),
    ]
    seen = {first}
    for change in changes:
        change()
        now = dir_fingerprint(src)
        assert now not in seen
        seen.add(now)


# ------------------------------------------------------------------------------------ fetch and upload


def artifact(
    label: str, url: str | None, *, mutable: bool = False, unpack: bool = True, key: str | None = None
) -> Artifact:
    return Artifact(label=label, mutable=mutable, unpack=unpack, key=key, qualified=url)


def fetch(
    art: Artifact, expdir: Path, budget: DiskBudget | None = None, cache: ArtifactCache | None = None
) -> Restored:
    return trio.run(fetch_artifact, art, expdir, Stores(), budget or DiskBudget(None), cache)


def store_object(tmp_path: Path, key: str, data: bytes) -> str:
    """Put ``data`` where the client's local storage would, and return the client-style locator."""
    root = tmp_path / "storage" / "bucket"
    (root / key).parent.mkdir(parents=True, exist_ok=True)
    (root / key).write_bytes(data)
    return "file:/" + str(root) + "/" + key


def test_fetch_unpacks_into_a_private_label_directory(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "w.tar", [reg("train.py", b"print(1)"), reg("lib/util.py", b"x = 1")])
    url = store_object(tmp_path, "blobstore/abc.tar.gz", archive.read_bytes())  # plain tar, .gz name
    expdir = tmp_path / "exp"
    expdir.mkdir()
    budget = DiskBudget(20_000)

    placed = fetch(artifact("workspace", url), expdir, budget)

    assert placed is Restored.PLACED and placed
    assert tree(expdir / "workspace") == {"train.py": b"print(1)", "lib": "dir", "lib/util.py": b"x = 1"}
    assert stat.S_IMODE((expdir / "workspace").stat().st_mode) == 0o700
    assert budget.remaining == 20_000 - 13 - 2 * ENTRY_COST  # the bytes, plus a fixed cost per member
    assert sorted(os.listdir(expdir)) == ["workspace"]  # scratch space is gone


def test_fetch_without_unpack_places_the_object_under_its_key_name(tmp_path: Path) -> None:
    url = store_object(tmp_path, "blobstore/data.csv", b"a,b\n1,2\n")
    expdir = tmp_path / "exp"
    budget = DiskBudget(None)
    placed = fetch(artifact("data", url, unpack=False, key="blobstore/data.csv"), expdir, budget)
    assert placed is Restored.PLACED
    assert tree(expdir / "data") == {"data.csv": b"a,b\n1,2\n"}
    # a url-only artifact (no key) is named after the URL's path
    assert fetch(artifact("raw", url, unpack=False), expdir, budget) is Restored.PLACED
    assert os.listdir(expdir / "raw") == ["data.csv"]


def test_fetch_missing_objects(tmp_path: Path) -> None:
    expdir = tmp_path / "exp"
    url = "file://" + str(tmp_path / "storage" / "nothing.tar")
    budget = DiskBudget(None)
    absent = fetch(artifact("modeldir", url, mutable=True), expdir, budget)
    assert absent is Restored.ABSENT and not absent
    assert (expdir / "modeldir").is_dir() and os.listdir(expdir / "modeldir") == []
    with pytest.raises(ArtifactError, match="immutable artifact data not found"):
        fetch(artifact("data", url), expdir, budget)
    assert (expdir / "data").is_dir()
    assert sorted(os.listdir(expdir)) == ["data", "modeldir"]


def test_fetch_skips_metadata_and_locatorless_artifacts(tmp_path: Path) -> None:
    url = store_object(tmp_path, "metadata/x.json", b"{}")
    expdir = tmp_path / "exp"
    assert fetch(artifact("_metadata", url, mutable=True, unpack=False), expdir) is Restored.SKIPPED
    assert fetch(artifact("tb", None, mutable=True), expdir) is Restored.SKIPPED
    assert os.listdir(expdir / "_metadata") == [] and os.listdir(expdir / "tb") == []


def test_fetch_enforces_the_disk_budget(tmp_path: Path) -> None:
    expdir = tmp_path / "exp"
    raw = store_object(tmp_path, "blobstore/big.bin", bytes(5000))
    with pytest.raises(ArtifactTooLarge, match="hdd budget") as caught:
        fetch(artifact("big", raw, unpack=False), expdir, DiskBudget(4999))
    assert caught.value.disposition is Disposition.FAIL  # the same request would fail the same way again
    assert os.listdir(expdir / "big") == []

    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("zeros")
        info.size = 1 << 20
        tf.addfile(info, io.BytesIO(bytes(info.size)))
    url = store_object(tmp_path, "blobstore/bomb.tar.gz", archive.read_bytes())
    budget = DiskBudget(100_000)
    with pytest.raises(ArtifactTooLarge, match="budget"):
        fetch(artifact("bomb", url), expdir, budget)
    assert os.listdir(expdir / "bomb") == []
    assert sorted(os.listdir(expdir)) == ["big", "bomb"]


def test_refused_archive_leaves_the_label_directory_empty(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "evil.tar", [reg("good", b"1"), reg("../evil", b"2")])
    url = store_object(tmp_path, "experiments/e/modeldir.tar", archive.read_bytes())
    expdir = tmp_path / "exp"
    with pytest.raises(ArchiveUnsafe):
        fetch(artifact("modeldir", url, mutable=True), expdir)
    assert os.listdir(expdir / "modeldir") == []
    assert not (expdir / "evil").exists()


def test_fetch_through_the_cache_never_lets_the_experiment_write_the_entry(tmp_path: Path) -> None:
    url = store_object(tmp_path, "blobstore/w.bin", b"cached bytes")
    cache = ArtifactCache(tmp_path / "cache", 1 << 30)
    expdir = tmp_path / "exp"
    for label in ("one", "two"):
        assert fetch(artifact(label, url, unpack=False, key="blobstore/w.bin"), expdir, cache=cache)
    entries = cache.entries()
    assert len(entries) == 1 and cache.hits == 1
    placed = expdir / "one" / "w.bin"
    assert placed.stat().st_nlink == 1
    placed.write_bytes(b"experiment scribbles")
    (entry,) = entries
    assert (tmp_path / "cache" / entry).read_bytes() == b"cached bytes"

    mutable = store_object(tmp_path, "experiments/e/out.bin", b"mutable")
    fetch(artifact("out", mutable, mutable=True, unpack=False), expdir, cache=cache)
    assert len(cache.entries()) == 1  # mutable artifacts bypass the cache


def test_upload_packs_changed_directories_only(tmp_path: Path) -> None:
    expdir = tmp_path / "exp"
    root = tmp_path / "storage" / "bucket"
    url = "file:/" + str(root) + "/experiments/e/output.tar"
    art = artifact("output", url, mutable=True, key="experiments/e/output.tar")
    stores = Stores()

    assert trio.run(upload_artifact, art, expdir, stores, None) is None  # no directory yet
    assert not (root / "experiments").exists()

    (expdir / "output").mkdir(parents=True)
    (expdir / "output" / "output").write_bytes(b"line 1\n")
    first = trio.run(upload_artifact, art, expdir, stores, None)
    stored = root / "experiments" / "e" / "output.tar"
    with tarfile.open(stored) as tf:
        assert tf.getnames() == ["output"]
        assert tf.extractfile("output").read() == b"line 1\n"  # type: ignore[union-attr]
    assert sorted(os.listdir(expdir)) == ["output"]

    stored.unlink()
    assert trio.run(upload_artifact, art, expdir, stores, first) == first
    assert not stored.exists()  # unchanged: nothing uploaded

    with open(expdir / "output" / "output", "ab") as f:
        f.write(b"line 2\n")
    second = trio.run(upload_artifact, art, expdir, stores, first)
    assert second != first
    with tarfile.open(stored) as tf:
        assert tf.extractfile("output").read() == b"line 1\nline 2\n"  # type: ignore[union-attr]

    with pytest.raises(ArtifactError, match="_metadata"):
        trio.run(upload_artifact, artifact("_metadata", url, mutable=True), expdir, stores, None)


def test_disk_budget() -> None:
    budget = DiskBudget(10)
    budget.take(4)
    budget.check(6, "x")
    with pytest.raises(ArtifactTooLarge, match="only 6"):
        budget.take(7, "artifact big")
    assert budget.remaining == 6
    assert DiskBudget(0).remaining > 1 << 60 and DiskBudget(None).limit is None


def test_disk_budget_for_a_request_without_hdd_is_the_free_space(tmp_path: Path) -> None:
    with_hdd = DiskBudget.for_request(10, tmp_path)
    assert with_hdd.limit == 10 and not with_hdd.free_space
    free = DiskBudget.for_request(0, tmp_path)
    assert free.free_space and 0 < free.remaining <= shutil.disk_usage(tmp_path).free
    with pytest.raises(DiskFull, match="free disk space") as caught:
        free.take(free.remaining + 1, "artifact huge")
    assert caught.value.disposition is Disposition.RETRY  # another runner may have the room


# ------------------------------------------------ item 3: a failed restore never leaves part of the artifact


def _gzip_damaged_mid_stream(tmp_path: Path) -> bytes:
    return _damaged(tmp_path, gzip.compress, "modeldir.tar.gz").read_bytes()


@pytest.mark.parametrize(
    ("case", "error", "disposition"),
    [
        ("corrupt gzip", ArchiveCorrupt, Disposition.FAIL),
        ("plain file", ArchiveCorrupt, Disposition.FAIL),
        ("over the hdd budget", ArtifactTooLarge, Disposition.FAIL),
        ("unpacks beyond the hdd budget", ArtifactTooLarge, Disposition.FAIL),
        ("over the free disk space", DiskFull, Disposition.RETRY),
    ],
)
def test_a_failed_restore_of_a_mutable_artifact_raises_and_places_nothing(
    tmp_path: Path, case: str, error: type[Exception], disposition: Disposition
) -> None:
    """Each of these once left ``modeldir/`` empty or partial and let the final upload replace the stored
    work with it: fetch_artifact must raise, with the right disposition, and leave the directory empty."""
    good = make_tar(tmp_path / "good.tar", [reg("weights.bin", bytes(50_000)), reg("notes.txt", b"epoch 9")])
    body, budget = good.read_bytes(), DiskBudget(None)
    if case == "corrupt gzip":
        body = _gzip_damaged_mid_stream(tmp_path)
    elif case == "plain file":
        body = b"epoch,loss\n1,0.5\n" * 100
    elif case == "over the hdd budget":
        budget = DiskBudget(len(body) - 1)
    elif case == "unpacks beyond the hdd budget":
        body = gzip.compress(body)  # the download fits the budget, what it unpacks to does not
        budget = DiskBudget(len(body) + 100)
    else:
        budget = DiskBudget(len(body) - 1, free_space=True)
    url = store_object(tmp_path, "experiments/e/modeldir.tar", body)
    expdir = tmp_path / "exp"
    with pytest.raises(error) as caught:
        fetch(artifact("modeldir", url, mutable=True), expdir, budget)
    assert isinstance(caught.value, ArtifactError | DiskFull)
    assert caught.value.disposition is disposition  # type: ignore[attr-defined]
    assert os.listdir(expdir / "modeldir") == []
    assert sorted(os.listdir(expdir)) == ["modeldir"]  # no scratch space left behind


def _watch_and_cancel(scope: trio.CancelScope, expdir: Path, ready, seen: list[int]):
    """A task that cancels ``scope`` as soon as ``ready(scratch dir)`` says the transfer is under way."""

    async def watch() -> None:
        while True:
            for scratch in (expdir / ".downloads").glob("*"):
                progress = ready(scratch)
                if progress:
                    seen.append(progress)
                    assert os.listdir(expdir / "modeldir") == []  # nothing is placed while in flight
                    scope.cancel()
                    return
            await trio.sleep(0.001)

    return watch


def _fetch_and_cancel(art: Artifact, expdir: Path, ready) -> list[int]:
    seen: list[int] = []

    async def main() -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_and_cancel(scope, expdir, ready, seen))
                await fetch_artifact(art, expdir, Stores(), DiskBudget(None))
                raise AssertionError("the fetch finished before it was cancelled")
        assert scope.cancelled_caught

    trio.run(main)
    return seen


def _partial_bytes(scratch: Path) -> int:
    sizes = [p.stat().st_size for p in scratch.glob(".object.*") if p.exists()]
    return max(sizes, default=0) if max(sizes, default=0) >= 4 << 20 else 0


def test_cancelled_mid_download_leaves_nothing(tmp_path: Path) -> None:
    """SIGTERM 1.2 s into a 300 MB download: the task is cancelled while the copy runs."""
    size = 256 << 20
    url = store_object(tmp_path, "experiments/e/modeldir.tar", b"")
    with open(url.removeprefix("file:/"), "r+b") as f:
        f.truncate(size)  # sparse: a big object without writing one
    expdir = tmp_path / "exp"
    seen = _fetch_and_cancel(artifact("modeldir", url, mutable=True), expdir, _partial_bytes)
    assert seen and seen[0] < size  # cancelled mid-download
    assert os.listdir(expdir / "modeldir") == []
    assert sorted(os.listdir(expdir)) == ["modeldir"]


def test_cancelled_mid_unpack_leaves_nothing(tmp_path: Path) -> None:
    members = [reg(f"shard{i:05d}.txt", b"w" * 64) for i in range(20_000)]
    archive = make_tar(tmp_path / "m.tar", members)
    url = store_object(tmp_path, "experiments/e/modeldir.tar", archive.read_bytes())
    expdir = tmp_path / "exp"

    def unpacking(scratch: Path) -> int:
        tree_dir = scratch / "tree"
        count = len(os.listdir(tree_dir)) if tree_dir.is_dir() else 0
        return count if count >= 200 else 0

    seen = _fetch_and_cancel(artifact("modeldir", url, mutable=True), expdir, unpacking)
    assert seen and seen[0] < 20_000  # cancelled mid-unpack
    assert os.listdir(expdir / "modeldir") == []
    assert sorted(os.listdir(expdir)) == ["modeldir"]


# ------------------------------------------------------------- item 14: entries count against the budget


@pytest.fixture(scope="module")
def empty_files_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real tar of 50,000 empty files: zero bytes of data, 50,000 inodes."""
    path = tmp_path_factory.mktemp("inodes") / "empty-files.tar"
    with tarfile.open(path, "w") as tf:
        for i in range(50_000):
            tf.addfile(tarfile.TarInfo(f"d{i // 1000:02d}/f{i:05d}"))
    return path


def test_50000_empty_files_do_not_pass_a_small_hdd_budget(tmp_path: Path, empty_files_tar: Path) -> None:
    url = store_object(tmp_path, "experiments/e/modeldir.tar", empty_files_tar.read_bytes())
    expdir = tmp_path / "exp"
    hdd = 28 << 20  # more than the tar itself (about 26 MB), far less than 50,000 entries at 4 KiB each
    assert empty_files_tar.stat().st_size < hdd
    with pytest.raises(ArtifactTooLarge, match="per entry") as caught:
        fetch(artifact("modeldir", url, mutable=True), expdir, DiskBudget(hdd))
    assert caught.value.disposition is Disposition.FAIL
    assert os.listdir(expdir / "modeldir") == [] and sorted(os.listdir(expdir)) == ["modeldir"]


def test_entry_count_is_capped_whatever_the_budget(tmp_path: Path, empty_files_tar: Path) -> None:
    assert MAX_ENTRIES == 1_000_000
    with pytest.raises(ArchiveTooManyEntries, match="more than 2000 entries") as caught:
        safe_extract(empty_files_tar, tmp_path / "dest", BIG, max_entries=2_000)
    assert caught.value.disposition is Disposition.FAIL
    # under the cap and the budget an archive unpacks, charged by entry
    small = make_tar(tmp_path / "small.tar", [node(f"f{i}", tarfile.REGTYPE) for i in range(100)])
    assert safe_extract(small, tmp_path / "ok", BIG) == 100 * ENTRY_COST
    assert len(os.listdir(tmp_path / "ok")) == 100


# --------------------------------------------------------- item 15: packed members carry a fresh mtime


def test_packed_members_are_stamped_later_than_the_packing_started(tmp_path: Path) -> None:
    """The client accepts a retval only if its extracted mtime is later than the time it recorded after
    publishing the task; a runner that finishes within that second must still be accepted."""
    src = tmp_path / "retval"
    src.mkdir()
    (src / "retval").write_bytes(b"result")  # written just now, within the current second
    (src / "old").write_bytes(b"o")
    os.utime(src / "old", (time.time() - 3600, time.time() - 3600))
    future = math.ceil(time.time()) + 7200
    (src / "later").write_bytes(b"l")
    os.utime(src / "later", (future - 0.5, future - 0.5))
    recorded = time.time()  # the client's submitted_time, taken before the runner packs

    pack_dir(src, tmp_path / "retval.tar", "experiments/e/retval.tar")

    with tarfile.open(tmp_path / "retval.tar") as tf:
        mtimes = {m.name: m.mtime for m in tf}
    assert mtimes["retval"] > recorded and mtimes["old"] > recorded
    assert mtimes["retval"] == mtimes["old"] <= math.ceil(time.time())
    assert mtimes["later"] == future  # never earlier than the file's own mtime (rounded up)
    safe_extract(tmp_path / "retval.tar", tmp_path / "client", BIG)
    assert os.path.getmtime(tmp_path / "client" / "retval") > recorded  # the client's own test


def test_packing_leaves_no_reference_cycle(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for n in range(50):
        (src / "sub" / f"f{n}.txt").write_text(str(n))
    gc.collect()
    gc.disable()
    try:
        pack_dir(src, tmp_path / "out.tar", "out.tar")
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_scratch_directories_survive_a_concurrent_tidy(tmp_path: Path) -> None:
    """Downloads of one attempt run at once; each tidies the shared ``.downloads`` parent when it is empty,
    which must never make another one's scratch directory fail (it did: EEXIST from mkdir's own check)."""
    import threading

    from studio_runner.artifacts import _scratch_dir, _tidy

    parent = tmp_path / ".downloads"
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            for _ in range(300):
                _tidy(_scratch_dir(parent))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
