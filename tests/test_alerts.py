"""The alert tracker and its place in the controller: lifecycles on an injected clock.

Usage, limits and times are given directly (the tracker reads no clock and no files); the
controller tests feed real snapshots through a real dynamic strategy and a dry-run enforcer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edged.alerts import Alert, AlertState, AlertTracker, Severity
from edged.config import Level, Limits
from edged.control import Controller, health, policy_readings
from edged.enforce.enforcer import Enforcer
from edged.enforce.restore import StateStore
from edged.enforce.signals import Signaller
from edged.policy.base import Limit, Resource
from edged.policy.registry import make_strategy
from edged.snapshot import Reading, Snapshot

MEM = Resource.MEMORY
SOFT, HARD = 100.0, 200.0
LIMITS = {MEM: Limit(MEM, SOFT, HARD)}
WARNING, CRITICAL = Severity.WARNING, Severity.CRITICAL
PENDING, FIRING, RESOLVED = AlertState.PENDING, AlertState.FIRING, AlertState.RESOLVED


def states(transitions: Iterable[Alert]) -> list[tuple[Resource, Severity, AlertState]]:
    return [(a.resource, a.severity, a.state) for a in transitions]


def run(tracker: AlertTracker, trace: Iterable[tuple[float, float]]) -> list[Alert]:
    """Feed (time s, memory used) pairs; all transitions, in order."""
    out: list[Alert] = []
    for now_s, used in trace:
        out.extend(tracker.update(now_s, {MEM: used}, LIMITS))
    return out


def test_pending_then_firing_once_the_condition_held_for_the_hold_time() -> None:
    tracker = AlertTracker(for_s=30.0)
    assert states(tracker.update(0.0, {MEM: 150.0}, LIMITS)) == [(MEM, WARNING, PENDING)]
    assert tracker.update(10.0, {MEM: 160.0}, LIMITS) == []
    assert tracker.update(29.9, {MEM: 170.0}, LIMITS) == []
    assert not tracker.firing()
    (fired,) = tracker.update(30.0, {MEM: 180.0}, LIMITS)
    assert (fired.state, fired.severity, fired.value, fired.threshold) == (
        FIRING,
        WARNING,
        180.0,
        SOFT,
    )
    assert (fired.active_since_s, fired.state_since_s) == (0.0, 30.0)
    assert tracker.firing()
    assert tracker.update(31.0, {MEM: 190.0}, LIMITS) == []  # firing stays firing, silently
    (active,) = tracker.active()
    assert (active.state, active.value, active.state_since_s) == (FIRING, 190.0, 30.0)


def test_usage_exactly_at_soft_counts_as_a_breach() -> None:
    tracker = AlertTracker(for_s=0.0)
    assert states(tracker.update(0.0, {MEM: SOFT}, LIMITS)) == [(MEM, WARNING, FIRING)]


def test_flapping_shorter_than_the_hold_time_never_fires_nor_resolves() -> None:
    tracker = AlertTracker(for_s=30.0)
    trace = []
    for cycle in range(10):  # 25 s above soft, 1 s under it, ten times over
        start = cycle * 26.0
        trace += [(start + i, 150.0) for i in range(25)] + [(start + 25.0, 50.0)]
    transitions = run(tracker, trace)
    assert {a.state for a in transitions} == {PENDING}
    assert len(transitions) == 10  # pending at each rise; a cleared pending leaves no trace
    assert tracker.active() == []


def test_resolved_when_the_condition_clears_and_the_series_go_back_to_zero() -> None:
    tracker = AlertTracker(for_s=5.0)
    run(tracker, [(0.0, 150.0), (5.0, 150.0)])
    assert ("memory", "warning", "firing", 1) in {
        (r.value, s.value, st_.value, n) for r, s, st_, n in tracker.series()
    }
    (resolved,) = tracker.update(6.0, {MEM: 50.0}, LIMITS)
    assert (resolved.state, resolved.value, resolved.state_since_s) == (RESOLVED, 50.0, 6.0)
    assert resolved.active_since_s == 0.0
    assert tracker.active() == []
    assert not tracker.firing()
    assert tracker.update(7.0, {MEM: 50.0}, LIMITS) == []  # resolved once, not every tick
    assert {n for *_, n in tracker.series()} == {0}
    # a new breach starts a new lifecycle, with its own hold time
    assert states(tracker.update(8.0, {MEM: 150.0}, LIMITS)) == [(MEM, WARNING, PENDING)]
    assert tracker.update(12.0, {MEM: 150.0}, LIMITS) == []
    assert states(tracker.update(13.0, {MEM: 150.0}, LIMITS)) == [(MEM, WARNING, FIRING)]


def test_escalation_to_critical_fires_at_once_and_deescalation_resolves_only_critical() -> None:
    tracker = AlertTracker(for_s=30.0, critical_for_s=0.0)
    run(tracker, [(0.0, 150.0), (30.0, 150.0)])
    # past hard: critical fires on the first tick (no pending), warning keeps firing
    assert states(tracker.update(31.0, {MEM: 250.0}, LIMITS)) == [(MEM, CRITICAL, FIRING)]
    assert [(a.severity, a.state) for a in tracker.active()] == [
        (WARNING, FIRING),
        (CRITICAL, FIRING),
    ]
    assert states(tracker.update(32.0, {MEM: 150.0}, LIMITS)) == [(MEM, CRITICAL, RESOLVED)]
    assert [(a.severity, a.state) for a in tracker.active()] == [(WARNING, FIRING)]
    assert states(tracker.update(33.0, {MEM: 50.0}, LIMITS)) == [(MEM, WARNING, RESOLVED)]


def test_a_jump_straight_past_hard_raises_both_rules_in_severity_order() -> None:
    tracker = AlertTracker(for_s=10.0, critical_for_s=2.0)
    assert states(tracker.update(0.0, {MEM: 250.0}, LIMITS)) == [
        (MEM, WARNING, PENDING),
        (MEM, CRITICAL, PENDING),
    ]
    assert states(tracker.update(2.0, {MEM: 250.0}, LIMITS)) == [(MEM, CRITICAL, FIRING)]
    assert states(tracker.update(10.0, {MEM: 250.0}, LIMITS)) == [(MEM, WARNING, FIRING)]


def test_resources_without_a_limit_or_a_level_never_alert() -> None:
    tracker = AlertTracker(for_s=0.0)
    limits = {
        MEM: Limit(MEM, SOFT, None),  # soft only: no critical rule
        Resource.TEMPERATURE: Limit(Resource.TEMPERATURE, None, 90.0),  # hard only
    }
    usage = {
        MEM: 1e12,
        Resource.CPU: 1e6,  # no limit at all
        Resource.POWER: 1e6,
        Resource.TEMPERATURE: 95.0,
    }
    assert states(tracker.update(0.0, usage, limits)) == [
        (MEM, WARNING, FIRING),
        (Resource.TEMPERATURE, CRITICAL, FIRING),
    ]
    assert {(r, s) for r, s, _, _ in tracker.series()} == {
        (MEM, WARNING),
        (Resource.TEMPERATURE, CRITICAL),
    }
    assert AlertTracker().update(0.0, usage, {}) == []


def test_a_tick_without_a_reading_neither_advances_nor_clears_an_alert() -> None:
    tracker = AlertTracker(for_s=30.0)
    run(tracker, [(0.0, 150.0)])
    assert tracker.update(40.0, {}, LIMITS) == []  # no reading: still pending
    assert tracker.update(41.0, {MEM: 150.0}, {}) == []  # no resolvable limit: the same
    assert [a.state for a in tracker.active()] == [PENDING]
    assert states(tracker.update(42.0, {MEM: 150.0}, LIMITS)) == [(MEM, WARNING, FIRING)]
    assert tracker.update(43.0, {}, LIMITS) == []  # a sensor error does not resolve it
    assert tracker.firing()


def test_negative_hold_times_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        AlertTracker(for_s=-1.0)


@settings(max_examples=200, deadline=None)
@given(
    for_s=st.floats(0.0, 20.0),
    steps=st.lists(
        st.tuples(st.floats(0.01, 5.0), st.one_of(st.none(), st.floats(0.0, 300.0))),
        max_size=80,
    ),
)
def test_on_any_trace_alerts_fire_only_after_the_hold_time_and_resolve_only_after_firing(
    for_s: float, steps: list[tuple[float, float | None]]
) -> None:
    tracker = AlertTracker(for_s=for_s, critical_for_s=for_s / 2)
    now_s = 0.0
    # start of the current unbroken run of observed breaches, per rule (None: no run)
    run_start: dict[Severity, float | None] = {WARNING: None, CRITICAL: None}
    lifecycle: dict[Severity, AlertState | None] = {WARNING: None, CRITICAL: None}
    for dt_s, used in steps:
        now_s += dt_s
        usage = {} if used is None else {MEM: used}
        transitions = tracker.update(now_s, usage, LIMITS)
        if used is None:
            assert transitions == []  # no evidence, no change
            continue
        for severity, level in ((WARNING, SOFT), (CRITICAL, HARD)):
            breach = used >= level
            if breach and run_start[severity] is None:
                run_start[severity] = now_s
            if not breach:
                run_start[severity] = None
            mine = [a.state for a in transitions if a.severity is severity]
            assert len(mine) <= 1
            previous = lifecycle[severity]
            if mine == [FIRING]:
                start = run_start[severity]
                assert start is not None
                assert now_s - start >= tracker.hold_s(severity) - 1e-9
                assert previous in (None, PENDING)
            if mine == [RESOLVED]:
                assert previous is FIRING
                assert not breach
            if mine == [PENDING]:
                assert previous is None
                assert breach
            if mine:
                lifecycle[severity] = None if mine[0] is RESOLVED else mine[0]
            elif previous is PENDING and not breach:
                lifecycle[severity] = None  # a pending alert clears silently
            # liveness: a breach held long enough is firing by now
            start = run_start[severity]
            if start is not None and now_s - start >= tracker.hold_s(severity):
                assert lifecycle[severity] is FIRING
            active = {a.severity: a.state for a in tracker.active()}
            assert active.get(severity) is lifecycle[severity]


# ---- in the controller ------------------------------------------------------------------

GIB = 2**30
TOTAL = 8 * GIB


def snapshot(seq: int, now_s: float, used_bytes: float) -> Snapshot:
    readings = (
        Reading("system.memory.limit", float(TOTAL)),
        Reading("system.memory.linux.available", float(TOTAL - used_bytes)),
    )
    return Snapshot(seq, 1_700_000_000_000_000_000 + round(now_s * 1e9), now_s, readings)


@pytest.fixture
def controller(tmp_path: Path) -> Controller:
    enforcer = Enforcer(
        None, Signaller(), StateStore(tmp_path / "state"), dry_run=True, recheck=lambda a: True
    )
    limits = Limits(memory=Level(soft=4 * GIB, hard=6 * GIB))
    return Controller(make_strategy("dynamic"), enforcer, limits, alerts=AlertTracker(for_s=1.0))


def alert_readings(controller: Controller) -> dict[tuple[str, str, str], Reading]:
    return {
        (
            str(r.attributes["edged.resource"]),
            str(r.attributes["edged.severity"]),
            str(r.attributes["edged.state"]),
        ): r
        for r in policy_readings(controller, {})
        if r.metric == "edged.alerts"
    }


def health_now(controller: Controller) -> str:
    return health(controller.last_state, {}, controller.alerts.firing_resources())


def test_controller_records_alert_events_logs_them_and_exports_edged_alerts(
    controller: Controller, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edged.control")
    controller.step(snapshot(1, 0.0, 2 * GIB), 0.1, {})
    assert list(controller.events) == []
    assert health_now(controller) == "ok"
    first = alert_readings(controller)
    assert {k: r.value for k, r in first.items()} == {
        ("memory", "warning", "pending"): 0.0,
        ("memory", "warning", "firing"): 0.0,
        ("memory", "critical", "pending"): 0.0,
        ("memory", "critical", "firing"): 0.0,
    }

    controller.step(snapshot(2, 0.5, 5 * GIB), 0.1, {})  # above soft: pending
    assert health_now(controller) == "moderate"
    controller.step(snapshot(3, 1.5, 5 * GIB), 0.1, {})  # held 1 s: firing
    assert health_now(controller) == "warning"  # a sustained soft breach
    alerts = [e for e in controller.events if e.action == "alert"]
    assert [(e.resource, e.reason, e.status) for e in alerts] == [
        ("memory", "warning", "pending"),
        ("memory", "warning", "firing"),
    ]
    assert alerts[1].pid == 0
    assert alerts[1].time_unix_ns == snapshot(3, 1.5, 0).time_unix_ns
    assert "5.00 GiB >= soft 4.00 GiB" in alerts[1].detail
    (status,) = controller.alert_status()
    assert status["state"] == "firing"
    assert status["since_unix_ns"] == snapshot(3, 1.5, 0).time_unix_ns
    assert status["active_since_unix_ns"] == snapshot(2, 0.5, 0).time_unix_ns
    now = alert_readings(controller)
    assert now[("memory", "warning", "firing")].value == 1.0
    assert now[("memory", "warning", "pending")].value == 0.0
    # one attribute dict per series, reused tick after tick (the history keys series by them)
    assert all(now[k].attributes is first[k].attributes for k in first)

    controller.step(snapshot(4, 2.0, 7 * GIB), 0.1, {})  # past hard: critical at once
    assert health_now(controller) == "critical"
    controller.step(snapshot(5, 2.5, 1 * GIB), 0.1, {})  # back under soft: both resolve
    assert health_now(controller) == "ok"
    assert [(e.reason, e.status) for e in controller.events if e.action == "alert"][2:] == [
        ("critical", "firing"),
        ("warning", "resolved"),
        ("critical", "resolved"),
    ]
    assert controller.alert_status() == []
    assert controller.action_counts == {}  # alerts are not actions
    fired = [r for r in caplog.records if "alert memory warning firing" in r.getMessage()]
    assert [r.levelno for r in fired] == [logging.WARNING]
    resolved = [r for r in caplog.records if "alert memory warning resolved" in r.getMessage()]
    assert [r.levelno for r in resolved] == [logging.INFO]
