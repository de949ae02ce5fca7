"""Which interpreter an experiment's environment is built on: ``pythonver`` matched by prefix.

Discovery is uv's (``uv python find``: managed interpreters, PATH, pyenv's global version) plus the
configured search paths and every pyenv version, because uv stops at the first pyenv shim that is not the
global one. Each interpreter is probed once and each answer remembered, so discovery costs nothing per
experiment. A matching interpreter is chosen only if uv can use it (``uv python find <path>`` inspects it the
way ``uv venv`` will): pyenv's 2.7, a broken build or anything else uv refuses would only fail the attempt.
Without a usable match the runner's own interpreter is used and the mismatch explained in a note (spec
README, "Python version"), or ``InterpreterNotFound`` with ``strict``.

Discovery takes about half a second (probes and ``uv python find``): :func:`warm_up` does it at runner
start-up for the version experiments ask most (the runner's own ``major.minor``, which is what a client on the
same Python sends), so the first experiment finds the answer remembered.

In the one-file build (PyInstaller, build/onefile.sh) ``sys.executable`` is the bundle, not a Python, and the
bundled interpreter has no ``bin/``: the default interpreter is then the host's (:func:`host_interpreter`:
the search paths, ``python3`` on PATH, what uv finds, or one uv downloads with ``--python-downloads``), which
also runs the reaper script (:func:`reaper_python`), and uv is the binary inside the bundle.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from studio_runner.errors import InterpreterNotFound

_VERSION_RE = re.compile(r"^(\d+)\.(\d+)\.(\d+)")
_REQUEST_RE = re.compile(r"^\d+(\.\d+){0,2}$")
_PROBE = "import platform; print(platform.python_version())"
_PROBES_AT_ONCE = 8


@dataclass(frozen=True)
class Interpreter:
    """The base interpreter for an environment; ``note`` explains a fallback (for the output log/metadata)."""

    path: Path
    version: str
    matched: bool = True
    note: str = ""


_discovery_lock = threading.Lock()
_discovered: dict[tuple[object, ...], tuple[Interpreter | None, str]] = {}
_probed: dict[str, str | None] = {}
_refused: dict[tuple[str, str | None], str | None] = {}


_host_lock = threading.Lock()
_host: list[Interpreter] = []  # the frozen build's default, once found

NO_HOST_PYTHON = (
    "no Python interpreter for experiments: the one-file studio-runner carries none it can lend them. "
    "Install python3 (>= 3.8) on PATH, point --python-search-path at one, or allow --python-downloads so "
    "that uv installs one"
)


def bundle_dir() -> Path | None:
    """Where the one-file build unpacked itself (PyInstaller's ``sys._MEIPASS``); None when not frozen."""
    meipass = getattr(sys, "_MEIPASS", None)
    return Path(meipass) if getattr(sys, "frozen", False) and meipass else None


def host_interpreter(
    search_paths: Sequence[Path] = (), allow_downloads: bool = False, uv: str | None = None
) -> Interpreter:
    """The frozen build's default interpreter, found once and remembered: the first Python 3 among the
    configured search paths, ``python3``/``python`` on PATH, and what ``uv python find`` sees (managed
    interpreters, pyenv's global); with ``allow_downloads``, one uv installs. InterpreterNotFound if none."""
    with _host_lock:
        if _host:
            return _host[0]
        uv = uv or resolve_uv()
        on_path = [shutil.which(name) for name in ("python3", "python")]
        candidates = [*_local_candidates(search_paths), *(Path(p) for p in on_path if p)]
        for path in dict.fromkeys(candidates):
            version = _probe(path)
            if version and _matches(version, (3,)) and unusable_reason(path, uv) is None:
                _host.append(Interpreter(path, version))
                return _host[0]
        found = _uv_find(uv, "3", allow_downloads) if uv else None
        version = _probe(found) if found else None
        if found is None or version is None:
            raise InterpreterNotFound(NO_HOST_PYTHON)
        _host.append(Interpreter(found, version))
        return _host[0]


def reaper_python() -> str:
    """The interpreter that runs the reaper script (stdlib only): the runner's own, or the host's when the
    runner is the one-file build (whose executable is not a Python)."""
    return str(host_interpreter().path) if bundle_dir() else sys.executable


def default_interpreter() -> Interpreter:
    """The interpreter the runner itself runs on (its base, never the runner's own venv); the host's in the
    one-file build."""
    if bundle_dir():
        return host_interpreter()
    base = Path(sys.base_prefix) / "bin"
    for name in (f"python{sys.version_info[0]}.{sys.version_info[1]}", "python3", "python"):
        if (base / name).is_file():
            return Interpreter(base / name, platform.python_version())
    return Interpreter(Path(sys.executable).resolve(), platform.python_version())


def _version_tuple(version: str) -> tuple[int, ...]:
    found = _VERSION_RE.match(version)
    return tuple(int(p) for p in found.groups()) if found else ()


def _matches(version: str, wanted: tuple[int, ...]) -> bool:
    have = _version_tuple(version)
    return bool(have) and have[: len(wanted)] == wanted


def _probe(path: Path) -> str | None:
    """The full version of the interpreter at ``path`` (one subprocess, remembered), None if unusable."""
    key = str(path)
    if key not in _probed:
        try:
            done = subprocess.run(
                [key, "-c", _PROBE], capture_output=True, text=True, timeout=20, check=False
            )
            _probed[key] = done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            _probed[key] = None
    return _probed[key]


def _pyenv_root() -> Path:
    return Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")


def _executable_in(directory: Path) -> Path | None:
    for sub in ("bin/python3", "bin/python", "python3", "python"):
        if (directory / sub).is_file():
            return directory / sub
    return None


def _local_candidates(search_paths: Sequence[Path]) -> list[Path]:
    """Configured paths (an interpreter, a prefix, a bin dir, or a dir of prefixes) then pyenv's versions.

    uv only sees pyenv's *global* version (the other shims fail), so pyenv's versions are listed directly;
    pyenv-virtualenv environments (symlinks, or dirs with pyvenv.cfg) are skipped.
    """
    found: list[Path] = []
    for entry in map(Path, search_paths):
        if entry.is_file():
            found.append(entry)
        elif entry.is_dir():
            direct = _executable_in(entry)
            if direct:
                found.append(direct)
            else:
                found.extend(p for p in map(_executable_in, sorted(entry.iterdir())) if p)
    versions = _pyenv_root() / "versions"
    if versions.is_dir():
        for prefix in sorted(versions.iterdir()):
            if prefix.is_symlink() or (prefix / "pyvenv.cfg").exists():
                continue
            exe = _executable_in(prefix)
            if exe:
                found.append(exe)
    return found


def uv_environment(allow_downloads: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX")}
    env.update(
        NO_COLOR="1", UV_NO_PROGRESS="1", UV_PYTHON_DOWNLOADS="automatic" if allow_downloads else "never"
    )
    return env


def _uv_find(uv: str, request: str, allow_downloads: bool) -> Path | None:
    """What uv finds (managed interpreters, PATH, pyenv's global version); installs one if allowed."""
    find = [uv, "python", "find", "--system", "--no-project", request]
    env = uv_environment(allow_downloads)
    try:
        done = subprocess.run(find, capture_output=True, text=True, env=env, timeout=60, check=False)
        if done.returncode != 0 and allow_downloads:
            subprocess.run(
                [uv, "python", "install", request], capture_output=True, env=env, timeout=600, check=False
            )
            done = subprocess.run(find, capture_output=True, text=True, env=env, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    path = done.stdout.strip()
    return Path(path) if done.returncode == 0 and path else None


def uv_error_summary(text: str) -> str:
    """The most specific line of uv's error (its last ``cause:``), for a one-line note."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    causes = [line.removeprefix("cause:").strip() for line in lines if line.startswith("cause:")]
    return (causes or lines or ["no reason given"])[-1][:300]


def unusable_reason(path: Path, uv: str | None) -> str | None:
    """Why uv (or, without uv, ``python -m venv``) cannot build an environment on ``path``; None if it can.

    Asked once per interpreter and remembered: ``uv python find <path>`` runs the same inspection as
    ``uv venv`` (it refuses Python 2, interpreters without ``-I``, and anything that does not answer like a
    CPython/PyPy it supports).
    """
    key = (str(path), uv)
    if key not in _refused:
        if uv:
            cmd = [uv, "python", "find", "--system", "--no-project", str(path)]
        else:
            cmd = [str(path), "-I", "-c", "import venv, sys; sys.exit(sys.version_info < (3, 6))"]
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, env=uv_environment(False), timeout=60, check=False
            )
            _refused[key] = None if done.returncode == 0 else uv_error_summary(done.stderr or done.stdout)
        except (OSError, subprocess.SubprocessError) as exc:
            _refused[key] = f"{type(exc).__name__}: {exc}"
    return _refused[key]


def _discover(
    request: str, search_paths: Sequence[Path], allow_downloads: bool, uv: str | None
) -> tuple[Interpreter | None, str]:
    """(the newest usable match or None, why matches were refused: "" when none was found at all)."""
    if not _REQUEST_RE.match(request) and request:
        return None, ""
    wanted = tuple(int(p) for p in request.split(".")) if request else ()
    default = host_interpreter(search_paths, allow_downloads, uv) if bundle_dir() else default_interpreter()
    if len(wanted) < 2 and _matches(default.version, wanted):
        return default, ""
    candidates = [(default.path, default.version)]
    local = _local_candidates(search_paths)
    with ThreadPoolExecutor(max_workers=_PROBES_AT_ONCE) as pool:  # each probe is an interpreter start-up
        candidates += [(p, v) for p, v in zip(local, pool.map(_probe, local), strict=True) if v]
    matching = [(p, v) for p, v in candidates if _matches(v, wanted)]
    if uv and (not matching or len(wanted) < 3):
        found = _uv_find(uv, request, allow_downloads and not matching)
        version = _probe(found) if found else None
        if found and version and _matches(version, wanted):
            matching.append((found, version))
    refused: list[str] = []
    for path, version in sorted(matching, key=lambda pv: _version_tuple(pv[1]), reverse=True):
        why = None if path == default.path else unusable_reason(path, uv)
        if why is None:
            return Interpreter(path, version), ""
        builder = "uv" if uv else "python -m venv"
        refused.append(f"{version} at {path}, which {builder} cannot use ({why})")
    return None, "; ".join(dict.fromkeys(refused))


def resolve_uv(uv_bin: str | None = None) -> str | None:
    """The uv executable: ``uv_bin`` when given (None if it does not exist), else the bundled or PATH uv."""
    if uv_bin:
        return uv_bin if Path(uv_bin).is_file() else shutil.which(uv_bin)
    bundle = bundle_dir()
    if bundle and (bundle / "uv").is_file():  # the one-file build carries uv at its top level
        return str(bundle / "uv")
    try:
        from uv import find_uv_bin

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        return shutil.which("uv")


def runner_version() -> str:
    """The runner's own ``major.minor``: what a client running the same Python sends as ``pythonver``.
    In the one-file build, the host interpreter's (its bundled Python is no client's); blocking there."""
    if bundle_dir():
        try:
            return ".".join(host_interpreter().version.split(".")[:2])
        except InterpreterNotFound:
            pass
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


def warm_up(
    pythonvers: Sequence[str],
    search_paths: Sequence[Path] = (),
    allow_downloads: bool = False,
    *,
    uv_bin: str | None = None,
) -> None:
    """Discover the interpreters for ``pythonvers`` now (blocking), with the arguments the environment cache
    will pass, so later :func:`find_interpreter` calls for them are a dict lookup. Strictness is applied after
    discovery, so it does not matter here; nothing is raised for a version that has no match."""
    for pythonver in pythonvers:
        find_interpreter(pythonver, search_paths, allow_downloads, uv_bin=uv_bin)


def find_interpreter(
    pythonver: str,
    search_paths: Sequence[Path] = (),
    allow_downloads: bool = False,
    strict: bool = False,
    *,
    uv_bin: str | None = None,
) -> Interpreter:
    """Pick the newest installed interpreter whose version starts with ``pythonver`` (by component).

    ``""`` and a bare major matching the runner's own interpreter give that interpreter. Blocking (it runs
    probes and ``uv python find`` once per ``pythonver``; later calls are a dict lookup). Matches uv cannot
    use are passed over. Without a usable match: ``InterpreterNotFound`` when ``strict``, else the runner's
    default with ``matched=False`` and a ``note`` (which names the refused matches and why).
    """
    request = pythonver.strip()
    cache_key = (request, tuple(str(p) for p in search_paths), allow_downloads, str(_pyenv_root()))
    with _discovery_lock:
        if cache_key not in _discovered:
            _discovered[cache_key] = _discover(request, search_paths, allow_downloads, resolve_uv(uv_bin))
        found, refused = _discovered[cache_key]
    if found is not None:
        return found
    reason = f"requested python {request}, " + (f"found {refused}" if refused else "none found")
    if strict:
        where = ", ".join(["uv", str(_pyenv_root() / "versions"), *map(str, search_paths)])
        raise InterpreterNotFound(f"{reason} (searched {where}) and strict python selection is on")
    default = default_interpreter()
    return Interpreter(
        default.path, default.version, matched=False, note=f"{reason}; using {default.version}"
    )
