"""Live figures of an experiment's process tree (CPU and RSS), for the status page, metrics and the TUI,
and the set of process ids it ran, which GPU release needs (a card returns to the pool only once none of
them holds memory on it)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import psutil


@dataclass
class TreeSampler:
    """Samples the descendants of ``root`` (the experiment's reaper); call :meth:`sample` every few
    seconds. CPU is the tree's CPU time over the interval since the previous sample, in percent of one core
    (200 = two cores busy); processes that ended between samples are simply no longer counted."""

    root: int
    counts_root: bool = False
    """Whether ``root`` itself belongs to the tree (no reaper in between)."""
    pids: set[int] = field(default_factory=set)
    """Every process id seen in the tree so far (bounded by what the experiment starts)."""
    _cpu: dict[int, float] = field(default_factory=dict)
    _at: float = 0.0

    def sample(self) -> tuple[float, int]:
        """``(cpu_percent, rss_bytes)`` of the tree now."""
        now = time.monotonic()
        try:
            root = psutil.Process(self.root)
            members = root.children(recursive=True) + ([root] if self.counts_root else [])
        except psutil.Error:
            members = []
        cpu: dict[int, float] = {}
        rss = 0
        for member in members:
            try:
                with member.oneshot():
                    times = member.cpu_times()
                    cpu[member.pid] = times.user + times.system
                    rss += member.memory_info().rss
            except psutil.Error:
                continue
        self.pids.update(cpu)
        elapsed = now - self._at if self._at else 0.0
        used = sum(max(0.0, seconds - self._cpu.get(pid, 0.0)) for pid, seconds in cpu.items())
        self._cpu, self._at = cpu, now
        return (100.0 * used / elapsed if elapsed > 0 else 0.0), rss
