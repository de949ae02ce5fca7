"""The one-file build (build/onefile.sh): what makes a frozen runner work, and the built file itself.

The first tests need no build: they put ``pythons`` in the state PyInstaller leaves it in (``sys.frozen``,
``sys._MEIPASS``, an executable that is not a Python) and check that uv comes from the bundle and that
experiments and the reaper get a real host interpreter, or a clear error when there is none. The others run
``dist/studio-runner`` when it was built, copied to an empty directory and started with a clean environment
as a user would (``build/ci_onefile.sh`` does the same in CI, with the build); a run without a build skips
them, as declared.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from studio_runner import __version__, pythons
from studio_runner.errors import InterpreterNotFound

REPO = Path(__file__).resolve().parent.parent
EXE = REPO / "dist" / "studio-runner"
NO_BUILD = "dist/studio-runner is not built (bash build/onefile.sh; CI runs build/ci_onefile.sh instead)"
NETWORK_VARS = ("SSL_CERT_FILE", "SSL_CERT_DIR", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "UV_INDEX_URL",
                "UV_DEFAULT_INDEX")


HOST_PYTHON = pythons.default_interpreter().path
"""A real interpreter that is not this venv's (the base of the one running the tests), taken before any test
makes ``pythons`` believe it is frozen."""


@pytest.fixture
def frozen(tmp_path, monkeypatch):
    """``pythons`` as the one-file build sees it: a bundle holding uv, sys.executable not a Python, nothing
    remembered from earlier discovery, and an empty HOME (no uv-managed or pyenv interpreters)."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    uv = pythons.resolve_uv()
    assert uv, "uv is a dependency of the runner"
    (bundle / "uv").symlink_to(uv)
    fake_exe = bundle / "studio-runner"
    fake_exe.write_text("#!/bin/sh\nexit 3\n")
    fake_exe.chmod(0o755)
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "_MEIPASS", str(bundle), raising=False)
    monkeypatch.setattr(sys, "executable", str(fake_exe))
    for cache in ("_host", "_discovered", "_probed", "_refused"):
        monkeypatch.setattr(pythons, cache, type(getattr(pythons, cache))())
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("PYENV_ROOT", str(home / ".pyenv"))
    monkeypatch.setenv("UV_PYTHON_INSTALL_DIR", str(home / "uv-pythons"))
    return bundle


