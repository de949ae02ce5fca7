"""Running the experiment's process tree: started under a per-experiment reaper, output merged, stopped whole.

Why a reaper (``studio_runner/reaper.py``, a stdlib-only script run as its own process): the runner must
guarantee that nothing an experiment started outlives the experiment's end, nor the runner itself, even
when the runner dies by ``kill -9`` (another runner is about to take the same message). The kernel's
``PR_SET_PDEATHSIG`` cannot give that from here: it fires when the *thread* that forked the child exits,
and trio forks from cached worker threads that exit after ~10 s idle, which used to SIGKILL every
experiment that outlived such an idle period. The single-threaded reaper instead

* watches a control pipe whose only writer is this runner: EOF (the runner died, however) means SIGKILL
  the whole tree and exit;
* is a child subreaper, so double-fork daemons and ``setsid`` escapes are re-parented to it and can always
  be found and signalled;
* ends the whole tree when the experiment's main process exits, then reports the main process's real
  status, so callers see exit code N or "killed by signal N" as if there were no reaper.

stderr is merged into stdout in the kernel pipe, the only way to keep the two streams' lines in the order
they were written. On platforms other than Linux there is no subreaper nor death signal: the experiment runs
as a plain child in its own session; its process group is signalled and cleaned up, but processes that
leave the group, or the whole tree if the runner is killed with ``kill -9``, may survive (weaker guarantee).

With ``--isolate bwrap`` the experiment's command is prefixed by a sandbox wrapper
(:mod:`studio_runner.isolation`) and the reaper runs outside it, told so (``--wrapped``): it spares the
wrapper on a graceful stop and translates its exit status back. ``pid`` is then the wrapper's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil
import trio

REAPER_SCRIPT = Path(__file__).with_name("reaper.py")
REAPER_AVAILABLE = sys.platform.startswith("linux")
"""The reaper needs Linux (child subreaper, death signal, /proc); elsewhere start() uses a plain child."""
REAPER_EXIT_TIMEOUT = 5.0
"""How long after kill() the reaper gets to report and exit before the runner SIGKILLs it and the tree."""


def reaper_command(control_fd: int, status_fd: int, wrapped: bool = False) -> list[str]:
    """The one place that picks the reaper's interpreter and script (a single-file build substitutes its
    own). ``-I -S``: no user site, no PYTHON* variables, no site-packages: fast and unaffected by the
    experiment's or runner's Python setup. ``wrapped``: the command runs inside a sandbox wrapper."""
    from studio_runner.pythons import reaper_python  # the host's interpreter in the one-file build

    command = [reaper_python(), "-I", "-S", str(REAPER_SCRIPT), str(control_fd), str(status_fd)]
    return [*command, "--wrapped"] if wrapped else command


def _encode_spec(argv: Sequence[str], cwd: Path, env: Mapping[str, str]) -> bytes:
    """The experiment as bytes for the reaper: exact (surrogate-escaped names survive), no JSON needed."""
    if not argv:
        raise ValueError("empty command line")
    fields = [os.fsencode(cwd), str(len(argv)).encode(), *(os.fsencode(arg) for arg in argv)]
    for key, value in env.items():
        name = os.fsencode(key)
        if not name or b"=" in name:
            raise ValueError(f"illegal environment variable name: {key!r}")
        fields.append(name + b"=" + os.fsencode(value))
    if any(b"\0" in field for field in fields):
        raise ValueError("embedded null byte")
    payload = b"\0".join(fields)
    return b"%d\n" % len(payload) + payload


class ExperimentProcess:
    """One running experiment: its merged output, its status, and the means to stop its whole tree.

    ``returncode`` is the experiment's main process's status, subprocess-style (>= 0 exit code, -N killed
    by signal N), None while it runs. ``stop_requested`` tells a signal death caused by the runner apart
    from the experiment's own result.
    """

    pid: int
    """The experiment's main process once known (always, after start() returns), else the reaper's."""
    stdout: trio.abc.ReceiveStream
    """Merged stdout+stderr of the whole tree; EOF once every writer is gone."""
    stop_requested: bool

    def __init__(self, proc: trio.Process, control: int | None = None, status: int | None = None) -> None:
        assert proc.stdout is not None
        self._proc = proc  # the reaper; without one (``supervised`` False), the experiment itself
        self.supervised = control is not None
        self._control = control
        self._status = status
        self._status_buffer = b""
        self._status_eof = status is None
        self._started = not self.supervised
        self._start_error: OSError | None = None
        self._returncode: int | None = None
        self._finished = False
        self._wait_lock = trio.Lock()
        self._program = self._cwd = ""  # for start errors, set by start()
        self.pid = proc.pid
        self.stdout = proc.stdout
        self.stop_requested = False

    @property
    def returncode(self) -> int | None:
        """None while the experiment runs; with a reaper, set once the whole tree is gone."""
        if self._returncode is None:
            if not self.supervised:
                self._returncode = self._proc.returncode
            elif self._status is not None and not self._status_eof:
                self._poll_status()
        return self._returncode

    @property
    def tree_root(self) -> tuple[int, bool]:
        """``(pid, counts_itself)``: the process whose descendants are the experiment's tree, and whether
        that process is itself part of the experiment (no reaper) or not (the reaper)."""
        return self._proc.pid, not self.supervised

    # -- the public API -----------------------------------------------------------------------------------

    async def wait(self) -> int:
        """Wait until the experiment and everything it started are gone (and the reaper has exited)."""
        async with self._wait_lock:
            if not self._finished:
                if self.supervised:
                    while not self._status_eof:
                        await self._receive_status()
                    self._close_fds()
                    await self._proc.wait()
                    if self._returncode is None:  # the reaper died without reporting (killed from outside)
                        self._sweep()
                        self._returncode = self._proc.returncode
                else:
                    self._returncode = await self._proc.wait()
                    self._signal_group(signal.SIGKILL)  # stragglers left in the experiment's group
                self._finished = True
            assert self._returncode is not None
            return self._returncode

    def terminate(self) -> None:
        """SIGTERM to every process of the experiment's tree."""
        self._send(b"T", signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL to every process of the experiment's tree."""
        self._send(b"K", signal.SIGKILL)

    async def stop(self, grace: float) -> None:
        """Terminate, wait up to ``grace`` seconds, kill what is left, wait for the end; shielded, so a
        cancelled caller still leaves nothing running. Harmless after the end and when called twice."""
        with trio.CancelScope(shield=True):
            if self.returncode is None:
                self.terminate()
                with trio.move_on_after(grace):
                    await self.wait()
            if self.returncode is None:
                self.kill()
            with trio.move_on_after(REAPER_EXIT_TIMEOUT):
                await self.wait()
            if not self._finished:  # the reaper is stuck: the safety net
                self._sweep()
                await self.wait()

    # -- the reaper's pipes -------------------------------------------------------------------------------

    def _consume(self, data: bytes) -> None:
        if not data:
            self._status_eof = True
            return
        self._status_buffer += data
        while b"\n" in self._status_buffer:
            line, _, self._status_buffer = self._status_buffer.partition(b"\n")
            word, _, rest = line.decode("utf-8", "replace").partition(" ")
            if word == "started":
                self.pid, self._started = int(rest), True
            elif word == "exit":
                self._returncode = int(rest)
            elif word == "error":
                code, step, message = (rest.split(" ", 2) + ["", ""])[:3]
                filename = {"chdir": self._cwd, "exec": self._program}.get(step)
                self._start_error = OSError(int(code), message, filename)

    def _poll_status(self) -> None:
        """Read what the reaper has said so far, without blocking."""
        assert self._status is not None
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while not self._status_eof:
                self._consume(os.read(self._status, 4096))

    async def _receive_status(self) -> None:
        """Block until the reaper says something more (or closes the pipe)."""
        assert self._status is not None
        while True:
            try:
                data = os.read(self._status, 4096)
            except (BlockingIOError, InterruptedError):
                await trio.lowlevel.wait_readable(self._status)
                continue
            self._consume(data)
            await trio.lowlevel.checkpoint()
            return

    async def _handshake(self, spec: bytes) -> None:
        """Send the experiment's spec; return once it runs, raise OSError if it could not start."""
        assert self._control is not None
        view = memoryview(spec)
        while view:
            try:
                view = view[os.write(self._control, view) :]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._control)
            except BrokenPipeError:
                break  # the reaper died: reported below
        while not (self._started or self._start_error or self._status_eof):
            await self._receive_status()
        if not self._started:
            await self.wait()
            if self._start_error is not None:
                raise self._start_error
            raise OSError(f"the experiment's reaper failed (status {self._proc.returncode})")

    def _send(self, command: bytes, sig: signal.Signals) -> None:
        if self.returncode is None:
            self.stop_requested = True
        if self._control is not None:
            with contextlib.suppress(OSError):  # full pipe (commands pending anyway) or the reaper is gone
                os.write(self._control, command)
        elif not self.supervised and self._proc.returncode is None:
            members = _tree(self._proc.pid)
            self._signal_group(sig)
            for member in members:
                with contextlib.suppress(psutil.Error):
                    member.send_signal(sig)

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def _sweep(self) -> None:
        """SIGKILL the reaper and whatever psutil still finds of the tree: its descendants while it lives
        (it is their subreaper), and the experiment's session and group (orphans of a dead reaper)."""
        members: list[psutil.Process] = []
        if self._proc.returncode is None:  # not reaped yet, so the pid is still ours
            members += _tree(self._proc.pid)
        if self._started:  # a session id cannot be reused while any member of the session lives
            for candidate in psutil.process_iter():
                with contextlib.suppress(OSError, psutil.Error):
                    if candidate.pid != os.getpid() and self.pid in (
                        os.getsid(candidate.pid),
                        os.getpgid(candidate.pid),
                    ):
                        members.append(candidate)
        for member in members:
            with contextlib.suppress(psutil.Error):
                member.kill()
        if self._proc.returncode is None:
            with contextlib.suppress(OSError):
                self._proc.kill()

    def _close_fds(self) -> None:
        for fd in (self._control, self._status):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._control = self._status = None

    def __del__(self) -> None:
        # Dropped without wait(): closing the control pipe makes the reaper end the tree.
        with contextlib.suppress(Exception):
            self._close_fds()


