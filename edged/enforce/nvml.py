"""GPU power limits through NVML: the lever for a machine over its power limit (DESIGN 4, 5).

:class:`GpuPowerLever` lowers a GPU's power limit (``nvmlDeviceSetPowerManagementLimit``,
root only) and puts the original back. What it changes is recorded in the state store
(``imposed.json``, :class:`~edged.enforce.restore.GpuRecord`) *before* the change: the limit
the GPU had before edged first touched it, read once with
``nvmlDeviceGetPowerManagementLimit``, and the limit edged set. Lifting, SIGTERM and the
restore after a crash (:func:`~edged.enforce.restore.restore_all`) all put that original back,
so edged never leaves a GPU capped, and never "restores" a limit it set itself.

A requested limit is clamped to the driver's constraints
(``nvmlDeviceGetPowerManagementLimitConstraints``) and never above the original (a throttle
only lowers). NVML errors (``NoPermission`` without root, ``NotSupported`` on GPUs without
power management, a lost GPU) become :class:`~edged.enforce.signals.EnforceError`, which the
enforcer turns into a failed outcome; a failed change leaves the record as it was before it.

Like :mod:`edged.sensors.nvml`, ``pynvml`` is imported only here and only when a driver could
answer: without one :func:`open_lever` returns None and the lever is simply absent. NVML
reference-counts ``nvmlInit``, so the lever's init is independent of the sensors'.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from edged.enforce.restore import GpuRecord, StateStore
from edged.enforce.signals import EnforceError
from edged.sensors.base import Roots
from edged.sensors.nvml import driver_present

log = logging.getLogger(__name__)

OP = "gpu power limit"


def _why(exc: BaseException) -> str:
    """A sentence for an NVML error, naming the usual cause where there is one."""
    name = type(exc).__name__
    if name == "NVMLError_NoPermission":
        return f"no permission to set the power limit (needs root): {exc}"
    if name == "NVMLError_NotSupported":
        return f"this GPU does not support setting a power limit: {exc}"
    return f"{name}: {exc}"


class GpuPowerLever:
    """Sets and restores the power limits of the GPUs NVML reports as settable.

    ``constraints_mw`` maps each controllable GPU's UUID to its (min, max) limit in mW.
    Handles are looked up by UUID on every call (actions are rare), so a GPU that was lost
    and came back is still reached.
    """

    def __init__(
        self, nv: ModuleType, store: StateStore, constraints_mw: Mapping[str, tuple[int, int]]
    ) -> None:
        self._nv = nv
        self.store = store
        self.constraints_mw = dict(constraints_mw)
        self._closed = False

    def constraints_w(self) -> dict[str, tuple[float, float]]:
        """UUID -> (min, max) settable limit in watts, for the strategy's GpuView."""
        return {u: (lo / 1000.0, hi / 1000.0) for u, (lo, hi) in self.constraints_mw.items()}

    def _handle(self, uuid: str) -> Any:
        try:
            return self._nv.nvmlDeviceGetHandleByUUID(uuid)
        except self._nv.NVMLError as exc:
            raise EnforceError(None, OP, f"{uuid}: {_why(exc)}") from exc

    def set_limit(self, uuid: str, limit_w: float) -> int:
        """Lower ``uuid``'s power limit to ``limit_w`` (clamped); returns the limit set, mW.

        The original limit is read and recorded before the first change; a failure leaves
        the GPU and the record as they were. Raises EnforceError.
        """
        if uuid not in self.constraints_mw:
            raise EnforceError(None, OP, f"{uuid}: not a GPU whose power limit edged can set")
        nv = self._nv
        handle = self._handle(uuid)
        gpus = self.store.data.gpus
        previous = gpus.get(uuid)
        if previous is None:
            try:
                original_mw = int(nv.nvmlDeviceGetPowerManagementLimit(handle))
            except nv.NVMLError as exc:
                raise EnforceError(None, OP, f"{uuid}: reading the limit: {_why(exc)}") from exc
            record = GpuRecord(original_limit_mw=original_mw)
        else:
            record = GpuRecord(previous.original_limit_mw, previous.limit_mw)
        low_mw, high_mw = self.constraints_mw[uuid]
        high_mw = min(high_mw, record.original_limit_mw)  # a throttle never raises the limit
        wanted_mw = round(limit_w * 1000.0)
        limit_mw = min(high_mw, max(low_mw, wanted_mw))
        record.limit_mw = limit_mw
        gpus[uuid] = record
        self.store.save()  # recorded before it is done: restore_all can always undo it
        try:
            nv.nvmlDeviceSetPowerManagementLimit(handle, limit_mw)
        except nv.NVMLError as exc:
            if previous is None:
                del gpus[uuid]
            else:
                gpus[uuid] = previous
            self.store.save()
            raise EnforceError(None, OP, f"{uuid}: {_why(exc)}") from exc
        if limit_mw != wanted_mw:
            log.info(
                "%s: %.1f W asked, %.1f W set (allowed %.1f..%.1f W)",
                uuid,
                wanted_mw / 1000.0,
                limit_mw / 1000.0,
                low_mw / 1000.0,
                high_mw / 1000.0,
            )
        return limit_mw

    def lift(self, uuid: str) -> int | None:
        """Put back the limit ``uuid`` had before edged lowered it; returns it (mW), or None
        when edged holds no limit on it. Raises EnforceError (the record is then kept)."""
        record = self.store.data.gpus.get(uuid)
        if record is None:
            return None
        self._restore(uuid, record)
        del self.store.data.gpus[uuid]
        self.store.save()
        return record.original_limit_mw

    def _restore(self, uuid: str, record: GpuRecord) -> None:
        nv = self._nv
        handle = self._handle(uuid)
        try:
            nv.nvmlDeviceSetPowerManagementLimit(handle, record.original_limit_mw)
        except nv.NVMLError as exc:
            raise EnforceError(None, OP, f"{uuid}: restoring: {_why(exc)}") from exc

    def restore_records(self, records: dict[str, GpuRecord]) -> tuple[int, dict[str, GpuRecord]]:
        """Put back the original limit of every recorded GPU (for restore_all); returns how
        many were put back and the records that could not be (kept for a later start)."""
        restored = 0
        kept: dict[str, GpuRecord] = {}
        for uuid, record in records.items():
            try:
                self._restore(uuid, record)
            except EnforceError as exc:
                log.warning("restore: keeping %s", exc)
                kept[uuid] = record
                continue
            log.info(
                "restore: %s power limit back to %.1f W", uuid, record.original_limit_mw / 1000.0
            )
            restored += 1
        return restored, kept

    def close(self) -> None:
        """Release this lever's NVML init (once)."""
        if not self._closed:
            self._closed = True
            try:
                self._nv.nvmlShutdown()
            except self._nv.NVMLError as exc:
                log.debug("nvmlShutdown: %s", exc)


