"""Reclaiming the roots of dead runners, with real processes, real kill -9 and real directories."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from studio_runner.config import sanitise_hostname
from studio_runner.sweep import OWNER_FILE, TRASH_PREFIX, claim_root, release_root, sweep_dead_roots

REPO = Path(__file__).resolve().parent.parent
HOST = socket.gethostname()

CLAIMER = """
import os, sys, time
from pathlib import Path
from studio_runner.sweep import claim_root
root = claim_root(Path(sys.argv[1]), f"{sys.argv[2]}-{os.getpid()}-abc123")
(root / "experiments" / "e.1" / "workspace").mkdir(parents=True)
(root / "experiments" / "e.1" / "workspace" / "big.bin").write_bytes(b"x" * 4096)
print(root, flush=True)
time.sleep(600)
"""


@pytest.fixture
def runners() -> Iterator[list[subprocess.Popen[str]]]:
    """Runner-like processes started by a test; any still alive at the end are killed."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def start_runner(runners: list[subprocess.Popen[str]], working_dir: Path,
                 host: str = sanitise_hostname(HOST)) -> tuple[subprocess.Popen[str], Path]:
    """A separate process that claims a root in ``working_dir`` (with an experiment in it) and stays."""
    proc = subprocess.Popen([sys.executable, "-c", CLAIMER, str(working_dir), host],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    runners.append(proc)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line, "the runner process did not claim a root"
    return proc, Path(line)


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not psutil.pid_exists(proc.pid)
    return proc.pid


def rewrite_record(root: Path, **changes: object) -> None:
    record = json.loads((root / OWNER_FILE).read_text())
    record.update(changes)
    (root / OWNER_FILE).write_text(json.dumps(record))


def test_claim_root_writes_an_owner_record(tmp_path: Path) -> None:
    root = claim_root(tmp_path / "work", f"{sanitise_hostname(HOST)}-{os.getpid()}-0a1b2c")
    assert root.parent == tmp_path / "work" and root.is_dir()
    record = json.loads((root / OWNER_FILE).read_text())
    assert record["pid"] == os.getpid()
    assert record["create_time"] == pytest.approx(psutil.Process().create_time())
    assert sweep_dead_roots(tmp_path / "work") == [] and root.is_dir()  # our own root is alive
    with pytest.raises(ValueError):
        claim_root(tmp_path / "work", "evil/../../x-1-abcdef")
    with pytest.raises(FileExistsError):
        claim_root(tmp_path / "work", f"{sanitise_hostname(HOST)}-{os.getpid()}-0a1b2c")


def test_the_root_of_a_killed_runner_is_removed(tmp_path: Path, runners: list) -> None:
    victim, root = start_runner(runners, tmp_path)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert (root / "experiments" / "e.1" / "workspace" / "big.bin").exists()  # left behind by kill -9
    assert sweep_dead_roots(tmp_path) == [root]
    assert os.listdir(tmp_path) == []


def test_the_root_of_a_killed_but_unreaped_runner_is_removed(tmp_path: Path, runners: list) -> None:
    """A zombie (killed, its parent has not waited yet) still has its pid: it is dead all the same."""
    victim, root = start_runner(runners, tmp_path)
    os.kill(victim.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while psutil.Process(victim.pid).status() != psutil.STATUS_ZOMBIE:  # not reaped yet
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert sweep_dead_roots(tmp_path) == [root]


def test_a_live_runner_root_is_kept(tmp_path: Path, runners: list) -> None:
    live, root = start_runner(runners, tmp_path)
    assert sweep_dead_roots(tmp_path) == []
    assert (root / "experiments" / "e.1" / "workspace" / "big.bin").exists()
    assert live.poll() is None


def test_a_root_whose_pid_was_reused_is_removed(tmp_path: Path, runners: list) -> None:
    """Same pid, other start time: the process living under that pid now is not the root's owner."""
    live, root = start_runner(runners, tmp_path)
    started = psutil.Process(live.pid).create_time()
    rewrite_record(root, create_time=started - 3600)
    assert sweep_dead_roots(tmp_path) == [root]
    assert live.poll() is None  # the process itself is not touched


def test_unrelated_entries_and_symlink_targets_are_untouched(tmp_path: Path, runners: list) -> None:
    work = tmp_path / "work"
    outside = tmp_path / "outside"
    (outside / "keep").mkdir(parents=True)
    (outside / "keep" / "precious.txt").write_text("precious")
    victim, root = start_runner(runners, work)
    os.symlink(outside / "keep", root / "experiments" / "link-to-outside")  # inside a dead root
    host, pid = sanitise_hostname(HOST), dead_pid()
    unrelated = {
        "studio-runner-demo-abcd1234": "dir",  # the demo's temp dir
        "studio-runner-envs": "dir",
        f"studio-runner-{host}-{pid}-xyz123": "dir",  # not 6 hex digits
        f"studio-runner-{host}-{pid}-abcdef.bak": "dir",
        f"studio-runner-{host}-{pid}-fedcba": "file",  # the right name, but a file
        f"{TRASH_PREFIX}notatrash": "dir",
        "experiment-data": "dir",
    }
    for name, kind in unrelated.items():
        if kind == "dir":
            (work / name).mkdir()
            (work / name / "inside.txt").write_text("x")
        else:
            (work / name).write_text("x")
    os.symlink(outside / "keep", work / f"studio-runner-{host}-{pid}-a1b2c3")  # a root-like symlink
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()

    assert sweep_dead_roots(work) == [root]
    assert (outside / "keep" / "precious.txt").read_text() == "precious"
    assert (work / f"studio-runner-{host}-{pid}-a1b2c3").is_symlink()
    for name, kind in unrelated.items():
        assert (work / name / "inside.txt").exists() if kind == "dir" else (work / name).is_file(), name


def test_roots_without_a_record_go_only_when_their_pid_is_not_alive(tmp_path: Path, runners: list) -> None:
    """Roots made by older versions: the pid in the name decides, and only for this host's names."""
    host = sanitise_hostname(HOST)
    dead = tmp_path / f"studio-runner-{host}-{dead_pid()}-abcdef"
    alive = tmp_path / f"studio-runner-{host}-{os.getpid()}-abcdef"
    elsewhere = tmp_path / f"studio-runner-another-host-{dead_pid()}-abcdef"
    for root in (dead, alive, elsewhere):
        (root / "experiments").mkdir(parents=True)
    (alive / OWNER_FILE).write_text("{not json")  # an unreadable record counts as none
    assert sweep_dead_roots(tmp_path) == [dead]
    assert alive.is_dir() and elsewhere.is_dir()


def test_records_from_elsewhere_are_not_judged_and_from_earlier_boots_are(tmp_path: Path,
                                                                           runners: list) -> None:
    victim, other_host = start_runner(runners, tmp_path)
    _, rebooted = start_runner(runners, tmp_path)
    _, old_container = start_runner(runners, tmp_path)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    rewrite_record(other_host, host="another-machine")  # NFS or a shared hostPath: its pid means nothing here
    rewrite_record(rebooted, boot_id="00000000-0000-0000-0000-000000000000")
    rewrite_record(old_container, pid_ns="pid:[1]")
    assert sorted(sweep_dead_roots(tmp_path)) == sorted([rebooted, old_container])
    assert other_host.is_dir()


def test_kept_roots_are_never_swept_and_release_removes(tmp_path: Path, runners: list) -> None:
    host = sanitise_hostname(HOST)
    victim, debug_root = start_runner(runners, tmp_path)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    release_root(debug_root, keep=True)  # --debug: experiment directories are for a human to read
    assert sweep_dead_roots(tmp_path) == [] and debug_root.is_dir()

    root = claim_root(tmp_path, f"{host}-{os.getpid()}-123456")
    (root / "experiments").mkdir()
    release_root(root)
    assert not root.exists() and sorted(os.listdir(tmp_path)) == [debug_root.name]


def test_a_half_done_removal_is_finished(tmp_path: Path) -> None:
    trash = tmp_path / f"{TRASH_PREFIX}0123456789ab"
    (trash / "experiments" / "x").mkdir(parents=True)
    (trash / "experiments" / "x" / "f").write_text("x")
    assert sweep_dead_roots(tmp_path) == []
    assert os.listdir(tmp_path) == []


def test_a_missing_working_dir_has_nothing_to_sweep(tmp_path: Path) -> None:
    assert sweep_dead_roots(tmp_path / "absent") == []
