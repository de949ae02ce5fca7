"""GPU cards: discovery (NVML or a fake file), the runner's visible set, slots, and allocation with draining.

Spec: ../shared/spec/resources.md §1 (fields), §3 (slots and allocation), §4 (NVML). This package is
self-contained bookkeeping; the supervisor wires it in.

How the supervisor uses it
--------------------------
::

    backend = open_gpu_backend(cpu_only, fake_path, visible_from_environ(os.environ))
    pool = GpuPool(backend, slot_overrides={"A10G": 12}, drain_timeout=60.0)   # queries the cards once
    if pool.reason: log.info(pool.reason)                # "no GPUs: no NVML: ..." -- never an exception

    demand = GpuDemand.from_resources(request.experiment.resources)
    if not (verdict := pool.could_ever_fit(demand)): ...  # never on this runner: verdict.reason says why
    got = pool.allocate(attempt_id, demand)               # Allocation, or Refusal (does not fit *now*)
    env.update(got.environment())                         # always, also with no card: hides every GPU
    ... run the experiment; usage.TreeSampler collects the pids of its process tree ...
    pool.release(attempt_id, pids)                        # its cards drain (see below)
    result = await trio.to_thread.run_sync(pool.refresh)  # right after a release, and every few seconds
    if result.returned: wake the intake                   # cards are back in the pool
    pool.snapshot().to_dict()                             # live figures for metrics / TUI
    pool.close()                                          # at exit

``never_fits``/``refusal`` (reason or None) and ``bool(RefreshResult)`` (cards came back) are the same
answers in the shape resources.py's ledger asks for them.

Start-up: Go refused to start when NVML works but no card has a free slot, unless ``--cpu-only``; the
pool never raises for that -- ``pool.snapshot()`` (cards, ``free_slots``) and ``pool.reason`` give the
supervisor what it needs to decide.

``allocate``, ``release``, ``fits_now``, ``could_ever_fit`` and ``snapshot`` do no I/O. ``refresh`` queries
the backend (NVML calls take well under a millisecond per card) outside the pool's lock, so it may run in a
worker thread while the trio thread allocates; only the bookkeeping that follows holds the lock.

Where things are (one module per concern; everything public is re-exported here)
--------------------------------------------------------------------------------
* :mod:`~studio_runner.gpus.demand`: ``GpuDemand`` (what ``gpus``/``gpuMem``/``gpuCount`` ask for, which
  cards qualify), ``Verdict``, ``Refusal``.
* :mod:`~studio_runner.gpus.slots`: the slot table, the unknown-card rule, slot overrides.
* :mod:`~studio_runner.gpus.visible`: the runner's visible set (``CUDA_VISIBLE_DEVICES``).
* :mod:`~studio_runner.gpus.devices`: ``GpuDevice`` and the ``GpuBackend`` protocol.
* :mod:`~studio_runner.gpus.nvml`: ``NvmlBackend``, the real cards.
* :mod:`~studio_runner.gpus.fake`: ``FakeBackend`` and the fake GPU file's format (``read_fake_gpus``).
* :mod:`~studio_runner.gpus.backends`: ``NoGpuBackend`` and ``open_gpu_backend``.
* :mod:`~studio_runner.gpus.allocation`: ``Allocation`` and the child's environment (``hidden_environment``).
* :mod:`~studio_runner.gpus.pool`: ``GpuPool`` (allocation, release and draining, fencing), snapshots.
"""

from __future__ import annotations

from studio_runner.gpus.allocation import AllocatedCard, Allocation, hidden_environment
from studio_runner.gpus.backends import NoGpuBackend, open_gpu_backend
from studio_runner.gpus.demand import GpuDemand, Refusal, Verdict
from studio_runner.gpus.devices import GpuBackend, GpuDevice
from studio_runner.gpus.fake import FakeBackend, read_fake_gpus
from studio_runner.gpus.nvml import NvmlBackend
from studio_runner.gpus.pool import (
    DEFAULT_DRAIN_TIMEOUT,
    CardState,
    GpuPool,
    GpuSnapshot,
    RefreshResult,
)
from studio_runner.gpus.slots import (
    SLOT_TABLE,
    UNKNOWN_SLOT_BYTES,
    UNKNOWN_SLOT_CAP,
    slot_rule,
    slots_for,
    unknown_card_slots,
)
from studio_runner.gpus.visible import VisibleSet, parse_visible, visible_from_environ

__all__ = [
    "DEFAULT_DRAIN_TIMEOUT", "SLOT_TABLE", "UNKNOWN_SLOT_BYTES", "UNKNOWN_SLOT_CAP",
    "AllocatedCard", "Allocation", "CardState", "FakeBackend", "GpuBackend", "GpuDemand", "GpuDevice",
    "GpuPool", "GpuSnapshot", "NoGpuBackend", "NvmlBackend", "RefreshResult", "Refusal", "Verdict",
    "VisibleSet", "hidden_environment", "open_gpu_backend", "parse_visible", "read_fake_gpus",
    "slot_rule", "slots_for", "unknown_card_slots", "visible_from_environ",
]
