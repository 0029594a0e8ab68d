"""From a Snapshot and the config to a strategy's State: pure, no I/O.

Resolving limits needs the machine's totals ("90%" of MemTotal, "50%" of the CPUs), which come
from the snapshot, so this is done per tick (cheaply) rather than once at load.

With a scope (``[scope] cgroup``), memory and CPU are the governed group's: its working set
against its limit (MemTotal when it has none), its CPU use against its quota (the CPU count
when it has none), and its PSI where the kernel keeps PSI per group (the machine's otherwise).
GPU memory, power and temperature have no per-group figure and stay the machine's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from edged.config import AUTO, Level, Limits, parse_size_bytes
from edged.policy.base import (
    GpuView,
    Imposed,
    Limit,
    ProcessClass,
    ProcessView,
    Resource,
    State,
)
from edged.snapshot import AttrValue, Reading, Snapshot

_BUSY_EXCLUDED = ("idle", "iowait")  # iowait is waiting, not computing


MIB = 1 << 20
AUTO_RESERVE_FRACTION = 0.05
AUTO_RESERVE_MIN_BYTES = 256 * MIB
AUTO_RESERVE_MAX_BYTES = 2048 * MIB


def auto_memory_levels(total_bytes: float) -> tuple[float, float]:
    """(soft, hard) used-memory levels for ``[limits.memory]`` ``"auto"`` (the default).

    What must stay available at hard (the SIGTERM level) is a reserve that suits the
    machine's size: 5 % of it, at least 256 MiB (or 10 % where that is less: a small scope),
    at most 2 GiB. Below ~256 MiB available a machine without swap evicts its programs' own
    code and thrashes before the kernel OOM killer acts; above 2 GiB a large server would
    keep memory idle for nothing. Soft keeps twice the reserve available. So: 24 GiB -> hard
    at 95 %, soft 90 %; 4 GiB -> 93.75 % / 87.5 %; 2 GiB -> 90 % / 80 %; 64 GiB -> 2 / 4 GiB
    available.
    """
    floor = min(AUTO_RESERVE_MIN_BYTES, 0.10 * total_bytes)
    reserve = min(max(AUTO_RESERVE_FRACTION * total_bytes, floor), AUTO_RESERVE_MAX_BYTES)
    return total_bytes - 2 * reserve, total_bytes - reserve


def resolve_level(
    value: float | int | str | None, resource: Resource, capacity: float | None
) -> float | None:
    """One soft/hard value in the resource's base unit; None when unset or unresolvable
    (a percentage of a total this machine does not report). ``"auto"`` is resolved by
    :func:`resolve_limits` (it needs to know which of the two levels it is)."""
    if value is None or value == AUTO:
        return None
    if isinstance(value, str) and value.strip().endswith("%"):
        if capacity is None:
            return None
        return float(value.strip()[:-1]) / 100.0 * capacity
    if resource in (Resource.MEMORY, Resource.GPU_MEMORY):
        return float(parse_size_bytes(value))
    return float(value)


def resolve_limits(limits: Limits, capacity: Mapping[Resource, float]) -> dict[Resource, Limit]:
    out: dict[Resource, Limit] = {}
    for resource in Resource:
        level: Level = getattr(limits, resource.value)
        soft = resolve_level(level.soft, resource, capacity.get(resource))
        hard = resolve_level(level.hard, resource, capacity.get(resource))
        total = capacity.get(resource)
        if resource is Resource.MEMORY and total is not None and AUTO in (level.soft, level.hard):
            auto_soft, auto_hard = auto_memory_levels(total)
            if level.soft == AUTO:
                soft = auto_soft if hard is None else min(auto_soft, hard)
            if level.hard == AUTO:
                hard = auto_hard if soft is None else max(auto_hard, soft)
        if soft is not None or hard is not None:
            out[resource] = Limit(resource, soft, hard)
    return out


def _by_metric(readings: Iterable[Reading]) -> dict[str, list[Reading]]:
    grouped: dict[str, list[Reading]] = {}
    for r in readings:
        grouped.setdefault(r.metric, []).append(r)
    return grouped


def machine_usage(
    snapshot: Snapshot, temperature_zone: str | None = None
) -> tuple[dict[Resource, float], dict[Resource, float], dict[Resource, float]]:
    """(usage, capacity, pressure) of the machine, from one snapshot.

    memory: MemTotal - MemAvailable - the per-CPU free pages (which MemAvailable misses; see
    :mod:`edged.sensors.memory`); cpu: busy cores (all modes but idle and iowait, summed
    over CPUs); gpu_memory: summed over GPUs; power: the top-level meters (readings without
    ``hw.parent``: a Jetson's input rail, RAPL packages, GPUs), batteries excluded;
    temperature: the hottest sensor, or the zone named in ``[limits.temperature] zone``.
    """
    by = _by_metric(snapshot.readings)
    usage: dict[Resource, float] = {}
    capacity: dict[Resource, float] = {}
    pressure: dict[Resource, float] = {}
    total = next((r.value for r in by.get("system.memory.limit", [])), None)
    available = next((r.value for r in by.get("system.memory.linux.available", [])), None)
    if total is not None and available is not None:
        percpu = next((r.value for r in by.get("edged.memory.percpu_free", [])), 0.0)
        usage[Resource.MEMORY] = total - available - percpu
        capacity[Resource.MEMORY] = total
    util = by.get("system.cpu.utilization", [])
    cpus = {r.attributes.get("cpu.logical_number") for r in by.get("system.cpu.time", [])}
    if cpus:
        capacity[Resource.CPU] = float(len(cpus))
    if util:
        usage[Resource.CPU] = sum(
            r.value for r in util if r.attributes.get("cpu.mode") not in _BUSY_EXCLUDED
        )
    gpu_used = by.get("hw.gpu.memory.usage", [])
    if gpu_used:
        usage[Resource.GPU_MEMORY] = sum(r.value for r in gpu_used)
        capacity[Resource.GPU_MEMORY] = sum(r.value for r in by.get("hw.gpu.memory.limit", []))
    top_power = [
        r.value
        for r in by.get("hw.power", [])
        if "hw.parent" not in r.attributes and r.attributes.get("hw.type") != "battery"
    ]
    if top_power:
        usage[Resource.POWER] = sum(top_power)
    temps = by.get("hw.temperature", [])
    if temperature_zone is not None:
        temps = [
            r
            for r in temps
            if temperature_zone in (r.attributes.get("hw.name"), r.attributes.get("hw.id"))
        ]
    if temps:
        usage[Resource.TEMPERATURE] = max(r.value for r in temps)
    for r in by.get("edged.pressure", []):
        if r.attributes.get("edged.window") == "10s":
            try:
                pressure[Resource(str(r.attributes.get("edged.resource")))] = r.value
            except ValueError:
                continue  # io pressure has no Resource of its own
    return usage, capacity, pressure


SCOPED_RESOURCES = (Resource.MEMORY, Resource.CPU)


def scope_usage(
    snapshot: Snapshot,
) -> tuple[dict[Resource, float], dict[Resource, float], dict[Resource, float]]:
    """(usage, capacity, pressure) of the governed cgroup, from its ``edged.scope.*``
    readings; a figure the scope sensor did not give this tick is absent (never the
    machine's, which would be judged against the group's limits)."""
    usage: dict[Resource, float] = {}
    capacity: dict[Resource, float] = {}
    pressure: dict[Resource, float] = {}
    for r in snapshot.readings:
        if not r.metric.startswith("edged.scope."):
            continue
        if r.metric == "edged.scope.memory.usage":
            usage[Resource.MEMORY] = r.value
        elif r.metric == "edged.scope.memory.limit":
            capacity[Resource.MEMORY] = r.value
        elif r.metric == "edged.scope.cpu.usage":
            usage[Resource.CPU] = r.value
        elif r.metric == "edged.scope.cpu.limit":
            capacity[Resource.CPU] = r.value
        elif r.metric == "edged.scope.pressure" and r.attributes.get("edged.window") == "10s":
            resource = str(r.attributes.get("edged.resource"))
            if resource in (Resource.MEMORY.value, Resource.CPU.value):
                pressure[Resource(resource)] = r.value
    return usage, capacity, pressure


def process_views(
    snapshot: Snapshot,
    start_ticks: Mapping[int, int],
    groups: Mapping[int, str] | None = None,
    self_pid: int | None = None,
) -> tuple[ProcessView, ...]:
    """One view per sampled process. ``start_ticks`` (pid -> start time) comes from the process
    sensor; a pid it does not know is left out (it cannot be acted on safely)."""
    self_pid = os.getpid() if self_pid is None else self_pid
    memory: dict[int, float] = {}
    cpu: dict[int, float] = {}
    gpu_memory: dict[int, float] = {}
    attrs: dict[int, Mapping[str, AttrValue]] = {}
    for r in snapshot.readings:
        if r.metric == "process.memory.usage":
            pid = int(r.attributes["process.pid"])
            memory[pid] = r.value
            attrs[pid] = r.attributes
        elif r.metric == "process.cpu.utilization":
            pid = int(r.attributes["process.pid"])
            cpu[pid] = cpu.get(pid, 0.0) + r.value
        elif r.metric == "hw.gpu.process.memory.usage":  # NVML: one reading per GPU and pid
            pid = int(r.attributes["process.pid"])
            gpu_memory[pid] = gpu_memory.get(pid, 0.0) + r.value
    views = []
    for pid, a in attrs.items():
        if pid not in start_ticks:
            continue
        client = a.get("edged.client")
        views.append(
            ProcessView(
                pid=pid,
                name=str(a.get("process.executable.name", "")),
                klass=ProcessClass(str(a.get("edged.class", "normal"))),
                memory_bytes=memory[pid],
                cpu_cores=cpu.get(pid, 0.0),
                start_ticks=start_ticks[pid],
                group=(groups or {}).get(pid),
                client=str(client) if client else None,
                protected=pid <= 1 or pid == self_pid,
                gpu_memory_bytes=gpu_memory.get(pid, 0.0),
            )
        )
    return tuple(views)


def gpu_views(
    snapshot: Snapshot, constraints_w: Mapping[str, tuple[float, float]] | None
) -> tuple[GpuView, ...]:
    """One view per GPU the enforcer can set a power limit on (``constraints_w``: UUID ->
    (min, max) W, from the NVML lever), with its draw and limit from this snapshot's NVML
    readings (``hw.power`` with hw.type=gpu, ``hw.gpu.power.limit``, keyed by hw.id)."""
    if not constraints_w:
        return ()
    power: dict[str, float] = {}
    limit: dict[str, float] = {}
    for r in snapshot.readings:
        if r.metric == "hw.power" and r.attributes.get("hw.type") == "gpu":
            power[str(r.attributes.get("hw.id"))] = r.value
        elif r.metric == "hw.gpu.power.limit":
            limit[str(r.attributes.get("hw.id"))] = r.value
    return tuple(
        GpuView(uuid, power.get(uuid), limit.get(uuid), low_w, high_w)
        for uuid, (low_w, high_w) in sorted(constraints_w.items())
    )


def build_state(
    snapshot: Snapshot,
    limits: Limits,
    interval_s: float,
    start_ticks: Mapping[int, int],
    *,
    imposed: tuple[Imposed, ...] = (),
    reaction_time_s: float = 0.05,
    groups: Mapping[int, str] | None = None,
    self_pid: int | None = None,
    gpu_constraints_w: Mapping[str, tuple[float, float]] | None = None,
    scoped: bool = False,
) -> State:
    """The strategy's view of one tick. ``scoped``: memory and CPU usage and capacity are the
    governed cgroup's (:func:`scope_usage`); ``start_ticks`` then holds its processes only."""
    usage, capacity, pressure = machine_usage(snapshot, limits.temperature.zone)
    if scoped:
        in_scope, scope_capacity, scope_pressure = scope_usage(snapshot)
        for resource in SCOPED_RESOURCES:
            usage.pop(resource, None)
            capacity.pop(resource, None)
        usage.update(in_scope)
        capacity.update(scope_capacity)
        pressure.update(scope_pressure)
    return State(
        now_s=snapshot.monotonic_s,
        interval_s=interval_s,
        usage=usage,
        capacity=capacity,
        limits=resolve_limits(limits, capacity),
        processes=process_views(snapshot, start_ticks, groups, self_pid),
        pressure=pressure,
        imposed=imposed,
        reaction_time_s=reaction_time_s,
        gpus=gpu_views(snapshot, gpu_constraints_w),
    )
