"""Cached Python environments for experiments, built with uv.

Building the experiment's virtualenv is the hot path of every run, so each environment is built once per
(full interpreter version, normalised requirement list) and shared by every experiment that asks for it.

Layout under ``root`` (one cache may be shared by several runner processes on one host):

* ``<key>/``                            a complete relocatable venv; appears only by atomic rename
* ``<key>/.studio-runner-size``         its size in bytes, measured after the build and again on each release
* ``<key>/.studio-runner-last-used``    touched on every acquire and release; its mtime drives LRU eviction
* ``<key>.lock``                        ``flock``: exclusive while building or evicting, shared while in use
* ``.build-<key>-<random>/``            a build in progress (``venv/`` + ``requirements.txt``)
* ``.evict-<key>-<random>/``            an entry being deleted

Size accounting: every regular file counts its full apparent size once per environment (by inode), even
when it is a hardlink into uv's cache or shared with another environment. That over-counts real disk use,
which is the conservative direction for a disk bound.

Bytecode is not compiled at build time (it was about two thirds of a cold build): an experiment's Python
compiles what it imports on first use and writes the ``.pyc`` beside the source, into the cached
environment. That is safe to share: CPython writes each ``.pyc`` to a temporary name and renames it into
place (``importlib``'s ``_write_atomic``), so concurrent experiments on one environment read either no
``.pyc`` or a whole one, and an unwritable environment only means recompiling in memory. The files land in
the environment's own ``__pycache__`` directories (uv hardlinks files, never directories), so uv's cache
is untouched. They are written only while an experiment holds the shared lock, so never into an entry being
evicted (eviction takes the exclusive lock). The environment grows by them after its build, so the size is
measured again on each release, keeping eviction's accounting current. Compiling in the background after
the experiment started was rejected: on a busy host it takes CPU from the experiment to compile modules the
experiment mostly never imports.

uv links installed files from its cache (``UV_CACHE_DIR`` when ``uv_cache_dir`` is given, else uv's own
default): keep that cache on the same filesystem as ``root`` so installs are hardlinks, not copies. uv runs
with ``UV_PYTHON_DOWNLOADS=never`` (it gets an explicit interpreter), ``NO_COLOR`` and ``UV_NO_PROGRESS``;
other ``UV_*`` settings of the runner's environment (mirrors, ``UV_HTTP_RETRIES``) pass through.

Callers do the request-specific rewriting before ``acquire``: ``${VAR}`` expansion from ``config.env`` and
``tensorflow`` -> ``tensorflow_gpu`` when a GPU is allocated (spec lifecycle.md §5).

Faults: a full disk (uv's "No space left on device", or ENOSPC/EDQUOT from our own writes) is ``DiskFull``
(retried, never the experiment's fault); network trouble is a retryable ``EnvBuildFailed``; an install that
fails otherwise is a plain ``EnvBuildFailed`` (FAIL). When the venv itself cannot be created with a matched
interpreter (it broke, or uv refuses it), the environment is built with the runner's default interpreter
instead and the output says so (``--strict-python`` fails instead).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from studio_runner.errors import DiskFull, Disposition, EnvBuildFailed, InterpreterNotFound, is_disk_full
from studio_runner.pythons import (  # noqa: F401  (re-exported)
    Interpreter,
    default_interpreter,
    find_interpreter,
    resolve_uv,
    uv_environment,
    uv_error_summary,
)
from studio_runner.redact import mask_patterns
from studio_runner.units import format_elapsed, format_size

logger = logging.getLogger(__name__)

SIZE_FILE = ".studio-runner-size"
LAST_USED_FILE = ".studio-runner-last-used"
KEY_LENGTH = 16
STALE_BUILD_SECONDS = 3600.0
ERROR_TAIL_LINES = 25

_KEY_RE = re.compile(rf"^[0-9a-f]{{{KEY_LENGTH}}}$")
_COMMENT_RE = re.compile(r"(^|\s+)#.*$")
_PIN_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*==\s*([^\s;,]+)$")
_NAME_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)")
_EDITABLE_VCS_RE = re.compile(r"^(-e|--editable)(\s+|=)\s*(?=(git|hg|svn|bzr)\+)")
_TRANSIENT_RE = re.compile(
    r"(?i)error sending request|connection (refused|reset)|timed out|name resolution|could not resolve host"
    r"|dns error|network is unreachable|failed to fetch"
)
_DISK_FULL_RE = re.compile(r"(?i)no space left on device|disk quota exceeded|os error (28|122)\b")


class _VenvFailed(EnvBuildFailed):
    """Creating the venv itself failed with this interpreter (not the network, not the disk)."""


# --- requirements and keys ---------------------------------------------------------------------------------


def canonical_name(name: str) -> str:
    """PEP 503 normal form, so ``Foo_Bar``, ``foo-bar`` and ``foo.bar`` share one cache entry."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _clean(line: str) -> tuple[str | None, str, bool] | None:
    """(canonical name or None, normalised line, is a ``name==ver`` pin); None for blanks and comments."""
    line = _COMMENT_RE.sub("", line).strip()
    if not line:
        return None
    pin = _PIN_RE.match(line)
    if pin:
        name, extras, version = canonical_name(pin[1]), pin[2], pin[3]
        if extras:
            names = sorted({canonical_name(e.strip()) for e in extras[1:-1].split(",") if e.strip()})
            extras = f"[{','.join(names)}]" if names else ""
        return name, f"{name}{extras or ''}=={version}", True
    named = _NAME_RE.match(line)
    return (canonical_name(named[1]) if named else None), line, False


