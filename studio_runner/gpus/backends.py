"""Choosing the backend from the runner's options: none (``--cpu-only``), the fake file, or NVML.

The only module that imports every backend; the pool knows them only through the
:class:`~studio_runner.gpus.devices.GpuBackend` protocol.
"""

from __future__ import annotations

from studio_runner.gpus.devices import GpuBackend, GpuDevice
from studio_runner.gpus.fake import FakeBackend
from studio_runner.gpus.nvml import NvmlBackend
from studio_runner.gpus.visible import VisibleSet


class NoGpuBackend:
    """No cards, ever (``--cpu-only``, or a backend that could not start)."""

    kind = "none"

    def __init__(self, reason: str) -> None:
        self._reason = reason

    @property
    def reason(self) -> str:
        return self._reason

    def devices(self) -> list[GpuDevice]:
        return []

    def close(self) -> None:
        pass


def open_gpu_backend(cpu_only: bool, fake_path: str | None, visible: str | None) -> GpuBackend:
    """The backend for the runner's options: ``cpu_only`` -> no cards (NVML untouched); ``fake_path`` -> the
    fake file; else NVML. ``visible`` is the runner's visible-set value (:func:`visible_from_environ`).

    Only a bad fake file raises (ValueError/OSError); a missing or broken NVML gives zero cards and a reason.
    """
    if cpu_only:
        return NoGpuBackend("cpu-only mode")
    if fake_path:
        return FakeBackend(fake_path, VisibleSet.parse(visible))
    return NvmlBackend(VisibleSet.parse(visible))