def open_lever(roots: Roots, store: StateStore) -> GpuPowerLever | None:
    """The lever over every GPU whose power limit NVML lets edged set, or None (no driver,
    no nvidia-ml-py, no GPU, or no GPU with power management). Call it as root only: the
    set call needs root and the lever is pointless without it."""
    if "pynvml" not in sys.modules and not driver_present(roots):
        return None
    try:
        import pynvml as nv
    except ImportError:
        return None
    try:
        nv.nvmlInit()
    except nv.NVMLError as exc:
        log.info("no GPU power lever: nvmlInit: %s", _why(exc))
        return None
    constraints: dict[str, tuple[int, int]] = {}
    try:
        count = int(nv.nvmlDeviceGetCount())
    except nv.NVMLError as exc:
        log.warning("no GPU power lever: nvmlDeviceGetCount: %s", _why(exc))
        count = 0
    for index in range(count):
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            uuid = str(nv.nvmlDeviceGetUUID(handle))
            low, high = nv.nvmlDeviceGetPowerManagementLimitConstraints(handle)
        except nv.NVMLError as exc:
            log.info("GPU %d: no power-limit lever: %s", index, _why(exc))
            continue
        constraints[uuid] = (int(low), int(high))
    if not constraints:
        try:
            nv.nvmlShutdown()
        except nv.NVMLError as exc:
            log.debug("nvmlShutdown: %s", exc)
        return None
    for uuid, (low, high) in constraints.items():
        log.info("GPU %s: power limit settable in %.1f..%.1f W", uuid, low / 1e3, high / 1e3)
    return GpuPowerLever(nv, store, constraints)


__all__ = ["OP", "GpuPowerLever", "open_lever"]
