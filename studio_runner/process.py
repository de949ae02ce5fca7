"""Running the experiment's process: its own session, merged output read line by line, group kill.

The child runs in a new session (``start_new_session``), so it and every process it forks (data-loader
workers, shells) share one process group that can be signalled at once. Processes that escape the group
with their own ``setsid`` are found through psutil's process tree and signalled too. stderr is merged into
stdout in the kernel pipe, which is the only way to keep the two streams' lines in the order they were
written.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import psutil
import trio

MAX_LINE_BYTES = 1 << 20
"""A line longer than this is cut into pieces, so one missing newline cannot grow memory without bound."""


def _die_with_runner() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask the kernel to SIGKILL the experiment if the runner dies (even by kill -9), so no orphan is left
    computing for a message that another runner is about to take."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


PR_SET_PDEATHSIG = 1


async def start(argv: Sequence[str], cwd: Path, env: Mapping[str, str]) -> trio.Process:
    """Start the experiment in its own session, stdout and stderr merged, dying with the runner."""
    return await trio.lowlevel.open_process(
        list(argv),
        cwd=str(cwd),
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_runner if sys.platform == "linux" else None,
    )


async def lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[str]:
    """Decoded lines (without the newline) as the process writes them; the last partial line at EOF too."""
    buffer = bytearray()
    while True:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        buffer += chunk
        while True:
            newline = buffer.find(b"\n")
            if newline < 0:
                if len(buffer) >= MAX_LINE_BYTES:
                    yield buffer[:MAX_LINE_BYTES].decode("utf-8", "replace")
                    del buffer[:MAX_LINE_BYTES]
                    continue
                break
            yield buffer[:newline].rstrip(b"\r").decode("utf-8", "replace")
            del buffer[: newline + 1]
    if buffer:
        yield buffer.decode("utf-8", "replace")


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _signal_all(pgid: int, members: list[psutil.Process], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
    for member in members:
        with contextlib.suppress(psutil.Error):
            member.send_signal(sig)


async def stop_tree(process: trio.Process, grace: float) -> None:
    """SIGTERM the whole tree, wait up to ``grace`` seconds, then SIGKILL whatever is left.

    Also called after a normal exit: background children an experiment left behind would otherwise
    outlive the runner and keep the output pipe open.
    """
    with trio.CancelScope(shield=True):
        members = _tree(process.pid)
        if process.returncode is None:
            _signal_all(process.pid, members, signal.SIGTERM)
            with trio.move_on_after(grace):
                await process.wait()
        members += [p for p in _tree(process.pid) if p not in members]
        _signal_all(process.pid, members, signal.SIGKILL)
        await process.wait()
        with contextlib.suppress(psutil.Error):
            psutil.wait_procs(members, timeout=0)
