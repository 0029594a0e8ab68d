"""The ``predictive`` strategy: act before the crossing, not after it.

It is :class:`~edged.policy.dynamic.DynamicStrategy` (same ladder, same hysteresis, same hard-level
behaviour: at or above hard it *is* dynamic) with one more trigger for the soft-level ladder:

    the machine-level Holt forecast of a resource reaches its hard level within
    ``horizon_s = state.reaction_time_s + state.interval_s + margin_s``

i.e. within the time an action needs to take effect plus one tick (DESIGN section 4). When it
does, the top victim is throttled at once (reason ``forecast``, no hold time), then frozen
``freeze_after_s`` later if the forecast (or the soft level) still says so, and the hard level
terminates as in dynamic if the ramp gets there anyway.

A benign transient must not trigger it. Two things keep it calm: the trend is smoothed over
``trend_tau_s`` (a spike that rises and falls inside a fraction of a second carries little
trend), and the condition must hold on ``confirm_ticks`` consecutive ticks (a one-tick outlier
never acts). The horizon is widened by the ticks spent confirming, so confirmation does not eat
into the time to act.

Forecast triggers apply to memory, temperature and power. CPU load is bursty by nature and
reaching the CPU hard level harms nothing by itself, so CPU is left to the dynamic rules.

Per process, a Holt trend of memory replaces dynamic's growth estimate in victim ranking: the
process whose forecast rises fastest (the leak) is the one held.

Defaults (in addition to dynamic's):

================== ====== ==================================================================
``margin_s``       0.5 s  enforcement is not instant (memory.high reclaim, a signal's delivery
                          and handling); half a second covers the slow ones at edge scale
``level_tau_s``    0.2 s  two ticks at 0.1 s: follows a ramp closely, damps one-tick noise
``trend_tau_s``    0.3 s  the slope of a fresh 1 GiB/s ramp is seen within about 0.7 s (the
                          tests' fastest case), while a sub-second spike moves it only part way;
                          0.6 s halved the lead time on that ramp for no gain on the spikes
``confirm_ticks``  2      one tick of confirmation rejects single outliers for 0.1 s of delay
================== ====== ==================================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from edged.policy.base import Limit, Resource, State
from edged.policy.dynamic import DYNAMIC_DEFAULTS, DynamicStrategy
from edged.policy.forecast import Holt
from edged.policy.victims import ProcessKey, key_of

PREDICTIVE_DEFAULTS: Mapping[str, float] = {
    **DYNAMIC_DEFAULTS,
    "margin_s": 0.5,
    "level_tau_s": 0.2,
    "trend_tau_s": 0.3,
    "confirm_ticks": 2.0,
}

# resources whose forecast may trigger the ladder (see the module docstring for CPU)
FORECAST_TRIGGERED: tuple[Resource, ...] = (
    Resource.MEMORY,
    Resource.TEMPERATURE,
    Resource.POWER,
)


class PredictiveStrategy(DynamicStrategy):
    """Dynamic plus a forecast trigger. See the module docstring."""

    name = "predictive"
    defaults: Mapping[str, float] = PREDICTIVE_DEFAULTS

    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        super().__init__(settings)
        s = self.settings
        if s["level_tau_s"] <= 0 or s["trend_tau_s"] <= 0:
            raise ValueError("[strategy.predictive] level_tau_s and trend_tau_s must be positive")
        if s["confirm_ticks"] < 1 or s["confirm_ticks"] != int(s["confirm_ticks"]):
            raise ValueError("[strategy.predictive] confirm_ticks: must be a whole number >= 1")
        self._machine: dict[Resource, Holt] = {}
        self._processes: dict[ProcessKey, Holt] = {}
        self._confirmed_ticks: dict[Resource, int] = {}
        self._forecasts: dict[Resource, float] = {}
        self._horizon_s = math.inf

    def _new_holt(self) -> Holt:
        return Holt(self.settings["level_tau_s"], self.settings["trend_tau_s"])

    def horizon_s(self, state: State) -> float:
        """How far ahead a crossing must be seen to act in time (confirmation included)."""
        confirm_s = (self.settings["confirm_ticks"] - 1) * state.interval_s
        return state.reaction_time_s + state.interval_s + self.settings["margin_s"] + confirm_s

    def _observe(self, state: State) -> None:
        super()._observe(state)
        self._horizon_s = self.horizon_s(state)
        self._forecasts = {}
        for resource, usage in state.usage.items():
            holt = self._machine.get(resource)
            if holt is None:
                holt = self._machine[resource] = self._new_holt()
            holt.update(state.now_s, usage)
            limit = state.limits.get(resource)
            if limit is None or limit.hard is None:
                self._confirmed_ticks[resource] = 0
                continue
            ttl_s = holt.time_to(limit.hard)
            self._forecasts[resource] = ttl_s
            soon = ttl_s < self._horizon_s
            self._confirmed_ticks[resource] = (
                self._confirmed_ticks.get(resource, 0) + 1 if soon else 0
            )
        seen: dict[ProcessKey, Holt] = {}
        for process in state.processes:
            key = key_of(process)
            holt = self._processes.get(key) or self._new_holt()
            holt.update(state.now_s, process.memory_bytes)
            seen[key] = holt
        self._processes = seen

    def _growth_rates(self, resource: Resource) -> Mapping[ProcessKey, float] | None:
        if resource is not Resource.MEMORY:
            return None
        return {key: holt.trend_per_s for key, holt in self._processes.items() if holt.ready}

    def _soft_trigger(self, state: State, resource: Resource, usage: float, limit: Limit) -> str:
        reason = super()._soft_trigger(state, resource, usage, limit)
        if reason:
            return reason
        if resource not in FORECAST_TRIGGERED:
            return ""
        confirmed = self._confirmed_ticks.get(resource, 0) >= self.settings["confirm_ticks"]
        return "forecast" if confirmed else ""

    def forecasts(self) -> Mapping[Resource, float]:
        """Seconds until each resource's forecast reaches its hard level (inf: never), as of the
        last tick; for the ``edged.forecast.time_to_limit`` gauge."""
        return dict(self._forecasts)
