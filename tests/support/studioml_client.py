"""The real StudioML client (studioml 0.0.49) in its own virtualenv, built once and cached between runs.

It needs ``urllib3<2`` and ``requests-toolbelt<1`` to import on current Python. The venv lives under
``$STUDIO_RUNNER_TEST_CACHE`` (default ``~/.cache/studio-runner-tests``) so repeated test runs and CI on
the same machine do not rebuild it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

CLIENT_REQUIREMENTS = ["studioml==0.0.49", "urllib3<2", "requests-toolbelt<1"]


def cache_root() -> Path:
    root = Path(os.environ.get("STUDIO_RUNNER_TEST_CACHE") or Path.home() / ".cache" / "studio-runner-tests")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _uv() -> str:
    from uv import find_uv_bin

    return find_uv_bin()


def ensure_client_venv() -> Path:
    """Path of the client venv's ``bin`` directory; builds it on first use (under a file lock)."""
    venv = cache_root() / "studioml-0.0.49"
    marker = venv / ".complete"
    with open(cache_root() / "studioml.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.exists():
            shutil.rmtree(venv, ignore_errors=True)
            env = dict(os.environ, UV_PYTHON_DOWNLOADS="never")
            subprocess.run([_uv(), "venv", "-q", "--python", "3.11", str(venv)], check=True, env=env)
            subprocess.run([_uv(), "pip", "install", "-q", "--python", str(venv / "bin" / "python"),
                            *CLIENT_REQUIREMENTS], check=True, env=env)
            subprocess.run([str(venv / "bin" / "python"), "-c", "import studio.experiment_submitter"],
                           check=True)
            marker.touch()
    return venv / "bin"


@pytest.fixture(scope="session")
def studioml_bin() -> Path:
    try:
        return ensure_client_venv()
    except (subprocess.CalledProcessError, OSError) as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"cannot build the studioml 0.0.49 client venv: {exc}")


def local_mode_config(path: Path, store: Path, extra: str = "") -> Path:
    """A client config.yaml for StudioML local mode: local queue, local storage and database."""
    store.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""\
database:
    type: local
    endpoint: {store}
    bucket: studiodb
    authentication: none
storage:
    type: local
    endpoint: {store}
    bucket: studiostore
queue: local
saveWorkspaceFrequency: 1m
verbose: error
resources_needed:
    cpus: 1
    ram: 1g
    hdd: 2g
    gpus: 0
{extra}""")
    return path


def studio_run(studioml_bin: Path, config: Path, home: Path, workdir: Path, *args: str,
               key: str | None = None) -> str:
    """Run ``studio-run`` (the client's entry point; the ``studio`` wrapper re-splits arguments) with
    ``--experiment=<key>`` and return the key."""
    key = key or f"client_{uuid.uuid4().hex[:12]}"
    env = dict(os.environ, STUDIOML_HOME=str(home))
    env.pop("PYTHONPATH", None)
    result = subprocess.run([str(studioml_bin / "studio-run"), "--config", str(config),
                             f"--experiment={key}", *args],
                            cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return key
