"""The runner's visible set: which of the machine's cards it may manage (``CUDA_VISIBLE_DEVICES``).

Visible set
-----------
The runner's own ``CUDA_VISIBLE_DEVICES`` (or ``NVIDIA_VISIBLE_DEVICES`` when the former is unset or empty;
see :func:`visible_from_environ`) bounds the cards managed: ``all`` (or unset) = every card; ``""``,
``none``, ``void`` = none; otherwise a comma list of UUIDs (``GPU-...``; a unique prefix is enough, as CUDA
allows) or indexes (accepted with a warning: they are matched against NVML's index, i.e. PCI bus order,
which CUDA's default order and a container's host numbering may not match). As in CUDA, a negative index
(``-1``) ends the list. Unlike CUDA, an entry that matches no card is skipped with a warning instead of
ending the list: the operator named the cards the runner may use, and one missing card should not hide the
others. ``MIG-`` entries are not supported (spec §4: MIG must be explicit); cards in MIG mode are skipped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from studio_runner.gpus.devices import GpuDevice

_NO_CARDS = frozenset({"", "none", "void"})
_INTEGER = re.compile(r"[+-]?[0-9]+")


def visible_from_environ(environ: Mapping[str, str]) -> str | None:
    """The runner's visible-set value: ``CUDA_VISIBLE_DEVICES`` when non-empty, else
    ``NVIDIA_VISIBLE_DEVICES`` when set, else ``CUDA_VISIBLE_DEVICES`` when set (so ``""`` = no card), else
    None (every card)."""
    cuda = environ.get("CUDA_VISIBLE_DEVICES")
    if cuda is not None and cuda.strip():
        return cuda
    nvidia = environ.get("NVIDIA_VISIBLE_DEVICES")
    if nvidia is not None:
        return nvidia
    return cuda


@dataclass(frozen=True)
class VisibleSet:
    """The cards this runner may manage: every card (``entries`` None) or the listed UUIDs/indexes."""

    entries: tuple[str, ...] | None = None
    text: str | None = None

    @classmethod
    def parse(cls, text: str | None) -> VisibleSet:
        """``None``/``all`` = every card; ``""``/``none``/``void``/``-1`` = none; else a comma list."""
        if text is None or text.strip().lower() == "all":
            return cls(None, text)
        if text.strip().lower() in _NO_CARDS:
            return cls((), text)
        return cls(tuple(entry.strip() for entry in text.split(",")), text)

    @property
    def admits_all(self) -> bool:
        return self.entries is None

    def select(self, devices: Sequence[GpuDevice], warn: Callable[[str], None]) -> list[GpuDevice]:
        """The devices admitted, in the order the backend gave them; odd entries are reported via ``warn``."""
        if self.entries is None:
            return list(devices)
        chosen: dict[str, GpuDevice] = {}
        for entry in self.entries:
            if _is_integer(entry):
                if int(entry) < 0:  # CUDA's idiom: an invalid index ends the list ("-1" hides everything)
                    break
                warn(f"the visible set {self.text!r} uses indexes: they are taken as NVML's (PCI bus order), "
                     "which CUDA's default order or a container's host numbering may not match; use UUIDs")
                found = [d for d in devices if d.index == int(entry)]
            elif entry.upper().startswith("GPU-"):
                found = [d for d in devices if d.uuid.lower().startswith(entry.lower())]
                if len(found) > 1:
                    warn(f"the visible set's entry {entry!r} matches {len(found)} cards; it is ignored")
                    continue
            elif entry.upper().startswith("MIG-"):
                warn(f"the visible set's entry {entry!r} is a MIG instance: not supported, ignored")
                continue
            else:
                warn(f"the visible set's entry {entry!r} is neither a GPU UUID nor an index; ignored")
                continue
            if not found:
                warn(f"the visible set's entry {entry!r} matches no card; ignored")
            for device in found:
                chosen.setdefault(device.uuid, device)
        return [d for d in devices if d.uuid in chosen]


def parse_visible(text: str | None) -> VisibleSet:
    """Same as :meth:`VisibleSet.parse`."""
    return VisibleSet.parse(text)


def _is_integer(text: str) -> bool:
    return _INTEGER.fullmatch(text) is not None
