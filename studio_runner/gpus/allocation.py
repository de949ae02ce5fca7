"""What an experiment is given: its cards (:class:`Allocation`) and the environment that shows the child those
cards and no other (:func:`hidden_environment` when it gets none).

Child environment
-----------------
``Allocation.environment()`` = ``CUDA_VISIBLE_DEVICES`` and ``NVIDIA_VISIBLE_DEVICES`` set to the
comma-joined UUIDs, plus ``CUDA_DEVICE_ORDER=PCI_BUS_ID``. Without a card both variables are the **empty
string**, not Go's ``-1``: the CUDA programming guide documents ``""`` as "no GPU devices are visible",
whereas ``-1`` only works through the rule that an invalid entry ends the list; NVIDIA's container runtime
treats an empty ``NVIDIA_VISIBLE_DEVICES`` like ``void`` (no GPU), while ``-1`` is no device name to it; and
it is the project's choice already (README, launch.py). The known weakness: code that reads the variable with
``os.environ.get(...) or <all>`` mistakes ``""`` for unset; ``bench/gpu_check.py`` checks both values
against the real driver. UUIDs rather than indexes because they do not depend on enumeration order.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AllocatedCard:
    uuid: str
    index: int
    name: str
    slots: int
    memory_total: int


def hidden_environment() -> dict[str, str]:
    """The environment that hides every GPU from a child (empty values; see the module docstring)."""
    return {"CUDA_VISIBLE_DEVICES": "", "NVIDIA_VISIBLE_DEVICES": "", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


@dataclass(frozen=True)
class Allocation:
    """Cards given to one owner (possibly none: a CPU-only experiment), in NVML index order."""

    owner: str
    cards: tuple[AllocatedCard, ...] = ()

    def __bool__(self) -> bool:
        return True

    @property
    def uuids(self) -> tuple[str, ...]:
        return tuple(card.uuid for card in self.cards)

    @property
    def visible_devices(self) -> str:
        """The value for ``CUDA_VISIBLE_DEVICES``: UUIDs, or ``""``."""
        return ",".join(self.uuids)

    def environment(self) -> dict[str, str]:
        """Variables for the child: the allocated cards and nothing else are visible (none without cards)."""
        env = hidden_environment()
        env["CUDA_VISIBLE_DEVICES"] = env["NVIDIA_VISIBLE_DEVICES"] = self.visible_devices
        return env

    def describe(self) -> str:
        if not self.cards:
            return "no GPU"
        return ", ".join(f"GPU {c.index} {c.name} ({c.uuid}, {c.slots} slots)" for c in self.cards)
