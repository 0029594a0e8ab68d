"""The ``adaptive`` strategy: feedback control of the limits themselves.

Memory: AIMD per managed group (a ProcessView with ``group`` set), senpai-like
    Each group has a target (its memory.high). It starts unlimited. While the machine's memory
    pressure (``state.pressure[MEMORY]``, PSI ``some`` avg10, 0..1) is above
    ``pressure_target``, every group's target is cut to ``beta`` times what it holds now, at
    most once per ``cut_interval_s`` (avg10 is a 10 s average: cutting every tick would react
    many times to one event). While pressure is below it, a target the group is actually
    pressing on (usage at least ``use_fraction`` of it) grows by ``grow_bytes_per_s``; one that
    reaches the ceiling (the group's budget, the machine's hard level, or MemTotal) is lifted
    (UNTHROTTLE). A target never goes below the group's floor: ``min_group_bytes``, or
    ``floor_fraction`` of its learned steady footprint (an average of its usage over
    ``footprint_tau_s``), whichever is larger. A THROTTLE is emitted only when the target
    moved by more than ``deadband_bytes`` since the last one, so memory.high is not rewritten
    every tick. The result is the additive-increase/multiplicative-decrease sawtooth that
    settles the groups where the machine just stops feeling pressure.

CPU: a PI loop holding the hottest temperature under its soft level
    ``error = (soft - setpoint_margin_c) - temperature`` (temperature low-passed over
    ``temperature_tau_s``); output = total CPU quota, in cores,
    for the ``max_cpu_procs`` top CPU consumers (besteffort first), clamped to
    ``[min_cores, capacity[CPU]]``. Gains are per cent of capacity, so one setting fits a
    4-core board and a 64-core server. Anti-windup: when the output is clamped, the integral is
    reset to what the clamp allows (back-calculation), so the loop leaves saturation at once.
    The integral starts at full capacity (bumpless: nothing is throttled until heat calls for
    it). The quota is shared out most-important-first: normal processes keep their demand,
    besteffort ones are squeezed first, none below ``min_cores``. THROTTLE(cpu) actions carry
    each process's quota (reason ``temperature``) when it moved by more than
    ``deadband_cores``; once the output has sat at full capacity for ``release_hold_s``, every
    quota is lifted (UNTHROTTLE).

The safety net: at or above the memory *hard* level, adaptive does what dynamic does (SIGTERM the
    top victim, SIGKILL it after the grace period or as soon as it keeps growing), through an
    embedded :class:`~edged.policy.dynamic.DynamicStrategy` that sees only the hard level. AIMD
    works on managed groups and reacts to pressure over tens of seconds; a process outside any
    group that runs the machine out of memory needs the ladder's answer in one tick.

Unlike dynamic, several actions may come on one tick (one per group or process whose limit
moved): they are adjustments of a limit, not escalations.

Defaults, and why:

======================== ======== ================================================================
``pressure_target``      0.02     2 % of time stalled: felt, not yet hurting (senpai aims lower
                                  per group; this is the whole machine's figure)
``beta``                 0.9      cut by 10 %: a tenth is within a working set's slack
``cut_interval_s``       10 s     the avg10 window: see the effect of a cut before the next
``grow_bytes_per_s``     8 MiB/s  a 1 GiB group regains a 10 % cut in about 13 s
``use_fraction``         0.9      grow a limit only while the group presses on it
``min_group_bytes``      64 MiB   below this a group thrashes whatever the pressure says
``floor_fraction``       0.5      never squeeze below half of the learned footprint
``footprint_tau_s``      60 s     the steady footprint is a minute-scale average
``deadband_bytes``       16 MiB   writes of memory.high only when they matter
``setpoint_margin_c``    2 °C     hold under soft with room for sensor noise
``kp_per_c``             0.05     5 % of capacity per °C of error
``ki_per_c_s``           0.005    integral time kp/ki = 10 s, slower than typical heat-sink
                                  time constants (tens of s) for a damped loop
``min_cores``            0.5      quota floor for the whole set (and each process gets 0.1)
``release_hold_s``       30 s     lift quotas only after half a minute with no need for them
``deadband_cores``       0.1      cpu.max rewritten only for a real change
``temperature_tau_s``    2 s      the loop sees temperature smoothed over 2 s: sensor noise
                                  (±0.5 °C is common) would otherwise drive the P term
``max_cpu_procs``        4        the handful of top consumers carries the heat
======================== ======== ================================================================
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edged.policy.base import (
    Action,
    ActionKind,
    Limit,
    ProcessClass,
    ProcessView,
    Resource,
    State,
)
from edged.policy.dynamic import DynamicStrategy, parse_settings
from edged.policy.victims import MIB, ProcessKey, eligible, key_of, rank_victims

ADAPTIVE_DEFAULTS: Mapping[str, float] = {
    "pressure_target": 0.02,
    "beta": 0.9,
    "cut_interval_s": 10.0,
    "grow_bytes_per_s": 8.0 * MIB,
    "use_fraction": 0.9,
    "min_group_bytes": 64.0 * MIB,
    "floor_fraction": 0.5,
    "footprint_tau_s": 60.0,
    "deadband_bytes": 16.0 * MIB,
    "setpoint_margin_c": 2.0,
    "kp_per_c": 0.05,
    "ki_per_c_s": 0.005,
    "min_cores": 0.5,
    "release_hold_s": 30.0,
    "deadband_cores": 0.1,
    "temperature_tau_s": 2.0,
    "max_cpu_procs": 4.0,
}

_PROCESS_MIN_CORES = 0.1  # no single process is held below this share


@dataclass
class _Group:
    """AIMD state of one managed group."""

    target_bytes: float = math.inf  # inf: unlimited
    footprint_bytes: float = math.nan
    last_cut_s: float = -math.inf
    emitted_bytes: float | None = None  # the target last sent (None: none in force)
    last_s: float = math.nan


@dataclass
class _Quota:
    """What the CPU loop knows of one controlled process."""

    demand_cores: float
    emitted_cores: float | None = None


class AdaptiveStrategy:
    """AIMD memory limits per group and a PI loop on CPU quota for temperature."""

    name = "adaptive"
    # it undoes only the limits it set itself: a switch to it lifts what the old one imposed
    adopts_imposed = False

    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        self.settings = parse_settings(settings, ADAPTIVE_DEFAULTS, self.name)
        s = self.settings
        if not 0 < s["beta"] < 1:
            raise ValueError("[strategy.adaptive] beta: must be between 0 and 1")
        self._groups: dict[str, _Group] = {}
        self._integral_cores = math.nan
        self._output_cores = math.nan
        self._last_pi_s = math.nan
        self._temperature_c = math.nan  # the loop's filtered reading
        self._saturated_since_s: float | None = None
        self._quotas: dict[ProcessKey, _Quota] = {}
        self._net = DynamicStrategy({})  # the hard-level ladder; see the module docstring

    def decide(self, state: State) -> list[Action]:
        """The hard-level safety net, then memory group targets and CPU quotas that moved."""
        return self._safety_net(state) + self._memory(state) + self._cpu(state)

    def _safety_net(self, state: State) -> list[Action]:
        """Dynamic's answer at the memory hard level (and only there: it is shown no soft
        level and nothing imposed, so it never throttles, freezes or lifts anything)."""
        limit = state.limits.get(Resource.MEMORY)
        hard_only: dict[Resource, Limit] = {}
        if limit is not None and limit.hard is not None:
            hard_only[Resource.MEMORY] = Limit(Resource.MEMORY, None, limit.hard)
        net_state = dataclasses.replace(state, limits=hard_only, imposed=())
        return [
            dataclasses.replace(a, strategy=self.name)
            for a in self._net.decide(net_state)
            if a.kind in (ActionKind.TERMINATE, ActionKind.KILL)
        ]

    @property
    def cpu_quota_cores(self) -> float:
        """The PI loop's last output (nan before the first temperature reading)."""
        return self._output_cores

    def group_targets(self) -> Mapping[str, float]:
        """Each managed group's current memory target in bytes (inf: unlimited)."""
        return {name: g.target_bytes for name, g in self._groups.items()}

    # ---------------------------------------------------------------- memory: AIMD

    def _memory(self, state: State) -> list[Action]:
        s = self.settings
        pressure = state.pressure.get(Resource.MEMORY, 0.0)
        limit = state.limits.get(Resource.MEMORY)
        machine_ceiling = state.capacity.get(Resource.MEMORY, math.inf)
        if limit is not None and limit.hard is not None:
            machine_ceiling = min(machine_ceiling, limit.hard)
        actions: list[Action] = []
        seen: set[str] = set()
        for process in state.processes:
            if process.group is None or not eligible(process) or process.group in seen:
                continue
            seen.add(process.group)
            group = self._groups.setdefault(process.group, _Group())
            usage = process.memory_bytes
            dt_s = state.now_s - group.last_s if math.isfinite(group.last_s) else 0.0
            group.last_s = state.now_s
            if math.isnan(group.footprint_bytes):
                group.footprint_bytes = usage
            elif dt_s > 0:
                weight = 1.0 - math.exp(-dt_s / max(s["footprint_tau_s"], 1e-3))
                group.footprint_bytes += weight * (usage - group.footprint_bytes)
            floor = max(s["min_group_bytes"], s["floor_fraction"] * group.footprint_bytes)
            ceiling = min(machine_ceiling, process.budget.get(Resource.MEMORY, math.inf))
            why = ""
            if pressure > s["pressure_target"]:
                if state.now_s - group.last_cut_s >= s["cut_interval_s"] - 1e-9:
                    base = min(group.target_bytes, usage)
                    group.target_bytes = max(floor, s["beta"] * base)
                    group.last_cut_s = state.now_s
                    why = f"memory pressure {pressure:.1%} > {s['pressure_target']:.1%}: cut"
            elif math.isfinite(group.target_bytes) and usage >= s["use_fraction"] * (
                group.target_bytes
            ):
                group.target_bytes += s["grow_bytes_per_s"] * dt_s
                why = f"memory pressure {pressure:.1%} <= {s['pressure_target']:.1%}: grow"
                if group.target_bytes >= ceiling:
                    group.target_bytes = math.inf
            action = self._emit_group(process, group, floor, why)
            if action is not None:
                actions.append(action)
        self._groups = {name: g for name, g in self._groups.items() if name in seen}
        return actions

    def _emit_group(
        self, process: ProcessView, group: _Group, floor: float, why: str
    ) -> Action | None:
        if math.isinf(group.target_bytes):
            if group.emitted_bytes is None:
                return None
            group.emitted_bytes = None
            return self._action(
                ActionKind.UNTHROTTLE,
                process,
                Resource.MEMORY,
                "pressure",
                detail=f"group {process.group}: limit grew back to its ceiling",
            )
        moved = (
            group.emitted_bytes is None
            or abs(group.target_bytes - group.emitted_bytes) > self.settings["deadband_bytes"]
        )
        if not moved:
            return None
        group.emitted_bytes = group.target_bytes
        return self._action(
            ActionKind.THROTTLE,
            process,
            Resource.MEMORY,
            "pressure",
            target=group.target_bytes,
            detail=f"group {process.group}: {why or 'adjust'}; target "
            f"{group.target_bytes / MIB:.0f} MiB (floor {floor / MIB:.0f} MiB, "
            f"footprint {group.footprint_bytes / MIB:.0f} MiB)",
        )

    # ---------------------------------------------------------------- CPU: PI on temperature

    def _cpu(self, state: State) -> list[Action]:
        s = self.settings
        temperature = state.usage.get(Resource.TEMPERATURE)
        limit = state.limits.get(Resource.TEMPERATURE)
        capacity = state.capacity.get(Resource.CPU)
        if temperature is None or limit is None or limit.soft is None or not capacity:
            return []
        low = min(s["min_cores"], capacity)
        setpoint = limit.soft - s["setpoint_margin_c"]
        if math.isnan(self._integral_cores):
            self._integral_cores, self._last_pi_s = capacity, state.now_s
            self._temperature_c = temperature
        dt_s = max(0.0, state.now_s - self._last_pi_s)
        self._last_pi_s = state.now_s
        if s["temperature_tau_s"] > 0:
            weight = 1.0 - math.exp(-dt_s / s["temperature_tau_s"])
            self._temperature_c += weight * (temperature - self._temperature_c)
        else:
            self._temperature_c = temperature
        temperature = self._temperature_c
        error_c = setpoint - temperature
        proportional = s["kp_per_c"] * capacity * error_c
        self._integral_cores += s["ki_per_c_s"] * capacity * error_c * dt_s
        raw = proportional + self._integral_cores
        output = min(capacity, max(low, raw))
        if output != raw:  # anti-windup by back-calculation
            self._integral_cores = output - proportional
        self._output_cores = output

        if output >= capacity - 1e-9:
            if self._saturated_since_s is None:
                self._saturated_since_s = state.now_s
        else:
            self._saturated_since_s = None
        released = (
            self._saturated_since_s is not None
            and state.now_s - self._saturated_since_s >= s["release_hold_s"] - 1e-9
        )
        present = {key_of(p): p for p in state.processes}
        if released:
            return self._release(present)
        holding = any(q.emitted_cores is not None for q in self._quotas.values())
        if output >= capacity - 1e-9 and not holding:
            return []  # cool: nothing held, nothing to hold
        return self._share(
            state,
            output,
            capacity=capacity,
            temperature=temperature,
            setpoint=setpoint,
            present=present,
        )

    def _release(self, present: Mapping[ProcessKey, ProcessView]) -> list[Action]:
        actions = []
        for key, quota in self._quotas.items():
            if quota.emitted_cores is not None and key in present:
                actions.append(
                    self._action(
                        ActionKind.UNTHROTTLE,
                        present[key],
                        Resource.CPU,
                        "temperature",
                        detail="temperature loop at full capacity for the release hold",
                    )
                )
        self._quotas = {}
        return actions

    def _share(
        self,
        state: State,
        output: float,
        *,
        capacity: float,
        temperature: float,
        setpoint: float,
        present: Mapping[ProcessKey, ProcessView],
    ) -> list[Action]:
        s = self.settings
        victims = rank_victims(state.processes, Resource.TEMPERATURE)
        chosen = victims[: max(1, int(s["max_cpu_procs"]))]
        keys = [key_of(v.process) for v in chosen]
        for victim, key in zip(chosen, keys, strict=True):
            quota = self._quotas.get(key)
            if quota is None:
                self._quotas[key] = _Quota(victim.size)
            elif quota.emitted_cores is None or victim.size > quota.emitted_cores + 1e-6:
                quota.demand_cores = max(victim.size, _PROCESS_MIN_CORES)
        # served first to last in the reverse of victim order: normal before besteffort, small
        # demands before large, so the largest besteffort consumer is squeezed first. Ordered
        # by demand, not by current use, which the quota itself sets (ordering by it would swap
        # two held processes every tick)
        remaining = output
        actions: list[Action] = []
        order = sorted(
            zip(chosen, keys, strict=True),
            key=lambda item: (
                item[0].process.klass is ProcessClass.BESTEFFORT,
                self._quotas[item[1]].demand_cores,
                item[0].process.pid,
            ),
        )
        for index, (victim, key) in enumerate(order):
            quota = self._quotas[key]
            reserve = _PROCESS_MIN_CORES * (len(order) - index - 1)
            share = max(_PROCESS_MIN_CORES, min(quota.demand_cores, remaining - reserve))
            remaining -= share
            moved = (
                quota.emitted_cores is None
                or abs(share - quota.emitted_cores) > s["deadband_cores"]
            )
            if quota.emitted_cores is None and share >= quota.demand_cores - 1e-9:
                continue  # not held yet and no need to: leave it alone
            if moved:
                quota.emitted_cores = share
                actions.append(
                    self._action(
                        ActionKind.THROTTLE,
                        victim.process,
                        Resource.CPU,
                        "temperature",
                        target=share,
                        detail=f"temperature {temperature:.1f} °C, setpoint {setpoint:.1f} °C: "
                        f"quota {output:.2f} of {capacity:.0f} cores for the top "
                        f"{len(order)}; {victim.why}",
                    )
                )
        self._quotas = {k: q for k, q in self._quotas.items() if k in present}
        return actions

    def _action(
        self,
        kind: ActionKind,
        process: ProcessView,
        resource: Resource,
        reason: str,
        *,
        target: float | None = None,
        detail: str = "",
    ) -> Action:
        return Action(
            kind=kind,
            pid=process.pid,
            resource=resource,
            reason=reason,
            strategy=self.name,
            klass=process.klass,
            start_ticks=process.start_ticks,
            target=target,
            detail=detail,
        )
