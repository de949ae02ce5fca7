"""``studio-runner run --tui``: the runner as a child process and the TUI in front of it, in one terminal.

Why a child process and not a thread: the runner runs on trio and Textual on asyncio, and the TUI must only
ever see the runner through its status endpoint (the same view ``studio-runner tui`` has of a runner on
another machine). The runner's own log cannot share the terminal with a full-screen app, so it goes to a file
whose path is shown in the TUI's header and printed on exit.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

READY_TIMEOUT_S = 60.0
"""How long the runner may take to serve /healthz (imports, queue root set-up) before we give up."""
STOP_TIMEOUT_S = 60.0
"""After SIGTERM the runner drains (hands running experiments back within its grace period); then SIGKILL."""


def runner_command(run_argv: list[str]) -> list[str]:
    """The command that starts ``studio-runner run`` with the same interpreter or the same frozen binary."""
    if getattr(sys, "frozen", False):  # a PyInstaller one-file build: the executable is the CLI
        return [sys.executable, "run", *run_argv]
    return [sys.executable, "-m", "studio_runner", "run", *run_argv]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def with_status_address(run_argv: list[str]) -> tuple[list[str], str]:
    """The argv with ``--prom-address`` (a free loopback port unless given) and the URL the TUI polls.

    An empty address (status off) or port 0 (the runner picks one we could not know) is replaced by a free
    port: the TUI cannot work without the endpoint.
    """
    argv = list(run_argv)
    at: int | None = None
    address = ""
    for i, arg in enumerate(argv):
        if arg == "--prom-address" and i + 1 < len(argv):
            at, address = i, argv[i + 1]
            del argv[i:i + 2]
            break
        if arg.startswith("--prom-address="):
            at, address = i, arg.split("=", 1)[1]
            del argv[i]
            break
    host, _, port = address.strip().rpartition(":")
    host = host.strip("[]")
    if not port.isdigit() or int(port) == 0:
        port = str(_free_port())
    bind = f"[{host}]" if ":" in host else host or "127.0.0.1"
    at = len(argv) if at is None else at
    argv[at:at] = ["--prom-address", f"{bind}:{port}"]
    if host in ("", "0.0.0.0", "::"):  # bound everywhere (or loopback by default): ask over loopback
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return argv, f"http://{host}:{port}"


def log_path() -> Path:
    """Where the runner's output goes while the TUI owns the terminal."""
    return Path(tempfile.gettempdir()) / f"studio-runner-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def wait_ready(url: str, runner: subprocess.Popen[Any], timeout: float = READY_TIMEOUT_S) -> str:
    """Wait until GET /healthz answers 200; "" then, else why not (the runner exited, or too slow)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=1.0, trust_env=False) as http:
        while time.monotonic() < deadline:
            code = runner.poll()
            if code is not None:
                return f"the runner exited with status {code} before it served {url}/healthz"
            try:
                if http.get(f"{url}/healthz").status_code == 200:
                    return ""
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    return f"the runner did not serve {url}/healthz within {timeout:.0f} s"


def stop_runner(runner: subprocess.Popen[Any], timeout: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM (the runner drains and hands work back), then SIGKILL if still there after ``timeout``."""
    if runner.poll() is None:
        runner.send_signal(signal.SIGTERM)
        try:
            runner.wait(timeout)
        except subprocess.TimeoutExpired:
            runner.kill()
            runner.wait()
    return int(runner.returncode)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_with_runner(run_argv: list[str]) -> int:
    """Start the runner with ``run_argv``, show the TUI until the user quits, stop the runner; its status."""
    from tui.app import RunnerApp  # Textual is only imported when the TUI is wanted

    argv, url = with_status_address(list(run_argv))
    log_file = log_path()
    with open(log_file, "ab") as log:
        # A session of its own: the terminal's signals (the TUI owns the keyboard; a hang-up would read as
        # the runner's "reload the configuration") reach only us, and we decide how the runner stops.
        runner = subprocess.Popen(runner_command(argv), stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        problem = wait_ready(url, runner)
        if problem:
            print(f"studio-runner: {problem}; its log ({log_file}) ends with:\n{_tail(log_file)}",
                  file=sys.stderr)
            return stop_runner(runner) or 1
        app = RunnerApp(url, note=f"runner log: {log_file}", runner_exit=runner.poll)

        def leave(signum: int, _frame: FrameType | None) -> None:
            app.exit(0)  # SIGTERM/SIGHUP to us: close the TUI, then stop the runner below

        previous = {sig: signal.signal(sig, leave) for sig in (signal.SIGTERM, signal.SIGHUP)}
        try:
            app.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        if runner.poll() is None:
            print(f"studio-runner: stopping the runner (pid {runner.pid}); it hands running work back",
                  file=sys.stderr)
        code = stop_runner(runner)
        print(f"studio-runner: the runner exited with status {code}; its log is {log_file}", file=sys.stderr)
    return code


__all__ = ["run_with_runner", "runner_command", "stop_runner", "wait_ready", "with_status_address"]