def normalise_requirements(pythonenv: Sequence[str], extra: Sequence[str]) -> list[str]:
    """The sorted, de-duplicated package list that defines an environment.

    Drops blanks, comments and ``pkg-resources*`` (spec lifecycle.md §5); ``name==ver`` names are PEP 503
    normalised, other lines kept verbatim. A ``name==ver`` pin in ``extra`` (``config.pip``) replaces a pin of
    the same package in ``pythonenv``, as Go's separate later ``pip install`` step did.
    """
    base = [c for c in map(_clean, pythonenv) if c is not None]
    add = [c for c in map(_clean, extra) if c is not None]
    overridden = {name for name, _, is_pin in add if is_pin}
    lines = {line for name, line, is_pin in base if not (is_pin and name in overridden)}
    lines.update(line for _, line, _ in add)
    return sorted(line for line in lines if not _is_pkg_resources(line))


def _is_pkg_resources(line: str) -> bool:
    named = _NAME_RE.match(line)
    return named is not None and canonical_name(named[1]).startswith("pkg-resources")


def env_key(python_version_full: str, requirements: Sequence[str]) -> str:
    """Short sha256 naming the cache entry; the list is (re)normalised so raw and normalised lists agree."""
    digest = hashlib.sha256(b"studio-runner-env-v1\0" + python_version_full.encode() + b"\0")
    for line in normalise_requirements(requirements, []):
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()[:KEY_LENGTH]


# --- interpreters ------------------------------------------------------------------------------------------


# --- locks and files ---------------------------------------------------------------------------------------


def _same_inode(fd: int, path: Path) -> bool:
    """A lock on an unlinked lock file protects nothing: check the fd still is the file at ``path``."""
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


async def _poll_flock(fd: int, mode: int) -> None:
    """Take ``mode`` on ``fd`` without blocking the event loop; cancellable."""
    delay = 0.005
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            await trio.sleep(delay)
            delay = min(delay * 2, 0.25)


