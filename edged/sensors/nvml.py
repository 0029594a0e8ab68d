"""NVIDIA GPUs through NVML (``nvidia-ml-py``, module ``pynvml``): one sensor per GPU.

``pynvml`` is imported here and only here, inside :func:`discover`, so edged runs without it
(it is the ``edged[nvidia]`` extra). NVML talks to the driver through ``/dev/nvidia*``, not
through sysfs, so the filesystem roots do not apply to this backend.

What each GPU reports per tick (metric: attributes; see :mod:`edged.metrics` for units):

* ``hw.gpu.utilization``: hw.id (GPU UUID), hw.name, hw.vendor=nvidia, hw.gpu.task
  (``general`` from nvmlDeviceGetUtilizationRates; ``encoder``/``decoder`` from the codec
  utilization calls). NVML's ``utilization.memory`` is the memory *controller* busy share,
  not occupancy, and is deliberately not reported as ``hw.gpu.memory.utilization``.
* ``hw.gpu.memory.usage`` / ``hw.gpu.memory.limit`` / ``hw.gpu.memory.utilization``: hw.id.
  Memory info v2 is used where the driver has it (``used`` then excludes driver-reserved
  memory); v1 otherwise.
* ``hw.power`` and ``hw.energy``: hw.id, hw.name, hw.type=gpu (mW and mJ from NVML).
* ``hw.gpu.power.limit``: hw.id (the enforced limit, mW from NVML).
* ``hw.temperature``: hw.id, hw.name, hw.type=gpu (the GPU die sensor).
* ``hw.gpu.clock``: hw.id, ``edged.clock.domain`` = ``sm`` | ``memory`` (MHz from NVML).
* ``hw.gpu.clock_event``: hw.id, ``edged.reason`` (one of :data:`CLOCK_EVENT_REASONS`); 1 while
  the reason holds the clocks down, 0 for every other reason the GPU supports, so a reason
  that clears goes to 0 instead of silently disappearing from the series.
* ``hw.gpu.process.memory.usage``: hw.id, process.pid (compute and graphics contexts; a
  process in both lists is reported once). PIDs are in the driver's (host) pid namespace.

Errors: a call that the GPU or driver does not support (``NotSupported``, a function the
installed driver lacks, no permission for that one query) is omitted, and remembered per GPU
so it is not retried every tick. ``NoData``/``NotReady`` omit a value for this tick only. Any
other NVML error (``GpuIsLost``, ``Unknown``, ...) raises :class:`SensorError`, so the GPU is
"error" for the tick; after a lost GPU the handle is re-acquired (by UUID) on the next tick.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from functools import partial
from types import ModuleType
from typing import Any

from edged.sensors.base import Absent, Roots, Sensor, SensorError
from edged.snapshot import AttrValue, Reading

log = logging.getLogger(__name__)

SOURCE = "nvml"
CLOCK_DOMAIN = "edged.clock.domain"
REASON = "edged.reason"

# Clock-event reason bits, from nvml.h (nvmlClocksEventReason*, which keep the bit values of
# the older nvmlClocksThrottleReason* names). They are ABI and never change; the tests check
# them against the constants of the installed pynvml.
CLOCK_EVENT_REASONS: tuple[tuple[int, str], ...] = (
    (0x0001, "gpu_idle"),
    (0x0002, "applications_clocks_setting"),
    (0x0004, "sw_power_cap"),
    (0x0008, "hw_slowdown"),
    (0x0010, "sync_boost"),
    (0x0020, "sw_thermal_slowdown"),
    (0x0040, "hw_thermal_slowdown"),
    (0x0080, "hw_power_brake_slowdown"),
    (0x0100, "display_clocks_setting"),
)
_ALL_REASONS_MASK = sum(bit for bit, _ in CLOCK_EVENT_REASONS)  # distinct bits: sum == or

# NVML error classes, by the suffix pynvml gives them (NVMLError_<Suffix>).
_UNSUPPORTED = ("NotSupported", "FunctionNotFound", "NoPermission")  # omit, and remember
_TRANSIENT = ("NoData", "NotReady")  # omit for this tick only
_HANDLE_GONE = ("GpuIsLost", "ResetRequired", "Uninitialized", "GpuNotFound")  # re-acquire
# A versioned call the driver lacks; the next older variant is tried instead.
_VERSION_MISSING = ("FunctionNotFound", "NotSupported", "ArgumentVersionMismatch")


def _error_class(nv: ModuleType, name: str) -> tuple[type[BaseException], ...]:
    """``(nv.<name>,)`` when this pynvml version defines that exception class, else ``()``."""
    cls = getattr(nv, name, None)
    return (cls,) if isinstance(cls, type) and issubclass(cls, BaseException) else ()


def _error_classes(nv: ModuleType, suffixes: tuple[str, ...]) -> tuple[type[BaseException], ...]:
    """The pynvml exception classes ``NVMLError_<suffix>`` that this pynvml version defines."""
    return tuple(cls for suffix in suffixes for cls in _error_class(nv, f"NVMLError_{suffix}"))


def _shutdown(nv: ModuleType) -> None:
    try:
        nv.nvmlShutdown()
    except nv.NVMLError as exc:  # already shut down: nothing left to release
        log.debug("nvmlShutdown: %s", exc)


class _Session:
    """One ``nvmlInit`` shared by the sensors of all GPUs; ``nvmlShutdown`` exactly once.

    NVML counts init/shutdown calls; the session holds one init for all sensors and shuts down
    when the last sensor is closed, so closing sensors one by one (or twice) is harmless.
    """

    def __init__(self, nv: ModuleType, users: int) -> None:
        self.nv = nv
        self._users = users
        self._shut = False

    def release(self) -> None:
        self._users -= 1
        if self._users <= 0 and not self._shut:
            self._shut = True
            _shutdown(self.nv)


class NvmlGpu(Sensor):
    """One NVIDIA GPU, found by its NVML index and followed by its UUID once known."""

    def __init__(self, session: _Session, index: int) -> None:
        self.name = f"{SOURCE}:{index}"
        self.index = index
        self.uuid: str | None = None
        self.device_name: str | None = None
        self._session = session
        self._nv = session.nv
        self._handle: Any = None
        self._closed = False
        nv = self._nv
        self._nvml_error: type[BaseException] = nv.NVMLError
        # pynvml raises NVMLLibraryMismatchError (not an NVMLError) for an unversioned call
        # whose newest C variant the driver lacks.
        mismatch = _error_class(nv, "NVMLLibraryMismatchError")
        self._unsupported_errors = _error_classes(nv, _UNSUPPORTED) + mismatch
        self._transient_errors = _error_classes(nv, _TRANSIENT)
        self._handle_gone_errors = _error_classes(nv, _HANDLE_GONE)
        self._version_missing = _error_classes(nv, _VERSION_MISSING) + mismatch
        # feature -> why it is not read any more (NotSupported etc.), kept for the CLI.
        self.unsupported: dict[str, str] = {}
        # Newest API variants first; each flag drops to the older call once the driver says no.
        self._temperature_v = hasattr(nv, "nvmlDeviceGetTemperatureV")
        self._memory_v2 = hasattr(nv, "nvmlMemory_v2")
        self._event_reasons = hasattr(nv, "nvmlDeviceGetCurrentClocksEventReasons")
        self._processes_unversioned = True
        self._supported_reasons: int | None = None
        self._attrs_id: dict[str, AttrValue] = {}
        self._attrs_device: dict[str, AttrValue] = {}
        self._attrs_util: dict[str, dict[str, AttrValue]] = {}
        self._attrs_clock: dict[str, dict[str, AttrValue]] = {}
        self._attrs_reason: dict[str, dict[str, AttrValue]] = {}

    # -- handle and identity -------------------------------------------------------------

    def open(self) -> None:
        """Open the GPU now (discovery does, to learn its UUID and name); SensorError if not."""
        self._acquire()

    def _acquire(self) -> Any:
        """The device handle, fetched again (by UUID when known) after the GPU was lost."""
        if self._handle is not None:
            return self._handle
        nv = self._nv
        try:
            if self.uuid is not None:
                handle = nv.nvmlDeviceGetHandleByUUID(self.uuid)
            else:
                handle = nv.nvmlDeviceGetHandleByIndex(self.index)
            uuid = str(nv.nvmlDeviceGetUUID(handle))
            name = str(nv.nvmlDeviceGetName(handle))
        except self._nvml_error as exc:
            raise SensorError(self.name, f"cannot open GPU {self.index}: {exc}") from exc
        self._handle = handle
        if uuid != self.uuid:
            self.uuid, self.device_name = uuid, name
            self._attrs_id = {"hw.id": uuid}
            self._attrs_device = {"hw.id": uuid, "hw.name": name, "hw.type": "gpu"}
            self._attrs_util = {
                task: {"hw.id": uuid, "hw.name": name, "hw.vendor": "nvidia", "hw.gpu.task": task}
                for task in ("general", "encoder", "decoder")
            }
            self._attrs_clock = {d: {"hw.id": uuid, CLOCK_DOMAIN: d} for d in ("sm", "memory")}
            self._attrs_reason = {r: {"hw.id": uuid, REASON: r} for _, r in CLOCK_EVENT_REASONS}
        return handle

    # -- one NVML call, with the error policy of the module docstring -----------------------

    def _call(self, feature: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, or None when the feature is unsupported (remembered) or has no data now."""
        if feature in self.unsupported:
            return None
        try:
            return fn()
        except self._unsupported_errors as exc:
            self.unsupported[feature] = str(exc)
            log.info("%s (%s): %s not available: %s", self.name, self.uuid, feature, exc)
            return None
        except self._transient_errors:
            return None
        except self._nvml_error as exc:
            if isinstance(exc, self._handle_gone_errors):
                self._handle = None
            raise SensorError(self.name, f"{feature}: {type(exc).__name__}: {exc}") from exc

    # -- per-feature reads -----------------------------------------------------------------

    def _temperature_c(self, handle: Any) -> Any:
        nv = self._nv
        if self._temperature_v:
            try:
                return nv.nvmlDeviceGetTemperatureV(handle, nv.NVML_TEMPERATURE_GPU)
            except self._version_missing:
                self._temperature_v = False  # driver older than the V call: use the old one
        return nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU)

    def _memory(self, handle: Any) -> Any:
        nv = self._nv
        if self._memory_v2:
            try:
                return nv.nvmlDeviceGetMemoryInfo(handle, version=nv.nvmlMemory_v2)
            except self._version_missing:
                self._memory_v2 = False
        return nv.nvmlDeviceGetMemoryInfo(handle)

    def _current_reasons(self, handle: Any) -> Any:
        nv = self._nv
        if self._event_reasons:
            try:
                return nv.nvmlDeviceGetCurrentClocksEventReasons(handle)
            except self._version_missing:
                self._event_reasons = False  # before driver 535 the call was "Throttle"
        return nv.nvmlDeviceGetCurrentClocksThrottleReasons(handle)

    def _supported_reasons_mask(self, handle: Any) -> int:
        if self._supported_reasons is None:
            nv = self._nv
            name = (
                "nvmlDeviceGetSupportedClocksEventReasons"
                if self._event_reasons
                else "nvmlDeviceGetSupportedClocksThrottleReasons"
            )
            fn = getattr(nv, name, None)
            mask = None if fn is None else self._call("supported_clock_events", lambda: fn(handle))
            self._supported_reasons = _ALL_REASONS_MASK if mask is None else int(mask)
        return self._supported_reasons

    def _processes(self, handle: Any, kind: str) -> list[Any]:
        nv = self._nv
        base = f"nvmlDeviceGet{kind}RunningProcesses"
        if self._processes_unversioned:
            try:
                return list(getattr(nv, base)(handle))
            except self._version_missing:
                self._processes_unversioned = False  # driver without the _v3 call
        return list(getattr(nv, f"{base}_v2")(handle))

    # -- the tick --------------------------------------------------------------------------

    def read(self) -> list[Reading]:
        if self._closed:
            raise SensorError(self.name, "sensor closed")
        nv = self._nv
        handle = self._acquire()
        out: list[Reading] = []

        rates = self._call("utilization", lambda: nv.nvmlDeviceGetUtilizationRates(handle))
        if rates is not None:
            out.append(
                Reading("hw.gpu.utilization", rates.gpu / 100.0, self._attrs_util["general"])
            )
        for task, fn_name in (
            ("encoder", "nvmlDeviceGetEncoderUtilization"),
            ("decoder", "nvmlDeviceGetDecoderUtilization"),
        ):
            codec = self._call(f"{task}_utilization", partial(getattr(nv, fn_name), handle))
            if codec is not None:
                out.append(Reading("hw.gpu.utilization", codec[0] / 100.0, self._attrs_util[task]))

        memory = self._call("memory", lambda: self._memory(handle))
        if memory is not None:
            used_bytes, total_bytes = int(memory.used), int(memory.total)
            out.append(Reading("hw.gpu.memory.usage", used_bytes, self._attrs_id))
            out.append(Reading("hw.gpu.memory.limit", total_bytes, self._attrs_id))
            if total_bytes > 0:
                out.append(
                    Reading("hw.gpu.memory.utilization", used_bytes / total_bytes, self._attrs_id)
                )

        power_mw = self._call("power", lambda: nv.nvmlDeviceGetPowerUsage(handle))
        if power_mw is not None:
            out.append(Reading("hw.power", power_mw / 1000.0, self._attrs_device))
        limit_mw = self._call("power_limit", lambda: nv.nvmlDeviceGetEnforcedPowerLimit(handle))
        if limit_mw is not None:
            out.append(Reading("hw.gpu.power.limit", limit_mw / 1000.0, self._attrs_id))
        energy_mj = self._call("energy", lambda: nv.nvmlDeviceGetTotalEnergyConsumption(handle))
        if energy_mj is not None:
            out.append(Reading("hw.energy", energy_mj / 1000.0, self._attrs_device))

        temperature_c = self._call("temperature", lambda: self._temperature_c(handle))
        if temperature_c is not None:
            out.append(Reading("hw.temperature", float(temperature_c), self._attrs_device))

        for domain, clock_type in (("sm", nv.NVML_CLOCK_SM), ("memory", nv.NVML_CLOCK_MEM)):
            mhz = self._call(
                f"clock_{domain}", partial(nv.nvmlDeviceGetClockInfo, handle, clock_type)
            )
            if mhz is not None:
                out.append(Reading("hw.gpu.clock", mhz * 1e6, self._attrs_clock[domain]))

        reasons = self._call("clock_events", lambda: self._current_reasons(handle))
        if reasons is not None:
            supported = self._supported_reasons_mask(handle)
            for bit, reason in CLOCK_EVENT_REASONS:
                if supported & bit:
                    out.append(
                        Reading(
                            "hw.gpu.clock_event",
                            1.0 if reasons & bit else 0.0,
                            self._attrs_reason[reason],
                        )
                    )

        out.extend(self._process_readings(handle))
        return out

    def _process_readings(self, handle: Any) -> list[Reading]:
        used_by_pid: dict[int, int] = {}
        for kind in ("Compute", "Graphics"):
            procs = self._call(f"{kind.lower()}_processes", partial(self._processes, handle, kind))
            for proc in procs or ():
                used = proc.usedGpuMemory  # None where the driver cannot attribute memory
                if used is None:
                    continue
                pid = int(proc.pid)
                # a process with both a compute and a graphics context is listed twice with
                # its one per-process total: keep one series per pid
                used_by_pid[pid] = max(used_by_pid.get(pid, 0), int(used))
        uuid = self.uuid or ""
        return [
            Reading("hw.gpu.process.memory.usage", used, {"hw.id": uuid, "process.pid": pid})
            for pid, used in sorted(used_by_pid.items())
        ]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._handle = None
            self._session.release()


