"""The cooperative strategy: fair shares, shrink notices, compliance, escalation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edged.config import Limits
from edged.control import Controller, Event
from edged.enforce.enforcer import Enforcer
from edged.enforce.restore import StateStore
from edged.enforce.signals import Signaller
from edged.policy.base import (
    Action,
    ActionKind,
    Imposed,
    Limit,
    ProcessClass,
    ProcessView,
    Resource,
    State,
)
from edged.policy.cooperative import COOPERATIVE_DEFAULTS, CooperativeStrategy, fair_shares
from edged.policy.dynamic import apply_to_imposed
from edged.policy.victims import key_of
from edged.snapshot import Reading, Snapshot
from tests.test_policy_support import GIB, HARD_BYTES, MIB, SOFT_BYTES, make_state, proc

K = ActionKind
LIMITS = {Resource.MEMORY: Limit(Resource.MEMORY, SOFT_BYTES, HARD_BYTES)}


@settings(max_examples=200, deadline=None)
@given(
    demands=st.lists(st.floats(0, 8 * GIB), min_size=1, max_size=8),
    weights=st.lists(st.sampled_from([1.0, 2.0, 3.0]), min_size=8, max_size=8),
    capacity=st.floats(0, 16 * GIB),
)
def test_fair_shares_are_weighted_max_min(
    demands: list[float], weights: list[float], capacity: float
) -> None:
    keys = [(i + 2, i) for i in range(len(demands))]
    d = dict(zip(keys, demands, strict=True))
    w = dict(zip(keys, weights[: len(keys)], strict=True))
    shares = fair_shares(d, w, capacity)
    total = sum(shares.values())
    assert total <= capacity * (1 + 1e-9) + 1e-6
    assert all(shares[k] <= d[k] * (1 + 1e-9) + 1e-6 for k in keys)  # never beyond a demand
    if sum(demands) > capacity:
        assert total == pytest.approx(capacity, rel=1e-6, abs=1e-3)  # nothing left idle
    # max-min: a client held below its demand has at least the weighted share of anyone else
    for k in keys:
        if shares[k] < d[k] * (1 - 1e-9) - 1e-6:
            for j in keys:
                assert shares[k] / w[k] >= shares[j] / w[j] * (1 - 1e-9) - 1e-6


def test_fair_shares_by_hand() -> None:
    shares = fair_shares(
        {(2, 0): 1.0, (3, 0): 10.0, (4, 0): 10.0}, {(2, 0): 1, (3, 0): 2, (4, 0): 1}, 7.0
    )
    assert shares == {(2, 0): 1.0, (3, 0): 4.0, (4, 0): 2.0}


def client(pid: int, memory_bytes: float, klass: ProcessClass = ProcessClass.NORMAL) -> ProcessView:
    return proc(pid, memory_bytes, klass=klass, client=f"c{pid}")


def run(
    strategy: CooperativeStrategy,
    seconds: float,
    processes: dict[int, float],
    shrink: dict[int, float] | None = None,
    base_bytes: float = 0.5 * GIB,
) -> list[tuple[float, Action]]:
    """A closed loop at 0.1 s ticks: usage = base + processes; a client in ``shrink`` comes
    down to what it was asked (after the given delay) once it gets a NOTIFY."""
    shrink = shrink or {}
    asked: dict[int, tuple[float, float]] = {}  # pid -> (time asked, target)
    imposed: tuple[Imposed, ...] = ()
    log: list[tuple[float, Action]] = []
    alive = dict(processes)
    for i in range(round(seconds / 0.1)):
        now = i * 0.1
        for pid, (when, target) in asked.items():
            if pid in alive and pid in shrink and now - when >= shrink[pid]:
                alive[pid] = min(alive[pid], target)
        views = [
            client(pid, size) if pid < 100 else proc(pid, size, name=f"p{pid}")
            for pid, size in alive.items()
        ]
        usage = base_bytes + sum(alive.values())
        state = make_state(now, {Resource.MEMORY: usage}, views, LIMITS, imposed=imposed)
        actions = strategy.decide(state)
        imposed = apply_to_imposed(actions, now, imposed)
        for a in actions:
            log.append((now, a))
            if a.kind is K.NOTIFY:
                assert a.target is not None
                asked[a.pid] = (now, a.target)
            elif a.kind in (K.TERMINATE, K.KILL):
                alive.pop(a.pid, None)
    return log


def test_a_client_over_its_share_is_asked_and_complying_ends_it() -> None:
    """3.6 GiB soft: two clients (1 GiB + 2.2 GiB) and 0.5 GiB of base push the machine over;
    the one over its fair share is asked, shrinks within the deadline, and nothing else
    happens to anyone."""
    strategy = CooperativeStrategy({})
    log = run(strategy, 20.0, {10: 1.0 * GIB, 11: 2.2 * GIB}, shrink={11: 2.0})
    notices = [a for _, a in log if a.kind is K.NOTIFY]
    assert [a.pid for a in notices] == [11]
    t_notice = next(t for t, a in log if a.kind is K.NOTIFY)
    assert t_notice == pytest.approx(COOPERATIVE_DEFAULTS["hold_s"])
    room = SOFT_BYTES * (1 - COOPERATIVE_DEFAULTS["throttle_cushion"]) - 0.5 * GIB
    assert notices[0].target == pytest.approx(room - 1.0 * GIB)  # the other keeps its 1 GiB
    assert notices[0].deadline_s == COOPERATIVE_DEFAULTS["deadline_s"]
    assert [a.kind for _, a in log] == [K.NOTIFY]  # no throttle, no kill: it cooperated
    assert strategy.complied == 1
    assert strategy.escalated == 0


def test_a_client_that_ignores_its_notice_goes_down_the_ladder() -> None:
    strategy = CooperativeStrategy({})
    log = run(strategy, 12.0, {10: 1.0 * GIB, 11: 2.2 * GIB})  # nobody shrinks
    kinds = [(a.kind, a.pid) for _, a in log]
    assert kinds[0] == (K.NOTIFY, 11)
    t_notice = log[0][0]
    t_throttle, throttle = next((t, a) for t, a in log if a.kind is K.THROTTLE)
    assert throttle.pid == 11
    assert throttle.reason == "ignored-shrink"
    assert t_throttle - t_notice == pytest.approx(COOPERATIVE_DEFAULTS["deadline_s"])
    assert (K.FREEZE, 11) in kinds  # then the usual ladder, on it
    assert all(pid == 11 for _, pid in kinds)  # the well-behaved client is never touched
    assert strategy.escalated == 1


def test_unmanaged_processes_get_the_ladder_while_clients_are_asked() -> None:
    """An unmanaged leak is throttled as under dynamic; the client under notice is not."""
    strategy = CooperativeStrategy({})
    log = run(strategy, 3.0, {10: 1.6 * GIB, 200: 1.6 * GIB}, shrink={10: 10.0})  # 3.7 GiB
    by_pid = {(a.kind, a.pid) for _, a in log}
    assert (K.NOTIFY, 10) in by_pid
    assert (K.THROTTLE, 200) in by_pid
    assert (K.THROTTLE, 10) not in by_pid


def test_at_hard_clients_are_not_spared() -> None:
    strategy = CooperativeStrategy({})
    big = client(10, 3.5 * GIB)
    state = make_state(0.0, {Resource.MEMORY: HARD_BYTES + MIB}, [big], LIMITS)
    kinds = [a.kind for a in strategy.decide(state)]
    assert K.NOTIFY in kinds
    assert K.TERMINATE in kinds  # the OOM killer is near: no notice is worth the machine


def test_no_notice_below_soft_or_without_clients() -> None:
    strategy = CooperativeStrategy({})
    assert run(strategy, 5.0, {10: 1.0 * GIB, 11: 1.0 * GIB}) == []  # 2.5 GiB < soft
    calm = make_state(0.0, {Resource.MEMORY: SOFT_BYTES + MIB}, [proc(200, GIB)], LIMITS)
    assert all(a.kind is not K.NOTIFY for a in strategy.decide(calm))
    assert math.isfinite(COOPERATIVE_DEFAULTS["deadline_s"])
    assert key_of(proc(200)) == (200, 1200)


# ---- the controller delivers NOTIFY through the server's hook ---------------------------


class _AskOnce:
    """A strategy that asks one client to shrink on every tick."""

    name = "cooperative"

    def decide(self, state: State) -> list[Action]:
        return [
            Action(K.NOTIFY, 4242, Resource.MEMORY, "pressure", "cooperative",
                   ProcessClass.NORMAL, target=GIB, deadline_s=5.0)
        ]  # fmt: skip


def _controller(tmp_path: Path, dry_run: bool = False) -> Controller:
    enforcer = Enforcer(
        None, Signaller(), StateStore(tmp_path / "state"), dry_run=dry_run, recheck=lambda a: True
    )
    return Controller(_AskOnce(), enforcer, Limits())


def _tick(controller: Controller) -> Event:
    readings = (Reading("system.memory.limit", 8.0 * GIB),)
    (event,) = controller.step(Snapshot(1, 1, 1.0, readings), 0.1, {})
    return event


def test_notify_is_delivered_by_the_hook_and_becomes_an_event(tmp_path: Path) -> None:
    controller = _controller(tmp_path)
    event = _tick(controller)
    assert (event.status, event.outcome) == ("skipped", "no budget server to deliver it")
    sent: list[Action] = []

    def deliver(action: Action) -> bool:
        sent.append(action)
        return True

    controller.notify = deliver
    event = _tick(controller)
    assert event.status == "done"
    assert event.action == "notify"
    assert [(a.pid, a.target, a.deadline_s) for a in sent] == [(4242, GIB, 5.0)]
    assert controller.action_counts[("notify", "pressure", "cooperative", "normal")] == 1
    controller.notify = lambda action: False  # the client is gone
    assert _tick(controller).outcome == "the client is not connected"
    dry = _controller(tmp_path, dry_run=True)
    dry.notify = lambda action: pytest.fail("dry run sends nothing")
    assert _tick(dry).status == "dry_run"


def test_no_client_is_asked_while_a_terminated_victim_is_on_its_way_out() -> None:
    """While a process edged terminated exits, the kernel has taken its mm (its RSS reads 0)
    but not yet freed its pages, so the machine's usage still counts them and the fair shares
    charge them to nobody. Asking the other clients to shrink then takes memory that is coming
    back anyway (bench/cooperative: two compliant clients were asked 250 ms after a deaf client
    was sent SIGTERM). Nor does that victim count as having complied with its notice."""
    strategy = CooperativeStrategy({})
    calm, deaf = client(10, 0.3 * GIB), client(11, 3.0 * GIB)
    usage = {Resource.MEMORY: HARD_BYTES + MIB}
    first = strategy.decide(make_state(0.0, usage, [calm, deaf], LIMITS))
    assert [(a.kind, a.pid) for a in first] == [(K.NOTIFY, 11), (K.TERMINATE, 11)]
    exiting = client(11, 0.0)  # what /proc says while exit_mmap frees 3 GiB
    second = strategy.decide(make_state(0.1, usage, [calm, exiting], LIMITS))
    assert [a for a in second if a.kind is K.NOTIFY] == []
    assert strategy.complied == 0
    gone = strategy.decide(make_state(0.2, {Resource.MEMORY: 0.6 * GIB}, [calm], LIMITS))
    assert gone == []  # memory came back: nobody is asked or touched


def test_a_client_terminated_at_hard_is_killed_after_the_grace_below_hard() -> None:
    """A client sent SIGTERM at the hard level that ignores it is SIGKILLed after the grace,
    also once memory is back between soft and hard (where clients are otherwise spared)."""
    strategy = CooperativeStrategy({})
    big = client(11, 3.0 * GIB)
    first = strategy.decide(make_state(0.0, {Resource.MEMORY: HARD_BYTES + MIB}, [big], LIMITS))
    assert (K.TERMINATE, 11) in [(a.kind, a.pid) for a in first]
    between = {Resource.MEMORY: (SOFT_BYTES + HARD_BYTES) / 2}
    later = strategy.decide(make_state(COOPERATIVE_DEFAULTS["grace_s"], between, [big], LIMITS))
    assert [(a.kind, a.pid) for a in later] == [(K.KILL, 11)]
