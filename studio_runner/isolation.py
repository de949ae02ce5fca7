"""Optional process isolation: ``--isolate bwrap`` runs each experiment in a bubblewrap sandbox.

This is the runner's counterpart of the Singularity isolation the Go runner offered (seeds: "the go based
runner can make use of Singularity ... to provide isolation and also access to low level machine resources
such as GPU cards"): an unprivileged sandbox around an unchanged experiment, built from the host's own files
rather than from an image. bubblewrap (Debian package ``bubblewrap``) needs user namespaces, or root.

What the experiment sees (everything at its real path, so nothing in the request or environment changes):

* its experiment directory, writable (its workspace is the working directory; ``TMPDIR`` lives inside it);
* its Python environment and the interpreter's installation it was built from, read-only (``pip install``
  from the experiment fails: environments are shared by every experiment with the same requirements);
* ``/usr``, ``/bin``, ``/sbin``, ``/lib*`` and ``/sys`` read-only, and a few files of ``/etc`` that
  libraries need (name resolution, users, TLS roots, the dynamic loader, time zones);
* a fresh ``/proc`` of its own PID namespace (it sees only its own processes, so neither the runner's
  environment nor other experiments' ``/proc/PID/root`` can be reached), a minimal ``/dev`` (null, zero,
  random, tty, a private ``/dev/shm``), and the NVIDIA device nodes only when it was given GPUs;
* a private, empty ``/tmp``, and ``$HOME`` backed by ``<experiment dir>/_runner/home`` (caches such as
  ``~/.cache/huggingface`` land in the experiment's disk budget and are removed with it).

Everything else -- home directories, other experiments, the queue root, storage roots, the artifact cache,
the runner's keys and certificates -- does not exist inside. The network is left on: experiments download
their data. The sandbox gets no capabilities (``--cap-drop ALL`` when the runner is root) and its own IPC
namespace.

How it fits the reaper (:mod:`studio_runner.process`): bwrap wraps only the experiment's command, inside the
reaper, so the reaper stays outside the sandbox, invisible to the experiment. ``--die-with-parent`` ties the
sandbox to the reaper (single-threaded, so the death signal is reliable), and the reaper's process tree
view (host ``/proc``) still sees every sandboxed process. With ``--unshare-pid`` the sandbox's PID 1
(bwrap) dying takes every process of the sandbox with it; ``--new-session`` gives the experiment its own
process group, which the reaper signals for a graceful stop while sparing bwrap (bwrap does not forward
signals: a SIGTERM to it would end the sandbox at once, without the grace period). bwrap reports a death by
signal N as exit status 128+N; the reaper turns that back into "killed by signal N", so an experiment that
exits with status 129..192 itself is reported as killed by a signal (the same convention as a shell).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from studio_runner.errors import ConfigError

MODES = ("none", "bwrap")
CHECK_TIMEOUT = 20.0
"""Seconds the start-up probe of bwrap may take."""
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
"""Read-only in the sandbox; on merged-/usr systems the top-level ones are symlinks and recreated as such."""
ETC_FILES = (
    "resolv.conf", "hosts", "host.conf", "nsswitch.conf", "gai.conf", "passwd", "group", "services",
    "protocols", "ssl", "ca-certificates", "ca-certificates.conf", "pki", "crypto-policies", "ld.so.cache",
    "ld.so.conf", "ld.so.conf.d", "localtime", "timezone", "zoneinfo", "alternatives", "mime.types",
    "os-release", "machine-id", "nvidia",
)
"""The parts of /etc libraries read (resolver, users, TLS roots, loader, time zone); nothing else of /etc
(credentials, service configuration) is visible."""
GPU_DEVICES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset", "nvidia-caps")


def bwrap_path() -> str | None:
    """The bwrap executable on PATH, or None."""
    return shutil.which("bwrap")


def check(mode: str) -> None:
    """Start-up check: with ``bwrap``, the tool must exist and be able to build the sandbox used for
    experiments (namespaces, a fresh /proc), else ConfigError: a runner asked to isolate must never run an
    experiment unisolated."""
    if mode == "none":
        return
    if mode not in MODES:
        raise ConfigError(f"--isolate {mode!r}: expected one of {', '.join(MODES)}")
    bwrap = bwrap_path()
    if bwrap is None:
        raise ConfigError("--isolate bwrap: bwrap is not installed (Debian: apt-get install bubblewrap)")
    for probe in ([bwrap, "--ro-bind", "/", "/", "true"],
                  [bwrap, *_system_arguments(), *_namespace_arguments(), "--", "true"]):
        try:
            done = subprocess.run(probe, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=CHECK_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"--isolate bwrap: {bwrap} cannot run: {exc}") from None
        if done.returncode != 0:
            why = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
            raise ConfigError(f"--isolate bwrap: bwrap cannot create its sandbox here ({why[0]}); user "
                              "namespaces may be disabled (kernel.unprivileged_userns_clone, a container's "
                              "seccomp profile) -- run with --isolate none or allow them")


def wrapper(mode: str, expdir: Path, cwd: Path, venv: Path, python: Path,
            env: Mapping[str, str]) -> list[str]:
    """The command prefix that runs the experiment isolated (ends with ``--``; the experiment's own command
    line follows), or ``[]`` for ``none``. ``python`` is the interpreter the environment was built from;
    ``env`` is the experiment's environment (its HOME is backed by the experiment directory; GPU device
    nodes are visible only when CUDA_VISIBLE_DEVICES names cards)."""
    if mode == "none":
        return []
    if mode != "bwrap":
        raise ConfigError(f"--isolate {mode!r}: expected one of {', '.join(MODES)}")
    bwrap = bwrap_path()
    if bwrap is None:  # check() ran at start-up; bwrap was removed since: fail, never run unisolated
        raise ConfigError("--isolate bwrap: bwrap is no longer installed")
    args = [bwrap, *_system_arguments(), *_namespace_arguments(), "--tmpfs", "/tmp"]
    home = env.get("HOME", "")
    if home.startswith("/") and home.rstrip("/") and not _under_system(Path(home)):
        backing = expdir / "_runner" / "home"
        backing.mkdir(parents=True, exist_ok=True)
        args += ["--bind", str(backing), home]
    for path in _installations(venv, python):
        args += ["--ro-bind", str(path), str(path)]
    args += ["--ro-bind", str(venv), str(venv)]
    if venv.resolve() != venv:
        args += ["--ro-bind", str(venv.resolve()), str(venv.resolve())]
    args += ["--bind", str(expdir), str(expdir)]
    if expdir.resolve() != expdir:
        args += ["--bind", str(expdir.resolve()), str(expdir.resolve())]
    if env.get("CUDA_VISIBLE_DEVICES") or env.get("NVIDIA_VISIBLE_DEVICES"):
        args += _gpu_arguments()
    return [*args, "--chdir", str(cwd), "--"]


def _system_arguments() -> list[str]:
    """The read-only host parts every sandbox has."""
    args: list[str] = []
    for name in SYSTEM_DIRS:
        if os.path.islink(name):
            args += ["--symlink", os.readlink(name), name]
        elif os.path.isdir(name):
            args += ["--ro-bind", name, name]
    for name in ETC_FILES:
        path = os.path.join("/etc", name)
        if os.path.lexists(path):
            args += ["--ro-bind-try", path, path]
    args += ["--ro-bind-try", "/sys", "/sys", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/dev/shm"]
    return args


def _namespace_arguments() -> list[str]:
    """New PID, IPC and (where possible) cgroup namespaces; network shared; no capabilities; the sandbox
    dies with the reaper; the experiment in its own session (the reaper's graceful-stop group)."""
    args = ["--unshare-pid", "--unshare-ipc", "--unshare-cgroup-try", "--die-with-parent", "--new-session"]
    if os.geteuid() == 0:
        args += ["--cap-drop", "ALL"]
    return args


def _installations(venv: Path, python: Path) -> list[Path]:
    """Directories holding the interpreter the environment runs on (the venv's ``python`` is a symlink to
    it; ``pyvenv.cfg`` names its ``bin``), outside the system directories already visible."""
    found: list[Path] = []
    candidates = [python, venv / "bin" / "python"]
    home = _venv_home(venv)
    if home is not None:
        candidates.append(home / "python")
    for candidate in candidates:
        with contextlib.suppress(OSError):
            real = candidate.resolve(strict=True)
            prefix = real.parent.parent if real.parent.name == "bin" else real.parent
            if not _under_system(prefix) and prefix != Path("/") and prefix not in found:
                found.append(prefix)
    return [path for path in found if not any(other != path and other in path.parents for other in found)]


def _venv_home(venv: Path) -> Path | None:
    with contextlib.suppress(OSError):
        for line in (venv / "pyvenv.cfg").read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home" and value.strip():
                return Path(value.strip())
    return None


def _under_system(path: Path) -> bool:
    return any(path == Path(top) or Path(top) in path.parents for top in SYSTEM_DIRS)


def _gpu_arguments() -> list[str]:
    """Every NVIDIA device node (cards are chosen by CUDA_VISIBLE_DEVICES, as without isolation)."""
    dev = Path("/dev")
    names: Sequence[str] = sorted({p.name for p in dev.glob("nvidia*")} | set(GPU_DEVICES))
    args: list[str] = []
    for name in names:
        path = dev / name
        if path.exists():
            args += ["--dev-bind-try", str(path), str(path)]
    return args
