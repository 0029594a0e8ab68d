"""Victim ranking: class, then growth, then overshoot of its budget, then size."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edged.policy.base import ProcessClass, ProcessView, Resource
from edged.policy.victims import GrowthTracker, eligible, key_of, rank_victims
from tests.test_policy_support import GIB, MIB, proc


def test_small_fast_leak_beats_large_steady_service() -> None:
    """The issue's case: earlyoom ranks by size and would kill the 3 GiB service."""
    service = proc(100, 3 * GIB, name="postgres")
    leak = proc(200, 200 * MIB, name="leaky")
    tracker = GrowthTracker(Resource.MEMORY)
    for i in range(11):
        now_s = i * 0.1
        leak_now = proc(200, 200 * MIB + now_s * 100 * MIB, name="leaky")
        service_now = proc(100, 3 * GIB + (i % 2) * 64 * 1024, name="postgres")  # jitter only
        tracker.update(now_s, [service_now, leak_now])
    victims = rank_victims([service, leak], Resource.MEMORY, tracker.rates(), 1 * MIB)
    assert [v.process.pid for v in victims] == [200, 100]
    assert "growing" in victims[0].why
    assert "leaky[200]" in victims[0].why
    assert victims[1].growth_per_s == 0.0  # jitter is under the noise floor


def test_without_growth_size_decides() -> None:
    victims = rank_victims([proc(2, 1 * GIB), proc(3, 2 * GIB)], Resource.MEMORY)
    assert [v.process.pid for v in victims] == [3, 2]


def test_class_comes_first() -> None:
    big_normal = proc(2, 3 * GIB)
    small_besteffort = proc(3, 10 * MIB, klass=ProcessClass.BESTEFFORT)
    growth = {key_of(big_normal): 500 * MIB}
    victims = rank_victims([big_normal, small_besteffort], Resource.MEMORY, growth)
    assert [v.process.pid for v in victims] == [3, 2]


def test_budget_overshoot_before_size() -> None:
    within = proc(2, 2 * GIB, budget={Resource.MEMORY: 4 * GIB})
    over = proc(3, 1 * GIB, budget={Resource.MEMORY: 512 * MIB})
    victims = rank_victims([within, over], Resource.MEMORY)
    assert [v.process.pid for v in victims] == [3, 2]
    assert "512 MiB over its budget" in victims[0].why


def test_cpu_resources_rank_by_cores_and_cpu_budget() -> None:
    a = proc(2, 4 * GIB, cpu_cores=0.5)
    b = proc(3, 10 * MIB, cpu_cores=3.0)
    c = proc(4, 10 * MIB, cpu_cores=1.0, budget={Resource.CPU: 0.5})
    for resource in (Resource.CPU, Resource.TEMPERATURE, Resource.POWER):
        assert [v.process.pid for v in rank_victims([a, b, c], resource)] == [4, 3, 2]


def test_growth_tracker_forgets_reused_pids() -> None:
    tracker = GrowthTracker(Resource.MEMORY)
    tracker.update(0.0, [proc(5, 100 * MIB, start_ticks=1)])
    tracker.update(1.0, [proc(5, 900 * MIB, start_ticks=1)])
    assert tracker.rates()[(5, 1)] == pytest.approx(800 * MIB)
    tracker.update(2.0, [proc(5, 10 * MIB, start_ticks=2)])  # a new process with the same pid
    assert tracker.rates() == {}


_klass = st.sampled_from(list(ProcessClass))


@st.composite
def _processes(draw: st.DrawFn) -> list[ProcessView]:
    count = draw(st.integers(0, 12))
    pids = draw(st.lists(st.integers(1, 40), min_size=count, max_size=count, unique=True))
    return [
        proc(
            pid,
            draw(st.floats(0, 8 * GIB)),
            draw(st.floats(0, 8)),
            draw(_klass),
            protected=draw(st.booleans()),
            budget=draw(st.sampled_from([{}, {Resource.MEMORY: 1 * GIB}, {Resource.CPU: 1.0}])),
        )
        for pid in pids
    ]


@settings(max_examples=60, deadline=None)
@given(
    processes=_processes(),
    resource=st.sampled_from(list(Resource)),
    growth=st.dictionaries(st.integers(1, 40), st.floats(-1e9, 1e9), max_size=12),
)
def test_never_pid1_protected_or_critical(
    processes: list[ProcessView], resource: Resource, growth: dict[int, float]
) -> None:
    rates = {(pid, 1000 + pid): rate for pid, rate in growth.items()}
    victims = rank_victims(processes, resource, rates, 1 * MIB)
    assert {v.process.pid for v in victims} == {p.pid for p in processes if eligible(p)}
    for victim in victims:
        assert victim.process.pid != 1
        assert not victim.process.protected
        assert victim.process.klass is not ProcessClass.CRITICAL
        assert victim.why
    # class order holds over the whole list
    classes = [v.process.klass for v in victims]
    assert classes == sorted(classes, key=lambda k: k is ProcessClass.NORMAL)
