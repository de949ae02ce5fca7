"""HttpStore against a real http.server on 127.0.0.1."""

from __future__ import annotations

import functools
import http.server
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from studio_runner.errors import ObjectNotFound, StorageError
from studio_runner.storage.http import HttpStore


class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/boom"):
            self.send_error(500, "boom")
        elif self.path.startswith("/truncated"):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"only a little")
            self.wfile.flush()
            self.close_connection = True
        elif self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", "/data.bin")
            self.end_headers()
        else:
            super().do_GET()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_get_downloads_the_body(server: tuple[str, Path], tmp_path: Path) -> None:
    base, root = server
    payload = os.urandom(3 << 20)
    (root / "data.bin").write_bytes(payload)
    dest = tmp_path / "dl" / "data.bin"

    info = trio.run(HttpStore().get, f"{base}/data.bin", dest)

    assert dest.read_bytes() == payload
    assert info.size == len(payload) and info.mtime is not None
    assert os.listdir(dest.parent) == ["data.bin"]


def test_get_follows_redirects(server: tuple[str, Path], tmp_path: Path) -> None:
    base, root = server
    (root / "data.bin").write_bytes(b"moved")
    trio.run(HttpStore().get, f"{base}/redirect", tmp_path / "x")
    assert (tmp_path / "x").read_bytes() == b"moved"


def test_missing_is_not_found_and_stat_none(server: tuple[str, Path], tmp_path: Path) -> None:
    base, _ = server
    with pytest.raises(ObjectNotFound):
        trio.run(HttpStore().get, f"{base}/nope.tar", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert trio.run(HttpStore().stat, f"{base}/nope.tar") is None


def test_stat_reports_size(server: tuple[str, Path]) -> None:
    base, root = server
    (root / "a.tar").write_bytes(b"12345")
    info = trio.run(HttpStore().stat, f"{base}/a.tar")
    assert info is not None and info.size == 5


def test_server_error_is_storage_error_without_query(server: tuple[str, Path], tmp_path: Path) -> None:
    base, _ = server
    with pytest.raises(StorageError, match="HTTP 500") as caught:
        trio.run(HttpStore().get, f"{base}/boom?X-Amz-Signature=TOPSECRET", tmp_path / "x")
    assert not isinstance(caught.value, ObjectNotFound)
    assert "TOPSECRET" not in str(caught.value)
    assert os.listdir(tmp_path) == ["www"]  # no partial download left


def test_truncated_body_is_storage_error(server: tuple[str, Path], tmp_path: Path) -> None:
    base, _ = server
    with pytest.raises(StorageError):
        trio.run(HttpStore().get, f"{base}/truncated", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_unreachable_server_is_storage_error(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(StorageError):
        trio.run(HttpStore().get, f"http://127.0.0.1:{port}/x", tmp_path / "x")


def test_put_and_list_are_refused(tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"")
    with pytest.raises(StorageError, match="read-only"):
        trio.run(HttpStore().put, src, "https://example.invalid/x")
    with pytest.raises(StorageError, match="read-only"):
        trio.run(HttpStore().list, "https://example.invalid/")
    assert HttpStore().handles("HTTPS://x") and not HttpStore().handles("s3://x")
