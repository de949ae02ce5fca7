"""What an experiment asks for (:class:`GpuDemand`, from the request's resources) and the pool's yes/no
answers to it (:class:`Verdict`, :class:`Refusal`).

Demand (``gpus``, ``gpuMem``, ``gpuCount``; the spec's "Recommended, compatible superset")
-----------------------------------------------------------------------------------------------
* No card at all when ``gpus == 0`` and ``gpuMem`` is absent/0 -- whatever ``gpuCount`` says (as Go).
* Otherwise ``max(gpuCount, 1)`` cards: a missing/0 ``gpuCount`` means one card (Go took none, the trap).
* A card qualifies when it is present, not fenced, not allocated (draining counts as allocated), has at
  least one slot, ``slots >= gpus`` and ``memory total >= gpuMem``. The smallest sufficient cards are taken
  (slots ascending, then memory, then UUID); each card goes wholly to one experiment.
"""

from __future__ import annotations

from dataclasses import dataclass

from studio_runner.request import Resources
from studio_runner.units import format_size


@dataclass(frozen=True)
class GpuDemand:
    """What one experiment asks for: ``slots`` per card (``gpus``), minimum memory per card (``gpuMem``,
    None when absent) and the number of cards (``gpuCount``, as sent; see :attr:`cards`)."""

    slots: int = 0
    mem: int | None = None
    count: int = 0

    def __post_init__(self) -> None:
        if self.slots < 0 or self.count < 0 or (self.mem is not None and self.mem < 0):
            raise ValueError(f"negative GPU demand: {self}")

    @classmethod
    def from_resources(cls, resources: Resources) -> GpuDemand:
        """From the parsed request (``Resources.gpu_mem`` is 0 when ``gpuMem`` is absent)."""
        return cls(slots=resources.gpus, mem=resources.gpu_mem or None, count=resources.gpu_count)

    @property
    def cards(self) -> int:
        """Cards to allocate: 0 without ``gpus`` and ``gpuMem``; else ``gpuCount``, and at least one."""
        if self.slots == 0 and not self.mem:
            return 0
        return max(self.count, 1)

    @property
    def wanted(self) -> bool:
        """Whether any card is asked for (the ledger's question)."""
        return self.cards > 0

    def __str__(self) -> str:
        return self.describe()

    def describe(self) -> str:
        """``"2 GPU cards with at least 4 slots and 16 GiB each"``."""
        if self.cards == 0:
            return "no GPU"
        wants = [f"at least {self.slots} slot{'s' if self.slots != 1 else ''}"] if self.slots else []
        if self.mem:
            wants.append(format_size(self.mem))
        card = "1 GPU card" if self.cards == 1 else f"{self.cards} GPU cards"
        each = " each" if self.cards > 1 else ""
        return f"{card} with {' and '.join(wants)}{each}" if wants else card


@dataclass(frozen=True)
class Verdict:
    """A yes/no answer with the reason for a no; truthy when ``ok``."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class Refusal:
    """``allocate``'s answer when the demand does not fit now; falsy."""

    reason: str

    def __bool__(self) -> bool:
        return False