def driver_present(roots: Roots) -> bool:
    """Whether an NVIDIA driver could answer NVML: its kernel module's procfs directory, its
    control device, or WSL's GPU device (where NVML comes from the Windows driver)."""
    return (
        (roots.proc / "driver" / "nvidia").exists()
        or os.path.exists("/dev/nvidiactl")
        or os.path.exists("/dev/dxg")
    )


def discover(roots: Roots) -> list[Sensor | Absent]:
    """One :class:`NvmlGpu` per GPU NVML sees, or Absent when there is no driver or library.

    No driver (libnvidia-ml missing, kernel module not loaded) is the normal state of most
    machines and is Absent. A driver that is there but refuses us (``NoPermission`` on the
    device nodes, a library/kernel version mismatch after an upgrade) is a fault the operator
    must see, so it raises :class:`SensorError` and discovery reports the source as "error".
    """
    if "pynvml" not in sys.modules and not driver_present(roots):
        # nvidia-ml-py costs 4.4 MiB of RSS just to import; without a driver it can only
        # answer LibraryNotFound/DriverNotLoaded, so the import is skipped.
        return [Absent(SOURCE, "no NVIDIA driver (no /proc/driver/nvidia, /dev/nvidiactl)")]
    try:
        import pynvml as nv
    except ImportError:
        return [Absent(SOURCE, "nvidia-ml-py not installed (pip install edged[nvidia])")]
    no_driver = _error_classes(nv, ("LibraryNotFound", "DriverNotLoaded"))
    try:
        nv.nvmlInit()
    except no_driver as exc:
        return [Absent(SOURCE, f"no NVIDIA driver ({exc})")]
    except nv.NVMLError as exc:
        raise SensorError(SOURCE, f"nvmlInit failed: {type(exc).__name__}: {exc}") from exc
    try:
        count = int(nv.nvmlDeviceGetCount())
    except nv.NVMLError as exc:
        _shutdown(nv)
        raise SensorError(SOURCE, f"nvmlDeviceGetCount failed: {exc}") from exc
    if count == 0:
        _shutdown(nv)
        return [Absent(SOURCE, "NVIDIA driver loaded but no GPU found")]
    session = _Session(nv, count)
    found: list[Sensor | Absent] = []
    for index in range(count):
        gpu = NvmlGpu(session, index)
        # A GPU that cannot be opened now still gets its sensor: it reports "error" each tick
        # (with the reason) until it can be opened, instead of vanishing from `edged sensors`.
        try:
            gpu.open()
        except SensorError as exc:
            log.warning("%s", exc)
        found.append(gpu)
    return found


__all__ = ["CLOCK_DOMAIN", "CLOCK_EVENT_REASONS", "REASON", "SOURCE", "NvmlGpu", "discover"]
