"""The backend contract: what one card looks like at a refresh (:class:`GpuDevice`) and what every source of
cards provides (:class:`GpuBackend`), plus the warn-once helper the backends share.

Kept apart from the backends so the visible set and the pool can use the card type without importing NVML
or the fake file's parser.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger("studio_runner.gpus")  # one logger for the package, as when it was one module


@dataclass(frozen=True)
class GpuDevice:
    """One card as a backend reports it at one refresh."""

    index: int
    uuid: str
    name: str
    memory_total: int
    memory_used: int
    memory_free: int
    utilisation: int | None = None
    """GPU utilisation in percent over NVML's last sample period; None when unknown."""
    ecc_errors: int = 0
    """Uncorrectable volatile ECC errors; 0 where ECC counts are not supported."""
    processes: Mapping[int, int] | None = None
    """PID -> bytes held (0 when the driver will not say) of compute processes; None = cannot be listed."""
    slots: int | None = None
    """A backend's own slot figure (the fake's ``slots``); None = use the slot rules."""


class GpuBackend(Protocol):
    """Where cards come from. ``devices()`` must not raise: it reports problems in the log."""

    kind: str
    """``nvml``, ``fake`` or ``none``."""

    @property
    def reason(self) -> str:
        """Why there are no cards ('' when there may be some): ``no NVML: <why>``, ``cpu-only mode``..."""
        ...

    def devices(self) -> list[GpuDevice]:
        """The visible cards now (a fresh query every call)."""
        ...

    def close(self) -> None: ...


class _WarnOnce:
    """The backends are queried every few seconds: a problem is worth one log line, not one per refresh."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, message: str) -> None:
        if message not in self._seen:
            self._seen.add(message)
            log.warning("%s", message)
