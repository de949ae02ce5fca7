"""Runner roots: claim one at start, reclaim the ones whose runner died.

Each runner works in ``<working-dir>/studio-runner-<hostname>-<pid>-<6 hex>/`` and removes it on a clean exit.
A runner killed with SIGKILL (or by the OOM killer, or a power cut) cannot, so its root, with whatever its
experiments left there, would stay forever. ``claim_root`` therefore writes an owner record into the root:
the pid, the process's start time, and where that pid is meaningful (host name, boot id, pid namespace).
``sweep_dead_roots``, run at start-up, removes the roots whose owner is gone.

When a root is reclaimed:

* the owner's pid no longer exists, is a zombie, or belongs to a process that started at another time (the
  pid was reused);
* the record comes from an earlier boot of this host (same host name, other boot id), or from an earlier
  container of this pod (same host name and boot, other pid namespace): every process of those is gone.

A record from another host or pod (working directories on NFS or a shared hostPath) is never judged: its
pid means nothing here. Roots made by older versions have no record; they are removed only when their name
carries this host's name and no process with the pid in their name is alive. Roots kept on purpose
(``--debug``) are marked so and never removed. Removal never follows symlinks: a root is renamed to a hidden
trash name first (so no other runner sees it half deleted), then deleted with ``shutil.rmtree``, which
refuses symlinked roots and unlinks symlinks inside instead of following them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger("studio_runner.sweep")

ROOT_PREFIX = "studio-runner-"
OWNER_FILE = ".owner.json"
"""The owner record inside a runner root."""
TRASH_PREFIX = ".studio-runner-trash-"
"""A root being removed: renamed to ``<working-dir>/.studio-runner-trash-<12 hex>`` first."""

_ROOT_NAME = re.compile(r"^studio-runner-(?P<host>[A-Za-z0-9._-]+)-(?P<pid>[0-9]{1,10})-[0-9a-f]{6}$")
_TRASH_NAME = re.compile(r"^\.studio-runner-trash-[0-9a-f]{12}$")
_RECORD_MAX = 4096
_START_TIME_TOLERANCE = 1.0
"""Seconds: psutil derives start times from the boot time, which the kernel may report a second apart."""


@dataclass(frozen=True)
class Owner:
    """Who made a runner root, and enough context to tell whether that process still lives."""

    pid: int
    create_time: float
    host: str
    boot_id: str | None
    pid_ns: str | None
    keep: bool = False


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _current_owner(keep: bool = False) -> Owner:
    return Owner(pid=os.getpid(), create_time=psutil.Process().create_time(), host=socket.gethostname(),
                 boot_id=_boot_id(), pid_ns=_pid_namespace(), keep=keep)


def _write_record(root: Path, owner: Owner) -> None:
    """Write the record atomically, so a sweeper never reads half of one."""
    tmp = root / f"{OWNER_FILE}.{secrets.token_hex(4)}.tmp"
    tmp.write_text(json.dumps({"version": 1, **asdict(owner)}))
    os.replace(tmp, root / OWNER_FILE)


def claim_root(working_dir: Path, runner_id: str, *, keep: bool = False) -> Path:
    """Create this runner's root and write an owner record (pid and the process's start time) into it.

    ``runner_id`` is ``<hostname>-<pid>-<6 hex>`` (the hostname already sanitised), so the root is a direct
    child of ``working_dir`` that ``sweep_dead_roots`` recognises. ``keep=True`` (``--debug``) marks it to be
    kept even after this runner dies. Raises ValueError for a runner id that would not make such a name."""
    name = f"{ROOT_PREFIX}{runner_id}"
    if not _ROOT_NAME.match(name):
        raise ValueError(f"runner id {runner_id!r} does not make a runner root name (<host>-<pid>-<6 hex>)")
    working_dir.mkdir(parents=True, exist_ok=True)
    root = working_dir / name
    root.mkdir()
    _write_record(root, _current_owner(keep))
    return root


def release_root(root: Path, *, keep: bool = False) -> None:
    """End of a clean run: remove the root, or with ``keep`` (``--debug``) mark it so no sweep removes it."""
    if keep:
        try:
            record = _read_record(root)
            owner = record if record is not None else _current_owner()
            _write_record(root, Owner(**{**asdict(owner), "keep": True}))
        except OSError as exc:
            log.warning("could not mark %s as kept: %s", root, exc)
        return
    _remove(root)


def _read_record(root: Path) -> Owner | None:
    """The owner record, or None when there is none or it cannot be read as one (treated as legacy)."""
    try:
        fd = os.open(root / OWNER_FILE, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as handle:
            data: Any = json.loads(handle.read(_RECORD_MAX))
        return Owner(pid=int(data["pid"]), create_time=float(data["create_time"]), host=str(data["host"]),
                     boot_id=data.get("boot_id"), pid_ns=data.get("pid_ns"), keep=bool(data.get("keep")))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _start_time(pid: int) -> float | None:
    """Start time of the live process ``pid``, None when there is none (a zombie is dead).

    Raises psutil.AccessDenied when the process exists but cannot be inspected."""
    if pid <= 0:
        return None
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return float(process.create_time())
    except psutil.NoSuchProcess:  # ZombieProcess included
        return None


def _owner_dead(owner: Owner, here: Owner) -> bool:
    """True only when the owner is certainly gone; anything we cannot judge counts as alive."""
    if owner.keep:
        return False
    if owner.host != here.host:
        return False  # another machine or pod sharing this directory: its pids mean nothing here
    if owner.boot_id and here.boot_id and owner.boot_id != here.boot_id:
        return True  # this host rebooted since
    if owner.pid_ns and here.pid_ns and owner.pid_ns != here.pid_ns:
        return True  # an earlier container of this pod (same host name, other pid namespace)
    try:
        started = _start_time(owner.pid)
    except psutil.AccessDenied:
        return False
    # no such process, or the pid now belongs to a process that started at another time
    return started is None or abs(started - owner.create_time) > _START_TIME_TOLERANCE


def _legacy_dead(name: str, host: str) -> bool:
    """A root without a record (older versions): dead only if it names this host and its pid is not alive."""
    match = _ROOT_NAME.match(name)
    if match is None or match["host"] != host:
        return False
    try:
        return _start_time(int(match["pid"])) is None
    except psutil.AccessDenied:
        return False


def _remove(root: Path) -> bool:
    """Rename ``root`` to a trash name, then delete it; False when another sweeper got there first."""
    trash = root.parent / f"{TRASH_PREFIX}{secrets.token_hex(6)}"
    try:
        os.rename(root, trash)
    except FileNotFoundError:
        return False
    _delete_trash(trash)
    return True


def _delete_trash(trash: Path) -> None:
    """``shutil.rmtree`` (symlinks inside are unlinked, never followed); what vanished meanwhile is fine."""

    def report(function: Any, path: str, error: BaseException) -> None:
        if not isinstance(error, FileNotFoundError):
            log.warning("could not remove %s: %s", path, error)

    if sys.version_info >= (3, 12):  # onerror is deprecated from 3.12 on
        shutil.rmtree(trash, onexc=report)
    else:
        shutil.rmtree(trash, onerror=lambda function, path, info: report(function, path, info[1]))


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def sweep_dead_roots(working_dir: Path) -> list[Path]:
    """Remove the roots of runners that are no longer alive (owner pid gone, or pid reused: start time
    differs); never touch a live runner's root or anything that is not a runner root; return what was
    removed.

    Also finishes removals that a sweeper killed half way left behind (hidden trash directories)."""
    try:
        names = sorted(os.listdir(working_dir))
    except FileNotFoundError:
        return []
    here = _current_owner()
    removed: list[Path] = []
    for name in names:
        path = working_dir / name
        if _TRASH_NAME.match(name) and _is_real_dir(path):
            _delete_trash(path)
            continue
        if not _ROOT_NAME.match(name) or not _is_real_dir(path):
            continue
        owner = _read_record(path)
        dead = _legacy_dead(name, here.host) if owner is None else _owner_dead(owner, here)
        if dead and _remove(path):
            log.info("removed %s: its runner is gone", path)
            removed.append(path)
    return removed
