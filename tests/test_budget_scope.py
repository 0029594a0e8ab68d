"""Budget leases as transient systemd scopes, against a real dbus-daemon and a fake systemd.

PID 1 here is not systemd (and systemd is never started for a test), so the manager is faked
(:class:`tests.systemd_bus.FakeManager`: signatures, property types and error names as
systemd's); the bus is a real private ``dbus-daemon``, and the lease holders are real
processes (``sleep``), because the fake refuses a pid that does not exist, as systemd does.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from edged import config as config_mod
from edged.budget.enforce import CgroupLeases, ScopeLeases
from edged.budget.ledger import Lease
from edged.budget.service import Cooperative
from edged.daemon import Daemon
from edged.enforce.enforcer import Enforcer, Status
from edged.enforce.restore import StateStore, restore_all
from edged.enforce.signals import EnforceError, Signaller, UnitError, read_start_ticks
from edged.enforce.systemd import (
    INVALID_ARGS,
    PROCESS_UNKNOWN,
    PROPERTY_READ_ONLY,
    UINT64_MAX,
    UNIT_EXISTS,
    SystemdUnits,
)
from edged.policy.base import Action, ActionKind, ProcessClass, Resource
from tests.conftest import sleeping_process
from tests.systemd_bus import Call, FakeManager, Scope, dbus_daemon, start_bus, stop_bus

pytestmark = pytest.mark.skipif(
    dbus_daemon() is None, reason="needs dbus-daemon (Debian package dbus)"
)

MiB = 1 << 20


@pytest.fixture
def bus_proc(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A private dbus-daemon (stopped in teardown if the test did not stop it)."""
    (tmp_path / "bus").mkdir()
    proc, address = start_bus(tmp_path / "bus")
    try:
        yield proc, address
    finally:
        if proc.poll() is None:
            stop_bus(proc)


@pytest.fixture
def manager(bus_proc: tuple[subprocess.Popen[bytes], str]) -> Iterator[FakeManager]:
    fake = FakeManager(bus_proc[1])
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def units(manager: FakeManager) -> Iterator[SystemdUnits]:
    client = SystemdUnits(manager.address, timeout_s=5.0)
    try:
        yield client
    finally:
        client.close()


victim = pytest.fixture(sleeping_process, name="victim")


def lease_for(pid: int, lease_id: int = 7, **granted: float) -> Lease:
    return Lease(
        id=lease_id,
        owner_uid=os.getuid(),
        owner_pid=os.getpid(),
        target_pid=pid,
        klass="normal",
        granted=dict(granted),
        requested=dict(granted),
        minimum=dict(granted),
        connection=1,
        granted_at_s=0.0,
    )


def calls(manager: FakeManager, member: str) -> list[Call]:
    return [c for c in manager.calls if c.member == member]


# --- apply, resize, lift --------------------------------------------------------------------


