"""The real backend: cards as the NVIDIA driver reports them through NVML (spec resources.md §4).

``pynvml`` is imported when a backend is created, not with this module, so a machine without it (or a test
that hides it) still imports the package; every NVML failure becomes a ``reason`` or a warning, never an
exception.
"""

from __future__ import annotations

import contextlib
from typing import Any

from studio_runner.gpus.devices import GpuDevice, _WarnOnce
from studio_runner.gpus.visible import VisibleSet


class NvmlBackend:
    """Cards as NVML (``pynvml``, package nvidia-ml-py) sees them. Never raises: a machine without a working
    driver gets zero cards and a ``reason``."""

    kind = "nvml"

    def __init__(self, visible: VisibleSet | None = None) -> None:
        self._visible = visible or VisibleSet()
        self._warn = _WarnOnce()
        self._nvml: Any = None
        self._reason = ""
        self._empty_reason = ""
        self._process_functions: list[str] = [
            "nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetComputeRunningProcesses_v2",
            "nvmlDeviceGetComputeRunningProcesses",
        ]
        try:
            import pynvml
        except ImportError as exc:
            self._reason = f"no NVML: the pynvml module (nvidia-ml-py) cannot be imported ({exc})"
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError_LibraryNotFound:
            self._reason = "no NVML: libnvidia-ml.so.1 not found (no NVIDIA driver installed here)"
        except pynvml.NVMLError_DriverNotLoaded:
            self._reason = "no NVML: the NVIDIA kernel driver is not loaded"
        except Exception as exc:  # NVMLError_NoPermission, _Unknown, a broken library: all mean "no GPUs"
            self._reason = f"no NVML: initialisation failed ({type(exc).__name__}: {exc})"
        else:
            self._nvml = pynvml

    @property
    def reason(self) -> str:
        return self._reason or self._empty_reason

    def devices(self) -> list[GpuDevice]:
        nvml = self._nvml
        if nvml is None:
            return []
        try:
            count = nvml.nvmlDeviceGetCount()
        except Exception as exc:
            self._warn(f"NVML cannot count the GPUs ({exc}); none are usable until it can")
            return []
        found = []
        for index in range(count):
            try:
                device = self._device(nvml, index)
            except Exception as exc:  # a bug or an odd driver must cost one card, not the runner
                self._warn(f"GPU {index} skipped: {type(exc).__name__}: {exc}")
                continue
            if device is not None:
                found.append(device)
        chosen = self._visible.select(found, self._warn)
        if not found:
            self._empty_reason = "NVML lists no usable GPU"
        elif not chosen:
            self._empty_reason = (f"the visible set {self._visible.text!r} admits none of the "
                                  f"{len(found)} cards")
        else:
            self._empty_reason = ""
        return chosen

    def close(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._nvml = None

    def _device(self, nvml: Any, index: int) -> GpuDevice | None:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        try:
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
        except nvml.NVMLError as exc:
            self._warn(f"GPU {index} skipped: its UUID cannot be read ({exc})")
            return None
        try:
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        except nvml.NVMLError as exc:
            self._warn(f"GPU {index} ({uuid}) skipped: its memory cannot be read ({exc})")
            return None
        try:
            name = _text(nvml.nvmlDeviceGetName(handle))
        except nvml.NVMLError:
            name = "unknown NVIDIA GPU"
        try:
            current, _pending = nvml.nvmlDeviceGetMigMode(handle)
        except nvml.NVMLError:  # NotSupported on cards without MIG
            current = 0
        if current == nvml.NVML_DEVICE_MIG_ENABLE:
            self._warn(f"GPU {index} {name} ({uuid}) skipped: MIG mode is on, and MIG is not supported")
            return None
        try:
            utilisation: int | None = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except nvml.NVMLError:
            utilisation = None
        try:
            ecc = int(nvml.nvmlDeviceGetTotalEccErrors(
                handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC))
        except nvml.NVMLError_NotSupported:
            ecc = 0
        except nvml.NVMLError as exc:
            self._warn(f"GPU {index} ({uuid}): ECC error counts cannot be read ({exc}); taken as 0")
            ecc = 0
        return GpuDevice(
            index=index, uuid=uuid, name=name, memory_total=int(memory.total), memory_used=int(memory.used),
            memory_free=int(memory.free), utilisation=utilisation, ecc_errors=ecc,
            processes=self._processes(nvml, handle, index),
        )

    def _processes(self, nvml: Any, handle: Any, index: int) -> dict[int, int] | None:
        while self._process_functions:
            function = getattr(nvml, self._process_functions[0], None)
            if function is None:  # an older pynvml
                self._process_functions.pop(0)
                continue
            try:
                infos = function(handle)
            except nvml.NVMLError_FunctionNotFound:  # an older driver: try the previous API version
                self._process_functions.pop(0)
                continue
            except nvml.NVMLError_NotSupported:
                return None
            except nvml.NVMLError as exc:
                self._warn(f"GPU {index}: its processes cannot be listed ({exc})")
                return None
            return {int(info.pid): int(info.usedGpuMemory or 0) for info in infos}
        self._warn("NVML has no function to list compute processes: released cards cannot be drained")
        return None


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
