"""The predictive strategy: acts before the crossing on ramps, not on benign spikes."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edged.policy.base import ActionKind, Resource
from edged.policy.dynamic import DynamicStrategy
from edged.policy.predictive import PREDICTIVE_DEFAULTS, PredictiveStrategy
from tests.test_policy_support import (
    GIB,
    HARD_BYTES,
    MIB,
    SOFT_BYTES,
    Replay,
    SimProcess,
    kinds,
    make_state,
    proc,
    ramp,
    steady,
)

K = ActionKind
BASELINE_BYTES = 1 * GIB  # kernel, caches, everything not managed
SERVICE_BYTES = 1.5 * GIB  # a large steady service
LEAK_START_S = 2.0
LEAK_BYTES = 64 * MIB
RATES_BYTES_PER_S = {"50MiB/s": 50 * MIB, "200MiB/s": 200 * MIB, "1GiB/s": 1 * GIB}


def _machine(rate: float) -> tuple[list[SimProcess], float]:
    """A steady service beside a leak ramping at ``rate``; and when usage crosses hard (if
    nothing is done)."""
    processes = [
        SimProcess(proc(100, SERVICE_BYTES, name="service"), steady(SERVICE_BYTES)),
        SimProcess(
            proc(200, LEAK_BYTES, name="leak"),
            ramp(LEAK_START_S, LEAK_BYTES, rate),
            leak_bytes_per_s=rate,
            leak_start_s=LEAK_START_S,
        ),
    ]
    start = BASELINE_BYTES + SERVICE_BYTES + LEAK_BYTES
    crossing_s = LEAK_START_S + (HARD_BYTES - start) / rate
    return processes, crossing_s


@pytest.mark.parametrize("rate", RATES_BYTES_PER_S.values(), ids=RATES_BYTES_PER_S.keys())
def test_acts_before_the_crossing_on_a_ramp(rate: float) -> None:
    """Open loop (the ramp goes on whatever is done): the first action precedes the crossing,
    throttles the leak (not the bigger service), and comes at least the horizon ahead."""
    processes, crossing_s = _machine(rate)
    replay = Replay(PredictiveStrategy({}), processes, BASELINE_BYTES, obey=False)
    log = replay.run(crossing_s + 1.0)
    t_first, first = log[0]
    assert t_first < crossing_s
    assert (first.kind, first.pid) == (K.THROTTLE, 200)
    # acting when the forecast drops under the horizon leaves at least the horizon minus one
    # tick: the reaction time plus the margin. On the 1 GiB/s ramp the trend is still being
    # learnt (the ramp starts 1.2 s before the crossing), so the lead is shorter there.
    lead_s = crossing_s - t_first
    if rate <= 200 * MIB:
        assert lead_s >= 0.05 + PREDICTIVE_DEFAULTS["margin_s"] - 1e-9
    else:
        assert lead_s >= 0.4
    forecast = [(t, a) for t, a in log if a.reason == "forecast"]
    if rate >= 200 * MIB:  # slower ramps spend > hold_s above soft: the soft rule acts first
        assert forecast
        assert forecast[0][0] == t_first


def test_dynamic_alone_is_late_on_a_fast_ramp() -> None:
    """The reason predictive exists: at 1 GiB/s soft to hard takes 0.2 s, less than the soft
    hold, so dynamic's first action is a SIGTERM at the crossing."""
    processes, crossing_s = _machine(1 * GIB)
    log = Replay(DynamicStrategy({}), processes, BASELINE_BYTES, obey=False).run(crossing_s + 1)
    assert log[0][1].kind is K.TERMINATE
    assert log[0][0] >= crossing_s


@pytest.mark.parametrize("rate", RATES_BYTES_PER_S.values(), ids=RATES_BYTES_PER_S.keys())
def test_closed_loop_holds_the_leak_below_hard(rate: float) -> None:
    """With an obedient enforcer the throttle holds the leak below hard; nothing is terminated,
    the service is never touched. A leak released after recovery is caught again, no sooner
    than the hold times allow."""
    processes, crossing_s = _machine(rate)
    replay = Replay(PredictiveStrategy({}), processes, BASELINE_BYTES)
    log = replay.run(crossing_s + 30.0)
    assert log
    assert K.TERMINATE not in kinds(log)
    assert K.KILL not in kinds(log)
    assert max(usage for _, usage in replay.usage_log) < HARD_BYTES
    assert all(a.pid == 200 for _, a in log)
    toggles = [(t, a.kind) for t, a in log if a.kind in (K.THROTTLE, K.UNTHROTTLE)]
    for (t_a, k_a), (t_b, k_b) in itertools.pairwise(toggles):
        if (k_a, k_b) == (K.THROTTLE, K.UNTHROTTLE):
            assert t_b - t_a >= PREDICTIVE_DEFAULTS["recover_hold_s"]


