"""The budget ledger on its own: admission, elasticity, the fair queue, ttl, resize, close,
elastic growth and lending idle budget.

The ledger is pure (the clock is injected), so time is a variable the tests move.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from edged.budget.ledger import (
    RESOURCES,
    Granted,
    Ledger,
    Lending,
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


def granted(led: Ledger, out: Granted | Queued | Refused) -> int:
    assert isinstance(out, Granted), out
    return out.lease.id


def test_elastic_leases_grow_when_capacity_frees_class_first_then_max_min() -> None:
    led = ledger(memory=10 * GIB)
    holder = granted(led, ask(led, requested={"memory": 8.5 * GIB}))
    small = granted(led, ask(led, conn=2, requested={"memory": 0.5 * GIB}))
    big = granted(led, ask(led, conn=3, requested={"memory": 0.5 * GIB}))
    low = granted(led, ask(led, conn=4, requested={"memory": 0.5 * GIB}, klass="besteffort"))
    # nothing is free: asking more is a standing request, met as capacity frees
    assert led.update(small, {"memory": 2 * GIB})[0].granted["memory"] == 0.5 * GIB
    led.update(big, {"memory": 9 * GIB})
    led.update(low, {"memory": 9 * GIB})
    change = led.release(holder)
    # 8.5 GiB free: the normal class first, max-min within it (small gets the 1.5 it lacks,
    # big the rest); nothing is left for the besteffort lease
    assert [lease.id for lease in change.grown] == [small, big]
    assert change.grown[1].granted["memory"] == 7.5 * GIB
    assert led.leases[small].granted["memory"] == 2 * GIB
    assert led.leases[big].granted["memory"] == 7.5 * GIB
    assert led.leases[low].granted["memory"] == 0.5 * GIB
    assert led.available()["memory"] == 0.0
    assert not led.tick().grown  # nothing more to grow into
    change = led.release(small)  # 2 GiB: big lacks 1.5, the besteffort lease gets the rest
    assert [lease.id for lease in change.grown] == [big, low]
    assert led.leases[big].granted["memory"] == 9 * GIB
    assert led.leases[low].granted["memory"] == 1 * GIB
    # capacity grows (a limit reloaded): the besteffort lease gets it
    change = led.set_capacity({"memory": 12 * GIB, "cpu": 4.0})
    assert [lease.id for lease in change.grown] == [low]
    assert led.leases[low].granted["memory"] == 3 * GIB


def test_equal_elastic_leases_split_what_frees_evenly() -> None:
    led = ledger(memory=10 * GIB, cpu=4.0)
    holder = granted(led, ask(led, requested={"memory": 9 * GIB}))
    a = granted(led, ask(led, conn=2, requested={"memory": 0.5 * GIB}))
    b = granted(led, ask(led, conn=3, requested={"memory": 0.5 * GIB}))
    led.update(a, {"memory": 8 * GIB})
    led.update(b, {"memory": 8 * GIB})
    led.release(holder)
    assert led.leases[a].granted["memory"] == led.leases[b].granted["memory"] == 5 * GIB


def test_a_queued_request_is_served_before_elastic_growth() -> None:
    led = ledger(memory=10 * GIB, cpu=4.0)
    holder = granted(led, ask(led, requested={"memory": 6 * GIB}))
    grows = granted(
        led,
        ask(led, conn=2, requested={"memory": 8 * GIB, "cpu": 2.0}, minimum={"memory": 2 * GIB}),
    )
    assert led.leases[grows].granted == {"memory": 4 * GIB, "cpu": 2.0}
    waiting = ask(led, conn=3, requested={"memory": 5 * GIB}, wait_s=30)
    assert isinstance(waiting, Queued)
    # 6 GiB frees: the queued request gets its 5; the elastic lease grows by what is left
    change = led.release(holder)
    assert [g.lease.id for g in change.granted] == [waiting.ask.id]
    assert [x.id for x in change.grown] == [grows]
    assert led.leases[grows].granted["memory"] == 5 * GIB
    # while a request waits for memory, freed memory is held for it, not grown into
    bigger = ask(led, conn=4, requested={"memory": 3 * GIB}, wait_s=30)
    assert isinstance(bigger, Queued)
    change = led.update(waiting.ask.id, {"memory": 3 * GIB})[1]  # 2 GiB free, 3 needed
    assert not change.granted
    assert not change.grown
    assert led.leases[grows].granted["memory"] == 5 * GIB
    assert led.available()["memory"] == 2 * GIB
    # cpu, which nobody waits for, still grows: a resize asking more takes what is free now
    assert led.update(grows, {"cpu": 8.0})[0].granted["cpu"] == 4.0
    change = led.close(3)  # 3 more: the queued request first, then growth
    assert [g.lease.id for g in change.granted] == [bigger.ask.id]
    assert [x.id for x in change.grown] == [grows]
    assert led.leases[grows].granted["memory"] == 7 * GIB


def lending_ledger(clock: Clock) -> Ledger:
    return Ledger(
        {"memory": 10 * GIB, "cpu": 4.0},
        {},
        clock,
        Lending(idle_after_s=30.0, idle_fraction=0.5, notice_s=5.0),
    )


def test_idle_budget_is_lent_and_recalled_with_notice_then_reclaimed() -> None:
    clock = Clock()
    led = lending_ledger(clock)
    lender = granted(led, ask(led, requested={"memory": 8 * GIB}))
    borrower = granted(
        led, ask(led, conn=2, requested={"memory": 8 * GIB}, minimum={"memory": 1 * GIB})
    )
    assert led.leases[borrower].granted["memory"] == 2 * GIB
    # unknown usage is not idle; measured low, it is idle only after idle_after_s
    assert not led.tick().grown
    led.observe(lender, {"memory": 1 * GIB})
    clock.now_s += 29.0
    assert not led.tick().grown
    led.observe(lender, {"memory": 3 * GIB})  # still at most half its grant
    clock.now_s += 1.0
    change = led.tick()
    # half the lender's grant is lent: the borrower grows by 4 GiB, borrowed
    assert [x.id for x in change.grown] == [borrower]
    assert led.leases[borrower].granted["memory"] == 6 * GIB
    assert led.borrowed_by(borrower) == {"memory": 4 * GIB}
    assert led.lent_by(lender) == {"memory": 4 * GIB}
    assert led.leases[lender].granted["memory"] == 8 * GIB  # the lender keeps its grant
    assert led.available()["memory"] == 0.0  # loans do not count as free capacity
    assert led.lendable()["memory"] == 0.0
    # a report above half the grant: the lender needs it back, the borrower is told
    _, change = led.update(lender, usage={"memory": 5 * GIB})
    (recall,) = change.recalled
    assert recall.lease.id == borrower
    assert recall.target == {"memory": 2 * GIB}
    assert recall.deadline_s == clock.now_s + 5.0
    assert led.next_deadline_s() == clock.now_s + 5.0
    clock.now_s += 4.9
    change = led.expire()
    assert not change.reclaimed
    assert led.leases[borrower].granted["memory"] == 6 * GIB
    clock.now_s += 0.1
    change = led.expire()
    assert [x.id for x in change.reclaimed] == [borrower]
    assert not change.grown  # nothing else to grow into
    assert led.leases[borrower].granted["memory"] == 2 * GIB
    assert led.loans == []
    # busy lenders do not lend again
    clock.now_s += 60.0
    led.observe(lender, {"memory": 5 * GIB})
    assert not led.tick().grown


def test_a_borrower_that_shrinks_in_time_settles_and_a_leaving_lender_calls_off() -> None:
    clock = Clock()
    led = lending_ledger(clock)
    lender = granted(led, ask(led, requested={"memory": 8 * GIB}))
    borrower = granted(
        led, ask(led, conn=2, requested={"memory": 8 * GIB}, minimum={"memory": 1 * GIB})
    )
    led.observe(lender, {"memory": 0.0})
    clock.now_s += 30.0
    led.tick()
    assert led.leases[borrower].granted["memory"] == 6 * GIB
    (recall,) = led.observe(lender, {"memory": 7 * GIB}).recalled
    assert recall.target == {"memory": 2 * GIB}
    # the borrower complies: asks what it was told; its loan is settled, nothing is reclaimed
    lease, _ = led.update(borrower, {"memory": 2 * GIB})
    assert lease.granted["memory"] == 2 * GIB
    assert led.loans == []
    clock.now_s += 10.0
    assert not led.expire().reclaimed
    # lent again later, recalled, and then the lender leaves before the deadline: the loan
    # becomes the borrower's own and the recall is called off
    led.update(borrower, {"memory": 8 * GIB})
    led.observe(lender, {"memory": 0.0})
    clock.now_s += 30.0
    led.tick()
    assert led.borrowed_by(borrower) == {"memory": 4 * GIB}
    assert led.observe(lender, {"memory": 8 * GIB}).recalled
    change = led.release(lender)
    assert [x.id for x in change.grown] == [borrower]
    assert led.leases[borrower].granted["memory"] == 8 * GIB  # kept, and it got the rest
    assert led.loans == []
    assert led.available()["memory"] == 2 * GIB
    clock.now_s += 10.0
    assert not led.expire().reclaimed


def test_a_lender_resizing_takes_its_budget_back_and_loans_never_cut_below_min() -> None:
    clock = Clock()
    led = lending_ledger(clock)
    lender = granted(led, ask(led, requested={"memory": 8 * GIB}))
    borrower = granted(
        led, ask(led, conn=2, requested={"memory": 9 * GIB}, minimum={"memory": 2 * GIB})
    )
    led.observe(lender, {"memory": 0.0})
    clock.now_s += 30.0
    led.tick()
    assert led.leases[borrower].granted["memory"] == 6 * GIB
    # the lender lowers its grant by 2 GiB: that much of the loan becomes the borrower's own;
    # the rest is recalled (a resize means it wants its budget back)
    _, change = led.update(lender, {"memory": 6 * GIB})
    (recall,) = change.recalled
    assert recall.target == {"memory": 4 * GIB}
    assert led.borrowed_by(borrower) == {"memory": 2 * GIB}
    assert led.available()["memory"] == 0.0
    clock.now_s += 5.0
    led.expire()
    assert led.leases[borrower].granted["memory"] == 4 * GIB
    assert led.leases[borrower].granted["memory"] >= led.leases[borrower].minimum["memory"]


def test_lending_turned_off_recalls_every_loan_with_notice() -> None:
    clock = Clock()
    led = lending_ledger(clock)
    lender = granted(led, ask(led, requested={"memory": 8 * GIB}))
    borrower = granted(
        led, ask(led, conn=2, requested={"memory": 8 * GIB}, minimum={"memory": 1 * GIB})
    )
    led.observe(lender, {"memory": 0.0})
    clock.now_s += 30.0
    led.tick()
    assert led.borrowed_by(borrower) == {"memory": 4 * GIB}
    (recall,) = led.set_lending(None).recalled
    assert (recall.lease.id, recall.target) == (borrower, {"memory": 2 * GIB})
    assert recall.deadline_s == clock.now_s + 5.0
    clock.now_s += 5.0
    assert [x.id for x in led.expire().reclaimed] == [borrower]
    assert led.loans == []
    clock.now_s += 60.0
    assert not led.tick().grown  # nothing is lent any more


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
op_usage = st.tuples(
    st.just("usage"), st.integers(0, 30), st.floats(0.0, 1.0), st.booleans()
)  # a lease's use as a share of its grant, measured (True) or reported
ops = st.lists(
    st.one_of(op_request, op_release, op_close, op_time, op_update, op_usage), max_size=60
)
# long enough, and rich enough in usage and time, for lenders to be recalled and reclaimed
lending_ops = st.lists(
    st.one_of(op_request, op_release, op_close, op_time, op_update, op_usage, op_usage),
    min_size=20,
    max_size=50,
)
LENDING = Lending(idle_after_s=5.0, idle_fraction=0.5, notice_s=3.0)


def check_invariants(led: Ledger, settled: bool = True) -> None:
    usable = led.usable()
    granted = led.granted_total()
    borrowed = led.borrowed_total()
    available = led.available()
    for key in RESOURCES:
        # what is not on loan fits the capacity
        own = granted[key] - borrowed[key]
        assert own <= usable.get(key, 0.0) + 1e-6, (key, granted, borrowed, usable)
    for lease in led.leases.values():
        lent = led.lent_by(lease.id)
        on_loan = led.borrowed_by(lease.id)
        for key, amount in lease.granted.items():
            assert lease.minimum.get(key, 0.0) - 1e-9 <= amount <= lease.requested[key] + 1e-9
            # loans are only ever the part above min, so taking them back keeps min
            assert amount - on_loan.get(key, 0.0) >= lease.minimum.get(key, 0.0) - 1e-6
            # a lender keeps at least its idle fraction of its grant
            assert lent.get(key, 0.0) <= amount * (1 - LENDING.idle_fraction) + 1e-6
    for loan in led.loans:
        assert loan.lender in led.leases
        assert loan.borrower in led.leases
        assert loan.amount > 0
        assert loan.lender != loan.borrower
    if led.queue:  # settled: the head does not fit, else it would have been admitted
        head = led.queue[0]
        assert fit(head.requested, head.minimum, available) is None
    if settled:  # growth is done: free capacity nobody waits for is not left beside a lack
        blocked = {key for a in led.queue for key in a.requested}
        for key in set(RESOURCES) - blocked:
            lacking = [
                x.id
                for x in led.leases.values()
                if x.requested.get(key, 0.0) - x.granted.get(key, 0.0) > 1e-6
            ]
            assert available[key] <= 1e-6 or not lacking, (key, available, lacking)
        lendable = led.lendable()
        for key in RESOURCES:  # and idle budget is not left unlent beside a lack
            lacking = [
                x.id
                for x in led.leases.values()
                if x.requested.get(key, 0.0) - x.granted.get(key, 0.0) > 1e-6
            ]
            assert lendable[key] <= 1e-6 or not lacking, (key, lendable, lacking)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_properties_hold_over_any_sequence(sequence: list[tuple[Any, ...]]) -> None:
    clock = Clock()
    run_ops(clock, Ledger(CAPACITY, RESERVE, clock, LENDING), sequence)


@settings(max_examples=150, deadline=None)
@given(lending_ops)
def test_properties_hold_with_loans_out(sequence: list[tuple[Any, ...]]) -> None:
    """The same, starting from two idle lenders that lend to two elastic leases."""
    clock = Clock()
    led = Ledger(CAPACITY, RESERVE, clock, LENDING)
    for conn, memory in ((1, 40.0), (2, 35.0)):
        lease = led.request(
            owner_uid=conn, owner_pid=conn, target_pid=conn, requested={"memory": memory},
            connection=conn,
        )  # fmt: skip
        assert isinstance(lease, Granted)
        led.observe(lease.lease.id, {"memory": 0.0})
    for conn in (3, 4):  # 7.5 each of the 15 left, asking 80 (min 5) once nothing is free
        led.request(
            owner_uid=conn, owner_pid=conn, target_pid=conn, requested={"memory": 7.5},
            connection=conn,
        )  # fmt: skip
    for lease_id in (3, 4):
        led.update(lease_id, {"memory": 80.0})
    clock.now_s += LENDING.idle_after_s
    assert [x.id for x in led.tick().grown] == [3, 4]
    assert led.borrowed_total()["memory"] == 20.0 + 17.5
    check_invariants(led)
    run_ops(clock, led, sequence)


def run_ops(clock: Clock, led: Ledger, sequence: list[tuple[Any, ...]]) -> None:
    settled = True  # growth has run since the last grant or measurement (a pump)
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
            else:  # a grant is not followed by a pump (growth waits for the next event)
                settled = False
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
                settled = True
                # a release always admits the head of the queue if it now fits
                if head is not None and head not in led.queue:
                    assert head.id in {g.lease.id for g in change.granted}
        elif op[0] == "close":
            led.close(op[1])
            settled = True
            assert all(lease.connection != op[1] for lease in led.leases.values())
            assert all(a.connection != op[1] for a in led.queue)
        elif op[0] == "time":
            clock.now_s += op[1]
            led.expire()
            settled = True
            assert all(a.wait_deadline_s > clock.now_s for a in led.queue)
            assert all(
                lease.deadline_s is None or lease.deadline_s > clock.now_s
                for lease in led.leases.values()
            )
        elif op[0] == "usage":
            if led.leases:
                ids = sorted(led.leases)
                lease = led.leases[ids[op[1] % len(ids)]]
                used = {k: v * op[2] for k, v in lease.granted.items()}
                if op[3]:
                    led.observe(lease.id, used)  # (no pump: that is the tick's)
                    settled = False
                else:
                    led.update(lease.id, usage=used)
                    settled = True
        elif led.leases:
            ids = sorted(led.leases)
            led.update(ids[op[1] % len(ids)], op[2])
            settled = True
        check_invariants(led, settled)
        if led.loans:
            event("loans out")
        if any(x.recall_deadline_s is not None for x in led.loans):
            event("loans recalled")
    # no lease leaks: once every connection is closed nothing is held or queued
    for conn in range(1, 5):
        led.close(conn)
    assert not led.leases
    assert not led.queue
    assert not led.loans
    assert all(v == 0.0 for v in led.granted_total().values())
    assert led.available() == {k: led.usable().get(k, 0.0) for k in RESOURCES}
