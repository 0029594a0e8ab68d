"""The metric contract: every metric edged exports, with its instrument kind and UCUM unit.

Names, units and attribute keys follow the OpenTelemetry semantic conventions (DESIGN section 3).
Sensors produce :class:`edged.snapshot.Reading` objects named by these keys; telemetry creates one
instrument per entry. A reading whose metric is not in this table is a programming error that the
tests catch (``tests/test_metrics_contract.py``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Kind(enum.Enum):
    """How a metric is exported; observable kinds read the latest snapshot at collection."""

    GAUGE = "gauge"
    COUNTER = "counter"  # monotonic, cumulative value (e.g. CPU seconds since boot)
    UPDOWN = "updowncounter"  # non-monotonic cumulative value (e.g. bytes in use)
    HISTOGRAM = "histogram"  # recorded synchronously by the daemon itself


@dataclass(frozen=True)
class MetricSpec:
    """One metric of the contract."""

    name: str
    kind: Kind
    unit: str
    description: str


_SPECS = [
    MetricSpec(
        "system.cpu.utilization",
        Kind.GAUGE,
        "1",
        "Share of time each logical CPU spent in each mode over the last tick",
    ),
    MetricSpec("system.cpu.time", Kind.COUNTER, "s", "Seconds each logical CPU spent in each mode"),
    MetricSpec("system.cpu.frequency", Kind.GAUGE, "Hz", "Current frequency of each logical CPU"),
    MetricSpec("system.memory.usage", Kind.UPDOWN, "By", "Bytes of memory in use, by state"),
    MetricSpec("system.memory.utilization", Kind.GAUGE, "1", "Share of memory in each state"),
    MetricSpec("system.memory.limit", Kind.UPDOWN, "By", "Total memory (MemTotal)"),
    MetricSpec(
        "system.memory.linux.available",
        Kind.UPDOWN,
        "By",
        "Memory available for new work without swapping (MemAvailable)",
    ),
    MetricSpec("system.paging.usage", Kind.UPDOWN, "By", "Swap space, used and free"),
    MetricSpec("hw.temperature", Kind.GAUGE, "Cel", "Temperature of a sensor"),
    MetricSpec(
        "hw.temperature.limit", Kind.GAUGE, "Cel", "Temperature limit (trip point) of a sensor"
    ),
    MetricSpec("hw.power", Kind.GAUGE, "W", "Instantaneous power of a device or rail"),
    MetricSpec("hw.energy", Kind.COUNTER, "J", "Energy consumed by a device or rail"),
    MetricSpec("hw.gpu.utilization", Kind.GAUGE, "1", "Share of time the GPU was busy"),
    MetricSpec("hw.gpu.memory.usage", Kind.UPDOWN, "By", "GPU memory in use"),
    MetricSpec("hw.gpu.memory.limit", Kind.UPDOWN, "By", "GPU memory in total"),
    MetricSpec("hw.gpu.memory.utilization", Kind.GAUGE, "1", "Share of GPU memory in use"),
    MetricSpec("hw.gpu.power.limit", Kind.GAUGE, "W", "Enforced GPU power limit"),
    MetricSpec("hw.gpu.clock", Kind.GAUGE, "Hz", "GPU clock, by domain (sm, memory)"),
    MetricSpec(
        "hw.gpu.clock_event",
        Kind.GAUGE,
        "1",
        "1 while the GPU clock is held down for the given reason",
    ),
    MetricSpec("hw.gpu.process.memory.usage", Kind.UPDOWN, "By", "GPU memory used by a process"),
    MetricSpec("hw.fan.speed", Kind.GAUGE, "rpm", "Fan speed"),
    MetricSpec("hw.battery.charge", Kind.GAUGE, "1", "Battery charge as a share of full"),
    MetricSpec("process.memory.usage", Kind.UPDOWN, "By", "Resident memory of a process"),
    MetricSpec(
        "process.cpu.utilization",
        Kind.GAUGE,
        "1",
        "Share of one CPU a process used over the last tick, by mode",
    ),
    MetricSpec("edged.pressure", Kind.GAUGE, "1", "PSI 'some' average, as a share of time"),
    # [scope] cgroup: the governed group, attribute edged.scope = its cgroup path
    MetricSpec(
        "edged.scope.memory.usage",
        Kind.UPDOWN,
        "By",
        "Working set of the governed cgroup: charged memory minus inactive file cache",
    ),
    MetricSpec(
        "edged.scope.memory.limit",
        Kind.UPDOWN,
        "By",
        "Memory limit of the governed cgroup (its own and its ancestors'), at most MemTotal",
    ),
    MetricSpec("edged.scope.cpu.time", Kind.COUNTER, "s", "CPU seconds the governed cgroup used"),
    MetricSpec(
        "edged.scope.cpu.usage", Kind.GAUGE, "{cpu}", "CPUs the governed cgroup used over a tick"
    ),
    MetricSpec(
        "edged.scope.cpu.limit",
        Kind.GAUGE,
        "{cpu}",
        "CPU limit of the governed cgroup (CFS quota / period), at most the CPU count",
    ),
    MetricSpec(
        "edged.scope.pressure",
        Kind.GAUGE,
        "1",
        "PSI 'some' average of the governed cgroup, as a share of time",
    ),
    MetricSpec(
        "edged.memory.percpu_free",
        Kind.UPDOWN,
        "By",
        "Free pages on the per-CPU lists, which MemAvailable does not count",
    ),
    MetricSpec("edged.tick.duration", Kind.HISTOGRAM, "s", "Cost of one sampling tick"),
    MetricSpec("edged.health", Kind.GAUGE, "1", "1 for the current health level, 0 for the others"),
    MetricSpec(
        "edged.limit",
        Kind.GAUGE,
        "1",
        "Configured soft/hard level per resource, in the resource's unit (By, {cpu}, W, Cel)",
    ),
    MetricSpec(
        "edged.forecast.time_to_limit",
        Kind.GAUGE,
        "s",
        "Forecast seconds until a resource reaches its hard limit",
    ),
    MetricSpec("edged.actions", Kind.COUNTER, "{action}", "Actions taken (or logged in dry run)"),
    MetricSpec(
        "edged.alerts",
        Kind.UPDOWN,
        "{alert}",
        "Alerts on the limits, by resource, severity (warning, critical) and state "
        "(pending, firing)",
    ),
    MetricSpec("edged.sensor.errors", Kind.COUNTER, "{error}", "Sensor reads that failed"),
]

METRICS: dict[str, MetricSpec] = {spec.name: spec for spec in _SPECS}


def unit_of(metric: str) -> str:
    """The UCUM unit of a metric of the contract; KeyError for an unknown name."""
    return METRICS[metric].unit
