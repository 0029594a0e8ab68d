"""A fake ``pynvml`` (nvidia-ml-py) for machines without an NVIDIA GPU.

The fake reuses the *real* library's error classes, constants and ctypes structures (the real
``pynvml`` imports fine without a driver; only ``nvmlInit`` needs one), so code under test
catches the very classes it will meet on a GPU: ``NVMLError(code)`` builds the same
``NVMLError_<Name>`` subclass, structs are ``c_nvmlMemory_t``/``c_nvmlUtilization_t``, process
entries are the friendly objects pynvml builds from ``c_nvmlProcessInfo_v2_t``.

What the fake simulates, like the real library and driver:

* ``nvmlInit``/``nvmlShutdown`` are reference counted; any device call without a live init
  raises ``NVMLError_Uninitialized``; a shutdown too many does too.
* a C symbol the "driver" lacks (``FakeNvml.missing_symbols``) raises
  ``NVMLError_FunctionNotFound``; the unversioned process listings raise
  ``NVMLLibraryMismatchError`` instead, as pynvml's ``throwOnVersionMismatch`` wrapper does.
* a Python function an older nvidia-ml-py lacks (``FakeNvml.python_missing``) is simply not an
  attribute of the module.
* per-GPU, per-function faults (``FakeGpu.faults["nvmlDeviceGetPowerUsage"] = code``) raise
  ``NVMLError(code)`` on every call; ``FakeGpu.lost`` makes every call on the GPU raise
  ``NVMLError_GpuIsLost``; ``FakeNvml.init_error`` fails ``nvmlInit``.
* power limits: ``nvmlDeviceSetPowerManagementLimit`` checks privilege and the constraints and
  records each change in ``FakeNvml.limit_log``; the enforced limit follows it.

Use::

    fake = FakeNvml([FakeGpu(uuid="GPU-1", name="NVIDIA H100")])
    monkeypatch.setitem(sys.modules, "pynvml", fake.module())
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pynvml as _real

NVMLError = _real.NVMLError
NVMLLibraryMismatchError = _real.NVMLLibraryMismatchError

MIB = 1 << 20
_NOT_AVAILABLE = _real.NVML_VALUE_NOT_AVAILABLE_ulonglong.value
_CLOCK_TYPES = (
    _real.NVML_CLOCK_GRAPHICS,
    _real.NVML_CLOCK_SM,
    _real.NVML_CLOCK_MEM,
    _real.NVML_CLOCK_VIDEO,
)


def _reexported(name: str, value: object) -> bool:
    """Whether a name of the real pynvml is data the fake shares (errors, constants, structs)."""
    if name.startswith("NVMLError") or name == "NVMLLibraryMismatchError":
        return True  # the exception classes, including every generated NVMLError_* subclass
    if name.startswith("NVML_"):
        return True  # constants (ints and the NVML_VALUE_NOT_AVAILABLE_* ctypes values)
    if name.startswith("nvml") and isinstance(value, int):
        return True  # nvmlClocksEventReason*, nvmlTemperature_v1, nvmlMemory_v2, ...
    if name.startswith("c_nvml") and isinstance(value, type):
        return True  # ctypes structures
    return name in ("nvmlFriendlyObject", "nvmlStructToFriendlyObject", "nvmlExceptionClass")


@dataclass
class FakeGpu:
    """The state of one simulated GPU; tests change the fields between reads."""

    uuid: str = "GPU-00000000-1111-2222-3333-444444444444"
    name: str = "NVIDIA H100 80GB HBM3"
    utilization_percent: int = 0
    memory_controller_percent: int = 0
    encoder_percent: int = 0
    decoder_percent: int = 0
    memory_total_bytes: int = 81559 * MIB
    memory_reserved_bytes: int = 530 * MIB
    memory_used_bytes: int = 0  # v2 meaning: without the driver-reserved memory
    power_mw: int = 70_000
    power_limit_mw: int = 700_000
    power_limit_default_mw: int = 700_000
    power_limit_min_mw: int = 200_000
    power_limit_max_mw: int = 700_000
    energy_mj: int = 0
    temperature_c: int = 30
    clocks_mhz: dict[int, int] = field(
        default_factory=lambda: {
            _real.NVML_CLOCK_GRAPHICS: 1980,
            _real.NVML_CLOCK_SM: 1980,
            _real.NVML_CLOCK_MEM: 2619,
            _real.NVML_CLOCK_VIDEO: 1755,
        }
    )
    clock_event_reasons: int = 0
    supported_clock_event_reasons: int = 0x1FF
    # (pid, used bytes or None where the driver cannot attribute memory)
    compute_processes: list[tuple[int, int | None]] = field(default_factory=list)
    graphics_processes: list[tuple[int, int | None]] = field(default_factory=list)
    faults: dict[str, int] = field(default_factory=dict)  # function name -> NVML_ERROR_*
    lost: bool = False


@dataclass(frozen=True)
class FakeHandle:
    """An opaque device handle (the real one is a ``c_nvmlDevice_t`` pointer)."""

    index: int


class FakeNvml:
    """The library plus driver state behind one fake ``pynvml`` module."""

    def __init__(self, gpus: list[FakeGpu] | None = None) -> None:
        self.gpus: list[FakeGpu] = list(gpus) if gpus is not None else [FakeGpu()]
        self.init_error: int | None = None
        self.count_error: int | None = None
        self.missing_symbols: set[str] = set()
        self.python_missing: set[str] = set()
        self.privileged = True
        self.driver_version = "580.65.06"
        self.refcount = 0
        self.init_calls = 0
        self.shutdown_calls = 0
        self.calls: collections.Counter[str] = collections.Counter()
        self.limit_log: list[tuple[str, int]] = []  # (uuid, limit mW) per accepted change

    # -- plumbing ---------------------------------------------------------------------------

    def module(self) -> ModuleType:
        """A module object to install as ``sys.modules["pynvml"]``."""
        mod = ModuleType("pynvml", "fake nvidia-ml-py (tests/fakes/pynvml.py)")
        for name, value in vars(_real).items():
            if _reexported(name, value):
                setattr(mod, name, value)
        for name in dir(self):
            if name.startswith("nvml") and name not in self.python_missing:
                setattr(mod, name, getattr(self, name))
        mod.fake = self  # type: ignore[attr-defined]
        return mod

    @staticmethod
    def error(code: int) -> Exception:
        """The real pynvml exception for an NVML_ERROR_* code (a NVMLError_* subclass)."""
        exc: Exception = _real.NVMLError(code)
        return exc

    def _symbol(self, symbol: str) -> None:
        """Account for a call of C symbol ``symbol``; raise as the library would."""
        self.calls[symbol] += 1
        if self.refcount <= 0:
            raise self.error(_real.NVML_ERROR_UNINITIALIZED)
        if symbol in self.missing_symbols:
            raise self.error(_real.NVML_ERROR_FUNCTION_NOT_FOUND)

    def _gpu(self, handle: Any, function: str, symbol: str | None = None) -> FakeGpu:
        self._symbol(symbol or function)
        if not isinstance(handle, FakeHandle) or not 0 <= handle.index < len(self.gpus):
            raise self.error(_real.NVML_ERROR_INVALID_ARGUMENT)
        gpu = self.gpus[handle.index]
        if gpu.lost:
            raise self.error(_real.NVML_ERROR_GPU_IS_LOST)
        if function in gpu.faults:
            raise self.error(gpu.faults[function])
        return gpu

    # -- init and system --------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self.init_calls += 1
        self.calls["nvmlInit"] += 1
        if self.init_error is not None:
            raise self.error(self.init_error)
        self.refcount += 1

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1
        self._symbol("nvmlShutdown")
        self.refcount -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._symbol("nvmlSystemGetDriverVersion")
        return self.driver_version

    def nvmlErrorString(self, code: int) -> str:
        return str(_real.NVMLError._errcode_to_string.get(code, f"NVML error {code}"))

    def nvmlDeviceGetCount(self) -> int:
        self._symbol("nvmlDeviceGetCount_v2")
        if self.count_error is not None:
            raise self.error(self.count_error)
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._symbol("nvmlDeviceGetHandleByIndex_v2")
        if not 0 <= index < len(self.gpus):
            raise self.error(_real.NVML_ERROR_INVALID_ARGUMENT)
        gpu = self.gpus[index]
        if gpu.lost:
            raise self.error(_real.NVML_ERROR_GPU_IS_LOST)
        if "nvmlDeviceGetHandleByIndex" in gpu.faults:
            raise self.error(gpu.faults["nvmlDeviceGetHandleByIndex"])
        return FakeHandle(index)

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> FakeHandle:
        self._symbol("nvmlDeviceGetHandleByUUID")
        for index, gpu in enumerate(self.gpus):
            if gpu.uuid == uuid:
                if gpu.lost:
                    raise self.error(_real.NVML_ERROR_GPU_IS_LOST)
                return FakeHandle(index)
        raise self.error(_real.NVML_ERROR_NOT_FOUND)

    # -- identity ---------------------------------------------------------------------------

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:
        return self._gpu(handle, "nvmlDeviceGetUUID").uuid

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str:
        return self._gpu(handle, "nvmlDeviceGetName").name

    # -- utilization and memory -------------------------------------------------------------

    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> Any:
        gpu = self._gpu(handle, "nvmlDeviceGetUtilizationRates")
        return _real.c_nvmlUtilization_t(gpu.utilization_percent, gpu.memory_controller_percent)

    def nvmlDeviceGetEncoderUtilization(self, handle: FakeHandle) -> list[int]:
        gpu = self._gpu(handle, "nvmlDeviceGetEncoderUtilization")
        return [gpu.encoder_percent, 167_000]  # [percent, sampling period in µs]

    def nvmlDeviceGetDecoderUtilization(self, handle: FakeHandle) -> list[int]:
        gpu = self._gpu(handle, "nvmlDeviceGetDecoderUtilization")
        return [gpu.decoder_percent, 167_000]

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle, version: int | None = None) -> Any:
        if not version:
            gpu = self._gpu(handle, "nvmlDeviceGetMemoryInfo")
            used_v1 = gpu.memory_used_bytes + gpu.memory_reserved_bytes  # v1 counts reserved
            return _real.c_nvmlMemory_t(
                gpu.memory_total_bytes, gpu.memory_total_bytes - used_v1, used_v1
            )
        gpu = self._gpu(handle, "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetMemoryInfo_v2")
        if version != _real.nvmlMemory_v2:
            raise self.error(_real.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        free = gpu.memory_total_bytes - gpu.memory_used_bytes - gpu.memory_reserved_bytes
        return _real.c_nvmlMemory_v2_t(
            version,
            gpu.memory_total_bytes,
            gpu.memory_reserved_bytes,
            free,
            gpu.memory_used_bytes,
        )

    # -- power, energy, temperature ---------------------------------------------------------

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        return self._gpu(handle, "nvmlDeviceGetPowerUsage").power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeHandle) -> int:
        return self._gpu(handle, "nvmlDeviceGetEnforcedPowerLimit").power_limit_mw

    def nvmlDeviceGetPowerManagementLimit(self, handle: FakeHandle) -> int:
        return self._gpu(handle, "nvmlDeviceGetPowerManagementLimit").power_limit_mw

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: FakeHandle) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetPowerManagementDefaultLimit")
        return gpu.power_limit_default_mw

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: FakeHandle) -> list[int]:
        gpu = self._gpu(handle, "nvmlDeviceGetPowerManagementLimitConstraints")
        return [gpu.power_limit_min_mw, gpu.power_limit_max_mw]

    def nvmlDeviceSetPowerManagementLimit(self, handle: FakeHandle, limit: int) -> None:
        gpu = self._gpu(handle, "nvmlDeviceSetPowerManagementLimit")
        if not self.privileged:
            raise self.error(_real.NVML_ERROR_NO_PERMISSION)
        if not gpu.power_limit_min_mw <= int(limit) <= gpu.power_limit_max_mw:
            raise self.error(_real.NVML_ERROR_INVALID_ARGUMENT)
        gpu.power_limit_mw = int(limit)
        self.limit_log.append((gpu.uuid, int(limit)))

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeHandle) -> int:
        return self._gpu(handle, "nvmlDeviceGetTotalEnergyConsumption").energy_mj

    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetTemperature")
        if sensor != _real.NVML_TEMPERATURE_GPU:
            raise self.error(_real.NVML_ERROR_INVALID_ARGUMENT)
        return gpu.temperature_c

    def nvmlDeviceGetTemperatureV(
        self, handle: FakeHandle, sensor: int, version: int = _real.nvmlTemperature_v1
    ) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetTemperatureV")
        if version != _real.nvmlTemperature_v1:
            raise self.error(_real.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        if sensor != _real.NVML_TEMPERATURE_GPU:
            raise self.error(_real.NVML_ERROR_INVALID_ARGUMENT)
        return gpu.temperature_c

    # -- clocks -----------------------------------------------------------------------------

    def nvmlDeviceGetClockInfo(self, handle: FakeHandle, type: int) -> int:  # pynvml name
        gpu = self._gpu(handle, "nvmlDeviceGetClockInfo")
        if type not in _CLOCK_TYPES:
            raise self.error(_real.NVML_ERROR_INVALID_ARGUMENT)
        if type not in gpu.clocks_mhz:
            raise self.error(_real.NVML_ERROR_NOT_SUPPORTED)
        return gpu.clocks_mhz[type]

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: FakeHandle) -> int:
        return self._gpu(handle, "nvmlDeviceGetCurrentClocksEventReasons").clock_event_reasons

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: FakeHandle) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetCurrentClocksThrottleReasons")
        return gpu.clock_event_reasons

    def nvmlDeviceGetSupportedClocksEventReasons(self, handle: FakeHandle) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetSupportedClocksEventReasons")
        return gpu.supported_clock_event_reasons

    def nvmlDeviceGetSupportedClocksThrottleReasons(self, handle: FakeHandle) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetSupportedClocksThrottleReasons")
        return gpu.supported_clock_event_reasons

    # -- processes --------------------------------------------------------------------------

    @staticmethod
    def _process_infos(entries: list[tuple[int, int | None]]) -> list[Any]:
        """What pynvml returns: friendly objects, ``usedGpuMemory`` None when unattributed."""
        infos = []
        for pid, used in entries:
            raw = _NOT_AVAILABLE if used is None else used
            obj = _real.nvmlStructToFriendlyObject(_real.c_nvmlProcessInfo_v2_t(pid, raw, 0, 0))
            if obj.usedGpuMemory == _NOT_AVAILABLE:
                obj.usedGpuMemory = None
            infos.append(obj)
        return infos

    def _processes(self, handle: FakeHandle, kind: str, symbol_version: str) -> list[Any]:
        function = f"nvmlDeviceGet{kind}RunningProcesses"
        gpu = self._gpu(handle, function, f"{function}_{symbol_version}")
        return self._process_infos(
            gpu.compute_processes if kind == "Compute" else gpu.graphics_processes
        )

    def _unversioned_processes(self, handle: FakeHandle, kind: str) -> list[Any]:
        try:
            return self._processes(handle, kind, "v3")
        except _real.NVMLError_FunctionNotFound as exc:  # pynvml's throwOnVersionMismatch
            raise NVMLLibraryMismatchError(
                "Unversioned function called and the pyNVML version does not match the NVML "
                "lib version."
            ) from exc

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeHandle) -> list[Any]:
        return self._unversioned_processes(handle, "Compute")

    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle: FakeHandle) -> list[Any]:
        return self._processes(handle, "Compute", "v2")

    def nvmlDeviceGetComputeRunningProcesses_v3(self, handle: FakeHandle) -> list[Any]:
        return self._processes(handle, "Compute", "v3")

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: FakeHandle) -> list[Any]:
        return self._unversioned_processes(handle, "Graphics")

    def nvmlDeviceGetGraphicsRunningProcesses_v2(self, handle: FakeHandle) -> list[Any]:
        return self._processes(handle, "Graphics", "v2")

    def nvmlDeviceGetGraphicsRunningProcesses_v3(self, handle: FakeHandle) -> list[Any]:
        return self._processes(handle, "Graphics", "v3")


__all__ = ["MIB", "FakeGpu", "FakeHandle", "FakeNvml", "NVMLError", "NVMLLibraryMismatchError"]
