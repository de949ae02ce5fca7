"""The resource ledger: what this machine may give experiments, and what running experiments hold.

Admission asks the ledger three questions (spec/resources.md §2): could this demand *ever* fit this runner
(if not, the message is released and its queue skipped for a while), does it fit *now* (if not, released
without counting an attempt), and, once taken, reserve it before any download starts. A reservation is
bookkeeping only, as in the Go runner: nothing is enforced on the process except the GPUs it can see
(``CUDA_VISIBLE_DEVICES``) and the thread counts it is told (``OMP_NUM_THREADS`` and friends).

Capacity is measured once at start-up (cores usable by this process, RAM available, bounded by a cgroup's
limits in containers) and reduced by ``--max-cores`` / ``--max-mem``. Disk is measured live, because other
programs fill it too: free space under the working directory minus ``--disk-reserve`` minus what running
experiments reserved, and, with ``--max-disk``, at most that much reserved in total (the cap its name
promises; the Go runner used it as a minimum free space instead, which ``--disk-reserve`` is here).

Every experiment reserves at least one core, even when its request names none: otherwise a queue of
requests without ``cpus`` would start without bound.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from studio_runner.errors import ConfigError
from studio_runner.gpus import GpuDemand, GpuPool, Refusal
from studio_runner.request import Resources
from studio_runner.units import format_size


@dataclass(frozen=True)
class Demand:
    """One request's needs, in the ledger's units (cores, bytes) plus its GPU demand."""

    cores: int
    ram: int
    disk: int
    gpu: GpuDemand | None = None

    """None when it asks for no card (``Demand.of`` never keeps a demand for nothing)."""

    @classmethod
    def of(cls, resources: Resources) -> Demand:
        """A request's ``resources_needed`` in the ledger's terms."""
        gpu = GpuDemand.from_resources(resources)
        return cls(cores=max(1, resources.cpus), ram=resources.ram, disk=resources.hdd,
                   gpu=gpu if gpu.wanted else None)

    def describe(self) -> str:
        parts = [f"{self.cores} core{'s' if self.cores != 1 else ''}", f"{format_size(self.ram)} RAM",
                 f"{format_size(self.disk)} disk"]
        if self.gpu is not None:
            parts.append(str(self.gpu))
        return ", ".join(parts)


@dataclass(frozen=True)
class Capacity:
    """What the runner may hand out in total."""

    cores: int
    ram: int
    disk_cap: int | None = None
    """``--max-disk``: the most disk reserved at once; None: only free space (minus the reserve) bounds it."""
    disk_reserve: int = 0
    """``--disk-reserve``: free space never handed out."""


@dataclass
class Reservation:
    """What one attempt holds, from admission until it has finished uploading."""

    owner: str
    demand: Demand
    gpu_env: dict[str, str] = field(default_factory=dict)
    """``CUDA_VISIBLE_DEVICES`` / ``NVIDIA_VISIBLE_DEVICES`` for the experiment (empty: no GPU)."""

    @property
    def cores(self) -> int:
        return self.demand.cores


class DoesNotFit(Exception):
    """The demand does not fit now; the message goes back without counting an attempt."""


class NeverFits(DoesNotFit):
    """The demand exceeds this runner's whole capacity: it can never run here."""


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, bounded by a cgroup v2 CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_value("cpu.max")
    if quota and quota[0] != "max":
        try:
            cores = min(cores, max(1, math.ceil(int(quota[0]) / int(quota[1]))))
        except (ValueError, IndexError, ZeroDivisionError):
            pass
    return cores


def available_ram() -> int:
    """RAM available now, bounded by a cgroup v2 memory limit minus what the cgroup already uses."""
    available = int(psutil.virtual_memory().available)
    limit, current = _cgroup_value("memory.max"), _cgroup_value("memory.current")
    if limit and limit[0] != "max" and current:
        try:
            available = min(available, max(0, int(limit[0]) - int(current[0])))
        except ValueError:
            pass
    return available


def _cgroup_value(name: str) -> list[str] | None:
    try:
        with open(f"/sys/fs/cgroup/{name}") as handle:
            return handle.read().split()
    except OSError:
        return None


def host_capacity(max_cores: int = 0, max_mem: int = 0, max_disk: int = 0, disk_reserve: int = 0,
                  cores: int | None = None, ram: int | None = None) -> Capacity:
    """The machine's capacity reduced by the caps (0 = no cap). A cap above what the machine has is a
    start-up error (spec/options.md), so a typo cannot promise experiments hardware that is not there."""
    cores = usable_cores() if cores is None else cores
    ram = available_ram() if ram is None else ram
    problems = []
    if max_cores > cores:
        problems.append(f"--max-cores {max_cores} is more than the {cores} core(s) this runner may use")
    if max_mem > ram:
        problems.append(f"--max-mem {format_size(max_mem)} is more than the {format_size(ram)} of RAM "
                        "available")
    if problems:
        raise ConfigError("; ".join(problems))
    return Capacity(cores=max_cores or cores, ram=max_mem or ram, disk_cap=max_disk or None,
                    disk_reserve=disk_reserve)


DiskProbe = Callable[[Path], Any]
"""``shutil.disk_usage``, or a stand-in in tests (anything with ``.free`` and ``.total``)."""