def test_a_lease_becomes_a_scope_in_the_slice_of_its_process(
    manager: FakeManager, units: SystemdUnits, victim: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    manager.add_unit("session-3.scope", victim.pid, slice="user-1000.slice")
    store = StateStore(tmp_path / "state")
    leases = ScopeLeases(units, store)
    lease = lease_for(victim.pid, memory=256 * MiB, cpu=0.5)
    scope = f"edged-lease-7-{victim.pid}.scope"

    how = leases.apply(lease)

    assert how == {
        "how": "scope",
        "unit": scope,
        "slice": "user-1000.slice",
        "memory_max_bytes": 256 * MiB,
        "cpu_quota_cores": 0.5,
    }
    (start,) = calls(manager, "StartTransientUnit")
    assert start.signature == "ssa(sv)a(sa(sv))"
    assert start.path == "/org/freedesktop/systemd1"
    assert start.interface == "org.freedesktop.systemd1.Manager"
    name, mode, properties, aux = start.body
    assert (name, mode, aux) == (scope, "fail", [])
    assert dict(properties) == {
        "Description": ("s", f"edged budget lease 7 (pid {victim.pid})"),
        "PIDs": ("au", [victim.pid]),
        "CollectMode": ("s", "inactive-or-failed"),
        "MemoryMax": ("t", 256 * MiB),
        "CPUQuotaPerSecUSec": ("t", 500_000),
        "Slice": ("s", "user-1000.slice"),
    }
    # systemd moved the process and holds the limits; the scope is recorded for a restore
    assert manager.pids[victim.pid] == scope
    assert manager.units[scope]["MemoryMax"] == 256 * MiB
    assert manager.units[scope]["CPUQuotaPerSecUSec"] == 500_000
    assert manager.scopes[scope].state == "running"
    assert StateStore(tmp_path / "state").data.units[scope].lease_scope


def test_resize_changes_the_scope_and_lift_abandons_it_without_stopping_it(
    manager: FakeManager, units: SystemdUnits, victim: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    store = StateStore(tmp_path / "state")
    leases = ScopeLeases(units, store)
    lease = lease_for(victim.pid, memory=256 * MiB, cpu=0.5)
    scope = leases.apply(lease)["unit"]
    # a process in no unit: no Slice asked for (systemd then uses its default)
    assert "Slice" not in dict(calls(manager, "StartTransientUnit")[0].body[2])

    resized = leases.apply(replace(lease, granted={"memory": 128 * MiB}))
    assert resized == {"how": "scope", "unit": scope, "memory_max_bytes": 128 * MiB}
    assert calls(manager, "SetUnitProperties")[-1].body == (
        scope,
        True,
        [("MemoryMax", ("t", 128 * MiB)), ("CPUQuotaPerSecUSec", ("t", UINT64_MAX))],
    )
    assert manager.units[scope]["CPUQuotaPerSecUSec"] == UINT64_MAX

    leases.lift(lease)
    assert manager.units[scope]["MemoryMax"] == UINT64_MAX
    assert manager.scopes[scope].state == "abandoned"
    assert "StopUnit" not in manager.members()  # stopping a scope kills what is in it
    assert victim.poll() is None
    assert StateStore(tmp_path / "state").data.empty()
    leases.lift(lease)  # twice is harmless: nothing more is sent
    assert manager.members().count("AbandonScope") == 1


def test_a_grant_without_memory_or_cpu_is_cooperative_and_lifts_an_earlier_scope(
    manager: FakeManager, units: SystemdUnits, victim: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    leases = ScopeLeases(units, StateStore(tmp_path))
    assert leases.apply(lease_for(victim.pid, gpu_memory=MiB)) == {"how": "cooperative"}
    assert calls(manager, "StartTransientUnit") == []
    lease = lease_for(victim.pid, cpu=1.0)
    scope = leases.apply(lease)["unit"]
    assert leases.apply(replace(lease, granted={"gpu_memory": MiB})) == {"how": "cooperative"}
    assert manager.scopes[scope].state == "abandoned"


def test_a_second_lease_for_a_process_in_a_lease_scope_is_cooperative(
    manager: FakeManager, units: SystemdUnits, victim: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    leases = ScopeLeases(units, StateStore(tmp_path))
    first = leases.apply(lease_for(victim.pid, 1, memory=64 * MiB))
    second = leases.apply(lease_for(victim.pid, 2, memory=64 * MiB))
    assert second == {
        "how": "cooperative",
        "reason": f"pid {victim.pid} is in {first['unit']} (lease 1)",
    }
    leases.lift(lease_for(victim.pid, 1))
    # once the first lease is over, a new one moves the process into a scope of its own
    third = leases.apply(lease_for(victim.pid, 3, memory=64 * MiB))
    assert third["unit"] == f"edged-lease-3-{victim.pid}.scope"
    assert manager.pids[victim.pid] == third["unit"]


# --- refusals, as systemd refuses ------------------------------------------------------------


def test_the_fake_refuses_what_systemd_refuses(
    manager: FakeManager, units: SystemdUnits, victim: subprocess.Popen[bytes]
) -> None:
    pids = ("PIDs", ("au", [victim.pid]))
    with pytest.raises(UnitError) as info:
        units.start_scope("a.scope", [pids, ("MemoryMaximum", ("t", MiB))])
    assert info.value.error_name == PROPERTY_READ_ONLY
    assert "MemoryMaximum" in str(info.value)
    with pytest.raises(UnitError) as info:
        units.start_scope("a.scope", [pids, ("MemoryMax", ("s", "1M"))])
    assert info.value.error_name == INVALID_ARGS
    with pytest.raises(UnitError) as info:
        units.start_scope("no/slashes.scope", [pids])
    assert info.value.error_name == INVALID_ARGS
    with pytest.raises(UnitError) as info:
        units.start_scope("a.scope", [("PIDs", ("au", [1]))])
    assert info.value.error_name == INVALID_ARGS
    gone = subprocess.Popen(["true"])
    gone.wait()
    with pytest.raises(UnitError) as info:
        units.start_scope("a.scope", [("PIDs", ("au", [gone.pid]))])
    assert info.value.error_name == PROCESS_UNKNOWN
    units.start_scope("a.scope", [pids])
    with pytest.raises(UnitError) as info:
        units.start_scope("a.scope", [pids])
    assert info.value.error_name == UNIT_EXISTS
    assert manager.scopes["a.scope"].pids == [victim.pid]


def test_a_taken_name_gets_a_suffix_and_a_refused_start_leaves_the_lease_cooperative(
    manager: FakeManager, units: SystemdUnits, victim: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    store = StateStore(tmp_path)
    leases = ScopeLeases(units, store)
    # an abandoned scope of an earlier run with the same lease number and pid
    manager.add_unit(f"edged-lease-7-{victim.pid}.scope")
    how = leases.apply(lease_for(victim.pid, memory=64 * MiB))
    assert how["unit"] == f"edged-lease-7-{victim.pid}-1.scope"
    assert list(store.data.units) == [how["unit"]]  # the refused name left no record

    manager.deny.add("StartTransientUnit")
    other = subprocess.Popen(["sleep", "60"])
    try:
        refused = leases.apply(lease_for(other.pid, 8, memory=64 * MiB))
    finally:
        other.kill()
        other.wait()
    assert refused["how"] == "cooperative"
    assert "Access denied" in refused["reason"]
    assert list(store.data.units) == [how["unit"]]


def test_a_failed_start_job_leaves_the_lease_cooperative(
    manager: FakeManager, units: SystemdUnits, victim: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    manager.job_result = "failed"  # e.g. the process exited before the job ran
    store = StateStore(tmp_path)
    how = ScopeLeases(units, store).apply(lease_for(victim.pid, memory=64 * MiB))
    assert how["how"] == "cooperative"
    assert "result 'failed'" in how["reason"]
    assert store.data.empty()  # systemd has nothing under that name: nothing to release


# --- the bus gone mid-lease --------------------------------------------------------------


def test_the_bus_gone_mid_lease_keeps_the_scope_recorded_for_the_restore(
    bus_proc: tuple[subprocess.Popen[bytes], str],
    manager: FakeManager,
    victim: subprocess.Popen[bytes],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = StateStore(tmp_path / "state")
    units = SystemdUnits(manager.address, timeout_s=5.0)
    leases = ScopeLeases(units, store)
    lease = lease_for(victim.pid, memory=256 * MiB, cpu=0.5)
    applied = leases.apply(lease)
    scope = applied["unit"]
    manager.stop()
    stop_bus(bus_proc[0])

    # a resize: refused with the reason; what is in force is still what it was
    resized = leases.apply(replace(lease, granted={"memory": 512 * MiB, "cpu": 0.5}))
    assert resized["memory_max_bytes"] == 256 * MiB
    assert resized["error"].startswith("resize not applied: ")
    assert "D-Bus" in resized["error"]
    # the lift cannot reach systemd: the lease ends anyway, the scope stays recorded
    with caplog.at_level(logging.WARNING, logger="edged"):
        leases.lift(lease)
    units.close()
    assert "keeps its limits until systemd answers" in caplog.text
    assert StateStore(tmp_path / "state").data.units[scope].lease_scope

    # the next start, with systemd back: the restore releases it
    (tmp_path / "bus2").mkdir()
    proc, address = start_bus(tmp_path / "bus2")
    back = FakeManager(address)
    back.units[scope] = {"MemoryMax": 256 * MiB, "MemoryHigh": UINT64_MAX}
    back.units[scope]["CPUQuotaPerSecUSec"] = 500_000
    back.scopes[scope] = Scope(pids=[victim.pid])
    back.start()
    restarted = SystemdUnits(address)
    try:
        assert restore_all(StateStore(tmp_path / "state"), None, Signaller(), units=restarted) == 1
        assert back.units[scope]["MemoryMax"] == UINT64_MAX
        assert back.units[scope]["CPUQuotaPerSecUSec"] == UINT64_MAX
        assert back.scopes[scope].state == "abandoned"
        assert StateStore(tmp_path / "state").data.empty()
    finally:
        restarted.close()
        back.stop()
        stop_bus(proc)
    assert victim.poll() is None


def test_a_lease_on_a_bus_that_is_not_there_is_cooperative(
    victim: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    nowhere = SystemdUnits(f"unix:path={tmp_path / 'none'}", timeout_s=1.0)
    store = StateStore(tmp_path)
    how = ScopeLeases(nowhere, store).apply(lease_for(victim.pid, memory=MiB))
    assert how["how"] == "cooperative"
    assert "D-Bus" in how["reason"]
    with pytest.raises(EnforceError):
        nowhere.ping()


# --- with the enforcer on the same scope ----------------------------------------------------


def test_a_cpu_throttle_on_a_lease_scope_outlives_the_lease_and_then_lifts_to_none(
    manager: FakeManager, units: SystemdUnits, victim: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    store = StateStore(tmp_path)
    leases = ScopeLeases(units, store)
    lease = lease_for(victim.pid, memory=256 * MiB, cpu=1.0)
    scope = leases.apply(lease)["unit"]
    enforcer = Enforcer(
        None, Signaller(), store, dry_run=False, recheck=lambda a: True, units=units
    )
    ticks = read_start_ticks(victim.pid)
    assert ticks is not None

    def act(kind: ActionKind, target: float | None = None) -> Status:
        action = Action(
            kind,
            victim.pid,
            Resource.CPU,
            reason="soft",
            strategy="dynamic",
            klass=ProcessClass.NORMAL,
            start_ticks=ticks,
            target=target,
        )
        return enforcer.apply(action).status

    assert act(ActionKind.THROTTLE, 0.25) is Status.DONE  # through systemd, on the scope
    assert manager.units[scope]["CPUQuotaPerSecUSec"] == 250_000
    leases.lift(lease)
    assert manager.units[scope]["MemoryMax"] == UINT64_MAX
    assert manager.units[scope]["CPUQuotaPerSecUSec"] == 250_000  # the throttle still holds
    assert manager.scopes[scope].state == "abandoned"
    assert act(ActionKind.UNTHROTTLE) is Status.DONE
    assert manager.units[scope]["CPUQuotaPerSecUSec"] == UINT64_MAX  # not the lease's 1 core
    assert store.data.empty()


# --- which way the daemon enforces leases ---------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        ("auto", True, ScopeLeases),
        ("systemd", True, ScopeLeases),
        ("auto", False, Cooperative),  # no bus: cgroups, and there are none under this root
        ("systemd", False, ScopeLeases),  # asked for: each lease says why it is not enforced
        ("cgroupfs", True, Cooperative),
    ],
)
def test_the_daemon_enforces_leases_as_scopes_where_systemd_answers(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    manager: FakeManager,
    case: tuple[str, bool, type],
) -> None:
    setting, bus_up, expected = case
    root = tmp_path / "root"
    (root / "run" / "systemd" / "system").mkdir(parents=True)
    address = manager.address if bus_up else f"unix:path={tmp_path / 'none'}"
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", address)
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    cfg = config_mod.load(
        None, environ={}, overrides={"root": str(root), "enforce": {"backend": setting}}
    )
    daemon = Daemon(cfg, environ={"STATE_DIRECTORY": str(tmp_path / "state")})
    daemon._start_controller()
    try:
        assert type(daemon.budgets.enforcer) is expected
        assert not isinstance(daemon.budgets.enforcer, CgroupLeases)
    finally:
        daemon._shutdown_parts()
