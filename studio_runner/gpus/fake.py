"""The fake backend: cards described by a JSON file, for tests and for trying the runner without a GPU.

Fake backend file (``open_gpu_backend(..., fake_path, ...)``; re-read at every refresh, so tests can edit
it while the runner runs: replace it atomically)
----------------------------------------------------------------------------------------------------------
A JSON list of cards (or ``{"cards": [...]}``)::

    [{"uuid": "GPU-11111111-2222-3333-4444-555555555555",   required, unique
      "name": "Tesla V100-SXM2-16GB",                      default "Fake GPU"
      "memory": "16GiB",                                   total; size string or bytes; required
      "used": "1GiB",                                      default: sum of the processes' memory
      "utilisation": 35,                                   percent, optional ("utilization" accepted too)
      "ecc_errors": 0,                                     uncorrectable volatile ECC errors, default 0
      "slots": 16,                                         optional: overrides every slot rule
      "index": 0,                                          default: position in the list
      "processes": {"4242": "2GiB"}}]                      PID -> memory held; null = cannot list
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from studio_runner.gpus.devices import GpuDevice, _WarnOnce
from studio_runner.gpus.visible import VisibleSet
from studio_runner.units import parse_size

_FAKE_KEYS = {"uuid", "name", "memory", "memory_total", "used", "utilisation", "utilization", "ecc_errors",
              "slots", "index", "processes"}


class FakeBackend:
    """Cards described by a JSON file (format in the module docstring), re-read at every ``devices()``."""

    kind = "fake"

    def __init__(self, path: str | Path, visible: VisibleSet | None = None) -> None:
        self.path = Path(path)
        self._visible = visible or VisibleSet()
        self._warn = _WarnOnce()
        self._last = read_fake_gpus(self.path)  # a bad file at start-up is the operator's error: raise
        self._empty_reason = ""

    @property
    def reason(self) -> str:
        return self._empty_reason

    def devices(self) -> list[GpuDevice]:
        try:
            self._last = read_fake_gpus(self.path)
        except (OSError, ValueError) as exc:
            self._warn(f"fake GPU file: {exc}; keeping the previous cards")
        chosen = self._visible.select(self._last, self._warn)
        if not self._last:
            self._empty_reason = f"the fake GPU file {self.path} lists no cards"
        elif not chosen:
            self._empty_reason = (f"the visible set {self._visible.text!r} admits none of the "
                                  f"{len(self._last)} fake cards")
        else:
            self._empty_reason = ""
        return chosen

    def close(self) -> None:
        pass


def read_fake_gpus(path: Path) -> list[GpuDevice]:
    """Parse a fake GPU file; raises ValueError (naming the card and key) or OSError."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    if isinstance(doc, dict) and set(doc) == {"cards"}:
        doc = doc["cards"]
    if not isinstance(doc, list):
        raise ValueError(f"{path}: expected a list of cards (or {{\"cards\": [...]}})")
    devices = []
    for position, card in enumerate(doc):
        where = f"{path}: card {position}"
        if not isinstance(card, dict):
            raise ValueError(f"{where}: expected an object")
        unknown = set(card) - _FAKE_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        try:
            devices.append(_fake_device(position, card))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{where}: {exc}") from None
    uuids = [d.uuid for d in devices]
    if len(set(uuids)) != len(uuids):
        raise ValueError(f"{path}: duplicate UUIDs")
    return devices


def _fake_device(position: int, card: dict[str, Any]) -> GpuDevice:
    uuid = card.get("uuid")
    if not isinstance(uuid, str) or not uuid:
        raise ValueError("'uuid' must be a non-empty string")
    name = card.get("name", "Fake GPU")
    if not isinstance(name, str):
        raise ValueError("'name' must be a string")
    total_text = card.get("memory", card.get("memory_total"))
    if total_text is None:
        raise ValueError("'memory' (the card's total memory) is required")
    total = parse_size(total_text)
    raw_processes = card.get("processes", {})
    processes: dict[int, int] | None
    if raw_processes is None:
        processes = None
    elif isinstance(raw_processes, dict):
        processes = {int(pid): parse_size(held) for pid, held in raw_processes.items()}
    else:
        raise ValueError("'processes' must be an object {pid: memory} or null")
    used = parse_size(card["used"]) if "used" in card else sum((processes or {}).values())
    utilisation = card.get("utilisation", card.get("utilization"))
    return GpuDevice(
        index=_whole(card.get("index", position), "index"), uuid=uuid, name=name, memory_total=total,
        memory_used=used, memory_free=max(0, total - used),
        utilisation=None if utilisation is None else _whole(utilisation, "utilisation"),
        ecc_errors=_whole(card.get("ecc_errors", 0), "ecc_errors"),
        processes=processes, slots=None if card.get("slots") is None else _whole(card["slots"], "slots"),
    )


def _whole(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key!r} must be a whole number >= 0, got {value!r}")
    return value