async def _open_locked(path: Path, mode: int) -> int:
    """An fd on ``path`` holding ``mode``, retried until the locked file is still the one at ``path``."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            await _poll_flock(fd, mode)
        except BaseException:
            os.close(fd)
            raise
        if _same_inode(fd, path):
            return fd
        os.close(fd)


def _measure(path: Path) -> int:
    """Apparent bytes of the regular files under ``path``, each inode once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def _record_size(env_dir: Path) -> None:
    """Re-measure an entry in use (it grows by the bytecode its experiments write); atomic for readers."""
    try:
        size = _measure(env_dir)
        if (env_dir / SIZE_FILE).read_text() == str(size):
            return
        tmp = env_dir / f"{SIZE_FILE}.{secrets.token_hex(4)}"
        tmp.write_text(str(size))
        os.replace(tmp, env_dir / SIZE_FILE)
    except (OSError, ValueError) as exc:  # the recorded size stays; never fail a finished experiment
        logger.warning("python environment %s: re-measuring its size failed: %s", env_dir.name, exc)


def _touch(path: Path) -> None:
    try:
        path.touch()
    except OSError:
        pass


def _rewrite_prefix(bin_dir: Path, old: str, new: str) -> None:
    """Point a plain ``python -m venv``'s scripts (shebangs, activate) at the path it is renamed to."""
    for item in bin_dir.iterdir():
        if item.is_file() and not item.is_symlink():
            data = item.read_bytes()
            if old.encode() in data:
                item.write_bytes(data.replace(old.encode(), new.encode()))


# --- the cache ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PythonEnv:
    """A ready environment; valid (never evicted or rebuilt) while its ``acquire`` context is open."""

    path: Path
    python: Path
    key: str
    cache_hit: bool
    interpreter: Interpreter
    build_seconds: float