def _spike(base: float, peak: float, rate: float, dwell_s: float) -> Callable[[float], float]:
    rise_s = (peak - base) / rate

    def demand(t: float) -> float:
        t -= 1.0
        if t <= 0:
            return base
        if t < rise_s:
            return base + rate * t
        if t < rise_s + dwell_s:
            return peak
        return max(base, peak - rate * (t - rise_s - dwell_s))

    return demand


@pytest.mark.parametrize(
    ("peak_gib", "rate", "dwell_s"),
    [(2.8, 1 * GIB, 0.0), (3.3, 200 * MIB, 0.5), (3.6, 50 * MIB, 0.3), (2.6, 4 * GIB, 0.2)],
)
def test_benign_spike_no_action(peak_gib: float, rate: float, dwell_s: float) -> None:
    """A spike that rises and falls below hard (and below soft for less than the hold) is left
    alone: the trend does not carry it to the limit within the horizon."""
    base = 0.5 * GIB
    processes = [
        SimProcess(
            proc(300, base, name="burst"), _spike(base, peak_gib * GIB - 1.5 * GIB, rate, dwell_s)
        )
    ]
    replay = Replay(PredictiveStrategy({}), processes, 1.5 * GIB, obey=False)
    assert replay.run(15.0) == []
    assert max(u for _, u in replay.usage_log) < SOFT_BYTES


@settings(max_examples=25, deadline=None)
@given(
    peak_gib=st.floats(2.0, 2.8),
    rate=st.floats(50 * MIB, 1 * GIB),
    dwell_s=st.floats(0.0, 2.0),
    noise_bytes=st.floats(0, 20 * MIB),
)
def test_benign_spikes_property(
    peak_gib: float, rate: float, dwell_s: float, noise_bytes: float
) -> None:
    """Any spike up to 2.8 GiB of a 4 GiB machine (hard 3.8 GiB) at up to 1 GiB/s, with
    jitter, leaves no action."""
    base = 0.5 * GIB
    shape = _spike(base, peak_gib * GIB - 1.5 * GIB, rate, dwell_s)

    def demand(t: float) -> float:
        return shape(t) + noise_bytes * math.sin(37.0 * t)

    replay = Replay(PredictiveStrategy({}), [SimProcess(proc(300), demand)], 1.5 * GIB)
    assert replay.run(8.0) == []


def test_single_tick_outlier_is_not_confirmed() -> None:
    """One reading just under hard, then back: needs confirm_ticks ticks of forecast, gets one."""
    strategy = PredictiveStrategy({})
    usages = [2 * GIB] * 20 + [HARD_BYTES - MIB] + [2 * GIB] * 30
    for i, usage in enumerate(usages):
        state = make_state(i * 0.1, {Resource.MEMORY: usage}, [proc(5, 1 * GIB)])
        assert strategy.decide(state) == []


def test_at_hard_falls_back_to_dynamic() -> None:
    strategy = PredictiveStrategy({})
    state = make_state(0.0, {Resource.MEMORY: HARD_BYTES + MIB}, [proc(5, 1 * GIB)])
    (action,) = strategy.decide(state)
    assert (action.kind, action.reason, action.strategy) == (K.TERMINATE, "hard", "predictive")


def test_forecasts_exposed() -> None:
    strategy = PredictiveStrategy({})
    assert strategy.forecasts() == {}
    for i in range(30):
        usage = 2 * GIB + i * 0.1 * 100 * MIB
        strategy.decide(make_state(i * 0.1, {Resource.MEMORY: usage, Resource.CPU: 1.0}))
    forecasts = strategy.forecasts()
    assert set(forecasts) == {Resource.MEMORY}  # CPU has no hard level here
    expected_s = (HARD_BYTES - (2 * GIB + 2.9 * 100 * MIB)) / (100 * MIB)
    assert forecasts[Resource.MEMORY] == pytest.approx(expected_s, rel=0.05)


def test_settings() -> None:
    with pytest.raises(ValueError, match="horizon_s"):
        PredictiveStrategy({"horizon_s": 1})
    with pytest.raises(ValueError, match="confirm_ticks"):
        PredictiveStrategy({"confirm_ticks": 0.5})
    assert PredictiveStrategy({"margin_s": "250ms", "hold_s": 2}).settings["margin_s"] == 0.25
