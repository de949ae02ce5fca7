"""Admission: which served queues intake may receive from now, and whether a parsed request may start here.

Kept apart from the supervisor (which owns messages and their fate) because these are the runner's memories
about *queues*, each with its own expiry:

* never fits: a request from the queue needs more than this runner has (cores, RAM, disk, GPUs it will
  never have): the queue is skipped for ``never_fit_pause``, so other runners get its work and this one does
  not spin.
* last demand (spec/resources.md §2): the queue's last request did not fit *now*; the queue is skipped while
  that demand would still not fit, re-probed after ``refused_pause`` at most (the next message may be
  smaller).
* twins: the queue just delivered again an experiment an attempt here is still running (a redelivery after a
  lost claim, or a resubmission under the same key); the queue is skipped until that attempt has ended, so one
  experiment never runs twice at once on one runner.

Times are trio's clock (``trio.current_time()``), passed in by the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from studio_runner.resources import Demand, DoesNotFit, Ledger, NeverFits, Reservation

log = logging.getLogger("studio_runner.supervisor")

QueueKey = tuple[str, str]
"""(backend kind, queue name)."""


class Admission:
    """The ledger plus the per-queue memories above; ``ledger`` None admits everything (tests of other
    rules)."""

    def __init__(self, ledger: Ledger | None, *, refused_pause: float, never_fit_pause: float) -> None:
        self.ledger = ledger
        self.refused_pause = refused_pause
        self.never_fit_pause = never_fit_pause
        self._paused_until: dict[QueueKey, float] = {}
        self._last_demand: dict[QueueKey, tuple[Demand, float]] = {}
        self._twins: dict[QueueKey, str] = {}

    # -- queues ---------------------------------------------------------------------------------------------
    def queue_open(self, key: QueueKey, now: float, is_held: Callable[[str], bool]) -> bool:
        """Whether intake receives from this queue now: not paused, its last request would fit, and no
        attempt here (``is_held(attempt_id)``) still runs the experiment it delivered again."""
        if self._paused_until.get(key, 0.0) > now:
            return False
        twin = self._twins.get(key)
        if twin is not None:
            if is_held(twin):
                return False
            del self._twins[key]
        return self.fits_last_demand(key, now)

    def fits_last_demand(self, key: QueueKey, now: float) -> bool:
        """The spec's per-queue memory: False while the queue's last request would not fit (for a while)."""
        last = self._last_demand.get(key)
        if last is None or self.ledger is None:
            return True
        demand, seen = last
        if now - seen > self.refused_pause:
            return True
        return self.ledger.refusal(demand) is None

    def describe(self, key: QueueKey, now: float, is_held: Callable[[str], bool]) -> tuple[float | None, str]:
        """Seconds until a paused queue is looked at again (None when not paused) and why it is skipped."""
        paused = self._paused_until.get(key, 0.0) - now
        if paused > 0:
            return round(paused, 1), "a request here can never run on this runner"
        twin = self._twins.get(key)
        if twin is not None and is_held(twin):
            return None, "waiting for a running copy of its last experiment"
        if not self.fits_last_demand(key, now):
            return None, "its last request does not fit now"
        return None, ""

    def pauses(self, now: float) -> list[float]:
        """Seconds until each paused queue may be served again (intake wakes up then)."""
        return [until - now for until in self._paused_until.values() if until > now]

    def hold_for_twin(self, key: QueueKey, attempt_id: str) -> None:
        """Skip the queue until attempt ``attempt_id`` (running the experiment it delivered again) ends."""
        self._twins[key] = attempt_id

    # -- requests -------------------------------------------------------------------------------------------
    def reserve(self, key: QueueKey, attempt_id: str, experiment: str, demand: Demand,
                now: float) -> Reservation | None | str:
        """The attempt's reservation (None without a ledger), or why the request is released instead."""
        if self.ledger is None:
            return None
        queue = key[1]
        try:
            reservation = self.ledger.reserve(attempt_id, demand)
        except NeverFits as exc:
            self._paused_until[key] = now + self.never_fit_pause
            log.warning("experiment %s from %s can never run on this runner (%s): released; queue %s is "
                        "skipped by this runner for %.0fs", experiment, queue, exc, queue,
                        self.never_fit_pause)
            return f"can never fit: {exc}"
        except DoesNotFit as exc:
            self._last_demand[key] = (demand, now)
            log.info("experiment %s from %s does not fit now (%s): released; queue skipped until it would",
                     experiment, queue, exc)
            return f"does not fit: {exc}"
        self._last_demand[key] = (demand, now)
        return reservation
