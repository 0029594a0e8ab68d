"""The cgroup v2 backend against a v2-shaped tree in tmp.

No kernel backs the tree, so these tests assert what the backend *writes* (``cgroup.procs``,
``memory.high``, ``cpu.max``, ``cgroup.freeze``, ``cgroup.subtree_control``...) and pre-seed what
the kernel would report (``cgroup.events``, ``memory.current``, ``/proc/<pid>/cgroup``).
Also here: :func:`detect` on v1, v2, hybrid and empty trees, and the enforcer plus
:func:`restore_all` driving the v2 backend (no signal reaches any process: the pids are fake).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edged.enforce.cgroupfs import CgroupV1, CgroupV2, detect
from edged.enforce.enforcer import Enforcer, Status
from edged.enforce.restore import StateStore, restore_all
from edged.enforce.signals import CgroupError, Signaller
from edged.policy.base import Action, ActionKind, ProcessClass, Resource

SUBTREE = "edged-test"
PID = 4242
START_TICKS = 777
# a stat line: comm with a space and a ')' to check the parser; starttime is field 22
STAT = f"{PID} (we ird) S 1 1 1 0 -1 0 0 0 0 0 5 5 0 0 20 0 1 0 {START_TICKS} 0 0\n"

GROUP_FILES = {
    "cgroup.procs": "",
    "cgroup.controllers": "cpu memory",
    "cgroup.subtree_control": "",
    "cgroup.freeze": "0\n",
    "cgroup.events": "populated 1\nfrozen 0\n",
    "cgroup.kill": "",
    "memory.high": "max\n",
    "memory.max": "max\n",
    "memory.current": "12345678\n",
    "cpu.max": "max 100000\n",
}


def seed(d: Path, files: dict[str, str]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A v2 root with ``user.slice`` (where the process is) and edged's group pre-made, as the
    kernel would make its files on mkdir."""
    root = tmp_path / "cgroup"
    seed(
        root,
        {
            "cgroup.controllers": "cpuset cpu io memory hugetlb pids\n",
            "cgroup.subtree_control": "\n",
            "cgroup.procs": "",
        },
    )
    seed(root / "user.slice", {"cgroup.procs": f"{PID}\n"})
    seed(root / SUBTREE, {**GROUP_FILES, "cgroup.controllers": "cpu memory\n"})
    seed(root / SUBTREE / f"pid-{PID}", GROUP_FILES)
    proc = tmp_path / "proc" / str(PID)
    seed(proc, {"cgroup": "0::/user.slice\n", "stat": STAT})
    return tmp_path


def backend(tree: Path) -> CgroupV2:
    return CgroupV2(tree / "cgroup", subtree=SUBTREE, proc=tree / "proc")


def text(tree: Path, relative: str) -> str:
    return (tree / "cgroup" / relative).read_text().strip()


GROUP = f"{SUBTREE}/pid-{PID}"


def test_place_enables_controllers_and_moves_the_pid(tree: Path) -> None:
    v2 = backend(tree)
    assert v2.where(PID) == {"": "/user.slice"}
    assert v2.place(PID, f"pid-{PID}") == GROUP
    assert text(tree, "cgroup.subtree_control") == "+cpu +memory"
    assert text(tree, f"{SUBTREE}/cgroup.subtree_control") == "+cpu +memory"
    assert text(tree, f"{GROUP}/cgroup.procs") == str(PID)


def test_limits_write_what_the_kernel_expects(tree: Path) -> None:
    v2 = backend(tree)
    v2.set_memory_high(GROUP, 256 << 20)
    assert text(tree, f"{GROUP}/memory.high") == str(256 << 20)
    v2.set_memory_max(GROUP, 512 << 20)
    assert text(tree, f"{GROUP}/memory.max") == str(512 << 20)
    v2.set_cpu_quota(GROUP, 0.5)
    assert text(tree, f"{GROUP}/cpu.max") == "50000 100000"
    v2.set_cpu_quota(GROUP, 0.001)  # below the kernel's 1 ms floor
    assert text(tree, f"{GROUP}/cpu.max") == "1000 100000"
    v2.set_memory_high(GROUP, None)
    v2.set_memory_max(GROUP, None)
    v2.set_cpu_quota(GROUP, None)
    assert text(tree, f"{GROUP}/memory.high") == "max"
    assert text(tree, f"{GROUP}/memory.max") == "max"
    assert text(tree, f"{GROUP}/cpu.max") == "max 100000"
    assert v2.usage(GROUP) == 12345678
    with pytest.raises(ValueError, match="positive"):
        v2.set_cpu_quota(GROUP, 0)


