"""Change notification for the local queue root, so an idle runner neither polls nor scans 200 directories.

The local queue has no broker to wait on, and polling every queue every 0.2 s costs a fifth of a core with
200 queues. Instead one recursive watch on the root (inotify through watchfiles' Rust ``notify`` binding)
records which queue directories changed; the supervisor's ``wait_for_work`` returns when one it waits for
did, and ``receive`` skips the directory scan of a queue that was found idle and has not changed since.

Why it is safe:

* Events are gathered by the binding's own thread all the time and kept until the next pull, so a change
  that happens while nobody waits (during the supervisor's round) is reported by the next wait at once.
* A scan's "idle" finding is trusted only after a later pull showed no change of that queue, and only while
  the watcher is alive; a pull that was interrupted (its events are dropped by the binding) distrusts every
  finding, so the next round scans everything again.
* Each timed-out wait probes the queues believed idle (one worker-thread hop, one ``scandir`` each). A
  message file older than a second that no event announced means the file system does not report changes
  (a network file system written by another host): the watch is given up for polling, with a warning.
* Polling (``poll_interval``, 0.2 s) is also what happens when watching is switched off or the watcher
  cannot start (inotify limits, no inotify).

Pickup latency is one or two ``_STEP_MS`` steps of the binding's loop (its debounce ends when a step adds no
new change), well inside the 0.2 s target; while nobody waits the binding's loop does not run at all.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

log = logging.getLogger(__name__)

_STEP_MS = 40
"""How often the binding's loop looks at the events gathered: pickup latency versus wake-ups (25 a second,
about 1.5 ms of CPU a second in all, and only while someone waits)."""
_DEBOUNCE_MS = 80
"""Longest a burst of changes (a client writing lock.lock, the file, its content) is grouped before waking."""
_MARGIN = 0.1
"""A pull's own timeout ends this long before the caller's deadline (the rest is slept): a pull stopped from
outside drops its gathered events (then every queue is scanned again), so it must not be stopped merely
because the caller's time, or that of a wait on another backend, is up. Events of that last moment are
kept by the binding for the next pull."""
MISSED_AFTER = 1.0
"""A message file this many seconds old in a queue believed idle was never announced: events are missed."""

Probe = Callable[[list[str]], dict[str, float]]
"""Worker-thread function: for each given queue that holds message files, the age (s) of the newest one."""


class RootWatch:
    """Which queues of one root changed since they were last looked at, or polling when that is unknown."""

    def __init__(self, root: Path, enabled: bool = True, poll_interval: float = 0.2) -> None:
        self.root = os.path.abspath(root)
        self.poll_interval = poll_interval
        self.polling = not enabled
        """True once watching is off or impossible: waits are plain sleeps, and no queue is skipped."""
        self._notify: Any = None
        self._pulls = 0
        """Completed pulls of the binding's events (each numbered by the count after it)."""
        self._reset_at = 0
        """Findings made before this pull are not trusted (events may have been dropped)."""
        self._last_change: dict[str, int] = {}
        self._idle_since: dict[str, int] = {}
        """Queues a scan found idle, with the pull count when that scan began."""
        self._unseen: set[str] = set()
        """Queues changed since a wait covering them last returned."""
        self._all_unseen = False
        self._pumping = False
        self._pumped = trio.Event()
        self._stop: threading.Event | None = None

    # -- what receive() asks ------------------------------------------------------------------------------

    def scan_started(self) -> int:
        """Token to pass to :meth:`scan_finished` (the pull count when the directory listing begins)."""
        return self._pulls

    def scan_finished(self, queue: str, started: int, idle: bool) -> None:
        """Record what a scan of ``queue`` found: idle (no message file, nothing of another runner's in
        flight) or not."""
        if idle and not self.polling:
            self._idle_since[queue] = started
        else:
            self._idle_since.pop(queue, None)

    def changed(self, queue: str) -> None:
        """This runner put a message into ``queue`` (handed back, released, published): the next receive
        scans it, without waiting for the file event to arrive (``--once`` would not wait for it)."""
        self._idle_since.pop(queue, None)

    def known_idle(self, queue: str) -> bool:
        """Whether ``queue`` was found idle and a pull since then showed that it did not change."""
        started = self._idle_since.get(queue)
        if started is None or self.polling or self._notify is None:
            return False
        return max(self._last_change.get(queue, 0), self._reset_at) <= started < self._pulls

    # -- wait_for_work ------------------------------------------------------------------------------------

    async def wait(self, queues: Sequence[str], timeout: float, probe: Probe) -> None:
        """Return when one of ``queues`` changed since a wait covering it last returned, or after
        ``timeout``; polling: after ``poll_interval`` at most."""
        wanted = set(queues)
        deadline = trio.current_time() + timeout
        while not self._take_unseen(wanted):
            remaining = deadline - trio.current_time()
            if remaining <= _MARGIN:
                await trio.sleep(max(0.0, remaining))
                return
            if self.polling:
                await trio.sleep(min(remaining, self.poll_interval))
                return
            if self._pumping:  # another task pulls: its findings land in _unseen
                with trio.move_on_after(remaining):
                    await self._pumped.wait()
                continue
            self._pumping = True
            try:
                await self._pump(remaining - _MARGIN, probe)
            finally:
                self._pumping = False
                self._pumped.set()
                self._pumped = trio.Event()

    def _take_unseen(self, wanted: set[str]) -> bool:
        if self._all_unseen or self._unseen & wanted:
            self._all_unseen = False
            self._unseen -= wanted
            return True
        return False

    async def _pump(self, seconds: float, probe: Probe) -> None:
        if self._notify is None:
            await trio.to_thread.run_sync(self._open)
            return  # fresh watcher: anything may have changed before it started (_all_unseen is set)
        stop = threading.Event()
        self._stop = stop
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_set_when_cancelled, stop)
            try:
                # not abandoned on cancel: the binding drops its gathered events when stopped, and that must
                # be recorded (below) before the caller polls again
                result = await trio.to_thread.run_sync(self._notify.watch, _DEBOUNCE_MS, _STEP_MS,
                                                       max(1, int(seconds * 1000)), stop)
            except Exception as exc:
                self._give_up(f"the watcher failed ({type(exc).__name__}: {exc})")
                result = None
            finally:
                self._stop = None
                nursery.cancel_scope.cancel()
            self._pulls += 1
            if isinstance(result, set):
                for _change, path in result:
                    queue = self._queue_of(path)
                    if queue is not None:
                        self._last_change[queue] = self._pulls
                        self._unseen.add(queue)
            elif result != "timeout":  # "stop" (cancelled), "signal", failure: gathered events were dropped
                self._reset_at = self._pulls
        if result == "timeout":
            await self._check_for_misses(probe)

    def _open(self) -> None:
        """Start the binding's watcher thread on the root (worker thread: it walks the tree)."""
        try:
            from watchfiles._rust_notify import RustNotify

            self._notify = RustNotify([self.root], False, False, 0, True, True)
        except Exception as exc:
            self._give_up(f"cannot watch it ({type(exc).__name__}: {exc}; on Linux see the sysctls "
                          "fs.inotify.max_user_watches and fs.inotify.max_user_instances)")
            return
        self._pulls += 1
        self._reset_at = self._pulls
        self._all_unseen = True
        log.debug("watching %s for new messages", self.root)

    async def _check_for_misses(self, probe: Probe) -> None:
        """The safety net: queues believed idle are listed; a file there that no event announced means the
        file system does not report changes, and watching is given up."""
        idle = [q for q in self._idle_since if self.known_idle(q)]
        if not idle:
            return
        found = await trio.to_thread.run_sync(probe, idle)
        for queue, age in found.items():
            self._idle_since.pop(queue, None)
            self._unseen.add(queue)
            if age > MISSED_AFTER and not self.polling:
                self._give_up(f"a message in {queue} ({age:.0f} s old) was never announced, so this file "
                              "system does not report changes (a network file system?)")

    def _give_up(self, why: str) -> None:
        log.warning("queue root %s: %s; polling every %.2g s instead", self.root, why, self.poll_interval)
        self.polling = True
        self._all_unseen = True
        self._idle_since.clear()
        self.close()

    def _queue_of(self, path: str) -> str | None:
        """The queue directory a changed path lies in; None for the root itself and hidden bookkeeping."""
        if not path.startswith(self.root + os.sep):
            return None
        name = path[len(self.root) + 1:].split(os.sep, 1)[0]
        return None if not name or name.startswith(".") else name

    def close(self) -> None:
        """Stop the binding's thread (a pull in progress ends within a step)."""
        if self._stop is not None:
            self._stop.set()
        notify, self._notify = self._notify, None
        if notify is not None:
            try:
                notify.close()
            except RuntimeError:  # the binding is busy in a pull: dropping our reference ends it later
                pass


async def _set_when_cancelled(stop: threading.Event) -> None:
    try:
        await trio.sleep_forever()
    finally:
        stop.set()
