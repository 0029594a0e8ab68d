"""Holt's linear trend (double exponential smoothing) on irregular time steps.

Why Holt: a leak or a load ramp is a level plus a slope; the slope is what tells how long is left
before a limit. Holt keeps both, costs two floats per series, and needs no window buffer.

Time-aware formulation. The textbook method assumes a fixed step; edged's ticks are irregular
(the tick adapts under pressure, a tick can be late). Each smoothing weight is derived from a
time constant instead of a per-step factor::

    a = 1 - exp(-dt / level_tau_s)        # level weight for a step of dt seconds
    g = 1 - exp(-dt / trend_tau_s)        # trend weight

    predicted = level + trend * dt        # where the old line says we are now
    level'    = predicted + a * (y - predicted)
    trend'    = trend + g * ((level' - level) / dt - trend)

This is the same as using a per-second factor ``alpha`` with ``1 - (1 - alpha) ** dt`` where
``alpha = 1 - exp(-1 / tau)``: two steps of dt/2 weigh the same as one step of dt, so the
result does not depend on the tick rate. ``trend`` is in units per second.

Properties the tests hold it to: a constant series has trend 0 (exactly, once started); a linear
ramp is a fixed point (level = y, trend = slope), and errors decay towards it, so the trend
converges to the slope; bounded noise gives a bounded trend.

Start-up: the first sample sets the level with trend 0; the second sets the trend to the
observed slope (the usual Holt initialisation), so a ramp under way when edged starts is seen
after two ticks rather than after several trend time constants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Holt:
    """One series' smoothed level and trend. Feed it with :meth:`update`."""

    level_tau_s: float = 0.3
    trend_tau_s: float = 0.6
    level: float = math.nan
    trend_per_s: float = 0.0
    last_s: float = math.nan
    samples: int = 0

    def __post_init__(self) -> None:
        if not (self.level_tau_s > 0 and self.trend_tau_s > 0):
            raise ValueError("level_tau_s and trend_tau_s must be positive")

    def update(self, now_s: float, value: float) -> None:
        """Take one observation at ``now_s``. Out-of-order or repeated times are ignored."""
        if self.samples == 0:
            self.level, self.trend_per_s, self.last_s, self.samples = value, 0.0, now_s, 1
            return
        dt_s = now_s - self.last_s
        if not dt_s > 0:
            return
        if self.samples == 1:
            self.trend_per_s = (value - self.level) / dt_s
            self.level, self.last_s, self.samples = value, now_s, 2
            return
        a = 1.0 - math.exp(-dt_s / self.level_tau_s)
        g = 1.0 - math.exp(-dt_s / self.trend_tau_s)
        predicted = self.level + self.trend_per_s * dt_s
        level = predicted + a * (value - predicted)
        self.trend_per_s += g * ((level - self.level) / dt_s - self.trend_per_s)
        self.level, self.last_s = level, now_s
        self.samples += 1

    @property
    def ready(self) -> bool:
        """True once a trend exists (two samples)."""
        return self.samples >= 2

    def time_to(self, limit: float) -> float:
        """Seconds until the smoothed line reaches ``limit`` (inf when not ready)."""
        if not self.ready:
            return math.inf
        return time_to_limit_s(self.level, self.trend_per_s, limit)


def time_to_limit_s(level: float, trend_per_s: float, limit: float) -> float:
    """Seconds until ``level`` growing by ``trend_per_s`` reaches ``limit``.

    0 when already at or above it; inf when the trend is flat or falling (it never gets there).
    """
    if level >= limit:
        return 0.0
    if not trend_per_s > 0:
        return math.inf
    return (limit - level) / trend_per_s
