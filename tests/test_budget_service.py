"""The budget service's pure parts: capacity and reserve, authorization from /proc, and what
growth and lending send and enforce, in which order."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edged.budget.ledger import Lending
from edged.budget.service import BudgetService, capacity_of
from edged.config import Budget
from edged.policy.base import Action, ActionKind, ProcessClass, Resource
from edged.server.protocol import RpcError
from edged.server.server import Deferred, Peer
from edged.snapshot import Reading

GIB = 1 << 30


def test_capacity_is_the_hard_limit_else_the_total_less_the_reserve() -> None:
    capacity, reserve = capacity_of(
        {"memory": 16 * GIB, "cpu": 8.0},
        {"memory": 12 * GIB, "cpu": None, "gpu_memory": 4 * GIB},
        Budget(reserve_memory="25%", reserve_cpu=0.5, reserve_gpu_memory="1GiB"),
    )
    # no GPU on the machine: no GPU memory to grant, whatever the limit says
    assert capacity == {"memory": 12 * GIB, "cpu": 8.0}
    assert reserve == {"memory": 3 * GIB, "cpu": 0.5}
    capacity, reserve = capacity_of(
        {"gpu_memory": 8 * GIB}, {"gpu_memory": 4 * GIB}, Budget(reserve_gpu_memory="1GiB")
    )
    assert (capacity, reserve) == ({"gpu_memory": 4 * GIB}, {"gpu_memory": 1 << 30})
    # a hard limit above the total is capped by the total; defaults are 10 %
    capacity, reserve = capacity_of({"memory": 8 * GIB, "cpu": 2.0}, {"memory": 20 * GIB}, Budget())
    assert capacity == {"memory": 8 * GIB, "cpu": 2.0}
    assert reserve == {"memory": 0.8 * GIB, "cpu": 0.2}


def fake_proc(root: Path, pid: int, uid: int, groups: str = "") -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "status").write_text(
        f"Name:\tx\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t{uid}\t{uid}\t{uid}\t{uid}\n"
        f"Groups:\t{groups}\n"
    )


def test_uid_of_and_admin_from_proc(tmp_path: Path) -> None:
    fake_proc(tmp_path, 100, 1000)
    fake_proc(tmp_path, 200, 1001, "27 1001")
    service = BudgetService(lambda *_: True, proc=tmp_path)
    assert service.uid_of(100) == 1000
    assert service.uid_of(300) is None
    assert service.is_admin(Peer(pid=1, uid=0, gid=0))
    assert not service.is_admin(Peer(pid=100, uid=1000, gid=1000))
    service._admin_gid = 27  # as if group edged-admin had gid 27
    assert service.is_admin(Peer(pid=200, uid=1001, gid=1001))  # a supplementary group
    assert service.is_admin(Peer(pid=999, uid=1002, gid=27))  # the primary group
    assert not service.is_admin(Peer(pid=100, uid=1000, gid=1000))


def test_gpu_memory_leases_are_checked_against_nvml_per_process_usage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    notes: list[tuple[int, str, Any]] = []

    def notify(connection: int, method: str, params: Any) -> bool:
        notes.append((connection, method, params))
        return True

    service = BudgetService(notify)
    service.set_capacity({"gpu_memory": 8.0 * GIB, "memory": 8.0 * GIB}, {})
    me = Peer(pid=os.getpid(), uid=os.getuid(), gid=os.getgid(), connection=1)

    async def scenario() -> None:
        got = await service.request(me, {"resources": {"gpu_memory": 2 * GIB}})
        lease = got["lease"]

        def usage(pid: int, *per_gpu: int) -> list[Reading]:
            return [
                Reading("hw.gpu.process.memory.usage", v, {"hw.id": f"GPU-{i}", "process.pid": pid})
                for i, v in enumerate(per_gpu)
            ]

        service.check_gpu(usage(os.getpid(), GIB, GIB // 2) + usage(1, 5 * GIB))
        (entry,) = (await service.list_leases(me, {}))["leases"]
        assert entry["lease"] == lease
        assert (entry["gpu_memory_used_bytes"], entry["over_budget"]) == (GIB + GIB // 2, [])
        with caplog.at_level(logging.WARNING):
            service.check_gpu(usage(os.getpid(), 2 * GIB, GIB))
        (entry,) = (await service.list_leases(me, {}))["leases"]
        assert (entry["gpu_memory_used_bytes"], entry["over_budget"]) == (3 * GIB, ["gpu_memory"])
        assert f"lease {lease}: pid {os.getpid()} uses 3072 MiB of GPU memory" in caplog.text
        await service.release(me, {"lease": lease})
        service.close()

    asyncio.run(scenario())
    assert notes == []  # nothing to notify: GPU memory is cooperative, no revocation


def test_shrink_tells_the_connections_holding_a_lease_on_the_pid() -> None:
    notes: list[tuple[int, str, Any]] = []

    def notify(connection: int, method: str, params: Any) -> bool:
        notes.append((connection, method, params))
        return True

    service = BudgetService(notify)
    service.set_capacity({"memory": 8.0 * GIB, "cpu": 4.0}, {})
    me = Peer(pid=os.getpid(), uid=os.getuid(), gid=os.getgid(), connection=7)

    def shrink_note(lease: int, target_bytes: int) -> tuple[int, str, Any]:
        params = {"lease": lease, "target": {"memory": target_bytes}, "deadline": 5.0}
        return (7, "budget.shrink", {**params, "reason": "soft"})

    async def scenario() -> None:
        lease = (await service.request(me, {"resources": {"memory": GIB}}))["lease"]
        assert service.shrink(os.getpid(), {"memory": 0.5 * GIB}, 5.0, "soft") == [lease]
        assert service.shrink(1, {"memory": 0.5 * GIB}, 5.0, "soft") == []
        # the controller's NOTIFY hook
        action = Action(
            ActionKind.NOTIFY,
            os.getpid(),
            Resource.MEMORY,
            "soft",
            "cooperative",
            ProcessClass.NORMAL,
            target=0.25 * GIB,
            deadline_s=5.0,
        )
        assert service.notify_action(action)
        assert not service.notify_action(dataclasses.replace(action, pid=1))
        assert notes == [shrink_note(lease, GIB // 2), shrink_note(lease, GIB // 4)]
        service.close()

    asyncio.run(scenario())


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
ALLOWED = {
    "budget.request": ["resources", "min", "class", "pid", "wait", "ttl"],
    "budget.update": ["lease", "resources", "usage"],
    "budget.release": ["lease"],
    "budget.list": ["lease"],
}
inner_keys = st.sampled_from(["memory", "cpu", "gpu_memory", "gpu", "disk"])
values = json_values | st.dictionaries(inner_keys, json_values, max_size=3)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_any_params_get_a_result_or_an_rpc_error_never_a_crash(data: st.DataObject) -> None:
    method = data.draw(st.sampled_from(sorted(ALLOWED)))
    params = data.draw(st.dictionaries(st.sampled_from(ALLOWED[method]), values, max_size=3))
    service = BudgetService(lambda *_: True)
    service.set_capacity({"memory": 8.0 * GIB, "cpu": 4.0}, {})
    me = Peer(pid=os.getpid(), uid=os.getuid(), gid=os.getgid(), connection=1)

    async def call() -> int:
        await service.request(me, {"resources": {"cpu": 1}})  # lease 1 exists
        code = 0
        try:
            # valid params with some replaced or added, so later checks are reached too
            base: dict[str, Any] = {
                "budget.request": {"resources": {"cpu": 0.5}},
                "budget.list": {},
            }.get(method, {"lease": 1})
            result = await service.methods()[method](me, {**base, **params})
        except RpcError as exc:
            code = exc.code
        else:
            if isinstance(result, Deferred):
                result.future.cancel()
        service.close()
        return code

    assert asyncio.run(call()) in (0, -32602, 1001, 1003, 1004)


class RecordingEnforcer:
    """A LeaseEnforcer that writes what it applies into the same log as the notifications, so
    the order of the two can be checked (a cgroup enforcer's writes are what it stands for)."""

    def __init__(self, log: list[tuple[Any, ...]]) -> None:
        self.log = log

    def apply(self, lease: Any) -> dict[str, Any]:
        self.log.append(("enforce", lease.id, dict(lease.granted)))
        return {"how": "recorded", "memory_max_bytes": lease.granted.get("memory")}

    def lift(self, lease: Any) -> None:
        self.log.append(("lift", lease.id))


def test_growth_is_enforced_before_budget_grow_and_a_loan_is_recalled_then_reclaimed() -> None:
    log: list[tuple[Any, ...]] = []
    now = [100.0]

    def notify(connection: int, method: str, params: Any) -> bool:
        log.append((method, connection, params))
        return True

    service = BudgetService(
        notify,
        enforcer=RecordingEnforcer(log),
        clock=lambda: now[0],
        lending=Lending(idle_after_s=10.0, idle_fraction=0.5, notice_s=5.0),
    )
    service.set_capacity({"memory": 8.0 * GIB}, {})
    pid = os.getpid()
    a = Peer(pid=pid, uid=os.getuid(), gid=os.getgid(), connection=1)
    b = Peer(pid=pid, uid=os.getuid(), gid=os.getgid(), connection=2)

    def rss(bytes_: float) -> list[Reading]:
        return [Reading("process.memory.usage", bytes_, {"process.pid": pid})]

    async def scenario() -> None:
        held = (await service.request(a, {"resources": {"memory": 6 * GIB}}))["lease"]
        elastic = await service.request(
            b, {"resources": {"memory": 4 * GIB}, "min": {"memory": GIB}}
        )
        assert elastic["granted"] == {"memory": 2 * GIB}
        log.clear()
        # a resize by the holder frees 2 GiB: the elastic lease grows; its limit is raised
        # first, then it is told; the holder is answered, not notified
        answer = await service.update(a, {"lease": held, "resources": {"memory": 4 * GIB}})
        assert answer == {"lease": held, "granted": {"memory": 4 * GIB}}
        assert log == [
            ("enforce", held, {"memory": 4 * GIB}),
            ("enforce", elastic["lease"], {"memory": 4 * GIB}),
            ("budget.grow", 2, {"lease": elastic["lease"], "granted": {"memory": 4 * GIB}}),
        ]
        # the elastic lease asks for more than there is; the holder's process is idle (1 GiB
        # of 4 measured): after 10 s half of its grant is lent
        await service.update(b, {"lease": elastic["lease"], "resources": {"memory": 7 * GIB}})
        log.clear()
        service.observe(rss(GIB))
        now[0] += 10.0
        service.observe(rss(GIB))
        service.set_capacity({"memory": 8.0 * GIB}, {})  # the tick
        assert log == [
            ("enforce", elastic["lease"], {"memory": 6 * GIB}),
            ("budget.grow", 2, {"lease": elastic["lease"], "granted": {"memory": 6 * GIB}}),
        ]
        listed = {x["lease"]: x for x in (await service.list_leases(a, {}))["leases"]}
        assert listed[held]["lent"] == {"memory": 2 * GIB}
        assert listed[held]["measured"] == {"memory": GIB}
        assert listed[elastic["lease"]]["borrowed"] == {"memory": 2 * GIB}
        log.clear()
        # its process grows past half its grant: the borrower is told, with 5 s to comply
        service.observe(rss(3 * GIB))
        assert log == [
            (
                "budget.shrink",
                2,
                {
                    "lease": elastic["lease"],
                    "target": {"memory": 4 * GIB},
                    "deadline": 5.0,
                    "reason": "reclaim",
                },
            )
        ]
        log.clear()
        now[0] += 5.0
        service._expire()  # the timer at the deadline: the grant and the limit go down
        assert log == [("enforce", elastic["lease"], {"memory": 4 * GIB})]
        listed = {x["lease"]: x for x in (await service.list_leases(a, {}))["leases"]}
        assert listed[elastic["lease"]]["granted"] == {"memory": 4 * GIB}
        assert "borrowed" not in listed[elastic["lease"]]
        service.close()

    asyncio.run(scenario())


def fake_proc_ids(root: Path, pid: int, uids: tuple[int, ...], gids: tuple[int, ...]) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "status").write_text(
        "Name:\tx\nUid:\t" + "\t".join(map(str, uids)) + "\nGid:\t" + "\t".join(map(str, gids))
        + "\nGroups:\t\n"
    )


