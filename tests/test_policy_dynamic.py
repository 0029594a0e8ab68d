"""The dynamic strategy: soft/hard levels, the ladder, hysteresis, no flapping."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edged.policy.base import (
    Action,
    ActionKind,
    Imposed,
    Limit,
    ProcessClass,
    ProcessView,
    Resource,
)
from edged.policy.dynamic import DYNAMIC_DEFAULTS, DynamicStrategy, apply_to_imposed
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


def _drive(
    strategy: DynamicStrategy,
    usages: list[float],
    processes: list[ProcessView],
    *,
    resource: Resource = Resource.MEMORY,
    limit: Limit | None = None,
    interval_s: float = 0.1,
) -> list[tuple[float, Action]]:
    """Open-loop usage series for one resource; imposed follows the actions (obedient)."""
    limit = limit or Limit(Resource.MEMORY, SOFT_BYTES, HARD_BYTES)
    imposed: tuple[Imposed, ...] = ()
    log: list[tuple[float, Action]] = []
    for i, usage in enumerate(usages):
        now_s = i * interval_s
        state = make_state(
            now_s,
            {resource: usage},
            processes,
            {resource: limit},
            imposed=imposed,
            interval_s=interval_s,
        )
        actions = strategy.decide(state)
        imposed = apply_to_imposed(actions, now_s, imposed)
        log.extend((now_s, a) for a in actions)
    return log


def test_calm_trace_no_action() -> None:
    strategy = DynamicStrategy({})
    usages = [SOFT_BYTES * (0.5 + 0.4 * math.sin(i / 7)) for i in range(600)]
    assert _drive(strategy, usages, [proc(10, 1 * GIB)]) == []


def test_hard_terminates_top_victim_then_kills_after_grace() -> None:
    """The leak is picked over the big steady service, once; it stops growing past hard but
    ignores SIGTERM, so SIGKILL follows at +grace."""
    service = SimProcess(proc(100, 2 * GIB, name="service"), steady(2 * GIB))
    leaking = ramp(1.0, 64 * MIB, 400 * MIB)
    leak = SimProcess(
        proc(200, 64 * MIB, name="leak"),
        # plateaus 20 MiB past hard (3.8 GiB in all): under term_growth_bytes after SIGTERM
        lambda t: min(leaking(t), 1.3 * GIB + 20 * MIB),
        ignores_sigterm=True,
    )
    replay = Replay(DynamicStrategy({"hold_s": 30}), [service, leak], baseline_bytes=0.5 * GIB)
    log = replay.run(12.0)
    assert kinds(log)[:2] == [K.TERMINATE, K.KILL]
    (t_term, term), (t_kill, kill) = log[0], log[1]
    assert term.pid == kill.pid == 200
    assert term.reason == "hard"
    assert term.start_ticks == 1200
    assert t_kill - t_term == pytest.approx(DYNAMIC_DEFAULTS["grace_s"])
    assert "still running" in kill.detail
    assert all(a.pid != 100 for _, a in log)  # the steady service is never touched
    assert not leak.alive
    assert service.alive


def test_a_victim_still_growing_after_sigterm_is_killed_without_waiting_the_grace() -> None:
    """A process shutting down does not keep allocating: one that grows by
    ``term_growth_bytes`` after its SIGTERM ignored it, and the margin left before the kernel
    OOM killer is worth more than the rest of the grace period."""
    service = SimProcess(proc(100, 2 * GIB, name="service"), steady(2 * GIB))
    leak = SimProcess(
        proc(200, 64 * MIB, name="leak"), ramp(1.0, 64 * MIB, 400 * MIB), ignores_sigterm=True
    )
    replay = Replay(DynamicStrategy({"hold_s": 30}), [service, leak], baseline_bytes=0.5 * GIB)
    log = replay.run(12.0)
    assert kinds(log)[:2] == [K.TERMINATE, K.KILL]
    (t_term, term), (t_kill, kill) = log[0], log[1]
    assert term.pid == kill.pid == 200
    # 400 MiB/s at 0.1 s ticks: 32 MiB of growth is seen on the first tick after SIGTERM
    assert t_kill - t_term == pytest.approx(0.1)
    assert "after SIGTERM: it is ignoring it" in kill.detail
    assert not leak.alive
    assert service.alive


def test_hard_one_termination_at_a_time() -> None:
    """Held above hard with everyone ignoring SIGTERM: never two terminations in flight."""
    strategy = DynamicStrategy({})
    processes = [proc(pid, 1 * GIB) for pid in range(2, 7)]
    log = _drive(strategy, [HARD_BYTES * 1.01] * 30, processes)  # 3 s
    assert kinds(log) == [K.TERMINATE, K.KILL]  # the grace wait is 2 s; kill is once


def test_frozen_victim_at_hard_is_killed() -> None:
    strategy = DynamicStrategy({})
    victim = proc(7, 1 * GIB)
    imposed = (Imposed(K.FREEZE, 7, Resource.MEMORY, 0.0),)
    state = make_state(1.0, {Resource.MEMORY: HARD_BYTES + 1}, [victim], imposed=imposed)
    (action,) = strategy.decide(state)
    assert action.kind is K.KILL
    assert "frozen" in action.detail


def test_soft_ladder_throttle_freeze_thaw() -> None:
    strategy = DynamicStrategy({})
    victim = proc(9, 1 * GIB)
    over = 100 * MIB
    log = _drive(strategy, [SOFT_BYTES + over] * 200, [victim])  # 20 s above soft
    (t0, throttle), (t1, freeze), (t2, thaw), *rest = log
    assert throttle.kind is K.THROTTLE
    assert t0 == pytest.approx(DYNAMIC_DEFAULTS["hold_s"])
    cushion = DYNAMIC_DEFAULTS["throttle_cushion"] * SOFT_BYTES
    assert throttle.target == pytest.approx(1 * GIB - over - cushion)
    assert throttle.reason == "soft"
    assert freeze.kind is K.FREEZE
    assert t1 - t0 == pytest.approx(DYNAMIC_DEFAULTS["freeze_after_s"])
    assert thaw.kind is K.THAW
    assert thaw.reason == "freeze-limit"
    assert t2 - t1 == pytest.approx(DYNAMIC_DEFAULTS["freeze_max_s"])
    # still above soft freeze_after_s after the thaw: throttle and freeze did not help, so the
    # ladder goes on to SIGTERM (soft eviction), and SIGKILL after the grace
    assert [a.kind for _, a in rest] == [K.TERMINATE, K.KILL]
    assert rest[0][0] - t2 == pytest.approx(DYNAMIC_DEFAULTS["freeze_after_s"])
    assert rest[0][1].reason == rest[1][1].reason == "soft"  # the re-check judges both on soft
    assert "still above after its thaw" in rest[0][1].detail
    assert rest[1][0] - rest[0][0] == pytest.approx(DYNAMIC_DEFAULTS["grace_s"])


def test_soft_ladder_stays_on_its_victim_while_it_is_frozen() -> None:
    """Above soft with the top victim frozen, a second (steady) process is not throttled: the
    frozen one's memory does not come back by squeezing someone else. The ladder goes on with
    the frozen one instead (thaw, then SIGTERM)."""
    strategy = DynamicStrategy({})
    log = _drive(strategy, [SOFT_BYTES + 100 * MIB] * 200, [proc(9, 1 * GIB), proc(10, 512 * MIB)])
    assert [(a.kind, a.pid) for _, a in log] == [
        (K.THROTTLE, 9),
        (K.FREEZE, 9),
        (K.THAW, 9),
        (K.TERMINATE, 9),
        (K.KILL, 9),
    ]


def test_gpu_memory_at_hard_ends_the_largest_gpu_holder_not_the_largest_process() -> None:
    """GPU memory is judged on NVML's per-process figure: the big host process that holds no
    GPU memory is not the victim; nothing happens below hard (no soft ladder: a throttle or a
    freeze gives no GPU memory back)."""
    strategy = DynamicStrategy({})
    limit = Limit(Resource.GPU_MEMORY, 60 * GIB, 70 * GIB)
    host_hog = proc(10, 8 * GIB)  # no GPU memory
    trainer = proc(11, 2 * GIB, gpu_memory_bytes=50 * GIB)
    viewer = proc(12, 1 * GIB, gpu_memory_bytes=15 * GIB)
    processes = [host_hog, trainer, viewer]
    calm = _drive(strategy, [65 * GIB] * 50, processes, resource=Resource.GPU_MEMORY, limit=limit)
    assert calm == []  # above soft, below hard: no action
    log = _drive(
        DynamicStrategy({}), [72 * GIB] * 30, processes, resource=Resource.GPU_MEMORY, limit=limit
    )
    assert [(a.kind, a.pid) for _, a in log] == [(K.TERMINATE, 11), (K.KILL, 11)]
    assert log[0][1].reason == "hard"


def test_cpu_soft_ladder_cycles_freezes_and_never_terminates() -> None:
    """A CPU hog held by quota and freezes does no harm: no SIGTERM for CPU."""
    strategy = DynamicStrategy({})
    limit = Limit(Resource.CPU, 2.0, 4.0)
    log = _drive(
        strategy, [3.0] * 400, [proc(9, cpu_cores=3.0)], resource=Resource.CPU, limit=limit
    )
    assert K.FREEZE in kinds(log)
    assert K.TERMINATE not in kinds(log)
    assert K.KILL not in kinds(log)


def test_soft_not_before_hold() -> None:
    strategy = DynamicStrategy({"hold_s": "2s"})
    usages = ([SOFT_BYTES + MIB] * 15 + [SOFT_BYTES - MIB]) * 10  # 1.5 s above, one tick below
    assert _drive(strategy, usages, [proc(9, 1 * GIB)]) == []


def test_throttle_floor() -> None:
    strategy = DynamicStrategy({})
    log = _drive(strategy, [SOFT_BYTES + 150 * MIB] * 20, [proc(9, 100 * MIB)])
    assert log[0][1].target == DYNAMIC_DEFAULTS["min_throttle_bytes"]


def test_recovery_after_hold_below_margin() -> None:
    strategy = DynamicStrategy({})
    above = [SOFT_BYTES + 10 * MIB] * 15  # throttled at 1.0 s
    band = [SOFT_BYTES * 0.97] * 150  # inside the hysteresis band: nothing lifted
    low = [SOFT_BYTES * 0.90] * 150  # below soft - 5 %: lifted after 10 s
    log = _drive(strategy, above + band + low, [proc(9, 1 * GIB)])
    assert kinds(log) == [K.THROTTLE, K.UNTHROTTLE]
    t_low_start = (len(above) + len(band)) * 0.1
    assert log[1][0] == pytest.approx(t_low_start + DYNAMIC_DEFAULTS["recover_hold_s"])
    assert log[1][1].reason == "recovered"


def _toggles(log: list[tuple[float, Action]], pid: int) -> list[tuple[float, ActionKind]]:
    pairs = {K.THROTTLE, K.UNTHROTTLE, K.FREEZE, K.THAW}
    return [(t, a.kind) for t, a in log if a.pid == pid and a.kind in pairs]


@settings(max_examples=25, deadline=None)
@given(
    period_s=st.floats(0.4, 30.0),
    amplitude=st.floats(0.01, 0.15),
    phase=st.floats(0, 2 * math.pi),
)
def test_no_flapping_around_soft(period_s: float, amplitude: float, phase: float) -> None:
    """Oscillation around soft: throttle and unthrottle never alternate faster than the holds."""
    strategy = DynamicStrategy({"freeze_after_s": 1e6})  # look at the throttle loop alone
    usages = [
        SOFT_BYTES * (1 + amplitude * math.sin(2 * math.pi * i * 0.1 / period_s + phase))
        for i in range(1200)
    ]
    log = _drive(strategy, usages, [proc(9, 1 * GIB)])
    toggles = _toggles(log, 9)
    for (t_a, k_a), (t_b, k_b) in itertools.pairwise(toggles):
        if k_a is K.THROTTLE and k_b is K.UNTHROTTLE:
            assert t_b - t_a >= DYNAMIC_DEFAULTS["recover_hold_s"] - 1e-6
        if k_a is K.UNTHROTTLE and k_b is K.THROTTLE:
            assert t_b - t_a >= DYNAMIC_DEFAULTS["hold_s"] - 1e-6
    # 120 s of input: at most one throttle per (hold + recover hold)
    assert len(toggles) <= 2 * 120 / (DYNAMIC_DEFAULTS["recover_hold_s"]) + 1


def test_cpu_throttles_top_consumer_after_cpu_hold() -> None:
    strategy = DynamicStrategy({})
    limit = Limit(Resource.CPU, 3.0, 3.8)
    processes = [proc(2, cpu_cores=0.5), proc(3, cpu_cores=2.5), proc(4, cpu_cores=0.2)]
    log = _drive(strategy, [3.4] * 60, processes, resource=Resource.CPU, limit=limit)
    (t, action), *_ = log
    assert t == pytest.approx(DYNAMIC_DEFAULTS["cpu_hold_s"])
    assert (action.kind, action.pid, action.resource) == (K.THROTTLE, 3, Resource.CPU)
    assert action.target == pytest.approx(2.5 - (3.4 - 3.0 * 0.98))  # to 2 % under soft


def test_cpu_at_hard_throttles_at_once_with_min_cores() -> None:
    strategy = DynamicStrategy({"min_cores": 0.25})
    limit = Limit(Resource.CPU, 3.0, 3.5)
    log = _drive(strategy, [3.9], [proc(3, cpu_cores=0.5)], resource=Resource.CPU, limit=limit)
    assert [(a.kind, a.reason, a.target) for _, a in log] == [(K.THROTTLE, "hard", 0.25)]


def test_temperature_throttles_then_tightens() -> None:
    strategy = DynamicStrategy({})
    limit = Limit(Resource.TEMPERATURE, 80.0, 95.0)
    processes = [proc(2, cpu_cores=3.2), proc(3, cpu_cores=0.4)]
    log = _drive(strategy, [85.0] * 100, processes, resource=Resource.TEMPERATURE, limit=limit)
    throttles = [(t, a) for t, a in log if a.kind is K.THROTTLE]
    assert throttles[0][1].pid == 2
    assert throttles[0][1].resource is Resource.TEMPERATURE
    assert throttles[0][1].target == pytest.approx(1.6)
    assert throttles[1][1].target == pytest.approx(0.8)
    assert throttles[1][0] - throttles[0][0] == pytest.approx(DYNAMIC_DEFAULTS["thermal_hold_s"])


def test_lifts_when_limit_removed() -> None:
    strategy = DynamicStrategy({})
    imposed: tuple[Imposed, ...] = (Imposed(K.THROTTLE, 9, Resource.MEMORY, 0.0, 1 * GIB),)
    lifted = []
    for i in range(120):
        state = make_state(i * 0.1, {Resource.MEMORY: 3 * GIB}, [proc(9)], {}, imposed=imposed)
        actions = strategy.decide(state)
        imposed = apply_to_imposed(actions, i * 0.1, imposed)
        lifted += actions
    assert [a.kind for a in lifted] == [K.UNTHROTTLE]


def test_resends_a_lift_the_enforcer_did_not_report() -> None:
    """``imposed`` is the truth: a lift that never shows up is sent again, not forgotten."""
    strategy = DynamicStrategy({})
    imposed = (Imposed(K.THROTTLE, 9, Resource.MEMORY, 0.0, 1 * GIB),)
    lifted = []
    for i in range(120):
        state = make_state(i * 0.1, {Resource.MEMORY: 3 * GIB}, [proc(9)], {}, imposed=imposed)
        lifted += strategy.decide(state)
    times = [a.kind for a in lifted]
    assert 1 < len(times) <= 3  # once per second at most (the wait for the report)


def test_unknown_setting_names_the_key() -> None:
    with pytest.raises(ValueError, match="hold_seconds"):
        DynamicStrategy({"hold_seconds": 3})
    with pytest.raises(ValueError, match="grace_s"):
        DynamicStrategy({"grace_s": "soon"})
    with pytest.raises(ValueError, match="hold_s"):
        DynamicStrategy({"hold_s": -1})
    assert DynamicStrategy({"min_throttle_bytes": "128MiB"}).settings[
        "min_throttle_bytes"
    ] == pytest.approx(128 * MIB)


_klass = st.sampled_from(list(ProcessClass))


@st.composite
def _machine(draw: st.DrawFn) -> list[ProcessView]:
    pids = draw(st.lists(st.integers(1, 30), min_size=1, max_size=8, unique=True))
    return [
        proc(
            pid,
            draw(st.floats(0, 2 * GIB)),
            draw(st.floats(0, 4)),
            draw(_klass),
            protected=draw(st.booleans()),
        )
        for pid in pids
    ]


@settings(max_examples=40, deadline=None)
@given(
    processes=_machine(),
    memory=st.lists(st.floats(0, 1.2), min_size=5, max_size=60),
    cpu=st.floats(0, 1.2),
    temperature=st.floats(40, 110),
)
def test_actions_are_well_formed(
    processes: list[ProcessView], memory: list[float], cpu: float, temperature: float
) -> None:
    """Whatever the input: one action per resource per tick, never a critical, protected or
    pid-1 victim, every action labelled."""
    strategy = DynamicStrategy({"hold_s": 0.2, "cpu_hold_s": 0.2, "thermal_hold_s": 0.2})
    limits = {
        Resource.MEMORY: Limit(Resource.MEMORY, SOFT_BYTES, HARD_BYTES),
        Resource.CPU: Limit(Resource.CPU, 3.0, 3.8),
        Resource.TEMPERATURE: Limit(Resource.TEMPERATURE, 80.0, 95.0),
    }
    imposed: tuple[Imposed, ...] = ()
    by_pid = {p.pid: p for p in processes}
    for i, fraction in enumerate(memory):
        usage = {
            Resource.MEMORY: fraction * 4 * GIB,
            Resource.CPU: cpu * 4,
            Resource.TEMPERATURE: temperature,
        }
        actions = strategy.decide(make_state(i * 0.5, usage, processes, limits, imposed=imposed))
        imposed = apply_to_imposed(actions, i * 0.5, imposed)
        assert len({a.resource for a in actions}) == len(actions)
        for action in actions:
            target = by_pid[action.pid]
            assert action.pid != 1
            assert not target.protected
            assert target.klass is not ProcessClass.CRITICAL
            assert action.klass is target.klass
            assert action.start_ticks == target.start_ticks
            assert action.strategy == "dynamic"
            assert action.reason
            assert action.detail