async def start(
    argv: Sequence[str], cwd: Path, env: Mapping[str, str], *, reaper: bool = REAPER_AVAILABLE,
    wrapper: Sequence[str] = (),
) -> ExperimentProcess:
    """Start the experiment (under its reaper); raises OSError if it cannot start.

    ``reaper=False`` runs it as a plain child in its own session (the non-Linux fallback).
    ``wrapper``: a sandbox command prefix (:func:`studio_runner.isolation.wrapper`); it needs the reaper,
    and a failure inside the sandbox (a missing path) shows in the output and as a non-zero exit.
    """
    if wrapper and not reaper:
        raise OSError("isolation needs the reaper (Linux)")
    if not reaper:
        return await _start_plain(argv, cwd, env)
    spec = _encode_spec([*wrapper, *argv], cwd, env)
    control_r, control_w = os.pipe()  # close-on-exec: no other child of the runner holds our ends
    status_r, status_w = os.pipe()
    try:
        os.set_blocking(control_w, False)
        os.set_blocking(status_r, False)
        proc = await trio.lowlevel.open_process(
            reaper_command(control_r, status_w, wrapped=bool(wrapper)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=None,  # the reaper is silent unless it crashes: then the runner's log shows why
            pass_fds=(control_r, status_w),
            start_new_session=True,  # Ctrl-C on the runner's terminal reaches the runner only
            cwd="/",
        )
    except BaseException:
        for fd in (control_w, status_r):
            os.close(fd)
        raise
    finally:
        os.close(control_r)
        os.close(status_w)
    experiment = ExperimentProcess(proc, control_w, status_r)
    experiment._program, experiment._cwd = str((wrapper or argv)[0]), str(cwd)
    try:
        await experiment._handshake(spec)
    except BaseException:
        with trio.CancelScope(shield=True):
            experiment._close_fds()  # EOF: the reaper kills whatever started, then exits
            with trio.move_on_after(REAPER_EXIT_TIMEOUT):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await proc.stdout.aclose()  # type: ignore[union-attr]
        raise
    return experiment


async def _start_plain(argv: Sequence[str], cwd: Path, env: Mapping[str, str]) -> ExperimentProcess:
    proc = await trio.lowlevel.open_process(
        list(argv),
        cwd=str(cwd),
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return ExperimentProcess(proc)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