def test_freeze_waits_for_cgroup_events(tree: Path) -> None:
    v2 = backend(tree)
    events = tree / "cgroup" / GROUP / "cgroup.events"
    with pytest.raises(CgroupError, match="frozen 1"):
        v2.freeze(GROUP, timeout_s=0.05)  # the kernel (nobody here) never says frozen
    assert text(tree, f"{GROUP}/cgroup.freeze") == "1"
    events.write_text("populated 1\nfrozen 1\n")
    assert v2.freeze(GROUP) < 0.5
    events.write_text("populated 1\nfrozen 0\n")
    assert v2.thaw(GROUP) < 0.5
    assert text(tree, f"{GROUP}/cgroup.freeze") == "0"


def test_kill_all_writes_cgroup_kill(tree: Path) -> None:
    v2 = backend(tree)
    (tree / "cgroup" / GROUP / "cgroup.procs").write_text(f"{PID}\n")
    assert v2.kill_all(GROUP) == 1
    assert text(tree, f"{GROUP}/cgroup.kill") == "1"


def test_release_returns_to_origin_or_its_closest_ancestor(tree: Path) -> None:
    v2 = backend(tree)
    v2.place(PID, f"pid-{PID}")
    assert v2.release(PID)
    assert text(tree, "user.slice/cgroup.procs") == str(PID)
    assert v2.release(PID, {"": "/user.slice/gone.scope"})  # the original group was removed
    assert text(tree, "user.slice/cgroup.procs") == str(PID)


def test_refuses_groups_outside_its_subtree(tree: Path) -> None:
    v2 = backend(tree)
    with pytest.raises(CgroupError, match="outside edged's subtree"):
        v2.set_memory_high("user.slice", 1)
    with pytest.raises(CgroupError, match="outside"):
        v2.freeze(f"{SUBTREE}/../user.slice")
    with pytest.raises(ValueError, match="one path component"):
        v2.place(PID, "a/b")
    with pytest.raises(ValueError, match="relative"):
        CgroupV2(tree / "cgroup", subtree="/abs")


def test_groups_and_remove(tree: Path) -> None:
    v2 = backend(tree)
    empty = tree / "cgroup" / SUBTREE / "empty"
    empty.mkdir()
    assert v2.groups() == [f"{SUBTREE}/empty", GROUP]
    assert v2.remove(f"{SUBTREE}/empty")
    assert not v2.remove(f"{SUBTREE}/empty")
    with pytest.raises(CgroupError, match="rmdir"):
        v2.remove(GROUP)  # files in it: on tmpfs that is "not empty"


def memory_throttle(target_bytes: int = 300 << 20) -> Action:
    return Action(
        ActionKind.THROTTLE,
        PID,
        Resource.MEMORY,
        "hard",
        "dynamic",
        ProcessClass.NORMAL,
        start_ticks=START_TICKS,
        target=float(target_bytes),
    )


