"""What a person watching the runner reads: the start-up banner, one line per phase of each attempt with
human sizes and durations, progress for slow phases, the output's tail on failure, and a terminal bar.

Why one module: the runner's log is its user interface on a workstation, in ``kubectl logs`` and in a
terminal, and its tone (how often, how much, in which units) is one decision. The rules:

* at most about six INFO lines per experiment (the supervisor's "starting" and settle lines, plus inputs,
  environment, running and finished from here); never a line per output line;
* a download or an environment build that takes longer than :data:`PROGRESS_FIRST` seconds gets a progress
  line then, and every :data:`PROGRESS_EVERY` seconds after; never more often;
* sizes as ``12.3 MiB``, durations as ``1m03s``, rates as ``30 MiB/s`` (:mod:`studio_runner.units`);
* on failure, the last :data:`TAIL_LINES` lines of the (already masked) output and where ``output.tar`` went.

The terminal bar (:class:`TerminalBar`) is for the interactive commands (``demo``, ``submit``): drawn only
when stderr is a terminal, kept under the log lines by :func:`studio_runner.logs.set_footer`; elsewhere
those commands print plain lines.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import socket
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import trio

from studio_runner import __version__, artifacts, logs
from studio_runner.attempt import Outcome, Status
from studio_runner.redact import mask_patterns
from studio_runner.storage import redact_url
from studio_runner.units import format_elapsed, format_rate, format_size

log = logging.getLogger("studio_runner.executor")

PROGRESS_FIRST = 5.0
"""A phase still under way after this many seconds gets its first progress line."""
PROGRESS_EVERY = 10.0
"""Seconds between progress lines after the first."""
PROGRESS_TICK = 1.0
"""How often the watcher looks at the clock (cheap: no I/O unless a line is due)."""
TAIL_LINES = 20
"""Output lines logged when an attempt does not succeed."""

_METADATA_LINE = re.compile(r'^\s*(\{"studioml"|\[\{"op")')
_INSTALLED = re.compile(r"^\s*(?:Installed|Successfully installed)\s+(\d+)\s+packages?\b|"
                        r"^\s*Successfully installed\s+(.+)$")
_NO_TAIL = (Status.SUCCESS, Status.DEFERRED, Status.INTERRUPTED, Status.EXPIRED)
"""Outcomes whose output tail says nothing worth a warning."""


# --------------------------------------------------------------------------- the banner


def banner_lines(settings: Any, status_address: str | None) -> list[str]:
    """The start-up banner, one fact per line, secrets masked: log each at INFO once the runner is wired.

    ``status_address`` is the ``host:port`` the status server really listens on (None or "" when off)."""
    s = settings
    host = socket.gethostname()
    named = s.hostname if s.hostname == host else f"{s.hostname} (host {host})"
    lines = [f"studio-runner {__version__} on {named}, pid {os.getpid()}, python {platform.python_version()}"]
    backends = []
    if s.amqp_url:
        backends.append(f"RabbitMQ {mask_patterns(s.amqp_url)}")
    if not s.amqp_url or s.explicitly_set("queue-root"):
        backends.append(f"local queue root {s.queue_root}")
    lines.append("queues: " + "; ".join(backends))
    match = f"queue match: {s.queue_match}"
    if s.queue_mismatch:
        match += f", never {s.queue_mismatch}"
    lines.append(match)
    lines.append(f"working dir: {s.working_dir}")
    env_used = _env_cache_bytes(Path(s.env_cache_dir))
    lines.append(f"environment cache: {s.env_cache_dir} ({format_size(env_used)} of "
                 f"{format_size(s.env_cache_size) if s.env_cache_size else 'unbounded'})")
    if s.cache_dir:
        used = _artifact_cache_bytes(Path(s.cache_dir))
        lines.append(f"artifact cache: {s.cache_dir} ({format_size(used)} of {format_size(s.cache_size)})")
    else:
        lines.append("artifact cache: off")
    lines.append("limits: " + ", ".join([
        f"max-running {s.max_running or 'unlimited'}",
        f"max-cores {s.max_cores or 'machine'}",
        f"max-mem {format_size(s.max_mem) if s.max_mem else 'machine'}",
        f"max-disk {format_size(s.max_disk) if s.max_disk else 'machine'}",
        f"disk-reserve {format_size(s.disk_reserve)}",
        f"cpu-only {'yes' if s.cpu_only else 'no'}",
    ]))
    lines.append(f"state file: {s.state_file or 'off'}")
    lines.append(f"status: http://{status_address} (/status /metrics /healthz)" if status_address
                 else "status: off")
    libraries = "libraries too" if getattr(s, "log_libraries", False) else "libraries at warning"
    lines.append(f"log: {str(s.log_level).lower()}, {getattr(s, 'log_format', 'text')} ({libraries})")
    return lines


def _env_cache_bytes(root: Path) -> int:
    """What the environment cache holds, from the size each entry recorded (no walk of the venvs)."""
    total = 0
    try:
        for entry in root.iterdir():
            try:
                total += int((entry / ".studio-runner-size").read_text())
            except (OSError, ValueError):
                continue
    except OSError:
        pass
    return total


def _artifact_cache_bytes(root: Path) -> int:
    return artifacts.bytes_in(root)  # entries sit directly under the root; .partial and .locks are dirs


# --------------------------------------------------------------------------- one attempt


def _sizes(by_label: dict[str, int]) -> int:
    return sum(by_label.values())


class AttemptConsole:
    """The runner log's view of one attempt. The executor calls a method per phase; :meth:`watch` runs
    beside the attempt and writes progress lines for slow phases."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.stats = artifacts.TransferStats()
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.phase = ""
        """``downloading``, ``building`` or "" (nothing to report progress on)."""
        self.phase_started = time.monotonic()
        self.env_step = ""
        self.packages: int | None = None
        self._last_report = 0.0
        self._last_bytes = 0
        self._asked: set[str] = set()

    # -- what the attempt feeds in
    def output_line(self, text: str) -> None:
        """A masked line of the output log (metadata JSON lines are left out of the tail)."""
        if text.strip() and not _METADATA_LINE.match(text):
            self.tail.append(text)

    def env_line(self, text: str) -> None:
        """A line of the environment build (uv's or pip's output, already masked)."""
        text = text.strip()
        if not text:
            return
        self.env_step = text
        found = _INSTALLED.match(text)
        if found:
            self.packages = int(found[1]) if found[1] else len(found[2].split())

    def begin(self, phase: str) -> None:
        self.phase = phase
        self.phase_started = time.monotonic()
        self._last_report = 0.0
        self._last_bytes = 0

    # -- phase lines
    def inputs_ready(self) -> None:
        """``<key>: inputs in 0.4s: workspace 12.3 MiB downloaded (30 MiB/s), data 1.2 GiB cached``."""
        seconds = time.monotonic() - self.phase_started
        self.phase = ""
        stats = self.stats
        if not stats.downloaded and not stats.cached:
            return
        parts = [f"{label} {format_size(n)} downloaded" for label, n in sorted(stats.downloaded.items())]
        parts += [f"{label} {format_size(n)} cached" for label, n in sorted(stats.cached.items())]
        rate = f" ({format_rate(_sizes(stats.downloaded), seconds)})" if stats.downloaded else ""
        log.info("%s: inputs ready in %s: %s%s", self.key, format_elapsed(seconds), ", ".join(parts), rate)

    def env_ready(self, cache_hit: bool) -> None:
        """``<key>: environment ready in 45s (built: 12 packages)`` or ``(cached)``."""
        seconds = time.monotonic() - self.phase_started
        self.phase = ""
        if cache_hit:
            how = "cached"
        elif self.packages is None:
            how = "built"
        else:
            how = f"built: {self.packages} package{'s' if self.packages != 1 else ''}"
        log.info("%s: environment ready in %s (%s)", self.key, format_elapsed(seconds), how)

    def running(self, pid: int, cores: int, ram: int, gpus: str) -> None:
        """``<key>: running (pid 123, 1 core, 1 GiB, GPUs 0)``."""
        memory = f", {format_size(ram)}" if ram else ""
        log.info("%s: running (pid %d, %d core%s%s, GPUs %s)", self.key, pid, cores,
                 "s" if cores != 1 else "", memory, gpus or "none")

    def uploads_started(self) -> None:
        self.stats.uploaded.clear()  # checkpoints uploaded while it ran are not the final upload
        self.phase_started = time.monotonic()

    def finished(self, outcome: Outcome, ran_seconds: float | None) -> None:
        """``<key>: success in 1m03s (ran 1m01s); uploaded 3 artifacts, 1.2 MiB in 0.3s``: the attempt's whole
        time (as the supervisor's settle line counts it) and the experiment's own. Anything but success is a
        WARNING that says why, where the output went, and (when it says something) the output's last lines."""
        upload_seconds = time.monotonic() - self.phase_started
        uploaded = self.stats.uploaded
        status = outcome.status.value
        text = f"{self.key}: {status} in {format_elapsed(outcome.seconds)}"
        if ran_seconds is not None:
            text += f" (ran {format_elapsed(ran_seconds)})"
        if outcome.reason and outcome.status is not Status.SUCCESS:
            text += f": {_first_line(outcome.reason.removeprefix(f'{status}: '))}"
        if uploaded:
            count = len(uploaded)
            text += (f"; uploaded {count} artifact{'s' if count != 1 else ''}, "
                     f"{format_size(_sizes(uploaded))} in {format_elapsed(upload_seconds)}")
        if outcome.status is Status.SUCCESS or outcome.status is Status.DEFERRED:
            log.info("%s", text)
            return
        if outcome.output_url:
            text += f"; output: {redact_url(outcome.output_url)}"
        log.warning("%s", text)
        if outcome.status in _NO_TAIL or not self.tail:
            return
        log.warning("%s: last %d line(s) of its output:", self.key, len(self.tail))
        for line in self.tail:
            log.warning("%s | %s", self.key, line)

    # -- progress
    async def watch(self) -> None:
        """Progress lines for a slow download or environment build; run it in a nursery, cancel it after."""
        while True:
            await trio.sleep(PROGRESS_TICK)
            if not self.phase:
                continue
            now = time.monotonic()
            elapsed = now - self.phase_started
            if elapsed < PROGRESS_FIRST or (self._last_report and now - self._last_report < PROGRESS_EVERY):
                continue
            if self.phase == "downloading":
                await self._download_progress(elapsed, now)
            elif self.phase == "building":
                step = f"; {self.env_step}" if self.env_step else ""
                log.info("%s: preparing the environment, %s so far%s", self.key, format_elapsed(elapsed),
                         step)
            self._last_report = now

    async def _download_progress(self, elapsed: float, now: float) -> None:
        flights = list(self.stats.in_flight.values())
        if not flights:
            return
        for flight in flights:
            if flight.total is None and flight.directory is not None and flight.label not in self._asked:
                self._asked.add(flight.label)  # once: a store that cannot tell the size is not asked again
                flight.total = await _size_of(flight)
        done_now = 0
        for flight in flights:
            if flight.directory is not None:
                done_now += await trio.to_thread.run_sync(artifacts.bytes_in, flight.directory)
        finished = _sizes(self.stats.downloaded) + _sizes(self.stats.cached)
        done = finished + done_now
        since = now - self._last_report if self._last_report else elapsed
        moved = done - self._last_bytes
        self._last_bytes = done
        totals = [f.total for f in flights]
        of = ""
        if all(t is not None and t >= 0 for t in totals):
            total = finished + sum(t for t in totals if t is not None)
            if total:
                of = f" of {format_size(total)} ({100 * done // total}%)"
        labels = ", ".join(sorted(f.label for f in flights))
        log.info("%s: downloading %s: %s%s at %s, %s so far", self.key, labels, format_size(done), of,
                 format_rate(moved, since), format_elapsed(elapsed))


