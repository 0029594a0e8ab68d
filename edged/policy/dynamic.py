"""The ``dynamic`` strategy: the current reading against soft and hard levels, with hysteresis.

The baseline (kubelet soft/hard eviction, earlyoom), and the machinery the predictive strategy
reuses. Per resource and per tick it emits at most one action on a process, so it never
mass-kills (power adds at most one action per GPU, see below).

Memory
    at or above hard: SIGTERM the top victim (no hold: the OOM killer is near). If the same
    process (pid and start time) is still there ``grace_s`` later, SIGKILL it; SIGKILL it at
    once if it has grown by ``term_growth_bytes`` since the SIGTERM (a process shutting down
    does not keep allocating, so it ignored the signal, and waiting would spend the margin). While a
    termination is in its grace period no second victim is terminated: its memory is about to
    come back. A victim that is frozen is killed at once (it could not handle SIGTERM).
    above soft for ``hold_s``: throttle the top victim to its usage minus the overshoot over
    ``soft * (1 - throttle_cushion)`` (floor ``min_throttle_bytes``); if still above soft
    ``freeze_after_s`` after that, freeze it; if still above soft ``freeze_after_s`` after the
    freeze was lifted (``freeze_max_s``), SIGTERM it (then SIGKILL after ``grace_s``), as the
    kubelet's soft eviction does: a throttle and a freeze did not bring memory back. The
    ladder escalates on a process it already holds before it throttles another one.
CPU
    above soft for ``cpu_hold_s`` (at hard: at once): throttle the top CPU consumer to its usage
    minus the overshoot (floor ``min_cores``); then freeze it as for memory.
GPU memory
    at or above hard only: SIGTERM the process holding the most (NVML's per-process figure),
    SIGKILL after ``grace_s`` as for memory. A throttle or a freeze gives no GPU memory back,
    so there is no soft-level ladder; below hard, GPU memory is for budget clients to share.
Temperature, power
    above soft for ``thermal_hold_s`` (at hard: at once): hold the top CPU consumer to
    ``thermal_throttle_factor`` of its usage; tighten by the same factor every hold while still
    above, down to ``min_cores``; then freeze it.
GPU power limits (power only; GPUs the enforcer has an NVML lever for, ``State.gpus``)
    on the same trigger as the power ladder above (and at most once per ``thermal_hold_s``,
    every tick at hard), besides the CPU step: the GPUs take the part of the overshoot over
    ``soft * (1 - throttle_cushion)`` that they draw of the machine's power, shared among them
    by their draw. Each GPU's limit goes to ``min(limit in force, its draw)`` minus its share,
    never below the driver's minimum: a limit above the draw would hold nothing back. A change
    of less than ``gpu_deadband_w`` is not written. While power stays above, the next step
    lowers again from there. On recovery (the same hysteresis as the rest: below
    ``soft * (1 - recover_margin)`` for ``recover_hold_s``, and each limit in force at least
    that long) every GPU limit is lifted (UNTHROTTLE with ``gpu`` set), which puts the GPU's
    original limit back. Actions: ``Action(THROTTLE, pid=0, POWER, gpu=uuid, target=W)``.
Every freeze is lifted after ``freeze_max_s`` (THAW, reason ``freeze-limit``), and not renewed
on the same process before ``freeze_after_s`` has passed.

Hysteresis: throttles and freezes of a resource are lifted (one per tick, freezes first) only
once its usage has stayed below ``soft * (1 - recover_margin)`` for ``recover_hold_s``, and no
throttle is lifted before it has been in force for ``recover_hold_s``. A new soft-level step
waits the hold time after the previous one. So on input oscillating around the soft level a
throttle is applied once and held, instead of toggling each period.

Defaults, and why:

=========================== ======== ===============================================================
``hold_s``                  1 s      memory: long enough to skip a one-tick blip, short beside
                                     the seconds a leak needs to fill the gap to hard
``cpu_hold_s``              5 s      CPU bursts are normal work; act on sustained overload only
``thermal_hold_s``          3 s      temperature lags CPU by seconds; sensors are noisy
``grace_s``                 2 s      SIGTERM-to-SIGKILL, as earlyoom and systemd's short stops
``term_growth_bytes``       32 MiB   a victim that grows this much after its SIGTERM is not
                                     shutting down (it ignored the signal): SIGKILL it at once
                                     instead of letting it eat the rest of the margin
``freeze_after_s``          3 s      give a throttle time to show (reclaim, quota periods)
``freeze_max_s``            10 s     a frozen process holds its locks and clients time out
``recover_margin``          0.05     5 % of the soft level below it: the hysteresis band
``recover_hold_s``          10 s     ten times the memory hold: lifting is slow, acting fast
``throttle_cushion``        0.02     a throttle aims 2 % under soft, so the machine does not sit
                                     on the soft level and escalate onto the next process
``min_throttle_bytes``      64 MiB   memory.high below a working set thrashes; keep a floor
``min_cores``               0.1      a CPU quota below this starves heartbeats and watchdogs
``thermal_throttle_factor`` 0.5      halve, then halve again: a few steps to any level
``growth_floor_bytes_per_s`` 1 MiB/s growth below this is allocator noise, not a leak
``growth_tau_s``            1 s      smoothing of per-process growth used for victim ranking
``gpu_deadband_w``          5 W      a GPU power limit is rewritten only for a real change
                                     (NVML limits move in whole watts; draw is noisy)
=========================== ======== ===============================================================

Settings come from ``[strategy.dynamic]``; an unknown key raises ValueError naming it. Values
may be numbers or, for ``*_s`` keys, durations (``"2s"``, ``"500ms"``) and, for ``*_bytes``
keys, sizes (``"64MiB"``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edged.config import parse_duration_s, parse_size_bytes
from edged.policy.base import (
    Action,
    ActionKind,
    GpuView,
    Imposed,
    Limit,
    ProcessClass,
    ProcessView,
    Resource,
    State,
)
from edged.policy.victims import (
    MIB,
    GrowthTracker,
    ProcessKey,
    Victim,
    format_quantity,
    key_of,
    rank_victims,
    usage_of,
)

DYNAMIC_DEFAULTS: Mapping[str, float] = {
    "hold_s": 1.0,
    "cpu_hold_s": 5.0,
    "thermal_hold_s": 3.0,
    "grace_s": 2.0,
    "term_growth_bytes": 32.0 * MIB,
    "freeze_after_s": 3.0,
    "freeze_max_s": 10.0,
    "recover_margin": 0.05,
    "recover_hold_s": 10.0,
    "throttle_cushion": 0.02,
    "min_throttle_bytes": 64.0 * MIB,
    "min_cores": 0.1,
    "thermal_throttle_factor": 0.5,
    "growth_floor_bytes_per_s": 1.0 * MIB,
    "growth_tau_s": 1.0,
    "gpu_deadband_w": 5.0,
}

# the order resources are looked at each tick (memory first: it is the one that kills machines)
RESOURCES: tuple[Resource, ...] = (
    Resource.MEMORY,
    Resource.GPU_MEMORY,
    Resource.CPU,
    Resource.TEMPERATURE,
    Resource.POWER,
)
_THERMAL = (Resource.TEMPERATURE, Resource.POWER)
# resources whose soft ladder ends in SIGTERM (for CPU and heat a held process does no harm)
_EVICTING = (Resource.MEMORY, Resource.GPU_MEMORY)
# the apply/undo pairs; the "family" keys the strategy's memory of what it sent
_UNDO = {ActionKind.THROTTLE: ActionKind.UNTHROTTLE, ActionKind.FREEZE: ActionKind.THAW}
_FAMILY = {
    ActionKind.THROTTLE: ActionKind.THROTTLE,
    ActionKind.UNTHROTTLE: ActionKind.THROTTLE,
    ActionKind.FREEZE: ActionKind.FREEZE,
    ActionKind.THAW: ActionKind.FREEZE,
}


def parse_settings(
    settings: Mapping[str, Any] | None, defaults: Mapping[str, float], strategy: str
) -> dict[str, float]:
    """``defaults`` overlaid with ``settings``, checked: unknown keys and bad values raise.

    ``*_bytes`` and ``*_bytes_per_s`` keys accept sizes ("64MiB"), other ``*_s`` keys durations
    ("500ms"), every key a non-negative number.
    """
    result = dict(defaults)
    for key, raw in (settings or {}).items():
        if key not in defaults:
            known = ", ".join(sorted(defaults))
            raise ValueError(f"[strategy.{strategy}]: unknown setting {key!r} (known: {known})")
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
            raise ValueError(f"[strategy.{strategy}] {key}: expected a number, got {raw!r}")
        try:
            if isinstance(raw, str) and key.endswith(("_bytes", "_bytes_per_s")):
                value = float(parse_size_bytes(raw))
            elif isinstance(raw, str) and key.endswith("_s"):
                value = parse_duration_s(raw)
            else:
                value = float(raw)
        except ValueError as exc:
            raise ValueError(f"[strategy.{strategy}] {key}: {exc}") from exc
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"[strategy.{strategy}] {key}: must be a non-negative number")
        result[key] = value
    return result


def _fmt_level(value: float, resource: Resource) -> str:
    if resource is Resource.MEMORY or resource is Resource.GPU_MEMORY:
        return f"{value / (1024 * MIB):.2f} GiB"
    if resource is Resource.TEMPERATURE:
        return f"{value:.1f} °C"
    if resource is Resource.POWER:
        return f"{value:.1f} W"
    return f"{value:.2f} cores"


@dataclass
class _Track:
    """Hysteresis timers of one resource."""

    above_since_s: float | None = None  # usage at or above soft since
    below_since_s: float | None = None  # usage below the recovery level since
    last_step_s: float = -math.inf  # last soft-ladder step (throttle, tighten, freeze)


@dataclass
class _Termination:
    """A SIGTERM sent, waiting for its grace period."""

    key: ProcessKey
    victim: ProcessView
    resource: Resource
    sent_s: float
    killed_s: float | None = None
    reason: str = "hard"  # the SIGTERM's reason; its SIGKILL gives the same (the re-check's)


class DynamicStrategy:
    """Soft/hard levels with hold times and hysteresis. See the module docstring."""

    name = "dynamic"
    defaults: Mapping[str, float] = DYNAMIC_DEFAULTS
    # it lifts, with its hysteresis, whatever State.imposed lists, also what another strategy
    # imposed: so a runtime switch to it hands the old strategy's throttles and freezes over
    adopts_imposed = True

    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        self.settings = parse_settings(settings, self.defaults, self.name)
        s = self.settings
        self._tracks: dict[Resource, _Track] = {r: _Track() for r in RESOURCES}
        self._growth = GrowthTracker(Resource.MEMORY, tau_s=max(s["growth_tau_s"], 1e-3))
        self._terminations: dict[ProcessKey, _Termination] = {}
        # what this strategy sent lately, until state.imposed shows it:
        # (family, pid, resource) -> (kind sent, time, target)
        self._sent: dict[tuple[ActionKind, int, Resource], tuple[ActionKind, float, float | None]]
        self._sent = {}
        self._last_thaw_s: dict[tuple[int, Resource], float] = {}
        # GPU power limits sent lately, until state.imposed shows them: uuid -> (kind, time,
        # target W), and when the GPU ladder last stepped
        self._gpu_sent: dict[str, tuple[ActionKind, float, float | None]] = {}
        self._gpu_last_step_s = -math.inf
        self._now_s = -math.inf  # the tick being decided (from state.now_s, never a clock)

    # ---------------------------------------------------------------- hooks for subclasses

    def _observe(self, state: State) -> None:
        """Update per-tick memory (growth rates) before any decision."""
        self._growth.update(state.now_s, state.processes)

    def _growth_rates(self, resource: Resource) -> Mapping[ProcessKey, float] | None:
        """Per-process growth for victim ranking (memory only; CPU growth is noise)."""
        return self._growth.rates() if resource is Resource.MEMORY else None

    def _soft_trigger(self, state: State, resource: Resource, usage: float, limit: Limit) -> str:
        """The reason to run the soft-level ladder now, or "" for none."""
        track = self._tracks[resource]
        if track.above_since_s is None:
            return ""
        held_s = state.now_s - track.above_since_s
        return "soft" if held_s >= self._hold_s(resource) - 1e-9 else ""

    # ---------------------------------------------------------------- the tick

    def decide(self, state: State) -> list[Action]:
        """At most one process action per resource for this tick, plus GPU power limits."""
        self._now_s = state.now_s
        self._observe(state)
        self._expire_sent(state)
        present = {key_of(p): p for p in state.processes}
        self._terminations = {k: t for k, t in self._terminations.items() if k in present}
        pids = {p.pid for p in state.processes}
        self._last_thaw_s = {k: v for k, v in self._last_thaw_s.items() if k[0] in pids}
        actions: list[Action] = []
        for resource in RESOURCES:
            action = self._decide_resource(state, resource, present)
            if action is not None:
                actions.append(action)
        actions.extend(self._gpu_power_step(state))
        return actions

    def _decide_resource(
        self, state: State, resource: Resource, present: Mapping[ProcessKey, ProcessView]
    ) -> Action | None:
        if resource is Resource.MEMORY:
            action = self._grace_step(state, present)
            if action is not None:
                return action
        usage = state.usage.get(resource)
        limit = state.limits.get(resource)
        track = self._tracks[resource]
        if usage is None:  # sensor missing this tick: keep timers, only bound freezes
            return self._freeze_limit_step(state, resource)
        if limit is None or (limit.soft is None and limit.hard is None):
            # no limit (any more): whatever was imposed for it is lifted after the hold
            track.above_since_s = None
            if track.below_since_s is None:
                track.below_since_s = state.now_s
            return self._freeze_limit_step(state, resource) or self._recover_step(state, resource)
        if resource is Resource.GPU_MEMORY:
            # no throttle or freeze gives GPU memory back (a frozen process keeps its
            # allocations): only the hard level acts, by ending the largest holder
            if limit.hard is not None and usage >= limit.hard:
                return self._hard_step(state, resource, usage, limit.hard, present)
            return None
        soft = limit.soft if limit.soft is not None else limit.hard
        assert soft is not None
        if usage >= soft:
            track.above_since_s = (
                track.above_since_s if track.above_since_s is not None else (state.now_s)
            )
        else:
            track.above_since_s = None
        if usage < soft * (1.0 - self.settings["recover_margin"]):
            if track.below_since_s is None:
                track.below_since_s = state.now_s
        else:
            track.below_since_s = None

        if limit.hard is not None and usage >= limit.hard:
            track.below_since_s = None
            action = self._hard_step(state, resource, usage, limit.hard, present)
            if action is not None:
                return action
        action = self._freeze_limit_step(state, resource)
        if action is not None:
            return action
        at_hard = limit.hard is not None and usage >= limit.hard
        if at_hard and resource is Resource.MEMORY:
            return None  # terminating (or waiting on a termination) is the step at hard
        reason = "hard" if at_hard else self._soft_trigger(state, resource, usage, limit)
        if reason:
            track.below_since_s = None
            return self._soft_step(state, resource, usage, soft, reason)
        return self._recover_step(state, resource)

    # ---------------------------------------------------------------- steps

    def _grace_step(self, state: State, present: Mapping[ProcessKey, ProcessView]) -> Action | None:
        """KILL a process still there ``grace_s`` after its SIGTERM (once)."""
        grace_s = self.settings["grace_s"]
        for key, term in list(self._terminations.items()):
            grown = usage_of(present[key], term.resource) - usage_of(term.victim, term.resource)
            waited_s = state.now_s - term.sent_s
            why = ""
            if grown >= self.settings["term_growth_bytes"]:
                why = (
                    f"grew {format_quantity(grown, Resource.MEMORY)} in {waited_s:.2f} s after "
                    "SIGTERM: it is ignoring it"
                )
            elif waited_s >= grace_s - 1e-9:
                why = f"still running {waited_s:.1f} s after SIGTERM"
            if term.killed_s is None and why:
                term.killed_s = state.now_s
                return self._action(
                    ActionKind.KILL, present[key], term.resource, term.reason, detail=why
                )
            if term.killed_s is not None and state.now_s - term.killed_s >= grace_s:
                # SIGKILL did not free it either (stuck in D state): stop waiting on it
                del self._terminations[key]
        return None

    def _hard_step(
        self,
        state: State,
        resource: Resource,
        usage: float,
        hard: float,
        present: Mapping[ProcessKey, ProcessView],
    ) -> Action | None:
        """Memory (or GPU memory) at hard: terminate the top victim unless one is already on
        its way out."""
        if resource not in _EVICTING:
            return None  # CPU and the thermal ones run the soft ladder without a hold
        if any(t.resource is resource for t in self._terminations.values()):
            return None  # its memory is about to come back: do not kill a second one
        victims = rank_victims(
            state.processes,
            resource,
            self._growth_rates(resource),
            self.settings["growth_floor_bytes_per_s"],
        )
        if resource is Resource.GPU_MEMORY:  # only a process holding some can give it back
            victims = [v for v in victims if v.size > 0]
        if not victims:
            return None
        victim = victims[0]
        context = (
            f"{resource.value} {_fmt_level(usage, resource)} >= hard {_fmt_level(hard, resource)}"
        )
        if victim.process.pid in self._in_force(state, ActionKind.FREEZE, None):
            return self._action(
                ActionKind.KILL,
                victim.process,
                resource,
                "hard",
                detail=f"{context}; frozen, so SIGTERM would wait for a thaw; {victim.why}",
            )
        key = key_of(victim.process)
        self._terminations[key] = _Termination(key, victim.process, resource, state.now_s)
        return self._action(
            ActionKind.TERMINATE,
            victim.process,
            resource,
            "hard",
            detail=f"{context}; {victim.why}",
        )

    def _soft_step(
        self, state: State, resource: Resource, usage: float, soft: float, reason: str
    ) -> Action | None:
        """The next ladder step (throttle, tighten, freeze) on the top victim, spaced by holds."""
        urgent = reason == "hard"
        spacing_s = state.interval_s if urgent else self._hold_s(resource)
        track = self._tracks[resource]
        if state.now_s - track.last_step_s < spacing_s - 1e-9:
            return None
        frozen = self._in_force(state, ActionKind.FREEZE, None)
        if resource in _EVICTING and (
            self._in_force(state, ActionKind.FREEZE, resource)
            or any(t.resource is resource for t in self._terminations.values())
        ):
            # a victim is frozen or on its way out for this resource: its memory stays where
            # it is until the ladder goes on with it (or comes back when it exits); holding a
            # second, steady process would not bring anything back
            return None
        terminating = {k[0] for k in self._terminations}
        victims = rank_victims(
            state.processes,
            resource,
            self._growth_rates(resource),
            self.settings["growth_floor_bytes_per_s"],
            exclude=set(frozen) | terminating,
        )
        if not victims:
            return None
        throttled = self._in_force(state, ActionKind.THROTTLE, resource)
        # escalate before spreading: once a process is held for this resource, the next step
        # is on it, not on whoever ranks first now that its growth has been stopped
        victim = next((v for v in victims if v.process.pid in throttled), victims[0])
        # what must come off to land just under soft (a cushion below it, so that a victim
        # held exactly at its share does not leave the machine sitting on the soft level)
        overshoot = max(0.0, usage - soft * (1.0 - self.settings["throttle_cushion"]))
        context = (
            f"{resource.value} {_fmt_level(usage, resource)} vs soft {_fmt_level(soft, resource)}"
        )
        pid = victim.process.pid
        action: Action | None = None
        if pid not in throttled:
            target = self._throttle_target(resource, victim, overshoot, None)
            action = self._action(
                ActionKind.THROTTLE,
                victim.process,
                resource,
                reason,
                target=target,
                detail=f"{context}; hold to {format_quantity(target, resource)}; {victim.why}",
            )
        else:
            since_s, current = throttled[pid]
            tighter = self._throttle_target(resource, victim, overshoot, current)
            if resource in _THERMAL and current is not None and tighter < current - 1e-9:
                action = self._action(
                    ActionKind.THROTTLE,
                    victim.process,
                    resource,
                    reason,
                    target=tighter,
                    detail=f"{context}; still above, tighten to "
                    f"{format_quantity(tighter, resource)}; {victim.why}",
                )
            elif state.now_s - since_s >= self.settings["freeze_after_s"] - 1e-9:
                thawed_s = self._last_thaw_s.get((pid, resource), -math.inf)
                spent = state.now_s - thawed_s >= self.settings["freeze_after_s"] - 1e-9
                if spent and math.isfinite(thawed_s) and resource in _EVICTING:
                    # throttled, frozen, thawed, and memory is still above soft: the rest of
                    # the ladder (kubelet's soft eviction); holding it forever helps no one
                    key = key_of(victim.process)
                    self._terminations[key] = _Termination(
                        key, victim.process, resource, state.now_s, reason=reason
                    )
                    action = self._action(
                        ActionKind.TERMINATE,
                        victim.process,
                        resource,
                        reason,
                        detail=f"{context}; throttled, frozen {self.settings['freeze_max_s']:.0f}"
                        f" s and still above after its thaw; {victim.why}",
                    )
                elif spent:
                    action = self._action(
                        ActionKind.FREEZE,
                        victim.process,
                        resource,
                        reason,
                        detail=f"{context}; throttled {state.now_s - since_s:.1f} s and still "
                        f"above; freeze for at most {self.settings['freeze_max_s']:.0f} s; "
                        f"{victim.why}",
                    )
        if action is not None:
            track.last_step_s = state.now_s
        return action

    def _throttle_target(
        self, resource: Resource, victim: Victim, overshoot: float, current: float | None
    ) -> float:
        s = self.settings
        if resource is Resource.MEMORY:
            return max(s["min_throttle_bytes"], victim.size - overshoot)
        if resource is Resource.CPU:
            return max(s["min_cores"], victim.size - overshoot)
        base = victim.size if current is None else min(current, victim.size)
        return max(s["min_cores"], base * s["thermal_throttle_factor"])

    def _freeze_limit_step(self, state: State, resource: Resource) -> Action | None:
        """THAW a freeze of this resource that has lasted ``freeze_max_s``."""
        frozen = self._in_force(state, ActionKind.FREEZE, resource)
        by_pid = {p.pid: p for p in state.processes}
        for pid, (since_s, _) in sorted(frozen.items()):
            held_s = state.now_s - since_s
            if held_s >= self.settings["freeze_max_s"] - 1e-9 and pid in by_pid:
                self._last_thaw_s[(pid, resource)] = state.now_s
                return self._action(
                    ActionKind.THAW,
                    by_pid[pid],
                    resource,
                    "freeze-limit",
                    detail=f"frozen {held_s:.1f} s: freezes are time-bounded",
                )
        return None

    def _recover_step(self, state: State, resource: Resource) -> Action | None:
        """Lift one throttle or freeze once usage has stayed low for ``recover_hold_s``."""
        track = self._tracks[resource]
        hold_s = self.settings["recover_hold_s"]
        if track.below_since_s is None or state.now_s - track.below_since_s < hold_s - 1e-9:
            return None
        by_pid = {p.pid: p for p in state.processes}
        for kind in (ActionKind.FREEZE, ActionKind.THROTTLE):
            for pid, (since_s, _) in sorted(self._in_force(state, kind, resource).items()):
                if pid not in by_pid or state.now_s - since_s < hold_s - 1e-9:
                    continue
                low_s = state.now_s - track.below_since_s
                return self._action(
                    _UNDO[kind],
                    by_pid[pid],
                    resource,
                    "recovered",
                    detail=f"{resource.value} below soft minus "
                    f"{self.settings['recover_margin']:.0%} for {low_s:.1f} s",
                )
        return None

    # ---------------------------------------------------------------- GPU power limits

    def _gpu_power_step(self, state: State) -> list[Action]:
        """Lower GPU power limits while power is over its limit; lift them once it has
        recovered. Runs after ``_decide_resource(POWER)``, whose timers it reads."""
        s = self.settings
        held = self._gpus_in_force(state)
        if not state.gpus and not held:
            return []
        usage = state.usage.get(Resource.POWER)
        limit = state.limits.get(Resource.POWER)
        if usage is None:
            return []
        track = self._tracks[Resource.POWER]
        soft = None if limit is None else (limit.soft if limit.soft is not None else limit.hard)
        if limit is not None and soft is not None:
            at_hard = limit.hard is not None and usage >= limit.hard
            reason = "hard" if at_hard else self._soft_trigger(state, Resource.POWER, usage, limit)
            if reason:
                spacing_s = state.interval_s if at_hard else s["thermal_hold_s"]
                if state.now_s - self._gpu_last_step_s < spacing_s - 1e-9:
                    return []
                actions = self._gpu_lower(state, usage, soft, reason, held)
                if actions:
                    self._gpu_last_step_s = state.now_s
                return actions
        hold_s = s["recover_hold_s"]
        if track.below_since_s is None or state.now_s - track.below_since_s < hold_s - 1e-9:
            return []
        low_s = state.now_s - track.below_since_s
        return [
            self._gpu_action(
                ActionKind.UNTHROTTLE,
                uuid,
                "recovered",
                detail=f"power below soft minus {s['recover_margin']:.0%} for {low_s:.1f} s: "
                "original limit back",
            )
            for uuid, (since_s, _) in sorted(held.items())
            if state.now_s - since_s >= hold_s - 1e-9
        ]

    def _gpu_lower(
        self,
        state: State,
        usage: float,
        soft: float,
        reason: str,
        held: Mapping[str, tuple[float, float | None]],
    ) -> list[Action]:
        """The GPUs' share of the overshoot, split by draw (see the module docstring)."""
        s = self.settings
        drawing = [g for g in state.gpus if g.power_w is not None and g.power_w > 0]
        gpu_draw_w = sum(g.power_w or 0.0 for g in drawing)
        overshoot_w = max(0.0, usage - soft * (1.0 - s["throttle_cushion"]))
        if gpu_draw_w <= 0 or overshoot_w <= 0 or usage <= 0:
            return []
        gpu_cut_w = overshoot_w * min(1.0, gpu_draw_w / usage)
        actions = []
        for gpu in drawing:
            assert gpu.power_w is not None
            current_w = self._gpu_current_w(gpu, held)
            cut_w = gpu_cut_w * gpu.power_w / gpu_draw_w
            target_w = max(gpu.min_limit_w, min(current_w, gpu.power_w) - cut_w)
            if target_w > current_w - s["gpu_deadband_w"]:
                continue  # at its minimum already, or too small a change to write
            actions.append(
                self._gpu_action(
                    ActionKind.THROTTLE,
                    gpu.uuid,
                    reason,
                    target=target_w,
                    detail=f"power {usage:.1f} W vs soft {soft:.1f} W; GPU draws "
                    f"{gpu.power_w:.1f} W: limit {current_w:.0f} -> {target_w:.0f} W "
                    f"(takes {cut_w:.1f} W of {overshoot_w:.1f} W over; min "
                    f"{gpu.min_limit_w:.0f} W)",
                )
            )
        return actions

    @staticmethod
    def _gpu_current_w(gpu: GpuView, held: Mapping[str, tuple[float, float | None]]) -> float:
        """The limit in force: what edged set, else the GPU's reading, else its maximum."""
        target = held.get(gpu.uuid, (0.0, None))[1]
        if target is not None:
            return target
        return gpu.limit_w if gpu.limit_w is not None else gpu.max_limit_w

    def _gpus_in_force(self, state: State) -> dict[str, tuple[float, float | None]]:
        """uuid -> (since_s, target W) of the GPU limits in force: ``state.imposed`` corrected
        by what this strategy sent and the enforcer has not reported yet."""
        out: dict[str, tuple[float, float | None]] = {}
        reported: set[str] = set()
        for imposed in state.imposed:
            if imposed.gpu is not None and imposed.kind is ActionKind.THROTTLE:
                out[imposed.gpu] = (imposed.since_s, imposed.target)
                reported.add(imposed.gpu)
        ttl_s = max(3 * state.interval_s, 1.0)
        kept = {}
        for uuid, (sent, sent_s, target) in self._gpu_sent.items():
            done = (uuid in reported) == (sent is ActionKind.THROTTLE)
            if done and sent is ActionKind.THROTTLE:
                done = out[uuid][1] == target
            if done or state.now_s - sent_s >= ttl_s:
                continue
            kept[uuid] = (sent, sent_s, target)
            if sent is ActionKind.THROTTLE:
                out[uuid] = (out[uuid][0] if uuid in out else sent_s, target)
            else:
                out.pop(uuid, None)
        self._gpu_sent = kept
        return out

    def _gpu_action(
        self,
        kind: ActionKind,
        uuid: str,
        reason: str,
        *,
        target: float | None = None,
        detail: str = "",
    ) -> Action:
        self._gpu_sent[uuid] = (kind, self._now_s, target)
        return Action(
            kind=kind,
            pid=0,
            resource=Resource.POWER,
            reason=reason,
            strategy=self.name,
            klass=ProcessClass.NORMAL,
            target=target,
            detail=detail,
            gpu=uuid,
        )

    # ---------------------------------------------------------------- bookkeeping

    def _hold_s(self, resource: Resource) -> float:
        if resource is Resource.CPU:
            return self.settings["cpu_hold_s"]
        if resource in _THERMAL:
            return self.settings["thermal_hold_s"]
        return self.settings["hold_s"]

    def _in_force(
        self, state: State, kind: ActionKind, resource: Resource | None
    ) -> dict[int, tuple[float, float | None]]:
        """pid -> (since_s, target) of the ``kind`` (THROTTLE/FREEZE) in force for ``resource``
        (any resource when None): ``state.imposed`` corrected by what this strategy sent since
        the enforcer last reported."""
        out: dict[int, tuple[float, float | None]] = {}
        for imposed in state.imposed:
            if imposed.gpu is not None:
                continue  # GPU limits: see _gpus_in_force
            if imposed.kind is kind and (resource is None or imposed.resource is resource):
                out[imposed.pid] = (imposed.since_s, imposed.target)
        for (family, pid, res), (sent, sent_s, target) in self._sent.items():
            if family is not kind or (resource is not None and res is not resource):
                continue
            if sent is kind:
                since_s = out[pid][0] if pid in out else sent_s
                out[pid] = (since_s, target)
            else:
                out.pop(pid, None)
        return out

    def _expire_sent(self, state: State) -> None:
        """Forget sent actions once the enforcer has had time to report them in ``imposed``."""
        ttl_s = max(3 * state.interval_s, 1.0)
        imposed: set[tuple[ActionKind, int, Resource]] = {
            (i.kind, i.pid, i.resource) for i in state.imposed if i.gpu is None
        }
        kept = {}
        for key, (sent, sent_s, target) in self._sent.items():
            family, pid, res = key
            reported = (family, pid, res) in imposed
            done = reported if sent is family else not reported
            if not done and state.now_s - sent_s < ttl_s:
                kept[key] = (sent, sent_s, target)
        self._sent = kept

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
        if kind in _FAMILY:
            self._sent[(_FAMILY[kind], process.pid, resource)] = (kind, self._now_s, target)
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


def apply_to_imposed(
    actions: list[Action], now_s: float, imposed: tuple[Imposed, ...]
) -> tuple[Imposed, ...]:
    """What an obedient enforcer would report in ``State.imposed`` after applying ``actions``
    at ``now_s``: for trace replays (tests, bench) that close the loop without an enforcer."""
    current = {(i.kind, i.pid, i.resource, i.gpu): i for i in imposed}
    for action in actions:
        if action.kind in (ActionKind.THROTTLE, ActionKind.FREEZE):
            key = (action.kind, action.pid, action.resource, action.gpu)
            old = current.get(key)
            since_s = old.since_s if old is not None else now_s
            current[key] = Imposed(
                action.kind, action.pid, action.resource, since_s, action.target, action.gpu
            )
        elif action.kind in (ActionKind.UNTHROTTLE, ActionKind.THAW):
            family = _FAMILY[action.kind]
            current.pop((family, action.pid, action.resource, action.gpu), None)
    return tuple(current.values())