def test_enforcer_and_restore_drive_v2_for_a_process_in_the_root(
    tree: Path, tmp_path: Path
) -> None:
    # a process in the root group (no manager's limits to keep) goes into edged's subtree
    (tree / "proc" / str(PID) / "cgroup").write_text("0::/\n")
    (tree / "cgroup" / "user.slice" / "cgroup.procs").write_text("")
    (tree / "cgroup" / "cgroup.procs").write_text(f"{PID}\n")
    v2 = backend(tree)
    store = StateStore(tmp_path / "state")
    enf = Enforcer(v2, Signaller(proc=tree / "proc"), store, False, lambda _a: True)
    assert enf.apply(memory_throttle()).status is Status.DONE
    assert text(tree, f"{GROUP}/memory.high") == str(300 << 20)
    assert text(tree, f"{GROUP}/cgroup.procs") == str(PID)
    saved = StateStore(tmp_path / "state").data.groups[GROUP]
    assert saved.origins == {str(PID): {"": "/"}}
    assert saved.memory_high_bytes == 300 << 20

    restored = restore_all(StateStore(tmp_path / "state"), backend(tree), Signaller())
    assert restored == 1
    assert text(tree, f"{GROUP}/memory.high") == "max"
    assert text(tree, "cgroup.procs") == str(PID)
    assert StateStore(tmp_path / "state").data.empty()


def test_a_process_alone_in_another_managers_group_is_throttled_there(
    tree: Path, tmp_path: Path
) -> None:
    """It keeps every limit its group has: never moved, the group's own values written back
    when edged lets go (after a crash too), the group never removed."""
    group = tree / "cgroup" / "user.slice"
    seed(group, {**GROUP_FILES, "cgroup.procs": f"{PID}\n", "memory.max": "1073741824\n"})
    (group / "memory.high").write_text("805306368\n")  # what its manager set
    v2 = backend(tree)
    store = StateStore(tmp_path / "state")
    enf = Enforcer(v2, Signaller(proc=tree / "proc"), store, False, lambda _a: True)
    assert enf.apply(memory_throttle()).status is Status.DONE
    assert text(tree, "user.slice/memory.high") == str(300 << 20)
    assert text(tree, "user.slice/memory.max") == "1073741824"  # its hard limit still binds
    assert text(tree, "user.slice/cgroup.procs") == str(PID)  # not moved
    assert text(tree, f"{GROUP}/cgroup.procs") == ""
    saved = StateStore(tmp_path / "state").data.groups["user.slice"]
    assert saved.layout["memory.high"] == "805306368"

    # a crash, then the restore of the next start: the manager's value is back
    restored = restore_all(StateStore(tmp_path / "state"), backend(tree), Signaller())
    assert restored == 1
    assert text(tree, "user.slice/memory.high") == "805306368"
    assert group.is_dir()
    assert StateStore(tmp_path / "state").data.empty()


def test_a_process_sharing_another_managers_group_is_not_moved_out(
    tree: Path, tmp_path: Path
) -> None:
    (tree / "cgroup" / "user.slice" / "cgroup.procs").write_text(f"{PID}\n{PID + 1}\n")
    v2 = backend(tree)
    store = StateStore(tmp_path / "state")
    enf = Enforcer(v2, Signaller(proc=tree / "proc"), store, False, lambda _a: True)
    outcome = enf.apply(memory_throttle())
    assert outcome.status is Status.FAILED
    assert "shares its group" in outcome.reason
    assert text(tree, "user.slice/cgroup.procs") == f"{PID}\n{PID + 1}"
    assert text(tree, f"{GROUP}/cgroup.procs") == ""


def test_detect_by_what_is_mounted(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    seed(v2, {"cgroup.controllers": "cpuset cpu io memory pids\n"})
    assert isinstance(detect(v2), CgroupV2)

    hybrid = tmp_path / "hybrid"  # v1 controllers plus a v2 mount without controllers
    for c in ("memory", "cpu", "freezer"):
        seed(hybrid / c, {"cgroup.procs": ""})
    seed(hybrid / "unified", {"cgroup.controllers": "\n"})
    found = detect(hybrid, subtree="x")
    assert isinstance(found, CgroupV1)
    assert found.can_freeze
    assert found.subtree == "x"

    no_freezer = tmp_path / "nofreezer"
    for c in ("memory", "cpu"):
        seed(no_freezer / c, {"cgroup.procs": ""})
    found = detect(no_freezer)
    assert isinstance(found, CgroupV1)
    assert not found.can_freeze  # the enforcer falls back to SIGSTOP

    assert detect(tmp_path / "nothing") is None
