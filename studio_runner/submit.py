"""``studio-runner submit``: what ``studio run`` does in local mode, without installing the client.

Packs the script's directory as the workspace artifact into local storage (``blobstore/<sha256>.tar``),
builds a request shaped exactly like the StudioML 0.0.49 client's (all seven default artifacts, shell-quoted
args, ``time_added``), and writes it to the local queue directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import trio

from studio_runner.queues.localdir import LocalDirQueue

DEFAULT_ARTIFACTS = ("workspace", "modeldir", "retval", "output", "tb", "_metrics", "_metadata")


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


def pack_workspace(directory: Path, store_root: Path) -> str:
    """Tar the directory (content-addressed like the client) into ``<store_root>/blobstore``; return key."""
    store_root.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(suffix=".tar", delete=False, dir=store_root) as tmp:
        tmp_path = Path(tmp.name)
    try:
        with tarfile.open(tmp_path, "w") as tar:
            for path in sorted(directory.rglob("*")):
                relative = path.relative_to(directory)
                if any(part in ("__pycache__", ".git") for part in relative.parts):
                    continue
                tar.add(path, arcname=relative.as_posix(), recursive=False)
        digest = hashlib.sha256(tmp_path.read_bytes()).hexdigest()
        key = f"blobstore/{digest}.tar"
        target = store_root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp_path, target)
        return key
    finally:
        tmp_path.unlink(missing_ok=True)


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


def submit(sub: Submission, queue_root: Path, store_root: Path) -> dict:
    """Upload the workspace, enqueue the request, return it."""
    store_root.mkdir(parents=True, exist_ok=True)
    workspace_key = pack_workspace(sub.script.resolve().parent, store_root)
    request = build_request(sub, store_root.resolve(), workspace_key)
    (queue_root / sub.queue).mkdir(parents=True, exist_ok=True)
    trio.run(LocalDirQueue(queue_root, "submit").enqueue, sub.queue, json.dumps(request).encode())
    return request
