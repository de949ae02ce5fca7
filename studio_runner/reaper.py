"""Per-experiment supervisor ("reaper"): a standalone, stdlib-only script (Python 3.7+, Linux).

Why a separate process: the runner is multi-threaded (trio forks from cached worker threads), so the
kernel's ``PR_SET_PDEATHSIG`` cannot be tied to the runner's lifetime from there -- it fires when the
*forking thread* exits, which idle trio threads do after ~10 s. This script is single-threaded, so the
death signal it sets on the experiment follows this process exactly; and it watches a pipe whose only
writer is the runner, so the runner's death by any means (even ``kill -9``) is seen as EOF.

It is run by ``studio_runner.process`` as ``python -I -S reaper.py CONTROL_FD STATUS_FD [--wrapped]`` with
the experiment's output pipe as its stdout, and:

* marks itself a child subreaper, so every descendant orphaned by its parent (double-fork daemons,
  ``setsid`` escapes) is re-parented here and stays findable;
* reads the experiment's spec from CONTROL_FD (``<length>\\n`` + NUL-separated fields: cwd, argc, argv...,
  ``KEY=VALUE``...), then starts the experiment in a new session with stdin ``/dev/null``, stdout+stderr
  merged into its own stdout, the exact cwd and environment given, and ``PDEATHSIG=SIGKILL``;
* reports ``started PID`` (or ``error ERRNO STEP MESSAGE``, STEP one of setup/chdir/exec) on STATUS_FD;
* obeys single-byte commands on CONTROL_FD: ``T`` SIGTERMs and ``K`` SIGKILLs every descendant;
  EOF means the runner is gone: SIGKILL every descendant, wait for them, exit;
* when the experiment's main process exits, SIGKILLs whatever descendants are left, waits until it has no
  children at all, then reports ``exit RETURNCODE`` (subprocess style: -N for signal N) and exits 0.

``--wrapped``: the command is a sandbox wrapper (bubblewrap, ``studio_runner.isolation``) around the
experiment, with a PID 1 of its own between them. The wrapper passes no signal on (a SIGTERM would end the
sandbox at once), so ``T`` spares the wrapper and its PID 1 and signals the rest of the tree, group by group;
``K`` kills everything as usual. The wrapper reports a death by signal N as exit status 128+N, reported here
as -N again.

It never writes to its stdout and prints nothing unless it crashes (to the runner's stderr).
"""

from __future__ import annotations

import errno
import os
import select
import sys

try:  # the C module: the same functions and constants, without importing enum (~10 ms per experiment)
    import _signal as signal
except ImportError:  # pragma: no cover - another interpreter
    import signal  # type: ignore[no-redef]

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: every import costs start-up time per experiment
    from collections.abc import Callable

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
IGNORED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
"""Signals the reaper ignores: it obeys its runner (control pipe) and SIGKILL only, so a Ctrl-C or a stray
SIGTERM cannot remove the supervision while the runner still wants a graceful stop."""
RESET_IN_CHILD = ("SIGPIPE", "SIGXFSZ", "SIGCHLD") + IGNORED
"""Dispositions set by Python or by us that would otherwise leak into the experiment through exec."""


