"""Victim ranking shared by every strategy: who to act on when a resource is over its limit.

Order (DESIGN section 4, as refined by the enforcement issue):

1. never pid 1, never a ``protected`` process (edged itself, kernel threads), never ``critical``;
2. lowest class first: ``besteffort`` before ``normal``;
3. then recent growth: the process whose usage is rising is the one causing the pressure. A
   large steady service beside a small fast leak must lose to the leak (earlyoom ranks by size
   alone and kills the big service). Growth below a noise floor counts as no growth, so a
   process creeping by a few KiB/s does not outrank a real overshoot;
4. then overshoot of its own budget (``ProcessView.budget``), for a process that has one;
5. then size (bytes for memory, cores for CPU-driven resources).

Growth comes either from the caller (``growth_per_s``, e.g. the predictive strategy's per-process
Holt trend) or from a :class:`GrowthTracker`, a small memory of the last value per
``(pid, start_ticks)`` that the strategy owns and feeds each tick. Both are pure: no clock, only
the times the caller hands in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from edged.policy.base import ProcessClass, ProcessView, Resource

ProcessKey = tuple[int, int]  # (pid, start_ticks): a pid reused by a new process is a new key

# lowest class first; CRITICAL is never ranked at all
_CLASS_RANK: Mapping[ProcessClass, int] = {ProcessClass.BESTEFFORT: 0, ProcessClass.NORMAL: 1}

MIB = 1024 * 1024


def key_of(process: ProcessView) -> ProcessKey:
    """The identity of a process across ticks: its pid and its start time."""
    return (process.pid, process.start_ticks)


def eligible(process: ProcessView) -> bool:
    """Whether edged may ever act on ``process``: not pid 1, not protected, not critical."""
    return process.pid > 1 and not process.protected and process.klass is not ProcessClass.CRITICAL


def usage_of(process: ProcessView, resource: Resource) -> float:
    """The per-process quantity that drives ``resource``.

    Memory is bytes. CPU, power and temperature are all driven by CPU time, so they rank by
    cores. GPU memory is NVML's per-process figure, summed over GPUs (0 for a process NVML
    does not list: it holds no GPU memory edged can see).
    """
    if resource is Resource.MEMORY:
        return process.memory_bytes
    if resource in (Resource.CPU, Resource.POWER, Resource.TEMPERATURE):
        return process.cpu_cores
    if resource is Resource.GPU_MEMORY:
        return process.gpu_memory_bytes
    return 0.0


def budget_resource(resource: Resource) -> Resource:
    """Which of a process's budgets bounds it for ``resource`` (CPU for the thermal ones)."""
    if resource in (Resource.POWER, Resource.TEMPERATURE):
        return Resource.CPU
    return resource


def format_quantity(value: float, resource: Resource) -> str:
    """A short human form: MiB for memory, cores for CPU-driven resources."""
    if resource in (Resource.MEMORY, Resource.GPU_MEMORY):
        return f"{value / MIB:.0f} MiB"
    return f"{value:.2f} cores"


@dataclass(frozen=True)
class Victim:
    """One ranked candidate, with the figures that placed it and a sentence saying so."""

    process: ProcessView
    growth_per_s: float  # resource units per second, 0 below the noise floor
    overshoot: float  # resource units over its own budget, 0 without one
    size: float  # resource units in use
    why: str  # for Action.detail


class GrowthTracker:
    """Per-process growth rate from successive readings, smoothed over ``tau_s`` seconds.

    The rate is an exponentially weighted average of finite differences with weight
    ``1 - exp(-dt / tau_s)`` per step, so irregular ticks weigh by the time they cover. Keys
    not seen on a tick are forgotten, so the memory is bounded by the process count and a
    reused pid (other ``start_ticks``) starts afresh.
    """

    def __init__(self, resource: Resource, tau_s: float = 1.0) -> None:
        if tau_s <= 0:
            raise ValueError("tau_s must be positive")
        self.resource = resource
        self.tau_s = tau_s
        self._last: dict[ProcessKey, tuple[float, float]] = {}  # key -> (time_s, value)
        self._rate: dict[ProcessKey, float] = {}

    def update(self, now_s: float, processes: Iterable[ProcessView]) -> None:
        """Feed one tick's readings."""
        seen: dict[ProcessKey, tuple[float, float]] = {}
        for process in processes:
            key = key_of(process)
            value = usage_of(process, self.resource)
            seen[key] = (now_s, value)
            previous = self._last.get(key)
            if previous is None:
                continue
            dt_s = now_s - previous[0]
            if dt_s <= 0:
                seen[key] = previous
                continue
            slope = (value - previous[1]) / dt_s
            weight = 1.0 - math.exp(-dt_s / self.tau_s)
            old = self._rate.get(key)
            self._rate[key] = slope if old is None else old + weight * (slope - old)
        self._last = seen
        self._rate = {k: v for k, v in self._rate.items() if k in seen}

    def rates(self) -> Mapping[ProcessKey, float]:
        """Growth per second per process (units of the resource), for :func:`rank_victims`."""
        return dict(self._rate)


def rank_victims(
    processes: Iterable[ProcessView],
    resource: Resource,
    growth_per_s: Mapping[ProcessKey, float] | None = None,
    growth_floor_per_s: float = 0.0,
    exclude: Iterable[int] = (),
) -> list[Victim]:
    """Eligible processes, the one to act on first, each with the reason for its place.

    ``growth_per_s`` maps ``(pid, start_ticks)`` to the growth rate in resource units per
    second; rates at or below ``growth_floor_per_s`` rank as 0 (noise). ``exclude`` removes pids
    the caller is already dealing with (a process in its SIGTERM grace period).
    """
    growth = growth_per_s or {}
    skip = set(exclude)
    budget_key = budget_resource(resource)
    ranked: list[tuple[tuple[float, ...], Victim]] = []
    for process in processes:
        if not eligible(process) or process.pid in skip:
            continue
        size = usage_of(process, resource)
        rate = growth.get(key_of(process), 0.0)
        rate = rate if rate > growth_floor_per_s else 0.0
        budget = process.budget.get(budget_key)
        overshoot = max(0.0, size - budget) if budget is not None else 0.0
        sort_key = (float(_CLASS_RANK[process.klass]), -rate, -overshoot, -size, process.pid)
        ranked.append((sort_key, Victim(process, rate, overshoot, size, "")))
    ranked.sort(key=lambda item: item[0])
    victims = [victim for _, victim in ranked]
    return [_explain(victim, rank, len(victims), resource) for rank, victim in enumerate(victims)]


def _explain(victim: Victim, rank: int, total: int, resource: Resource) -> Victim:
    parts = [f"{victim.process.name}[{victim.process.pid}] {victim.process.klass.value}"]
    if victim.growth_per_s > 0:
        parts.append(f"growing {format_quantity(victim.growth_per_s, resource)}/s")
    if victim.overshoot > 0:
        parts.append(f"{format_quantity(victim.overshoot, resource)} over its budget")
    parts.append(f"using {format_quantity(victim.size, resource)}")
    why = ", ".join(parts) + f" (rank {rank + 1} of {total} by class, growth, overshoot, size)"
    return Victim(victim.process, victim.growth_per_s, victim.overshoot, victim.size, why)


def top_victim(victims: Sequence[Victim]) -> Victim | None:
    """The first of a ranking, or None when nothing is eligible."""
    return victims[0] if victims else None
