"""The adaptive strategy against simulated plants: a thermal mass and a memory-pressured box."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edged.policy.adaptive import ADAPTIVE_DEFAULTS, AdaptiveStrategy
from edged.policy.base import Action, ActionKind, Limit, ProcessClass, Resource
from tests.test_policy_support import GIB, MIB, make_state, proc

K = ActionKind
CORES = 8.0
AMBIENT_C = 40.0
SOFT_C = 80.0


def _thermal_run(
    c_per_core: float, tau_s: float, noise_c: float = 0.0, duration_s: float = 600.0
) -> tuple[list[float], list[tuple[float, Action]], AdaptiveStrategy]:
    """A thermal mass heated by the CPU time actually used: dT/dt = (T_ss - T) / tau with
    T_ss = ambient + c_per_core * cores. Two besteffort batch jobs and one normal service
    would use 7 cores, enough for ambient + 7 * c_per_core at full speed."""
    strategy = AdaptiveStrategy({})
    demand = {11: 3.0, 12: 2.5, 13: 1.5}
    klass = {11: ProcessClass.BESTEFFORT, 12: ProcessClass.BESTEFFORT, 13: ProcessClass.NORMAL}
    quota: dict[int, float] = {}
    temperature = AMBIENT_C
    temps: list[float] = []
    log: list[tuple[float, Action]] = []
    dt_s = 0.5
    limits = {Resource.TEMPERATURE: Limit(Resource.TEMPERATURE, SOFT_C, 95.0)}
    for i in range(int(duration_s / dt_s)):
        now_s = i * dt_s
        used = {pid: min(d, quota.get(pid, math.inf)) for pid, d in demand.items()}
        steady_c = AMBIENT_C + c_per_core * sum(used.values())
        temperature += (steady_c - temperature) * (1 - math.exp(-dt_s / tau_s))
        reading = temperature + noise_c * math.sin(1.7 * i)
        temps.append(temperature)
        processes = [proc(pid, cpu_cores=used[pid], klass=klass[pid]) for pid in demand]
        state = make_state(
            now_s,
            {Resource.TEMPERATURE: reading, Resource.CPU: sum(used.values())},
            processes,
            limits,
            interval_s=dt_s,
            capacity={Resource.CPU: CORES, Resource.MEMORY: 4 * GIB},
        )
        for action in strategy.decide(state):
            log.append((now_s, action))
            if action.kind is K.THROTTLE:
                assert action.target is not None
                quota[action.pid] = action.target
            elif action.kind is K.UNTHROTTLE:
                quota.pop(action.pid, None)
    return temps, log, strategy


@pytest.mark.parametrize(
    ("c_per_core", "tau_s"), [(8.0, 20.0), (6.5, 10.0), (10.0, 40.0), (8.0, 5.0)]
)
def test_pi_holds_temperature_under_soft(c_per_core: float, tau_s: float) -> None:
    """Unchecked the box would reach 40 + 7 * c °C (85..110 °C); the loop holds it just under
    soft, with bounded overshoot and no sustained oscillation."""
    temps, log, strategy = _thermal_run(c_per_core, tau_s)
    assert AMBIENT_C + 7 * c_per_core > SOFT_C + 4
    assert max(temps) <= SOFT_C + 2.0  # bounded overshoot
    tail = temps[-200:]  # the last 100 s
    assert max(tail) <= SOFT_C
    assert max(tail) - min(tail) <= 1.0  # settled, not oscillating
    assert min(tail) >= SOFT_C - ADAPTIVE_DEFAULTS["setpoint_margin_c"] - 1.5
    assert all(a.reason == "temperature" and a.resource is Resource.CPU for _, a in log)
    # besteffort is squeezed first: the normal service keeps (nearly) its 1.5 cores
    normal = [a.target for _, a in log if a.pid == 13 and a.kind is K.THROTTLE]
    assert all(t is not None and t >= 1.5 - ADAPTIVE_DEFAULTS["deadband_cores"] for t in normal)
    assert strategy.cpu_quota_cores < CORES


def test_pi_with_sensor_noise_does_not_chatter() -> None:
    temps, log, _ = _thermal_run(8.0, 20.0, noise_c=0.5)
    assert max(temps[-200:]) <= SOFT_C
    assert len(log) < 200  # the deadband keeps cpu.max writes well under one per tick


def test_pi_releases_when_cool() -> None:
    """Heat goes away (demand drops): quotas are lifted after the release hold, not before."""
    strategy = AdaptiveStrategy({})
    limits = {Resource.TEMPERATURE: Limit(Resource.TEMPERATURE, SOFT_C, 95.0)}
    hot = [proc(11, cpu_cores=6.0, klass=ProcessClass.BESTEFFORT)]
    log: list[tuple[float, Action]] = []
    for i in range(200):
        now_s = i * 0.5
        temperature = 90.0 if now_s < 20 else 50.0
        state = make_state(
            now_s,
            {Resource.TEMPERATURE: temperature},
            hot,
            limits,
            interval_s=0.5,
            capacity={Resource.CPU: CORES},
        )
        log += [(now_s, a) for a in strategy.decide(state)]
    assert log[0][1].kind is K.THROTTLE
    released = [t for t, a in log if a.kind is K.UNTHROTTLE]
    assert len(released) == 1
    assert released[0] >= 20 + ADAPTIVE_DEFAULTS["release_hold_s"]


def _memory_run(
    other_bytes: float, duration_s: float = 600.0
) -> tuple[list[float], list[float], list[tuple[float, Action]]]:
    """A 4 GiB box; a managed group wants 2 GiB; from t=30 s another workload holds
    ``other_bytes``. PSI rises with total usage past 3 GiB (reclaim starts), 0 below it."""
    strategy = AdaptiveStrategy({})
    target = math.inf
    want_bytes, knee_bytes, machine_bytes = 2 * GIB, 3 * GIB, 4 * GIB
    totals: list[float] = []
    targets: list[float] = []
    log: list[tuple[float, Action]] = []
    pressure = 0.0
    for i in range(int(duration_s)):
        now_s = float(i)
        group_bytes = min(want_bytes, target)
        total = group_bytes + (other_bytes if now_s >= 30 else 0.5 * GIB)
        # avg10-like smoothing of an instantaneous stall fraction
        stall = max(0.0, min(1.0, (total - knee_bytes) / (machine_bytes - knee_bytes)))
        pressure += (stall - pressure) * (1 - math.exp(-1.0 / 10.0))
        totals.append(total)
        state = make_state(
            now_s,
            {Resource.MEMORY: total},
            [proc(50, group_bytes, group="batch.slice", klass=ProcessClass.BESTEFFORT)],
            interval_s=1.0,
            pressure={Resource.MEMORY: pressure},
        )
        for action in strategy.decide(state):
            log.append((now_s, action))
            if action.kind is K.THROTTLE:
                assert action.target is not None
                target = action.target
            elif action.kind is K.UNTHROTTLE:
                target = math.inf
        targets.append(strategy.group_targets().get("batch.slice", math.inf))
    return totals, targets, log


def test_aimd_converges_to_the_pressure_knee() -> None:
    """With 1.5 GiB of other load, 3 GiB is where pressure starts: the group's limit settles
    into a sawtooth just under 1.5 GiB instead of its 2 GiB wish."""
    totals, targets, log = _memory_run(1.5 * GIB)
    assert all(math.isinf(t) for t in targets[:30])  # no pressure, no limit
    tail = targets[-300:]
    assert all(0.9 * GIB <= t <= 1.7 * GIB for t in tail)
    assert max(totals[-300:]) <= 3.25 * GIB
    assert sum(totals[-300:]) / 300 <= 3.05 * GIB
    cuts = [a for _, a in log if a.kind is K.THROTTLE and "cut" in a.detail]
    assert cuts
    assert all(a.reason == "pressure" and a.resource is Resource.MEMORY for _, a in log)
    # writes are deadbanded: one per 16 MiB of growth (2 s at 8 MiB/s), not one per tick
    assert len(log) < len(totals) / 2


def test_aimd_never_below_floor() -> None:
    """Pressure that no cut can relieve (3.5 GiB of other load): the limit stops at the floor."""
    _, targets, _ = _memory_run(3.5 * GIB)
    floor = ADAPTIVE_DEFAULTS["min_group_bytes"]
    assert min(targets) >= floor
    assert targets[-1] >= floor


def test_aimd_grows_back_and_lifts() -> None:
    strategy = AdaptiveStrategy({"grow_bytes_per_s": 256 * MIB, "cut_interval_s": 1})
    group = proc(50, 1 * GIB, group="g")
    actions: list[Action] = []
    for i in range(60):
        pressure = 0.5 if i < 2 else 0.0
        limit_now = strategy.group_targets().get("g", math.inf)
        used = min(1 * GIB + i * 64 * MIB, limit_now)
        state = make_state(
            float(i),
            {Resource.MEMORY: 2 * GIB},
            [proc(50, used, group="g")],
            pressure={Resource.MEMORY: pressure},
        )
        actions += strategy.decide(state)
    assert actions[0].kind is K.THROTTLE
    assert actions[-1].kind is K.UNTHROTTLE  # grew back to the ceiling: limit lifted
    assert group.group == "g"


@settings(max_examples=30, deadline=None)
@given(
    pressures=st.lists(st.floats(0, 1), min_size=5, max_size=40),
    klass=st.sampled_from(list(ProcessClass)),
    protected=st.booleans(),
    pid=st.integers(1, 5),
)
def test_never_acts_on_critical_protected_or_pid1(
    pressures: list[float], klass: ProcessClass, protected: bool, pid: int
) -> None:
    strategy = AdaptiveStrategy({})
    limits = {Resource.TEMPERATURE: Limit(Resource.TEMPERATURE, 70.0, 90.0)}
    for i, pressure in enumerate(pressures):
        p = proc(pid, 1 * GIB, 3.0, klass, group="g", protected=protected)
        state = make_state(
            float(i),
            {Resource.MEMORY: 3 * GIB, Resource.TEMPERATURE: 60 + 30 * pressure},
            [p],
            limits,
            pressure={Resource.MEMORY: pressure},
            capacity={Resource.CPU: 4.0, Resource.MEMORY: 4 * GIB},
        )
        for action in strategy.decide(state):
            assert action.pid != 1
            assert not protected
            assert klass is not ProcessClass.CRITICAL
            assert action.strategy == "adaptive"


def test_settings() -> None:
    with pytest.raises(ValueError, match="alpha"):
        AdaptiveStrategy({"alpha": 1})
    with pytest.raises(ValueError, match="beta"):
        AdaptiveStrategy({"beta": 1.5})
    assert AdaptiveStrategy({"grow_bytes_per_s": "16MiB"}).settings["grow_bytes_per_s"] == (
        16 * MIB
    )


def test_an_unmanaged_leak_at_hard_meets_the_safety_net() -> None:
    """AIMD only steers managed groups; a process outside any group that takes the machine to
    its hard level is terminated as dynamic would, and killed when it ignores that and grows."""
    strategy = AdaptiveStrategy({})
    limits = {Resource.MEMORY: Limit(Resource.MEMORY, 3.0 * GIB, 3.5 * GIB)}
    service = proc(100, 2 * GIB, name="service")
    log: list[tuple[float, Action]] = []
    for i in range(40):
        now_s = i * 0.1
        leak = proc(200, 64 * MIB + i * 40 * MIB, name="leak")  # 400 MiB/s
        used = 1.0 * GIB + service.memory_bytes + leak.memory_bytes
        state = make_state(now_s, {Resource.MEMORY: used}, [service, leak], limits)
        log.extend((now_s, a) for a in strategy.decide(state))
    assert [a.kind for _, a in log][:2] == [K.TERMINATE, K.KILL]
    assert all(a.pid == 200 and a.strategy == "adaptive" for _, a in log)
    # nothing below hard: the soft level is AIMD's, not the ladder's
    first_s = log[0][0]
    assert 1.0 * GIB + 2 * GIB + 64 * MIB + first_s / 0.1 * 40 * MIB >= 3.5 * GIB
