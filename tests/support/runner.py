"""Helpers to run the real ``studio-runner`` CLI against a local queue root and store in a temp dir."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.studioml_client import cache_root

from studio_runner.storage.local import url_to_path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Sandbox:
    """A STUDIOML_HOME-like directory: queue root, object store and runner scratch space."""

    base: Path

    @property
    def queue_root(self) -> Path:
        return self.base / "queue"

    @property
    def store(self) -> Path:
        return self.base / "storage" / "studioml"

    @property
    def work(self) -> Path:
        return self.base / "work"

    def runner_env(self, **overrides: str) -> dict[str, str]:
        """Options as environment variables (``STUDIO_RUNNER_<NAME>``), the way a container would set them."""
        env = dict(os.environ)
        env.update(
            STUDIO_RUNNER_QUEUE_ROOT=str(self.queue_root),
            STUDIO_RUNNER_WORKING_DIR=str(self.work),
            STUDIO_RUNNER_ENV_CACHE_DIR=str(cache_root() / "envs"),
            STUDIO_RUNNER_GRACE_PERIOD="2s",
            STUDIO_RUNNER_POLL_INTERVAL="0.05s",
            STUDIO_RUNNER_ABORT_CHECK_INTERVAL="1s",
            STUDIO_RUNNER_LOG_LEVEL="debug",
            STUDIO_RUNNER_RETRY_DELAY="0.2s",  # hand-backs wait a moment, not the default 10 s
            STUDIO_RUNNER_PROM_ADDRESS="127.0.0.1:0",  # every runner serves its status, on a free port
            # local locators may name anything in the sandbox (tests keep stores beside it, in tmp_path)
            STUDIO_RUNNER_LOCAL_STORAGE_ROOTS=str(self.base),
            PYTHONPATH=str(REPO),
        )
        env.update(overrides)
        return env

    def run_once(self, timeout: float = 300, **overrides: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(REPO / "runner.py"), "run", "--once"],
                              env=self.runner_env(**overrides), capture_output=True, text=True,
                              timeout=timeout)

    def start(self, **overrides: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, str(REPO / "runner.py"), "run"],
                                env=self.runner_env(**overrides), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def artifact(self, key: str, label: str) -> Path:
        return self.store / "experiments" / key / f"{label}.tar"

    def output_text(self, key: str) -> str:
        return read_member(self.artifact(key, "output"), "output")

    def pending(self, queue: str) -> list[str]:
        qdir = self.queue_root / queue
        return sorted(p.name for p in qdir.iterdir() if p.name != "lock.lock") if qdir.exists() else []

    def set_aside(self, queue: str) -> list[Path]:
        folder = self.queue_root / ".set-aside" / queue
        return sorted(folder.iterdir()) if folder.exists() else []


def read_member(tar_path: Path, member: str) -> str:
    with tarfile.open(tar_path) as tar:
        handle = tar.extractfile(member)
        assert handle is not None, f"{member} is not a file in {tar_path}"
        return handle.read().decode("utf-8", "replace")


def metadata_documents(store: Path) -> list[Path]:
    folder = store / "metadata"
    return sorted(folder.glob("scrape-host-*.json")) if folder.exists() else []


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    box = Sandbox(tmp_path)
    box.queue_root.mkdir(parents=True)
    box.work.mkdir()
    return box


__all__ = ["Sandbox", "sandbox", "read_member", "metadata_documents", "url_to_path"]
