"""``studio-runner submit``: what ``studio run`` does in local mode, without installing the client.

Packs the script's directory as the workspace artifact into local storage (``blobstore/<sha256>.tar``),
builds a request shaped exactly like the StudioML 0.0.49 client's (all seven default artifacts, shell-quoted
args, ``time_added``), and writes it to the local queue directory.

A script that is not there is a :class:`SubmitError` (a ``ConfigError``: the CLI exits 2), never a request for
a workspace without it. The workspace is packed in one pass that also hashes it (a big directory is read
once, never held in memory), and ``show_progress`` draws a bar on a terminal, or prints one plain line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import stat
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import trio

from studio_runner.errors import ConfigError
from studio_runner.queues.localdir import LocalDirQueue
from studio_runner.units import format_elapsed, format_size

DEFAULT_ARTIFACTS = ("workspace", "modeldir", "retval", "output", "tb", "_metrics", "_metadata")

Progress = Callable[[int, int], None]
"""Called with (bytes packed so far, bytes to pack in all)."""


class SubmitError(ConfigError):
    """The submission cannot be made as asked (no such script); nothing was queued."""


@dataclass
class Submission:
    script: Path
    args: list[str] = field(default_factory=list)
    queue: str = "local_default"
    experiment: str | None = None
    project: str | None = None
    python_packages: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    max_duration: str | None = None
    lifetime: str | None = None
    save_workspace_frequency: str = "1m"
    cpus: int = 1
    ram: str = "1g"
    hdd: str = "2g"
    gpus: int = 0
    """GPU slots per card (spec/resources.md §3); with no ``gpu_count``, one card."""
    gpu_mem: str | None = None
    gpu_count: int | None = None

    def resources(self) -> dict[str, object]:
        """``resources_needed`` as the client writes it (gpuMem and gpuCount only when given)."""
        needed: dict[str, object] = {"cpus": self.cpus, "ram": self.ram, "hdd": self.hdd, "gpus": self.gpus}
        if self.gpu_mem:
            needed["gpuMem"] = self.gpu_mem
        if self.gpu_count is not None:
            needed["gpuCount"] = self.gpu_count
        return needed


def store_url(store_root: Path, key: str) -> str:
    return (store_root / key).resolve().as_uri()


def _workspace_files(directory: Path) -> list[Path]:
    return [path for path in sorted(directory.rglob("*"))
            if not any(part in ("__pycache__", ".git") for part in path.relative_to(directory).parts)]


class _HashingWriter:
    """A write-only file that hashes what passes through it (tarfile writes a plain tar sequentially)."""

    def __init__(self, out: BinaryIO) -> None:
        self.out, self.digest = out, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.out.write(data)

    def tell(self) -> int:
        return self.out.tell()


class _CountingReader:
    """A file's bytes for tarfile, reporting how far packing got."""

    def __init__(self, inner: BinaryIO, on_read: Callable[[int], None]) -> None:
        self.inner, self.on_read = inner, on_read

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size)
        self.on_read(len(data))
        return data


def pack_workspace(directory: Path, store_root: Path, progress: Progress | None = None) -> str:
    """Tar the directory (content-addressed like the client) into ``<store_root>/blobstore``; return key.

    One pass: the tar is hashed as it is written. ``progress(done, total)`` follows the file bytes packed."""
    store_root.mkdir(parents=True, exist_ok=True)
    paths = _workspace_files(directory)
    total = 0
    for path in paths:
        info = path.lstat()
        if stat.S_ISREG(info.st_mode):
            total += info.st_size
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    with tempfile.NamedTemporaryFile(suffix=".tar", delete=False, dir=store_root) as tmp:
        tmp_path = Path(tmp.name)
    try:
        with open(tmp_path, "wb") as out:
            writer = _HashingWriter(out)
            with tarfile.open(fileobj=writer, mode="w") as tar:  # type: ignore[call-overload]
                for path in paths:
                    member = tar.gettarinfo(str(path), arcname=path.relative_to(directory).as_posix())
                    if member.isreg():
                        with open(path, "rb") as data:
                            tar.addfile(member, _CountingReader(data, advance))  # type: ignore[arg-type]
                    else:
                        tar.addfile(member)
        key = f"blobstore/{writer.digest.hexdigest()}.tar"
        target = store_root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp_path, target)
        return key
    finally:
        tmp_path.unlink(missing_ok=True)


def check_script(script: Path) -> None:
    """Raise SubmitError unless ``script`` is a file to run."""
    if script.is_dir():
        raise SubmitError(f"submit: {script} is a directory, not a script")
    if not script.is_file():
        raise SubmitError(f"submit: {script} does not exist")


def build_request(sub: Submission, store_root: Path, workspace_key: str) -> dict:
    key = sub.experiment or f"{int(time.time())}_{uuid.uuid4()}"
    artifacts: dict[str, dict] = {}
    for label in DEFAULT_ARTIFACTS:
        artifact_key = workspace_key if label == "workspace" else f"experiments/{key}/{label}.tar"
        artifacts[label] = {
            "unpack": True,
            "mutable": label != "workspace",
            "key": artifact_key,
            "qualified": store_url(store_root, artifact_key),
        }
    storage = {"type": "local", "endpoint": str(store_root.parent), "bucket": store_root.name}
    config: dict = {
        "database": dict(storage, bucket=store_root.name + "-db"),
        "storage": storage,
        "queue": "local",
        "saveWorkspaceFrequency": sub.save_workspace_frequency,
        "env": dict(sub.env),
        "resources_needed": sub.resources(),
    }
    if sub.lifetime:
        config["experimentLifetime"] = sub.lifetime
    return {
        "experiment": {
            "key": key,
            "args": [shlex.quote(arg) for arg in sub.args],
            "filename": sub.script.name,
            "pythonenv": list(sub.python_packages),
            "project": sub.project,
            "pythonver": "{}.{}".format(*sys.version_info[:2]),
            "resources_needed": sub.resources(),
            "status": "waiting",
            "time_added": time.time(),
            "time_started": None,
            "time_last_checkpoint": None,
            "time_finished": None,
            "info": {},
            "git": None,
            "metric": None,
            "max_duration": sub.max_duration,
            "owner": "guest",
            "from_compl_service": False,
            "artifacts": artifacts,
        },
        "config": config,
    }


def submit(sub: Submission, queue_root: Path, store_root: Path, *, show_progress: bool = False) -> dict:
    """Upload the workspace, enqueue the request, return it. Raises SubmitError when the script is not
    there. ``show_progress``: a bar while packing on a terminal, else one plain line on stderr."""
    check_script(sub.script)
    store_root.mkdir(parents=True, exist_ok=True)
    workspace = sub.script.resolve().parent
    bar = None
    if show_progress:
        from studio_runner.console import TerminalBar

        bar = TerminalBar("packing workspace", 0, sizes=True)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done, str(workspace))

    started = time.monotonic()
    try:
        workspace_key = pack_workspace(workspace, store_root, progress if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    if show_progress:
        size = (store_root / workspace_key).stat().st_size
        spent = format_elapsed(time.monotonic() - started)
        print(f"packed workspace {workspace}: {format_size(size)} in {spent}", file=sys.stderr)
    request = build_request(sub, store_root.resolve(), workspace_key)
    (queue_root / sub.queue).mkdir(parents=True, exist_ok=True)
    trio.run(LocalDirQueue(queue_root, "submit").enqueue, sub.queue, json.dumps(request).encode())
    return request
