"""The budget ledger on its own: admission, elasticity, the fair queue, ttl, resize, close.

The ledger is pure (the clock is injected), so time is a variable the tests move.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edged.budget.ledger import (
    RESOURCES,
    Granted,
    Ledger,
    NoSuchLease,
    Queued,
    Refused,
    fit,
)

GIB = 1 << 30


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def ledger(memory: float = 10 * GIB, cpu: float = 4.0, reserve_memory: float = 0.0) -> Ledger:
    return Ledger({"memory": memory, "cpu": cpu}, {"memory": reserve_memory}, Clock())


def ask(led: Ledger, conn: int = 1, **kw: Any) -> Granted | Queued | Refused:
    requested = kw.pop("requested")
    return led.request(
        owner_uid=kw.pop("uid", 1000),
        owner_pid=kw.pop("pid", 4242),
        target_pid=kw.pop("target", 4242),
        requested=requested,
        connection=conn,
        **kw,
    )


def test_grant_then_refuse_with_what_is_available_after_the_reserve() -> None:
    led = ledger(memory=10 * GIB, reserve_memory=2 * GIB)
    first = ask(led, requested={"memory": 6 * GIB, "cpu": 1.0})
    assert isinstance(first, Granted)
    assert first.lease.granted == {"memory": 6 * GIB, "cpu": 1.0}
    second = ask(led, requested={"memory": 3 * GIB})
    assert isinstance(second, Refused)
    assert second.available["memory"] == 2 * GIB  # 10 - 2 reserve - 6 granted
    assert second.available["cpu"] == 3.0
    assert second.available["gpu_memory"] == 0.0  # no GPU capacity known
    assert isinstance(ask(led, requested={"gpu_memory": 1.0}), Refused)


def test_elastic_grant_takes_the_largest_amount_between_min_and_request() -> None:
    led = ledger(memory=10 * GIB)
    assert isinstance(ask(led, requested={"memory": 7 * GIB}), Granted)
    out = ask(led, requested={"memory": 5 * GIB, "cpu": 2.0}, minimum={"memory": 2 * GIB})
    assert isinstance(out, Granted)
    assert out.lease.granted == {"memory": 3 * GIB, "cpu": 2.0}
    # below the minimum: refused
    out = ask(led, requested={"memory": 5 * GIB}, minimum={"memory": 1 * GIB})
    assert isinstance(out, Refused)


def test_a_queued_request_is_granted_on_release_in_fair_order() -> None:
    led = ledger(memory=10 * GIB)
    holder = ask(led, requested={"memory": 8 * GIB})
    assert isinstance(holder, Granted)
    big = ask(led, conn=2, requested={"memory": 6 * GIB}, wait_s=10)
    small = ask(led, conn=3, requested={"memory": 1 * GIB}, wait_s=10)
    # the small one would fit, but it does not overtake the queued one of its class
    assert isinstance(big, Queued)
    assert isinstance(small, Queued)
    urgent = ask(led, conn=4, requested={"memory": 9 * GIB}, klass="critical", wait_s=10)
    assert isinstance(urgent, Queued)
    assert [a.id for a in led.queue] == [urgent.ask.id, big.ask.id, small.ask.id]
    # without wait, a request that would fit is refused while others of its class wait
    now = ask(led, conn=5, requested={"memory": 1 * GIB})
    assert isinstance(now, Refused)
    assert (now.available["memory"], now.queued_ahead) == (2 * GIB, 3)
    assert isinstance(ask(led, conn=5, requested={"memory": 1.0}, klass="critical"), Refused)
    change = led.release(holder.lease.id)
    assert [g.lease.id for g in change.granted] == [urgent.ask.id]  # class first
    change = led.close(4)
    assert [lease.id for lease in change.released] == [urgent.ask.id]
    assert [g.lease.id for g in change.granted] == [big.ask.id, small.ask.id]
    assert not led.queue


def test_wait_times_out_and_ttl_revokes() -> None:
    clock = Clock()
    led = Ledger({"memory": 10 * GIB}, None, clock)
    held = led.request(
        owner_uid=0, owner_pid=1, target_pid=1, requested={"memory": 9 * GIB}, ttl_s=5.0
    )
    assert isinstance(held, Granted)
    waiting = led.request(
        owner_uid=0, owner_pid=2, target_pid=2, requested={"memory": 5 * GIB}, wait_s=2.0
    )
    assert isinstance(waiting, Queued)
    assert led.next_deadline_s() == clock.now_s + 2.0
    clock.now_s += 1.9
    assert not led.expire().timed_out
    clock.now_s += 0.1
    change = led.expire()
    assert [a.id for a in change.timed_out] == [waiting.ask.id]
    assert led.next_deadline_s() == held.lease.deadline_s
    clock.now_s += 3.0
    change = led.expire()
    assert [lease.id for lease in change.revoked] == [held.lease.id]
    assert led.available()["memory"] == 10 * GIB


def test_ttl_of_a_queued_request_counts_from_its_grant() -> None:
    clock = Clock()
    led = Ledger({"memory": 10.0}, None, clock)
    held = led.request(owner_uid=0, owner_pid=1, target_pid=1, requested={"memory": 10.0})
    assert isinstance(held, Granted)
    led.request(
        owner_uid=0, owner_pid=2, target_pid=2, requested={"memory": 4.0}, wait_s=9, ttl_s=3
    )
    clock.now_s += 5.0
    (granted,) = led.release(held.lease.id).granted
    assert granted.lease.deadline_s == clock.now_s + 3.0


def test_update_shrinks_at_once_and_grows_only_from_what_is_free() -> None:
    led = ledger(memory=10 * GIB)
    a = ask(led, requested={"memory": 6 * GIB})
    assert isinstance(a, Granted)
    lease, _ = led.update(a.lease.id, {"memory": 12 * GIB}, usage={"memory": 5 * GIB})
    assert lease.granted["memory"] == 10 * GIB
    assert lease.usage == {"memory": 5 * GIB}
    waiting = ask(led, conn=2, requested={"memory": 4 * GIB}, wait_s=5)
    assert isinstance(waiting, Queued)
    lease, change = led.update(a.lease.id, {"memory": 3 * GIB})
    assert lease.granted["memory"] == 3 * GIB
    assert [g.lease.id for g in change.granted] == [waiting.ask.id]
    with pytest.raises(NoSuchLease):
        led.update(999, {"memory": 1.0})
    with pytest.raises(ValueError, match="unknown resource"):
        led.update(a.lease.id, {"disk": 1.0})


def test_bad_requests_are_errors() -> None:
    led = ledger()
    with pytest.raises(ValueError, match="unknown resource"):
        ask(led, requested={"disk": 1.0})
    with pytest.raises(ValueError, match="must not exceed"):
        ask(led, requested={"memory": 1.0}, minimum={"memory": 2.0})
    with pytest.raises(ValueError, match="unknown class"):
        ask(led, requested={"memory": 1.0}, klass="vip")
    with pytest.raises(NoSuchLease):
        led.release(12)


def test_fit() -> None:
    assert fit({"memory": 5.0}, {"memory": 5.0}, {"memory": 5.0}) == {"memory": 5.0}
    assert fit({"memory": 5.0}, {"memory": 2.0}, {"memory": 3.5}) == {"memory": 3.5}
    assert fit({"memory": 5.0}, {"memory": 4.0}, {"memory": 3.5}) is None
    assert fit({"cpu": 1.0}, {}, {}) is None  # no minimum given: the request is the minimum


# ---- properties -----------------------------------------------------------------------------

CAPACITY = {"memory": 100.0, "cpu": 8.0, "gpu_memory": 50.0}
RESERVE = {"memory": 10.0, "cpu": 1.0}

amounts = st.dictionaries(
    st.sampled_from(RESOURCES), st.floats(min_value=0.0, max_value=120.0), min_size=1
)
op_request = st.tuples(
    st.just("request"),
    st.integers(1, 4),  # connection
    amounts,
    st.floats(0.0, 1.0),  # min as a fraction of the request
    st.sampled_from(["critical", "normal", "besteffort"]),
    st.sampled_from([0.0, 0.0, 5.0, 50.0]),  # wait
    st.sampled_from([None, 3.0, 30.0]),  # ttl
)
op_release = st.tuples(st.just("release"), st.integers(0, 30))
op_close = st.tuples(st.just("close"), st.integers(1, 4))
op_time = st.tuples(st.just("time"), st.floats(0.0, 20.0))
op_update = st.tuples(st.just("update"), st.integers(0, 30), amounts)
ops = st.lists(st.one_of(op_request, op_release, op_close, op_time, op_update), max_size=60)


def check_invariants(led: Ledger) -> None:
    usable = led.usable()
    granted = led.granted_total()
    for key in RESOURCES:
        assert granted.get(key, 0.0) <= usable.get(key, 0.0) + 1e-6, (key, granted, usable)
    for lease in led.leases.values():
        for key, amount in lease.granted.items():
            assert lease.minimum.get(key, 0.0) - 1e-9 <= amount <= lease.requested[key] + 1e-9
    if led.queue:  # settled: the head does not fit, else it would have been admitted
        head = led.queue[0]
        assert fit(head.requested, head.minimum, led.available()) is None


@settings(max_examples=300, deadline=None)
@given(ops)
def test_properties_hold_over_any_sequence(sequence: list[tuple[Any, ...]]) -> None:
    clock = Clock()
    led = Ledger(CAPACITY, RESERVE, clock)
    for op in sequence:
        if op[0] == "request":
            _, conn, requested, fraction, klass, wait_s, ttl_s = op
            minimum = {k: v * fraction for k, v in requested.items()}
            before = led.available()
            out = led.request(
                owner_uid=conn,
                owner_pid=conn,
                target_pid=conn,
                requested=requested,
                minimum=minimum,
                klass=klass,
                wait_s=wait_s,
                ttl_s=ttl_s,
                connection=conn,
            )
            if isinstance(out, Refused):
                assert out.available == before
        elif op[0] == "release":
            head = led.queue[0] if led.queue else None
            # mostly a live lease (the k-th), sometimes an id that is not one
            ids = sorted(led.leases)
            lease_id = ids[op[1] % len(ids)] if ids and op[1] < 25 else 1000 + op[1]
            try:
                change = led.release(lease_id)
            except NoSuchLease:
                assert lease_id not in led.leases
            else:
                # a release always admits the head of the queue if it now fits
                if head is not None and head not in led.queue:
                    assert head.id in {g.lease.id for g in change.granted}
        elif op[0] == "close":
            led.close(op[1])
            assert all(lease.connection != op[1] for lease in led.leases.values())
            assert all(a.connection != op[1] for a in led.queue)
        elif op[0] == "time":
            clock.now_s += op[1]
            led.expire()
            assert all(a.wait_deadline_s > clock.now_s for a in led.queue)
            assert all(
                lease.deadline_s is None or lease.deadline_s > clock.now_s
                for lease in led.leases.values()
            )
        elif led.leases:
            ids = sorted(led.leases)
            led.update(ids[op[1] % len(ids)], op[2])
        check_invariants(led)
    # no lease leaks: once every connection is closed nothing is held or queued
    for conn in range(1, 5):
        led.close(conn)
    assert not led.leases
    assert not led.queue
    assert all(v == 0.0 for v in led.granted_total().values())
    assert led.available() == {k: led.usable().get(k, 0.0) for k in RESOURCES}
