"""LocalStore against real files, and Stores' choice of backend."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
import trio

from studio_runner.errors import Disposition, ObjectNotFound, StorageError
from studio_runner.storage import LocatorRefused, Stores, redact_url
from studio_runner.storage.http import HttpStore
from studio_runner.storage.local import LocalStore, url_to_path


def client_url(store_root: Path, key: str) -> str:
    """Exactly how studioml 0.0.49's LocalStorageHandler.get_qualified_location spells a location."""
    return "file:/" + str(store_root) + "/" + key


def test_url_forms_all_name_the_absolute_path() -> None:
    assert url_to_path("/abs/x") == Path("/abs/x")
    assert url_to_path("file:///abs/x") == Path("/abs/x")
    assert url_to_path("file://tmp/sm/store/bucket/key") == Path("/tmp/sm/store/bucket/key")
    assert url_to_path("file:/abs/x") == Path("/abs/x")
    with pytest.raises(StorageError):
        url_to_path("s3://host/bucket/key")


@pytest.mark.parametrize("form", ["plain", "file3", "client"])
def test_get_reads_every_url_form(tmp_path: Path, form: str) -> None:
    root = tmp_path / "store" / "bucket"
    (root / "blobstore").mkdir(parents=True)
    (root / "blobstore" / "abc.tar").write_bytes(b"payload")
    path = root / "blobstore" / "abc.tar"
    urls = {"plain": str(path), "file3": f"file://{path}", "client": client_url(root, "blobstore/abc.tar")}
    url = urls[form]
    assert url.startswith("file://") == (form != "plain")
    dest = tmp_path / "out" / "x.tar"

    info = trio.run(LocalStore().get, url, dest)

    assert dest.read_bytes() == b"payload"
    assert info.size == 7 and info.url == url and info.etag
    assert sorted(os.listdir(dest.parent)) == ["x.tar"]  # no temp file left behind


