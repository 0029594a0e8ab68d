"""Sensor discovery: find every source on this machine (or under a test root) once.

Each backend module exposes ``discover(roots) -> list[Sensor | Absent]``. A backend that is
missing its optional library or hardware reports itself Absent; a discovery that fails
unexpectedly is reported as an "error" source, never raised, so one broken sysfs node cannot
keep the daemon from starting.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence

from edged.sensors.base import Absent, Roots, Sensor, SensorError
from edged.snapshot import SourceStatus

log = logging.getLogger(__name__)

# Order is the order of readings in a snapshot and of `edged sensors` output.
BACKENDS: tuple[str, ...] = (
    "edged.sensors.memory",
    "edged.sensors.cpu",
    "edged.sensors.pressure",
    "edged.sensors.thermal",
    "edged.sensors.power",
    "edged.sensors.nvml",
    "edged.sensors.jetson",
)

__all__ = ["BACKENDS", "Absent", "Roots", "Sensor", "SensorError", "discover_all"]


def discover_all(
    roots: Roots,
    backends: Sequence[str] = BACKENDS,
    extra: Sequence[Callable[[Roots], list[Sensor | Absent]]] = (),
) -> tuple[list[Sensor], list[SourceStatus]]:
    """All sensors found, and the status of every source looked for (ok, absent or error)."""
    sensors: list[Sensor] = []
    statuses: list[SourceStatus] = []
    finders: list[tuple[str, Callable[[Roots], list[Sensor | Absent]]]] = []
    for module_name in backends:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # a backend not yet built, or a broken install
            statuses.append(SourceStatus(module_name.rsplit(".", 1)[-1], "error", str(exc)))
            continue
        finders.append((module_name.rsplit(".", 1)[-1], module.discover))
    finders.extend((getattr(f, "__name__", "extra"), f) for f in extra)
    for name, discover in finders:
        try:
            found = discover(roots)
        except (OSError, ValueError, SensorError) as exc:
            log.warning("discovery of %s failed: %s", name, exc)
            statuses.append(SourceStatus(name, "error", f"discovery failed: {exc}"))
            continue
        for item in found:
            if isinstance(item, Absent):
                statuses.append(SourceStatus(item.name, "absent", item.detail))
            else:
                sensors.append(item)
                statuses.append(SourceStatus(item.name, "ok", item.describe()))
    return sensors, statuses