def _prctl() -> Callable[..., int] | None:
    """libc's prctl, or None where there is none (non-Linux): then the guarantees degrade to the session."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl
    except (OSError, AttributeError, ImportError):
        return None


def _read_exact(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _read_spec(fd: int) -> tuple:
    """(cwd, argv, env) as bytes, exactly as the runner encoded them."""
    header = b""
    while not header.endswith(b"\n"):
        byte = os.read(fd, 1)
        if not byte:
            raise EOFError
        header += byte
    fields = _read_exact(fd, int(header)).split(b"\0")
    cwd, argc = fields[0], int(fields[1])
    argv = fields[2 : 2 + argc]
    env = {}
    for item in fields[2 + argc :]:
        key, _, value = item.partition(b"=")
        env[key] = value
    return cwd, argv, env


def _write(fd: int, text: str) -> None:
    """Best effort: if the runner is gone there is nobody to tell."""
    try:
        os.write(fd, text.encode("utf-8", "replace"))
    except OSError:
        pass


def _returncode(status: int) -> int:
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return 255  # stopped/continued statuses are never asked for


def _descendants(root: int) -> list:
    """(pid, process group, parent) of every process below ``root``, from /proc (ppid links). Orphans are
    re-parented to us (subreaper), so this finds everything the experiment started, whatever session or
    group it moved to."""
    children = {}  # type: dict
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open("/proc/" + entry + "/stat", "rb") as stat:
                data = stat.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses; the last ')' ends it.
        try:
            fields = data[data.rindex(b")") + 2 :].split()
            ppid, pgrp = int(fields[1]), int(fields[2])
        except (ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append((int(entry), pgrp, ppid))
    found = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child[0])
    return found


class Reaper:
    def __init__(self, control: int, status: int, wrapped: bool = False) -> None:
        self.control = control
        self.status = status
        self.wrapped = wrapped
        self.me = os.getpid()
        self.main = 0
        self.main_status = None  # type: int | None
        self.prctl = _prctl()

    def signal_tree(self, sig: int) -> None:
        """``sig`` once to each process of the tree: to the experiment's process group at once (which also
        catches a member forked during the scan), then to every descendant that left the group. Once only,
        because a second SIGTERM would re-enter the experiment's handler."""
        tree = _descendants(self.me)
        if self.wrapped and sig != signal.SIGKILL:
            self.signal_wrapped(tree, sig)
            return
        escaped = [pid for pid, pgrp, _ in tree if pgrp != self.main]
        if self.main:
            try:
                os.killpg(self.main, sig)
            except OSError:
                pass
        for pid in escaped:
            try:
                os.kill(pid, sig)
            except OSError:
                pass

    def signal_wrapped(self, tree: list, sig: int) -> None:
        """``sig`` to the tree below the sandbox wrapper and its PID 1: each process group once (the
        experiment leads its own), then each process outside those groups."""
        spared = {self.main} | {pid for pid, _, ppid in tree if ppid == self.main}
        targets = [(pid, pgrp) for pid, pgrp, _ in tree if pid not in spared]
        groups = {pgrp for pid, pgrp in targets if pgrp not in spared}
        for pgrp in groups:
            try:
                os.killpg(pgrp, sig)
            except OSError:
                pass
        for pid, pgrp in targets:
            if pgrp not in groups:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass

    def returncode(self, status: int) -> int:
        """The main process's status, subprocess style; a wrapper's 128+N is a death by signal N."""
        code = _returncode(status)
        if self.wrapped and 128 < code <= 128 + 64:
            return 128 - code
        return code

    def reap(self) -> bool:
        """Collect every exited child; False once we have no children at all."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
            if pid == self.main and self.main_status is None:
                self.main_status = status

    def wait_readable(self, wakeup: int, timeout: float | None) -> list:
        readable, _, _ = select.select([self.control, wakeup], [], [], timeout)
        if wakeup in readable:
            try:
                while os.read(wakeup, 4096):
                    pass
            except (BlockingIOError, InterruptedError):
                pass
        return readable

    def kill_all(self, wakeup: int) -> None:
        """SIGKILL the whole tree until no child is left: killed parents hand their children to us, and a
        process forked during one round is caught by the next."""
        while self.reap():  # no child at all means no descendant at all: nothing to scan
            self.signal_tree(signal.SIGKILL)
            select.select([wakeup], [], [], 0.05)
            try:
                while os.read(wakeup, 4096):
                    pass
            except (BlockingIOError, InterruptedError):
                pass

    def spawn(self, cwd: bytes, argv: list, env: dict) -> int:
        """Fork and exec the experiment; raises OSError (from the child's exec) if it cannot start."""
        devnull = os.open(os.devnull, os.O_RDWR)
        err_r, err_w = os.pipe()  # close-on-exec: EOF without data means exec succeeded
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child, between fork and exec
            step = "setup"
            try:
                os.close(err_r)
                os.setsid()
                if self.prctl is not None:
                    self.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
                    if os.getppid() != self.me:  # the reaper died before the death signal was armed
                        os._exit(137)
                for name in RESET_IN_CHILD:
                    if hasattr(signal, name):
                        signal.signal(getattr(signal, name), signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, [])
                step = "chdir"
                os.chdir(cwd)
                step = "exec"
                os.dup2(devnull, 0)
                os.dup2(1, 2)
                os.execvpe(argv[0], argv, env)
            except BaseException as exc:  # noqa: B036 - report anything, never return into the reaper
                code = getattr(exc, "errno", None) or errno.EINVAL
                message = getattr(exc, "strerror", None) or str(exc)
                try:
                    os.write(err_w, f"{code} {step} {message}".encode("utf-8", "replace"))
                finally:
                    os._exit(127)
        os.close(err_w)
        os.close(devnull)
        report = b""
        while True:
            chunk = os.read(err_r, 4096)
            if not chunk:
                break
            report += chunk
        os.close(err_r)
        if report:
            os.waitpid(pid, 0)
            code, step, message = report.decode("utf-8", "replace").split(" ", 2)
            raise OSError(int(code), message, step)  # filename: the step that failed
        return pid

    def run(self) -> int:
        for fd in (self.control, self.status):
            os.set_inheritable(fd, False)  # the experiment must not hold our pipes
        for name in IGNORED:
            signal.signal(getattr(signal, name), signal.SIG_IGN)
        try:
            cwd, argv, env = _read_spec(self.control)
        except (EOFError, ValueError, OSError):
            return 2  # the runner went away (or spoke nonsense) before asking for anything
        if self.prctl is not None:
            self.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        wakeup_r, wakeup_w = os.pipe()
        os.set_blocking(wakeup_r, False)
        os.set_blocking(wakeup_w, False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.set_wakeup_fd(wakeup_w, warn_on_full_buffer=False)
        try:
            self.main = self.spawn(cwd, argv, env)
        except OSError as exc:
            step = exc.filename if exc.filename in ("setup", "chdir", "exec") else "setup"
            _write(self.status, f"error {exc.errno or errno.EINVAL} {step} {exc.strerror or exc}\n")
            return 0
        _write(self.status, f"started {self.main}\n")
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)  # the output pipe's EOF must depend on the experiment's tree only
        os.close(null)
        while True:
            self.reap()
            if self.main_status is not None:
                self.kill_all(wakeup_r)
                _write(self.status, f"exit {self.returncode(self.main_status)}\n")
                return 0
            if self.control in self.wait_readable(wakeup_r, None):
                try:
                    commands = os.read(self.control, 4096)
                except OSError:
                    commands = b""
                if not commands:  # the runner is gone, however it died
                    self.kill_all(wakeup_r)
                    return 0
                if b"K" in commands:
                    self.signal_tree(signal.SIGKILL)
                elif b"T" in commands:
                    self.signal_tree(signal.SIGTERM)


def main(args: list) -> int:
    wrapped = args[2:] == ["--wrapped"]
    if len(args) != 2 and not wrapped:
        sys.stderr.write("usage: reaper.py CONTROL_FD STATUS_FD [--wrapped]\n")
        return 2
    return Reaper(int(args[0]), int(args[1]), wrapped).run()


if __name__ == "__main__":
    code = main(sys.argv[1:])
    os._exit(code)  # everything is written with os.write: skip the interpreter's finalisation