def test_get_missing_object_is_not_found(tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    for url in (str(tmp_path / "nope"), f"file://{tmp_path}/nope/deeper", str(tmp_path / "adir")):
        with pytest.raises(ObjectNotFound):
            trio.run(LocalStore().get, url, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_put_creates_parents_and_stat_lists_it(tmp_path: Path) -> None:
    src = tmp_path / "src.tar"
    src.write_bytes(b"x" * 1000)
    root = tmp_path / "store" / "bucket"
    url = client_url(root, "experiments/e1/output.tar")
    store = LocalStore()

    info = trio.run(store.put, src, url)

    assert (root / "experiments" / "e1" / "output.tar").read_bytes() == b"x" * 1000
    assert info.size == 1000
    stat = trio.run(store.stat, url)
    assert stat is not None and stat.size == 1000 and stat.etag == info.etag
    assert trio.run(store.stat, url + ".missing") is None
    listed = trio.run(store.list, client_url(root, "experiments/"))
    assert [i.url for i in listed] == [url]
    assert trio.run(store.list, client_url(root, "experiments/e2")) == []


def test_put_leaves_objects_readable_like_the_client_does(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"data")
    src.chmod(0o600)
    old = os.umask(0o022)
    try:
        trio.run(LocalStore().put, src, str(tmp_path / "store" / "obj"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "store" / "obj").stat().st_mode) == 0o644


def test_etag_changes_when_the_object_is_replaced(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"one")
    url = str(tmp_path / "obj")
    store = LocalStore()
    first = trio.run(store.put, src, url)
    src.write_bytes(b"three")
    second = trio.run(store.put, src, url)
    assert first.etag != second.etag


def test_put_failure_is_storage_error_naming_the_url(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"data")
    (tmp_path / "afile").write_bytes(b"")
    url = f"file://{tmp_path}/afile/under/a/file"
    with pytest.raises(StorageError, match="afile/under"):
        trio.run(LocalStore().put, src, url)


@pytest.fixture
def confined(tmp_path: Path) -> tuple[LocalStore, Path, Path]:
    """A store confined to ``allowed``; ``outside`` holds a file it must never serve, and ``allowed/escape``
    is a symbolic link to ``outside``."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "obj").write_bytes(b"ok")
    (outside / "secret").write_bytes(b"no")
    (allowed / "escape").symlink_to(outside)
    (allowed / "inner").symlink_to(allowed / "obj")
    return LocalStore(roots=[allowed]), allowed, outside


def test_roots_confine_every_operation_and_refuse_as_the_request_s_fault(
    confined: tuple[LocalStore, Path, Path], tmp_path: Path
) -> None:
    store, allowed, outside = confined
    trio.run(store.get, str(allowed / "obj"), tmp_path / "d1")
    assert (tmp_path / "d1").read_bytes() == b"ok"
    trio.run(store.get, f"file://{allowed}/inner", tmp_path / "d2")  # a link that stays inside is fine
    bad = [str(outside / "secret"), f"{allowed}/../outside/secret", f"file://{allowed}/escape/secret",
           "file:/" + str(outside) + "/secret", "/etc/passwd", f"file://{allowed}/escape/"]
    for url in bad:
        with pytest.raises(LocatorRefused, match="outside the storage roots") as caught:
            trio.run(store.get, url, tmp_path / "d3")
        assert str(allowed) in str(caught.value)  # the reason names the roots that are allowed
        assert caught.value.disposition is Disposition.SET_ASIDE
        assert not isinstance(caught.value, StorageError)  # not retried, not a storage outage
        with pytest.raises(LocatorRefused):
            trio.run(store.stat, url)
        with pytest.raises(LocatorRefused):
            trio.run(store.put, allowed / "obj", url)
        with pytest.raises(LocatorRefused):
            trio.run(store.list, url)
    assert not (tmp_path / "d3").exists()
    assert (outside / "secret").read_bytes() == b"no" and sorted(os.listdir(outside)) == ["secret"]


def test_listing_leaves_out_links_that_lead_outside(confined: tuple[LocalStore, Path, Path]) -> None:
    store, allowed, outside = confined
    (allowed / "sub").mkdir()
    (allowed / "sub" / "a").write_bytes(b"a")
    (allowed / "sub" / "out").symlink_to(outside / "secret")
    listed = trio.run(store.list, f"file://{allowed}/sub/")
    assert [info.url for info in listed] == [f"file://{allowed}/sub/a"]
    assert len(trio.run(LocalStore().list, f"file://{allowed}/sub/")) == 2  # unconfined: both


def test_a_link_swapped_in_after_the_check_is_caught_on_open(confined: tuple[LocalStore, Path, Path],
                                                            tmp_path: Path) -> None:
    """The check resolves the path; the read then checks the file it really opened."""
    store, allowed, outside = confined
    opened = store._opened("file://x")
    assert opened is not None
    with open(outside / "secret", "rb") as handle, pytest.raises(LocatorRefused):
        opened(handle.fileno())
    with open(allowed / "obj", "rb") as handle:
        opened(handle.fileno())


def test_empty_roots_refuse_every_local_locator(tmp_path: Path) -> None:
    (tmp_path / "obj").write_bytes(b"x")
    with pytest.raises(LocatorRefused, match=r"\(none;"):
        trio.run(LocalStore(roots=[]).get, str(tmp_path / "obj"), tmp_path / "d")


def test_stores_check_refuses_before_any_transfer(confined: tuple[LocalStore, Path, Path]) -> None:
    _store, allowed, outside = confined
    stores = Stores(local_roots=[allowed])
    stores.check(f"file://{allowed}/obj")
    stores.check(f"file://{allowed}/not/yet/there.tar")  # outputs that do not exist yet are fine
    stores.check("s3://host:9000/bucket/key")  # other schemes are not confined
    stores.check("gs://bucket/key")  # not confined: GCS URLs name no place on this machine
    stores.check("dockerhub://image")  # unsupported: the transfer says so, as before
    for url in (str(outside / "secret"), f"{allowed}/escape/secret", f"file://{allowed}/a/../../outside"):
        with pytest.raises(LocatorRefused):
            stores.check(url)
    with pytest.raises(LocatorRefused, match="neither a URL nor an absolute path"):
        stores.check("~/.ssh/id_rsa")
    Stores().check(str(outside / "secret"))  # no roots: nothing is confined


def test_put_is_atomic_to_concurrent_readers(tmp_path: Path) -> None:
    size = 8 << 20
    old, new = tmp_path / "old", tmp_path / "new"
    old.write_bytes(b"a" * size)
    new.write_bytes(b"b" * size)
    target = tmp_path / "store" / "obj"
    store = LocalStore()
    trio.run(store.put, old, str(target))
    seen: list[bytes] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            data = target.read_bytes()
            seen.append(data[:1] + data[-1:] + len(data).to_bytes(8, "big"))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(6):
            trio.run(store.put, new if i % 2 == 0 else old, str(target))
    finally:
        stop.set()
        thread.join()
    whole = {b"aa" + size.to_bytes(8, "big"), b"bb" + size.to_bytes(8, "big")}
    assert seen and set(seen) <= whole
    assert os.listdir(target.parent) == ["obj"]


def test_stores_picks_one_backend_per_kind(tmp_path: Path) -> None:
    stores = Stores()
    local = stores.for_url("/abs/path")
    assert isinstance(local.backend, LocalStore)  # type: ignore[attr-defined]  # behind the observer
    assert stores.for_url("file://tmp/x") is local
    assert stores.for_url("FILE:///x") is local
    assert isinstance(stores.for_url("https://example.com/a.tar").backend, HttpStore)  # type: ignore[attr-defined]
    assert stores.for_url("http://example.com/b") is stores.for_url("https://example.com/a")
    for url in ("dockerhub://image", "shub://x"):
        with pytest.raises(StorageError, match="unsupported locator scheme"):
            stores.for_url(url)
    with pytest.raises(StorageError):
        stores.for_url("relative/key.tar")


def test_stores_builds_s3_with_options() -> None:
    stores = Stores(s3_options={"default_region": "eu-west-2"})
    s3 = stores.for_url("s3://127.0.0.1:9000/bucket/key.tar")
    assert type(s3.backend).__name__ == "S3Store"  # type: ignore[attr-defined]
    assert s3.backend.default_region == "eu-west-2"  # type: ignore[attr-defined]
    assert stores.for_url("s3://other:9000/b/k") is s3


def test_redact_url_drops_secrets() -> None:
    shown = redact_url("https://user:pw@host.example:8443/a/b.tar?X-Amz-Signature=SECRET#frag")
    assert shown == "https://host.example:8443/a/b.tar"
    assert redact_url("file://tmp/x") == "file://tmp/x"
    assert redact_url("file://tmp/DB_PWD=abc/x") == "file://tmp/DB_PWD=****"
