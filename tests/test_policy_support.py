"""Shared builders for the policy tests: states, processes and a closed-loop trace replay.

No tests here; the module is named ``test_policy_*`` only to sit with the tests it serves.
The replay plays the part of an obedient enforcer: throttles cap a process's memory at their
target, frozen processes stop growing, SIGTERM removes a process unless it ignores it, SIGKILL
always does, and ``State.imposed`` reports what is in force.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from edged.policy.base import (
    Action,
    ActionKind,
    Imposed,
    Limit,
    ProcessClass,
    ProcessView,
    Resource,
    State,
    Strategy,
)
from edged.policy.dynamic import apply_to_imposed

MIB = 1024.0**2
GIB = 1024.0**3
MACHINE_BYTES = 4 * GIB
SOFT_BYTES = 0.90 * MACHINE_BYTES
HARD_BYTES = 0.95 * MACHINE_BYTES


def proc(
    pid: int,
    memory_bytes: float = 100 * MIB,
    cpu_cores: float = 0.0,
    klass: ProcessClass = ProcessClass.NORMAL,
    **kwargs: object,
) -> ProcessView:
    """A process with a stable start time derived from its pid."""
    return ProcessView(
        pid=pid,
        name=str(kwargs.pop("name", f"p{pid}")),
        klass=klass,
        memory_bytes=memory_bytes,
        cpu_cores=cpu_cores,
        start_ticks=int(kwargs.pop("start_ticks", 1000 + pid)),  # type: ignore[call-overload]
        **kwargs,  # type: ignore[arg-type]
    )


def memory_limits(soft: float = SOFT_BYTES, hard: float = HARD_BYTES) -> dict[Resource, Limit]:
    return {Resource.MEMORY: Limit(Resource.MEMORY, soft, hard)}


def make_state(
    now_s: float,
    usage: Mapping[Resource, float],
    processes: Sequence[ProcessView] = (),
    limits: Mapping[Resource, Limit] | None = None,
    *,
    imposed: Sequence[Imposed] = (),
    interval_s: float = 0.1,
    capacity: Mapping[Resource, float] | None = None,
    pressure: Mapping[Resource, float] | None = None,
) -> State:
    return State(
        now_s=now_s,
        interval_s=interval_s,
        usage=dict(usage),
        capacity=dict(capacity or {Resource.MEMORY: MACHINE_BYTES, Resource.CPU: 4.0}),
        limits=dict(limits if limits is not None else memory_limits()),
        processes=tuple(processes),
        pressure=dict(pressure or {}),
        imposed=tuple(imposed),
    )


@dataclass
class SimProcess:
    """A process of the simulated machine.

    ``demand_bytes(t)`` is what it would use unhindered; with ``leak_bytes_per_s`` it instead
    grows from its current size at that rate while neither throttled at its size nor frozen
    (a leak resumes where it was held, it does not jump to where it would have been).
    """

    view: ProcessView
    demand_bytes: Callable[[float], float]
    leak_bytes_per_s: float = 0.0
    leak_start_s: float = 0.0
    ignores_sigterm: bool = False
    cpu_cores: float = 0.0
    frozen_bytes: float | None = None  # memory held while frozen
    alive: bool = True


@dataclass
class Replay:
    """Closed-loop replay of a memory trace through a strategy."""

    strategy: Strategy
    processes: list[SimProcess]
    baseline_bytes: float = 1 * GIB
    interval_s: float = 0.1
    limits: Mapping[Resource, Limit] = field(default_factory=memory_limits)
    obey: bool = True  # False: actions are recorded but have no effect (open loop)
    imposed: tuple[Imposed, ...] = ()
    log: list[tuple[float, Action]] = field(default_factory=list)
    usage_log: list[tuple[float, float]] = field(default_factory=list)

    def _memory(self, sim: SimProcess, now_s: float) -> float:
        demand = sim.demand_bytes(now_s)
        if sim.leak_bytes_per_s and now_s > sim.leak_start_s:
            demand = sim.view.memory_bytes + sim.leak_bytes_per_s * self.interval_s
        if not self.obey:
            return demand
        for imposed in self.imposed:
            if imposed.pid != sim.view.pid or imposed.resource is not Resource.MEMORY:
                continue
            if imposed.kind is ActionKind.FREEZE:
                if sim.frozen_bytes is None:
                    sim.frozen_bytes = min(demand, sim.view.memory_bytes)
                return sim.frozen_bytes
            if imposed.kind is ActionKind.THROTTLE and imposed.target is not None:
                demand = min(demand, max(imposed.target, 0.0))
        sim.frozen_bytes = None
        return demand

    def run(self, until_s: float, start_s: float = 0.0) -> list[tuple[float, Action]]:
        steps = round((until_s - start_s) / self.interval_s)
        for step in range(steps + 1):
            now_s = start_s + step * self.interval_s
            alive = [p for p in self.processes if p.alive]
            for sim in alive:
                sim.view = replace(sim.view, memory_bytes=self._memory(sim, now_s))
            usage = self.baseline_bytes + sum(p.view.memory_bytes for p in alive)
            self.usage_log.append((now_s, usage))
            state = State(
                now_s=now_s,
                interval_s=self.interval_s,
                usage={Resource.MEMORY: usage},
                capacity={Resource.MEMORY: MACHINE_BYTES, Resource.CPU: 4.0},
                limits=dict(self.limits),
                processes=tuple(p.view for p in alive),
                imposed=self.imposed,
            )
            actions = self.strategy.decide(state)
            self.log.extend((now_s, a) for a in actions)
            if self.obey:
                self._apply(actions, now_s)
        return self.log

    def _apply(self, actions: list[Action], now_s: float) -> None:
        self.imposed = apply_to_imposed(actions, now_s, self.imposed)
        for action in actions:
            for sim in self.processes:
                if sim.view.pid != action.pid:
                    continue
                if action.kind is ActionKind.KILL or (
                    action.kind is ActionKind.TERMINATE and not sim.ignores_sigterm
                ):
                    sim.alive = False
        alive = {p.view.pid for p in self.processes if p.alive}
        self.imposed = tuple(i for i in self.imposed if i.pid in alive)


def ramp(start_s: float, start_bytes: float, rate_bytes_per_s: float) -> Callable[[float], float]:
    """Flat at ``start_bytes`` until ``start_s``, then rising at ``rate_bytes_per_s``."""
    return lambda t: start_bytes + max(0.0, t - start_s) * rate_bytes_per_s


def steady(value_bytes: float) -> Callable[[float], float]:
    return lambda t: value_bytes


def kinds(log: Sequence[tuple[float, Action]]) -> list[ActionKind]:
    return [a.kind for _, a in log]