def path_with(tmp_path: Path, python: Path | None) -> str:
    """A PATH holding only ``python3`` (a link to ``python``) or nothing at all."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if python is not None:
        (bin_dir / "python3").symlink_to(python)
    return str(bin_dir)


def test_frozen_runner_uses_the_bundled_uv(frozen):
    assert pythons.bundle_dir() == frozen
    assert pythons.resolve_uv() == str(frozen / "uv")
    assert pythons.resolve_uv("/no/such/uv") is None  # an explicit choice is still obeyed


def test_frozen_runner_lends_experiments_the_host_python(frozen, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", path_with(tmp_path, HOST_PYTHON))
    default = pythons.default_interpreter()
    assert default.path == tmp_path / "bin" / "python3"
    assert default.version.startswith(f"{sys.version_info[0]}.{sys.version_info[1]}")
    assert pythons.reaper_python() == str(default.path)  # never the frozen executable
    assert pythons.runner_version() == ".".join(default.version.split(".")[:2])
    found = pythons.find_interpreter("3")
    assert found.matched and found.path == default.path
    # and it really is a Python that can run the reaper's flags
    done = subprocess.run([pythons.reaper_python(), "-I", "-S", "-c", "print('ok')"], capture_output=True,
                          text=True, check=True)
    assert done.stdout == "ok\n"


def test_frozen_runner_prefers_the_configured_search_path(frozen, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", path_with(tmp_path, None))
    configured = tmp_path / "configured"
    configured.mkdir()
    (configured / "python3").symlink_to(HOST_PYTHON)
    found = pythons.find_interpreter(pythons.runner_version(), [configured])
    assert found.path == configured / "python3" and found.matched
    assert pythons.reaper_python() == str(configured / "python3")


def test_frozen_runner_without_any_python_says_how_to_get_one(frozen, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", path_with(tmp_path, None))
    with pytest.raises(InterpreterNotFound, match="--python-search-path"):
        pythons.find_interpreter("3.11")
    assert pythons.runner_version() == f"{sys.version_info[0]}.{sys.version_info[1]}"  # the bundle's, then


def test_not_frozen_nothing_changes():
    assert pythons.bundle_dir() is None
    assert pythons.reaper_python() == sys.executable


# --- the built executable -----------------------------------------------------------------------------------


def clean_env(home: Path, path: str = "/usr/bin:/bin") -> dict[str, str]:
    env = {"PATH": path, "HOME": str(home), "LANG": "C.UTF-8"}
    env.update({k: v for k, v in os.environ.items() if k in NETWORK_VARS})
    return env


@pytest.fixture
def installed(tmp_path) -> Path:
    """dist/studio-runner copied to an empty directory outside the repository (the cwd of every call)."""
    if not EXE.is_file():
        pytest.skip(NO_BUILD)
    target = tmp_path / "download" / "studio-runner"
    target.parent.mkdir()
    shutil.copy2(EXE, target)
    (tmp_path / "home").mkdir()
    return target


def run_exe(exe: Path, *args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), *args], cwd=exe.parent, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.mark.expected_skip(NO_BUILD)
def test_built_executable_version_in_clean_env(installed, tmp_path):
    done = run_exe(installed, "--version", env=clean_env(tmp_path / "home"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"studio-runner {__version__}"


@pytest.mark.slow
@pytest.mark.expected_skip(NO_BUILD)
def test_built_executable_runs_demo_and_submitted_work(installed, tmp_path):
    env = clean_env(tmp_path / "home")
    if not any(Path(d, "python3").is_file() for d in env["PATH"].split(":")):  # the documented way instead
        env["STUDIO_RUNNER_PYTHON_SEARCH_PATH"] = str(HOST_PYTHON)
    demo = run_exe(installed, "demo", "--demo-dir", str(tmp_path / "demo"), env=env)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "all experiments ended as expected" in demo.stdout

    script = tmp_path / "project" / "hello.py"
    script.parent.mkdir()
    script.write_text("import os, sys\nprint('hello from', sys.executable)\n"
                      "print('LD_LIBRARY_PATH', os.environ.get('LD_LIBRARY_PATH'))\n")
    queue, store = tmp_path / "queue", tmp_path / "store"
    submitted = run_exe(installed, "submit", "--queue-root", str(queue), "--storage-root", str(store),
                        "--experiment", "onefile_hello", str(script), env=env)
    assert submitted.returncode == 0, submitted.stderr
    ran = run_exe(installed, "run", "--once", "--queue-root", str(queue), "--working-dir",
                  str(tmp_path / "work"), "--prom-address", "", "--local-storage-roots", str(store), env=env)
    assert ran.returncode == 0, ran.stderr[-3000:]
    with tarfile.open(store / "experiments" / "onefile_hello" / "output.tar") as tar:
        member = tar.extractfile("output")
        assert member is not None
        output = member.read().decode()
    assert f"hello from {tmp_path / 'home'}" in output  # the env cache under the clean HOME
    assert "LD_LIBRARY_PATH None" in output  # the bundle's libraries stay the runner's own


@pytest.mark.expected_skip(NO_BUILD)
def test_built_executable_without_host_python_fails_the_experiment_clearly(installed, tmp_path):
    empty_bin = tmp_path / "empty-bin"  # no python3 on PATH, an empty HOME: nothing for uv to find either
    empty_bin.mkdir()
    env = clean_env(tmp_path / "home", str(empty_bin))
    script = tmp_path / "project" / "hello.py"
    script.parent.mkdir()
    script.write_text("print('never runs')\n")
    queue, store = tmp_path / "queue", tmp_path / "store"
    assert run_exe(installed, "submit", "--queue-root", str(queue), "--storage-root", str(store),
                   "--experiment", "no_python", str(script), env=env).returncode == 0
    ran = run_exe(installed, "run", "--once", "--queue-root", str(queue), "--working-dir",
                  str(tmp_path / "work"), "--prom-address", "", "--local-storage-roots", str(store), env=env)
    assert ran.returncode == 1, ran.stderr[-3000:]
    assert "no Python interpreter for experiments" in ran.stderr