class Ledger:
    """Cores, RAM, disk and GPUs: the totals, what is held, and the three admission questions."""

    def __init__(self, capacity: Capacity, working_dir: Path, gpus: GpuPool | None = None,
                 disk_usage: DiskProbe = shutil.disk_usage) -> None:
        self.capacity = capacity
        self.working_dir = working_dir
        self.gpus = gpus
        self._disk_usage = disk_usage
        self.held: dict[str, Reservation] = {}

    # -- figures --------------------------------------------------------------------------------------------
    @property
    def cores_free(self) -> int:
        return self.capacity.cores - sum(r.demand.cores for r in self.held.values())

    @property
    def ram_free(self) -> int:
        return self.capacity.ram - sum(r.demand.ram for r in self.held.values())

    @property
    def disk_reserved(self) -> int:
        return sum(r.demand.disk for r in self.held.values())

    def disk_free(self) -> int:
        """Disk a new experiment may reserve now (may be negative when others filled the disk)."""
        free = self._disk_usage(self.working_dir).free - self.capacity.disk_reserve - self.disk_reserved
        if self.capacity.disk_cap is not None:
            free = min(free, self.capacity.disk_cap - self.disk_reserved)
        return free

    @property
    def has_room(self) -> bool:
        """Whether any experiment at all could start now (a free core): intake asks before receiving."""
        return self.cores_free >= 1

    def refresh(self) -> bool:
        """Re-read the GPUs (fence cards with ECC errors, return drained ones); True when cards came back.
        Blocking (NVML): run it in a worker thread."""
        return bool(self.gpus.refresh()) if self.gpus is not None else False

    # -- the three questions -----------------------------------------------------------------------------
    def never_fits(self, demand: Demand) -> str | None:
        """Why ``demand`` exceeds this runner's whole capacity (it can never run here), or None."""
        cap = self.capacity
        if demand.cores > cap.cores:
            return f"asks for {demand.cores} cores; this runner has {cap.cores}"
        if demand.ram > cap.ram:
            return f"asks for {format_size(demand.ram)} of RAM; this runner has {format_size(cap.ram)}"
        if cap.disk_cap is not None and demand.disk > cap.disk_cap:
            return (f"asks for {format_size(demand.disk)} of disk; this runner hands out at most "
                    f"{format_size(cap.disk_cap)} (--max-disk)")
        try:
            total = self._disk_usage(self.working_dir).total
        except OSError:
            total = None
        if total is not None and demand.disk > total - cap.disk_reserve:
            return (f"asks for {format_size(demand.disk)} of disk; {self.working_dir} holds "
                    f"{format_size(total)} in all, {format_size(cap.disk_reserve)} of it kept in reserve")
        return self._gpu_reason(demand, now=False)

    def refusal(self, demand: Demand) -> str | None:
        """Why ``demand`` does not fit now, or None when it does."""
        if demand.cores > self.cores_free:
            return f"asks for {demand.cores} core(s); {self.cores_free} free"
        if demand.ram > self.ram_free:
            return f"asks for {format_size(demand.ram)} of RAM; {format_size(max(0, self.ram_free))} free"
        try:
            disk_free = self.disk_free()
        except OSError as exc:
            return f"cannot check free space in {self.working_dir}: {exc}"
        if demand.disk > disk_free:
            return (f"asks for {format_size(demand.disk)} of disk; {format_size(max(0, disk_free))} free in "
                    f"{self.working_dir} after running experiments' reservations and the "
                    f"{format_size(self.capacity.disk_reserve)} reserve")
        return self._gpu_reason(demand, now=True)

    def _gpu_reason(self, demand: Demand, now: bool) -> str | None:
        if demand.gpu is None:
            return None
        if self.gpus is None:
            return f"asks for {demand.gpu}; this runner uses no GPUs"
        return self.gpus.refusal(demand.gpu) if now else self.gpus.never_fits(demand.gpu)

    def reserve(self, owner: str, demand: Demand) -> Reservation:
        """Hold ``demand`` for ``owner`` (an attempt id); raises NeverFits or DoesNotFit with the reason."""
        if owner in self.held:
            raise ValueError(f"{owner} already holds a reservation")
        never = self.never_fits(demand)
        if never is not None:
            raise NeverFits(never)
        why = self.refusal(demand)
        if why is not None:
            raise DoesNotFit(why)
        reservation = Reservation(owner, demand)
        if demand.gpu is not None and self.gpus is not None:
            allocation = self.gpus.allocate(owner, demand.gpu)
            if isinstance(allocation, Refusal):  # refusal() said it fits; only a race could get here
                raise DoesNotFit(allocation.reason)
            reservation.gpu_env = allocation.environment()
        self.held[owner] = reservation
        return reservation

    def release(self, owner: str, pids: Iterable[int] = ()) -> Reservation | None:
        """Give back what ``owner`` held (idempotent). GPU cards return to the pool once none of ``pids``
        (the finished experiment's processes) holds memory on them."""
        reservation = self.held.pop(owner, None)
        if reservation is not None and reservation.demand.gpu is not None and self.gpus is not None:
            self.gpus.release(owner, pids)
        return reservation

    def describe(self) -> str:
        """One line for the start-up banner."""
        cap = self.capacity
        disk = (f"disk up to {format_size(cap.disk_cap)}" if cap.disk_cap is not None
                else "disk as free space allows")
        return (f"{cap.cores} core(s), {format_size(cap.ram)} RAM, {disk} under {self.working_dir} "
                f"(keeping {format_size(cap.disk_reserve)} free)")


def thread_settings(cores: int) -> dict[str, str]:
    """``OMP_NUM_THREADS`` and friends for an experiment holding ``cores`` cores.

    Numerical libraries start one thread per *host* core unless told otherwise, so several experiments on
    one machine would oversubscribe it; each is told exactly what it reserved. (The Go runner set cores − 1,
    and nothing for one core, which let a one-core experiment spread over the whole machine.)"""
    threads = str(max(1, cores))
    settings = {name: threads for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                           "GOTO_NUM_THREADS", "NUMEXPR_NUM_THREADS")}
    if cores > 1:
        settings["OPENMP"] = "True"
    return settings
