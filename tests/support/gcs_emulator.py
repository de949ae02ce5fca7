"""A real GCS-protocol server for tests: ``gcp-storage-emulator`` (PyPI) in a subprocess on a free loopback
port, started once per pytest process and stopped at its end.

Import the fixtures into a test module::

    from support.gcs_emulator import gcs_emulator, gcs_bucket  # noqa: F401

``gcs_emulator`` (session) yields the server (``.host`` is ``http://127.0.0.1:PORT``, the value for
``STORAGE_EMULATOR_HOST``); ``gcs_bucket`` (function) is a fresh, empty bucket, deleted with its objects
afterwards. The emulator keeps objects in memory and, like the real service, answers anonymous requests.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest


def _emulator_command() -> list[str]:
    """The emulator's console script beside this interpreter (the venv's), else ``python -m``."""
    script = Path(sys.executable).with_name("gcp-storage-emulator")
    if script.exists():
        return [str(script)]
    found = shutil.which("gcp-storage-emulator")
    return [found] if found else [sys.executable, "-m", "gcp_storage_emulator"]


@dataclass
class GcsEmulator:
    host: str
    """``http://127.0.0.1:PORT``: what ``STORAGE_EMULATOR_HOST`` is set to."""
    process: subprocess.Popen[bytes] = field(repr=False)
    log_path: str = ""

    def client(self) -> Any:
        """A plain google-cloud-storage client for set-up and checks in tests (not the code under test)."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project="test", credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.host})

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.log_path:
            with contextlib.suppress(OSError):
                os.unlink(self.log_path)


@dataclass
class GcsBucket:
    emulator: GcsEmulator
    name: str

    @property
    def prefix(self) -> str:
        """``gs://<bucket>``."""
        return f"gs://{self.name}"

    def url(self, key: str) -> str:
        return f"{self.prefix}/{key}"

    def bucket(self) -> Any:
        """The test's own client's handle on this bucket (set-up and checks)."""
        return self.emulator.client().bucket(self.name)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_answering(host: str, process: subprocess.Popen[bytes], timeout: float) -> bool:
    """Until the emulator lists buckets (not merely accepts connections), or it died, or ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{host}/storage/v1/b?project=test", timeout=1) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def start_emulator(timeout: float = 60.0) -> GcsEmulator:
    """Start the emulator on a free loopback port (in memory) and wait until it answers."""
    for attempt in range(5):  # the free port may be taken between probing and binding
        port = _free_port()
        host = f"http://127.0.0.1:{port}"
        log = tempfile.NamedTemporaryFile(prefix="gcs-emulator-", suffix=".log", delete=False)
        process = subprocess.Popen(
            [*_emulator_command(), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        if _wait_answering(host, process, timeout):
            return GcsEmulator(host=host, process=process, log_path=log.name)
        process.kill()
        process.wait()
        if attempt < 4:
            os.unlink(log.name)
    raise RuntimeError(f"gcp-storage-emulator did not start; see {log.name}")


_shared: list[GcsEmulator] = []


def shared_emulator() -> GcsEmulator:
    """This pytest process's emulator (fixtures imported into several modules share it)."""
    if not _shared or _shared[0].process.poll() is not None:
        _shared[:] = [start_emulator()]
        atexit.register(_shared[0].stop)  # also when the session fixture never finalises (a crash)
    return _shared[0]


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[GcsEmulator]:
    """The running emulator: ``.host`` (``http://127.0.0.1:PORT``), ``.client()``."""
    server = shared_emulator()
    yield server
    server.stop()
    _shared.clear()


@pytest.fixture
def gcs_bucket(gcs_emulator: GcsEmulator) -> Iterator[GcsBucket]:
    """A fresh bucket: ``.name``, ``.prefix`` (``gs://name``), ``.url(key)``, ``.bucket()``."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    gcs_emulator.client().create_bucket(name)
    yield GcsBucket(gcs_emulator, name)
    try:
        bucket = gcs_emulator.client().bucket(name)
        for blob in bucket.list_blobs():
            blob.delete()
        bucket.delete()
    except Exception:  # a test that broke the server must not hide its own failure behind this one
        pass


__all__ = ["GcsBucket", "GcsEmulator", "gcs_bucket", "gcs_emulator", "shared_emulator", "start_emulator"]
