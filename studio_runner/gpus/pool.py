"""The pool: which card belongs to which experiment, refreshed from the backend; snapshots for metrics and
the TUI; the process-tree sampling that release needs.

Which cards qualify for a demand and which are taken: :mod:`studio_runner.gpus.demand`.

Release, draining and the safety valve
--------------------------------------
A finished experiment's cards are *draining* until a refresh shows that no process that might be the
experiment's still holds memory on them: a PID the supervisor passed to ``release`` (its process tree), or
any process that appeared on the card after it was allocated (processes already on it at allocation are
someone else's). The second rule needs no PID from the supervisor and survives PID namespaces: in a
container NVML may report host PIDs that match nothing the runner knows. A draining card returns after
``drain_timeout`` seconds (default 60) anyway, with a warning, so a process stuck in the driver (or a stray
foreign process on the card) cannot leak a card forever; 60 s is far longer than the driver normally needs
to tear down a dead process's context (a fraction of a second) yet short next to an experiment. A backend
that cannot list processes (NotSupported) cannot drain: its cards return at the next refresh.

Fencing: a card that reports uncorrectable (volatile) ECC errors, at start-up or on any refresh, is fenced
for the rest of the runner's life: never allocated again, a warning logged once. An experiment running on
it keeps it until it ends (stopping it is not this module's call).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from studio_runner.gpus.allocation import AllocatedCard, Allocation
from studio_runner.gpus.demand import GpuDemand, Refusal, Verdict
from studio_runner.gpus.devices import GpuBackend, GpuDevice
from studio_runner.gpus.slots import _check_overrides, slot_rule
from studio_runner.units import format_size

log = logging.getLogger("studio_runner.gpus")  # one logger for the package, as when it was one module

DEFAULT_DRAIN_TIMEOUT = 60.0
"""Seconds a released card may stay draining before it is returned anyway, with a warning."""


@dataclass(frozen=True)
class CardState:
    """One card in a snapshot; plain values, JSON-ready via ``asdict``."""

    uuid: str
    name: str
    index: int
    memory_used: int
    memory_total: int
    utilisation: int | None
    slots: int
    fenced: bool
    owner: str | None
    state: str
    """``free``, ``allocated``, ``draining``, ``fenced`` (not held), ``disabled`` (0 slots) or ``missing``
    (no longer reported by the backend)."""
    ecc_errors: int
    pids: list[int]


@dataclass(frozen=True)
class GpuSnapshot:
    """Live figures: every card known (visible ones), and the runner's GPU totals."""

    backend: str
    reason: str
    cards: list[CardState]

    @property
    def free_slots(self) -> int:
        """Sum of slots of unallocated, usable cards (the Go metric ``runner_resource_gpu_free_slots``)."""
        return sum(card.slots for card in self.cards if card.state == "free")

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "reason": self.reason, "free_slots": self.free_slots,
                "cards": [asdict(card) for card in self.cards]}


@dataclass(frozen=True)
class RefreshResult:
    """What a refresh changed: cards back in the pool (``timed_out`` is a subset), cards newly fenced."""

    returned: tuple[str, ...] = ()
    timed_out: tuple[str, ...] = ()
    fenced: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        """True when cards came back: worth waking the intake."""
        return bool(self.returned)


@dataclass
class _Card:
    device: GpuDevice
    slots: int
    present: bool = True
    fenced: bool = False
    owner: str | None = None
    baseline: frozenset[int] = frozenset()
    """PIDs on the card when it was allocated: someone else's, never waited for."""
    draining_since: float | None = None
    drain_pids: frozenset[int] = frozenset()

    def holders(self) -> set[int] | None:
        """PIDs that keep a draining card out of the pool; None when the backend cannot list processes."""
        processes = self.device.processes
        if processes is None:
            return None
        return {pid for pid in processes if pid in self.drain_pids or pid not in self.baseline}

    def state(self) -> str:
        if not self.present:
            return "missing"
        if self.owner is not None:
            return "draining" if self.draining_since is not None else "allocated"
        if self.fenced:
            return "fenced"
        return "free" if self.slots > 0 else "disabled"


# -- the pool --------------------------------------------------------------------------------------------