@pytest.mark.parametrize(
    ("uids", "gids", "allowed"),
    [
        ((1000, 1000, 1000, 1000), (1000, 1000, 1000, 1000), True),
        ((1000, 0, 0, 0), (1000, 1000, 1000, 1000), False),  # a setuid-root program it ran
        ((1000, 1000, 0, 1000), (1000, 1000, 1000, 1000), False),  # root kept as saved uid
        ((1000, 1000, 1000, 1000), (1000, 42, 42, 42), False),  # a setgid program
        ((1001, 1001, 1001, 1001), (1001, 1001, 1001, 1001), False),  # another user's
        ((0, 1000, 1000, 1000), (1000, 1000, 1000, 1000), False),  # real uid root
    ],
)
def test_a_lease_needs_a_process_the_caller_could_signal_with_no_more_privilege(
    tmp_path: Path, uids: tuple[int, ...], gids: tuple[int, ...], allowed: bool
) -> None:
    fake_proc_ids(tmp_path, 100, (1000,) * 4, (1000,) * 4)  # the caller itself
    fake_proc_ids(tmp_path, 200, uids, gids)
    service = BudgetService(lambda *_: True, proc=tmp_path)
    caller = Peer(pid=100, uid=1000, gid=1000)
    assert service.ids_of(200) == (list(uids), list(gids))
    from edged.budget.service import _could_signal_unprivileged

    assert _could_signal_unprivileged((list(uids), list(gids)), caller.uid) is allowed
    # root and the admin group may lease any process
    assert service.is_admin(Peer(pid=1, uid=0, gid=0))