async def _size_of(flight: artifacts.InFlight) -> int | None:
    """The object's size (one stat, only for a download slow enough to report on); None if unknown."""
    try:
        with trio.move_on_after(5):
            info = await flight.store.stat(flight.url, flight.credentials)
            return info.size if info is not None and info.size >= 0 else None
    except Exception:  # progress is a courtesy: never fail a download for it
        return None
    return None


def _first_line(text: str) -> str:
    line = text.strip().split("\n", 1)[0]
    return line if len(line) <= 200 else line[:197] + "..."


# --------------------------------------------------------------------------- the terminal bar


class TerminalBar:
    """``label [#####.....] 2/4 detail`` under the log lines, on a terminal only (see module docstring).

    ``plain`` tells the caller whether to print plain progress lines instead."""

    WIDTH = 24

    def __init__(self, label: str, total: int, *, sizes: bool = False) -> None:
        self.label, self.total, self.sizes = label, max(0, total), sizes
        self.plain = not _stderr_is_tty()
        self._drawn = 0.0

    def update(self, done: int, detail: str = "", *, force: bool = False) -> None:
        """Redraw with ``done`` of ``total`` (at most 10 times a second unless ``force``)."""
        if self.plain:
            return
        now = time.monotonic()
        if not force and now - self._drawn < 0.1:
            return
        self._drawn = now
        fraction = min(1.0, done / self.total) if self.total else 1.0
        filled = round(fraction * self.WIDTH)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        count = (f"{format_size(done)} / {format_size(self.total)}" if self.sizes
                 else f"{done}/{self.total}")
        logs.set_footer(f"{self.label} [{bar}] {count}" + (f" {detail}" if detail else ""))

    def close(self) -> None:
        """Remove the bar (the terminal line is left clean for what follows)."""
        if not self.plain:
            logs.set_footer("")


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False