class GpuPool:
    """Which card belongs to which experiment. Thread-safe; only :meth:`refresh` does I/O."""

    def __init__(self, backend: GpuBackend, *, slot_overrides: Mapping[str, int] | None = None,
                 drain_timeout: float = DEFAULT_DRAIN_TIMEOUT, clock: Callable[[], float] = time.monotonic):
        self.backend = backend
        self.drain_timeout = drain_timeout
        self._overrides = _check_overrides(slot_overrides)
        self._clock = clock
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()  # one backend query at a time
        self._cards: dict[str, _Card] = {}
        self._owners: dict[str, tuple[str, ...]] = {}
        self.refresh()
        if self.reason:
            log.info("%s", self.reason)

    # -- queries ------------------------------------------------------------------------------------------

    @property
    def reason(self) -> str:
        """``"no GPUs: <why>"`` while no card is present, else ``""``."""
        with self._lock:
            if any(card.present for card in self._cards.values()):
                return ""
        return f"no GPUs: {self.backend.reason or 'none found'}"

    def could_ever_fit(self, demand: GpuDemand) -> Verdict:
        """Whether the demand fits this runner's present, non-fenced cards, all allocations ignored."""
        with self._lock:
            return self._ever(demand)

    def fits_now(self, demand: GpuDemand) -> Verdict:
        """Whether :meth:`allocate` would succeed now (same rules, nothing taken)."""
        with self._lock:
            return self._now(demand)[0]

    def never_fits(self, demand: GpuDemand) -> str | None:
        """:meth:`could_ever_fit` as the ledger asks it (resources.py): the reason, or None when it can."""
        verdict = self.could_ever_fit(demand)
        return None if verdict else verdict.reason

    def refusal(self, demand: GpuDemand) -> str | None:
        """:meth:`fits_now` as the ledger asks it: why it does not fit now, or None when it does."""
        verdict = self.fits_now(demand)
        return None if verdict else verdict.reason

    def snapshot(self) -> GpuSnapshot:
        with self._lock:
            cards = sorted(self._cards.values(), key=lambda c: (c.device.index, c.device.uuid))
            states = [
                CardState(
                    uuid=c.device.uuid, name=c.device.name, index=c.device.index,
                    memory_used=c.device.memory_used, memory_total=c.device.memory_total,
                    utilisation=c.device.utilisation, slots=c.slots, fenced=c.fenced, owner=c.owner,
                    state=c.state(), ecc_errors=c.device.ecc_errors,
                    pids=sorted(c.device.processes or ()),
                )
                for c in cards
            ]
        return GpuSnapshot(backend=self.backend.kind, reason=self.reason, cards=states)

    # -- bookkeeping --------------------------------------------------------------------------------------

    def allocate(self, owner: str, demand: GpuDemand) -> Allocation | Refusal:
        """Take the smallest sufficient cards for ``owner``; a demand for no card gets an empty Allocation.
        Raises ValueError if ``owner`` already holds cards (owners are attempt ids, never reused)."""
        with self._lock:
            if owner in self._owners:
                raise ValueError(f"{owner!r} already holds GPUs {list(self._owners[owner])}")
            verdict, chosen = self._now(demand)
            if not verdict:
                return Refusal(verdict.reason)
            if not chosen:
                return Allocation(owner)
            for card in chosen:
                card.owner = owner
                card.baseline = frozenset(card.device.processes or ())
                card.draining_since = None
                card.drain_pids = frozenset()
            chosen.sort(key=lambda c: (c.device.index, c.device.uuid))
            self._owners[owner] = tuple(c.device.uuid for c in chosen)
            allocation = Allocation(owner, tuple(
                AllocatedCard(c.device.uuid, c.device.index, c.device.name, c.slots, c.device.memory_total)
                for c in chosen))
        log.info("GPUs for %s: %s", owner, allocation.describe())
        return allocation

    def release(self, owner: str, pids: Iterable[int] = ()) -> None:
        """``owner`` ended: its cards drain until no process of ``pids`` (its process tree: everything the
        supervisor saw of it) nor any process that appeared on them since the allocation holds memory there
        (checked by :meth:`refresh`; run one soon after), or ``drain_timeout`` passes. Unknown owners are
        ignored, so releasing twice is harmless."""
        now = self._clock()
        with self._lock:
            for uuid in self._owners.pop(owner, ()):
                card = self._cards[uuid]
                card.draining_since = now
                card.drain_pids = frozenset(pids)

    def refresh(self) -> RefreshResult:
        """Query the backend, fence cards with new ECC errors, return drained cards. Call it every few seconds
        (``trio.to_thread.run_sync``), and soon after a release."""
        with self._refresh_lock:
            try:
                devices = self.backend.devices()
            except Exception:  # a backend bug must not stop the supervisor's loop
                log.exception("GPU refresh failed; keeping the previous figures")
                return RefreshResult()
            now = self._clock()
            with self._lock:
                return self._apply(devices, now)

    def close(self) -> None:
        self.backend.close()

    # -- internals (called with the lock held) ------------------------------------------------------------

    def _apply(self, devices: list[GpuDevice], now: float) -> RefreshResult:
        returned: list[str] = []
        timed_out: list[str] = []
        fenced: list[str] = []
        seen = set()
        for device in devices:
            seen.add(device.uuid)
            card = self._cards.get(device.uuid)
            if card is None:
                if device.slots is not None:
                    slots, source = device.slots, "given by the backend"
                else:
                    slots, source = slot_rule(device.name, device.memory_total, self._overrides)
                card = self._cards[device.uuid] = _Card(device, slots)
                log.info("GPU %d %s (%s): %s, %d slots (%s)", device.index, device.name, device.uuid,
                         format_size(device.memory_total), slots, source)
                if slots == 0:
                    log.warning("GPU %s (%s) has 0 slots: it will never be allocated",
                                device.uuid, device.name)
            elif not card.present:
                log.info("GPU %s (%s) is back", device.uuid, device.name)
            card.device = device
            card.present = True
            if device.ecc_errors > 0 and not card.fenced:
                card.fenced = True
                fenced.append(device.uuid)
                held = f"; {card.owner} keeps it until it ends" if card.owner else ""
                log.warning("GPU %s (%s) reports %d uncorrectable ECC error(s): fenced, never allocated "
                            "again%s", device.uuid, device.name, device.ecc_errors, held)
        for uuid, card in self._cards.items():
            if uuid not in seen and card.present:
                card.present = False
                log.warning("GPU %s (%s) is no longer reported; not allocated until it is back",
                            uuid, card.device.name)
        for uuid, card in self._cards.items():
            if card.draining_since is None:
                continue
            holders = card.holders() if card.present else None
            if holders or not card.present:  # a missing card cannot be checked: it waits for the timeout
                if now - card.draining_since < self.drain_timeout:
                    continue
                what = f"processes {sorted(holders)} still hold memory" if holders else "it is missing"
                log.warning("GPU %s released by %s after %.0fs of draining although %s; returned anyway",
                            uuid, card.owner, now - card.draining_since, what)
                timed_out.append(uuid)
            card.owner = None
            card.draining_since = None
            card.drain_pids = card.baseline = frozenset()
            returned.append(uuid)
        return RefreshResult(tuple(returned), tuple(timed_out), tuple(fenced))

    def _qualifying(self, demand: GpuDemand, *, free_only: bool) -> list[_Card]:
        cards = [
            card for card in self._cards.values()
            if card.present and not card.fenced and card.slots > 0 and card.slots >= demand.slots
            and (demand.mem is None or card.device.memory_total >= demand.mem)
            and not (free_only and card.owner is not None)
        ]
        cards.sort(key=lambda c: (c.slots, c.device.memory_total, c.device.uuid))
        return cards

    def _ever(self, demand: GpuDemand) -> Verdict:
        wanted = demand.cards
        if wanted == 0:
            return Verdict(True)
        present = [c for c in self._cards.values() if c.present]
        if not present:
            return Verdict(False, f"needs {demand.describe()} but this runner has no GPUs "
                                  f"({self.backend.reason or 'none found'})")
        suitable = self._qualifying(demand, free_only=False)
        if len(suitable) >= wanted:
            return Verdict(True)
        fenced = sum(c.fenced for c in present)
        inventory = "; ".join(
            f"{c.device.name} {c.slots} slots {format_size(c.device.memory_total)}"
            + (" (fenced: ECC errors)" if c.fenced else "")
            for c in sorted(present, key=lambda c: (c.device.index, c.device.uuid)))
        return Verdict(False, f"needs {demand.describe()}; this runner has {len(suitable)} such card"
                              f"{'' if len(suitable) == 1 else 's'} of {len(present)} "
                              f"({fenced} fenced): {inventory}")

    def _now(self, demand: GpuDemand) -> tuple[Verdict, list[_Card]]:
        wanted = demand.cards
        if wanted == 0:
            return Verdict(True), []
        ever = self._ever(demand)
        if not ever:
            return ever, []
        free = self._qualifying(demand, free_only=True)
        if len(free) >= wanted:
            return Verdict(True), free[:wanted]
        suitable = self._qualifying(demand, free_only=False)
        draining = sum(c.draining_since is not None for c in suitable)
        return Verdict(False, f"needs {demand.describe()}; {len(free)} of the {len(suitable)} suitable "
                              f"cards are free now ({draining} draining)"), []
