"""The budget service's pure parts: capacity and reserve, authorization from /proc."""

from __future__ import annotations

from pathlib import Path

from edged.budget.service import BudgetService, capacity_of
from edged.config import Budget
from edged.server.server import Peer

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
