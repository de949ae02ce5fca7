"""The intake state file: an operator (or Kubernetes) says Running, DrainAndSuspend or DrainAndTerminate.

Why a file: the spec's runner watches a ConfigMap through the Kubernetes API (RBAC, a client library, a watch
connection). Mounting the ConfigMap as a volume gives the same control with none of that: Kubernetes rewrites
the mounted ``STATE`` file (through a symlink swap) within its sync period, and a workstation user can
``echo DrainAndSuspend > state``. The file is read again every ``interval`` seconds (one stat and one small
read: cheap), so a change takes effect within one refresh, without a restart.

The file holds a bare value (``DrainAndSuspend``) or ``STATE=value`` / ``STATE: value`` lines (an env file
or a YAML snippet); blank lines and ``#`` comments are ignored. Unknown values and a missing file change
nothing (the spec's recommendation), with one warning per distinct problem.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import trio

from studio_runner.supervisor import INTAKE_STATES

log = logging.getLogger("studio_runner.statefile")

_STATE_LINE = re.compile(r"^\s*STATE\s*[=:]\s*[\"']?([A-Za-z]+)[\"']?\s*$")
_MAX_BYTES = 4096
"""A state file is one word; anything bigger is not one (and is not read whole)."""


class StateFileError(ValueError):
    """The state file does not hold a state the runner knows."""


def parse_state(text: str) -> str:
    """The state named by a state file's text; raises StateFileError saying what is wrong."""
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise StateFileError("the file is empty")
    for line in lines:
        match = _STATE_LINE.match(line)
        if match:
            return _known(match.group(1))
    if len(lines) == 1:
        return _known(lines[0].strip("\"'"))
    raise StateFileError("no STATE=value line and more than one line")


def _known(value: str) -> str:
    for state in INTAKE_STATES:
        if value.lower() == state.lower():
            return state
    shown = value if len(value) <= 40 else value[:40] + "..."
    raise StateFileError(f"unknown state {shown!r} (expected {', '.join(INTAKE_STATES)})")


def read_state(path: Path) -> str:
    """The state in ``path``; OSError when it cannot be read, StateFileError when it names no state."""
    with open(path, "rb") as handle:
        raw = handle.read(_MAX_BYTES + 1)
    if len(raw) > _MAX_BYTES:
        raise StateFileError(f"larger than {_MAX_BYTES} bytes")
    return parse_state(raw.decode("utf-8", errors="replace"))


async def watch_state_file(path: Path, apply: Callable[[str, str], None], interval: float = 1.0) -> None:
    """Read ``path`` now and every ``interval`` seconds; call ``apply(state, reason)`` when the state it
    names differs from the last one applied. Runs until cancelled."""
    last_applied: str | None = None
    last_problem: str | None = None
    while True:
        try:
            state = await trio.to_thread.run_sync(read_state, path)
        except (OSError, StateFileError) as exc:
            problem = f"{type(exc).__name__}: {exc}" if isinstance(exc, OSError) else str(exc)
            if problem != last_problem:
                log.warning("state file %s: %s; the intake state is left as it is", path, problem)
                last_problem = problem
        else:
            last_problem = None
            if state != last_applied:
                apply(state, f"state file {path}")
                last_applied = state
        await trio.sleep(interval)