class EnvCache:
    """Environments under ``root``, bounded to ``max_bytes`` (0: unbounded) by LRU eviction of unused ones."""

    def __init__(
        self,
        root: Path,
        max_bytes: int,
        uv_bin: str | None = None,
        uv_cache_dir: Path | None = None,
        allow_downloads: bool = False,
        search_paths: Sequence[Path] = (),
        strict_python: bool = False,
        index_url: str | None = None,
    ) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.uv_bin = uv_bin
        self.uv_cache_dir = uv_cache_dir
        self.allow_downloads = allow_downloads
        self.search_paths = list(search_paths)
        self.strict_python = strict_python
        self.index_url = index_url
        self.builds = self.hits = self.evictions = 0
        self._interpreters: dict[str, Interpreter] = {}
        self._key_locks: dict[str, trio.Lock] = {}
        self._evict_lock = threading.Lock()
        self._started = False

    async def start(self) -> None:
        """Adopt existing entries, clear dead builds: call at runner start-up (acquire does on first use)."""
        if not self._started:
            await trio.to_thread.run_sync(self._startup)
            self._started = True

    @asynccontextmanager
    async def acquire(
        self, pythonver: str, pythonenv: Sequence[str], extra: Sequence[str], log: Callable[[str], None]
    ) -> AsyncIterator[PythonEnv]:
        """The environment for this request, built if needed; held "in use" (shared flock) while open."""
        await self.start()
        interpreter = await self._interpreter(pythonver)
        requirements = normalise_requirements(pythonenv, extra)
        while True:
            try:
                key, fd, built, seconds = await self._ready(interpreter, requirements, log)
                break
            except _VenvFailed as exc:
                interpreter = self._fall_back(pythonver, interpreter, exc, log)
        env_dir = self.root / key
        try:
            _touch(env_dir / LAST_USED_FILE)
            if built:
                self.builds += 1
                try:
                    await trio.to_thread.run_sync(self._evict, key)
                except OSError as exc:  # a full cache must not fail the experiment that just got its env
                    logger.warning("python environment eviction failed: %s", exc)
            else:
                self.hits += 1
            yield PythonEnv(env_dir, env_dir / "bin" / "python", key, not built, interpreter, seconds)
        finally:
            _touch(env_dir / LAST_USED_FILE)
            try:
                with trio.CancelScope(shield=True):  # still holding the shared lock: nobody evicts it now
                    await trio.to_thread.run_sync(_record_size, env_dir)
            finally:
                os.close(fd)

    async def _ready(
        self, interpreter: Interpreter, requirements: list[str], log: Callable[[str], None]
    ) -> tuple[str, int, bool, float]:
        """(key, fd holding its shared lock, built now, build seconds): the environment is ready then."""
        key = env_key(interpreter.version, requirements)
        env_dir, lock_path = self.root / key, self.root / f"{key}.lock"
        built, seconds = False, 0.0
        fd = -1
        async with self._key_locks.setdefault(key, trio.Lock()):
            try:
                fd = await _open_locked(lock_path, fcntl.LOCK_SH)
                while not (env_dir / SIZE_FILE).is_file():  # missing: build it under the exclusive lock
                    os.close(fd)
                    fd = -1
                    fd = await _open_locked(lock_path, fcntl.LOCK_EX)
                    if not (env_dir / SIZE_FILE).is_file():  # nobody built it while we waited
                        seconds = await self._build(key, interpreter, requirements, log, lock_path)
                        built = True
                    await _poll_flock(fd, fcntl.LOCK_SH)  # downgrade: not atomic, so check the file again
                    if not _same_inode(fd, lock_path):
                        os.close(fd)
                        fd = -1
                        fd = await _open_locked(lock_path, fcntl.LOCK_SH)
            except BaseException:
                if fd >= 0:
                    os.close(fd)
                raise
        return key, fd, built, seconds

    def _fall_back(
        self, pythonver: str, failed: Interpreter, exc: _VenvFailed, log: Callable[[str], None]
    ) -> Interpreter:
        """The default interpreter in place of ``failed``, whose venv could not be created; or raise."""
        default = default_interpreter()
        if failed.path == default.path:
            raise EnvBuildFailed(str(exc)) from exc
        why = uv_error_summary(str(exc))
        reason = (
            f"requested python {pythonver}, the environment could not be created with {failed.version} "
            f"at {failed.path} ({why})"
        )
        if self.strict_python:
            raise InterpreterNotFound(f"{reason} and strict python selection is on") from exc
        log(f"studio-runner: {reason}; building with the default python {default.version} instead")
        note = f"{reason}; using {default.version}"
        fallback = Interpreter(default.path, default.version, matched=False, note=note)
        self._interpreters[pythonver] = fallback
        return fallback

    async def _interpreter(self, pythonver: str) -> Interpreter:
        found = self._interpreters.get(pythonver)
        if found is None:
            found = await trio.to_thread.run_sync(
                lambda: find_interpreter(
                    pythonver, self.search_paths, self.allow_downloads, self.strict_python, uv_bin=self.uv_bin
                )
            )
            self._interpreters[pythonver] = found
        return found

    def _uv_env(self) -> dict[str, str]:
        env = uv_environment(allow_downloads=False)
        if self.uv_cache_dir is not None:
            env["UV_CACHE_DIR"] = str(self.uv_cache_dir)
        return env

    async def _build(
        self,
        key: str,
        interp: Interpreter,
        requirements: list[str],
        log: Callable[[str], None],
        lock_path: Path,
    ) -> float:
        """Build in a temp dir inside ``root``, rename it into place; called holding the exclusive lock."""
        started = time.monotonic()
        try:
            build_dir = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=self.root))
        except OSError as exc:
            lock_path.unlink(missing_ok=True)
            if is_disk_full(exc):
                raise _disk_full(exc, key) from exc
            raise
        venv, final = build_dir / "venv", self.root / key
        try:
            reqfile = build_dir / "requirements.txt"
            reqfile.write_text("".join(f"{line}\n" for line in requirements))
            uv = resolve_uv(self.uv_bin)
            log(f"studio-runner: building python environment {key}, python {interp.version} ({interp.path})")
            if uv:
                await self._build_uv(uv, interp, venv, reqfile, bool(requirements), log)
            else:
                log("studio-runner: uv not available, building with python -m venv and pip")
                await self._build_pip(interp, venv, reqfile, bool(requirements), log)
                await trio.to_thread.run_sync(_rewrite_prefix, venv / "bin", str(venv), str(final))
            reqfile.unlink()
            size = await trio.to_thread.run_sync(_measure, venv)
            (venv / LAST_USED_FILE).touch()
            (venv / SIZE_FILE).write_text(str(size))
            if final.exists():  # a foreign or incomplete directory: never merge into it, delete it below
                os.rename(final, build_dir / "replaced")
            os.rename(venv, final)
        except BaseException as exc:
            lock_path.unlink(missing_ok=True)  # we hold it exclusively; waiters notice the new inode
            if isinstance(exc, OSError) and is_disk_full(exc):
                raise _disk_full(exc, key) from exc
            raise
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(shutil.rmtree, build_dir, True)
        seconds = time.monotonic() - started
        log(f"studio-runner: built python environment {key} in {format_elapsed(seconds)} "
            f"({format_size(size)})")
        return seconds

    async def _build_uv(
        self,
        uv: str,
        interp: Interpreter,
        venv: Path,
        reqfile: Path,
        install: bool,
        log: Callable[[str], None],
    ) -> None:
        env, cwd = self._uv_env(), venv.parent
        index = ["--index-url", self.index_url] if self.index_url else []
        venv_cmd = [uv, "venv", "--relocatable", "--seed", "--no-project", "--python", str(interp.path)]
        await _venv_step([*venv_cmd, *index, str(venv)], env, cwd, log, "uv venv")
        if install:
            lines = reqfile.read_text().splitlines()  # uv cannot install VCS checkouts as editables
            reqfile.write_text("".join(_EDITABLE_VCS_RE.sub("", line) + "\n" for line in lines))
            # no --compile-bytecode: experiments compile what they import (module docstring)
            cmd = [uv, "pip", "install", "--python", str(venv / "bin" / "python")]
            await _run_logged([*cmd, *index, "-r", str(reqfile)], env, cwd, log, "uv pip install")

    async def _build_pip(
        self, interp: Interpreter, venv: Path, reqfile: Path, install: bool, log: Callable[[str], None]
    ) -> None:
        env, cwd = self._uv_env(), venv.parent
        await _venv_step([str(interp.path), "-m", "venv", str(venv)], env, cwd, log, "python -m venv")
        if install:
            cmd = [
                str(venv / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
                "--no-compile",  # as with uv: experiments compile what they import (module docstring)
                "-r",
                str(reqfile),
            ]
            await _run_logged(
                cmd + (["--index-url", self.index_url] if self.index_url else []),
                env,
                cwd,
                log,
                "pip install",
            )

    def _startup(self) -> None:
        """Adopt existing entries, clear dead builds and deletions, then enforce the bound."""
        self.root.mkdir(parents=True, exist_ok=True)
        for item in self.root.iterdir():
            try:
                if item.name.startswith(".evict-"):
                    _rmtree(item)
                elif (
                    item.name.startswith(".build-")
                    and time.time() - item.stat().st_mtime > STALE_BUILD_SECONDS
                ):
                    # a builder still working in it holds its key's lock; no lock file, no builder
                    self._with_exclusive(item.name.split("-")[1], partial(_rmtree, item), create=False)
                elif _KEY_RE.match(item.name) and item.is_dir() and not (item / SIZE_FILE).is_file():
                    (item / SIZE_FILE).write_text(str(_measure(item)))
            except OSError as exc:  # another runner got there first
                logger.warning("python environment cache start-up: skipped %s: %s", item.name, exc)
        self._evict(keep=None)

    def _with_exclusive(self, key: str, action: Callable[[], bool], create: bool = True) -> bool:
        """``action()`` run holding ``key``'s lock exclusively if nobody holds it now; False if busy."""
        lock_path = self.root / f"{key}.lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0), 0o644)
        except FileNotFoundError:
            return action()
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            if not _same_inode(fd, lock_path):
                return False
            return action()
        finally:
            os.close(fd)

    def _evict(self, keep: str | None) -> None:
        """Delete least recently used entries nobody uses until the total fits ``max_bytes``."""
        if self.max_bytes <= 0:
            return
        with self._evict_lock:
            entries = []
            for item in self.root.iterdir():
                if _KEY_RE.match(item.name) and (item / SIZE_FILE).is_file():
                    try:
                        size = int((item / SIZE_FILE).read_text())
                        used = (item / LAST_USED_FILE).stat().st_mtime
                    except (OSError, ValueError):
                        size, used = _measure(item), 0.0
                    entries.append((used, item.name, size))
            total = sum(size for _, _, size in entries)
            for _, key, size in sorted(entries):
                if total <= self.max_bytes:
                    break
                if key != keep and self._with_exclusive(key, partial(self._remove, key)):
                    total -= size
                    self.evictions += 1
                    logger.info("evicted python environment %s (%d bytes)", key, size)
            if total > self.max_bytes:
                logger.warning(
                    "python environments use %d bytes, over the %d bound: the rest are in use",
                    total,
                    self.max_bytes,
                )

    def _remove(self, key: str) -> bool:
        """Called holding the exclusive lock: hide the entry atomically, drop its lock file, then delete."""
        trash = self.root / f".evict-{key}-{secrets.token_hex(4)}"
        try:
            os.rename(self.root / key, trash)
        except FileNotFoundError:  # another runner evicted it first
            return False
        (self.root / f"{key}.lock").unlink(missing_ok=True)
        return _rmtree(trash)


def _rmtree(path: Path) -> bool:
    shutil.rmtree(path, ignore_errors=True)
    return True


def _disk_full(exc: OSError, key: str) -> DiskFull:
    return DiskFull(f"no space left while building python environment {key}: {exc}")


async def _venv_step(
    cmd: list[str], env: dict[str, str], cwd: Path, log: Callable[[str], None], what: str
) -> None:
    """Create the venv; a failure that is neither the network nor the disk is the interpreter's fault."""
    try:
        await _run_logged(cmd, env, cwd, log, what)
    except EnvBuildFailed as exc:
        if exc.disposition is Disposition.FAIL:
            raise _VenvFailed(str(exc)) from exc
        raise


async def _run_logged(
    cmd: list[str], env: dict[str, str], cwd: Path, log: Callable[[str], None], what: str
) -> None:
    """Run an installer step, sending each output line to ``log``; EnvBuildFailed with the output's tail
    (retryable when it shows network trouble), DiskFull when it shows a full disk."""
    tail: deque[str] = deque(maxlen=ERROR_TAIL_LINES)

    def emit(raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        tail.append(line)
        log(line)

    try:
        proc = await trio.lowlevel.open_process(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd
        )
    except OSError as exc:
        raise EnvBuildFailed(f"{what} could not start: {exc}") from exc
    try:
        assert proc.stdout is not None
        pending = b""
        async for chunk in proc.stdout:
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                emit(line)
        if pending:
            emit(pending)
        status = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()
            if proc.stdout is not None:
                await proc.stdout.aclose()
    if status != 0:
        output = mask_patterns("\n".join(tail))  # installer errors may quote requirement URLs
        if _DISK_FULL_RE.search(output):
            raise DiskFull(f"{what} ran out of disk space (exit status {status}):\n{output}")
        error = EnvBuildFailed(f"{what} failed with exit status {status}:\n{output}")
        if _TRANSIENT_RE.search(output):
            error.disposition = Disposition.RETRY  # network or disk trouble, not the request's fault
        raise error
