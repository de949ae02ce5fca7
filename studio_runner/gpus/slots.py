"""How many slots a card has: the spec's table, the rule for unknown models, and the operator's overrides.

A slot is the unit a request's ``gpus`` counts in; this module turns a card's NVML name and memory into its
slots, and checks the ``slot_overrides`` map the pool is given.

Slots
-----
The spec's table (substring of the NVML name, case-insensitive; the longest matching key wins, so
"RTX 2080 Ti" beats a shorter key). A ``slot_overrides`` map {name substring: slots} wins over the table
(same matching rule); 0 there disables a model. A card of unknown model gets **one slot per 2 GiB of
memory, at least 1, capped at 32** (``UNKNOWN_SLOT_BYTES``, ``UNKNOWN_SLOT_CAP``): Go gave such cards 0
slots, making A100-80GB, H100, L4... unusable. The cap keeps requests written for the table's largest card
(A100-40GB: 24) satisfiable by newer, bigger cards without letting one 140 GiB card look like 70 small ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from studio_runner.units import format_size

SLOT_TABLE: tuple[tuple[str, int], ...] = (
    ("GTX 1050", 2), ("GTX 1060", 2), ("GTX 1070", 2), ("GTX 1080", 2), ("TITAN X", 2), ("RTX 2080 Ti", 2),
    ("Tesla K80", 2), ("NVIDIA K80", 2),
    ("Tesla P40", 4), ("NVIDIA P40", 4),
    ("Tesla P100", 8), ("NVIDIA P100", 8),
    ("Tesla V100", 16), ("NVIDIA V100", 16),
    ("A100-SXM4-40GB", 24),
)
"""Slots by NVML name substring (spec resources.md §3, the Go code's ``GetSlots``)."""

UNKNOWN_SLOT_BYTES = 2 * 1024**3
"""An unknown card gets one slot per this much memory..."""
UNKNOWN_SLOT_CAP = 32
"""...at least 1 and at most this many (see the module docstring)."""


def _lookup(name: str, table: Iterable[tuple[str, int]]) -> int | None:
    lowered = name.lower()
    matches = [(len(key), slots) for key, slots in table if key and key.lower() in lowered]
    return max(matches)[1] if matches else None


def unknown_card_slots(memory_total: int) -> int:
    """The default for a model missing from the table: one slot per 2 GiB, at least 1, at most 32."""
    return max(1, min(UNKNOWN_SLOT_CAP, memory_total // UNKNOWN_SLOT_BYTES))


def slot_rule(name: str, memory_total: int, overrides: Mapping[str, int] | None = None) -> tuple[int, str]:
    """Slots for a card and where the figure comes from (for the start-up log)."""
    if overrides:
        found = _lookup(name, overrides.items())
        if found is not None:
            return found, "configured"
    found = _lookup(name, SLOT_TABLE)
    if found is not None:
        return found, "table"
    slots = unknown_card_slots(memory_total)
    return slots, f"unknown model: 1 per {format_size(UNKNOWN_SLOT_BYTES)}, capped at {UNKNOWN_SLOT_CAP}"


def slots_for(name: str, memory_total: int, overrides: Mapping[str, int] | None = None) -> int:
    """Slots of a card: ``overrides`` (name substring -> slots) > the spec's table > the memory default."""
    return slot_rule(name, memory_total, overrides)[0]


def _check_overrides(overrides: Mapping[str, int] | None) -> dict[str, int]:
    checked: dict[str, int] = {}
    for key, value in (overrides or {}).items():
        if not isinstance(key, str) or not key.strip():
            raise ValueError(f"GPU slot map: a card name must be a non-empty string, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"GPU slot map: slots for {key!r} must be a whole number >= 0, got {value!r}")
        checked[key.strip()] = value
    return checked
