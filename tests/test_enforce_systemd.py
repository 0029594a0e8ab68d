"""The systemd D-Bus backend, against a real dbus-daemon and a fake systemd manager.

PID 1 here is not systemd (and systemd is never started for a test), so systemd itself is
faked (:class:`tests.systemd_bus.FakeManager`, which checks every call's signature and answers
with systemd's own error names); the bus is real: a private ``dbus-daemon`` on a temporary
socket, started per test and killed by its pid in teardown. The victims are real processes
(``sleep``), because the enforcer checks their start time before it acts.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from edged import config as config_mod
from edged.daemon import Daemon
from edged.enforce.cgroupfs import CgroupBackend
from edged.enforce.enforcer import Enforcer, Status
from edged.enforce.restore import StateStore, restore_all
from edged.enforce.signals import EnforceError, Signaller, UnitError, read_start_ticks
from edged.enforce.systemd import (
    ACCESS_DENIED,
    NO_SUCH_UNIT,
    NO_UNIT_FOR_PID,
    UINT64_MAX,
    SystemdUnits,
    choose_units,
    cores_to_usec_per_s,
    systemd_booted,
)
from edged.policy.base import Action, ActionKind, ProcessClass, Resource
from tests.conftest import sleeping_process
from tests.systemd_bus import Call, FakeManager, dbus_daemon, start_bus, stop_bus

pytestmark = pytest.mark.skipif(
    dbus_daemon() is None, reason="needs dbus-daemon (Debian package dbus)"
)

GiB = 1 << 30
MiB = 1 << 20


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[str]:
    """A private dbus-daemon; its address."""
    proc, address = start_bus(tmp_path)
    try:
        yield address
    finally:
        stop_bus(proc)


@pytest.fixture
def manager(bus: str) -> Iterator[FakeManager]:
    fake = FakeManager(bus)
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def units(bus: str) -> Iterator[SystemdUnits]:
    client = SystemdUnits(bus, timeout_s=5.0)
    try:
        yield client
    finally:
        client.close()


victim = pytest.fixture(sleeping_process, name="victim")


def ticks(pid: int) -> int:
    value = read_start_ticks(pid)
    assert value is not None
    return value


def action(kind: ActionKind, pid: int, resource: Resource, target: float | None = None) -> Action:
    return Action(
        kind,
        pid,
        resource,
        reason="soft",
        strategy="dynamic",
        klass=ProcessClass.NORMAL,
        start_ticks=ticks(pid),
        target=target,
    )


def enforcer(store: StateStore, units: SystemdUnits) -> Enforcer:
    """An enforcer with systemd units and no cgroup backend (this machine is no systemd one,
    and a call routed to cgroupfs must show up as 'no cgroup backend', not act)."""
    return Enforcer(None, Signaller(), store, dry_run=False, recheck=lambda a: True, units=units)


def sets(manager: FakeManager) -> list[Call]:
    return [c for c in manager.calls if c.member == "SetUnitProperties"]


# --- the calls themselves -------------------------------------------------------------------


def test_calls_carry_the_documented_signatures_and_values(
    manager: FakeManager, units: SystemdUnits
) -> None:
    manager.add_unit("app.service", 4242, memory_high=GiB)
    assert units.unit_of(4242) == "app.service"
    assert units.memory_high_bytes("app.service") == GiB
    assert units.cpu_quota_usec_per_s("app.service") == UINT64_MAX
    units.set_memory_high("app.service", 256 * MiB)
    units.set_cpu_quota("app.service", cores_to_usec_per_s(0.5))
    units.set_memory_high("app.service", UINT64_MAX)
    units.freeze("app.service")
    assert manager.frozen == {"app.service"}
    units.thaw("app.service")
    assert manager.frozen == set()

    by_pid, get_id = manager.calls[0], manager.calls[1]
    assert (by_pid.member, by_pid.signature, by_pid.body) == ("GetUnitByPID", "u", (4242,))
    assert by_pid.interface == "org.freedesktop.systemd1.Manager"
    assert by_pid.path == "/org/freedesktop/systemd1"
    assert (get_id.interface, get_id.signature, get_id.body) == (
        "org.freedesktop.DBus.Properties",
        "ss",
        ("org.freedesktop.systemd1.Unit", "Id"),
    )
    assert get_id.path == "/org/freedesktop/systemd1/unit/app_2eservice"
    gets = [c.body for c in manager.calls if c.member == "Get"][1:]
    assert gets == [
        ("org.freedesktop.systemd1.Service", "MemoryHigh"),
        ("org.freedesktop.systemd1.Service", "CPUQuotaPerSecUSec"),
        # lifting MemoryHigh reads the unit's cgroup to check the kernel agrees (see
        # SystemdUnits._lifted_in_cgroup)
        ("org.freedesktop.systemd1.Service", "ControlGroup"),
    ]
    assert [(c.signature, c.body) for c in sets(manager)] == [
        ("sba(sv)", ("app.service", True, [("MemoryHigh", ("t", 256 * MiB))])),
        ("sba(sv)", ("app.service", True, [("CPUQuotaPerSecUSec", ("t", 500_000))])),
        ("sba(sv)", ("app.service", True, [("MemoryHigh", ("t", UINT64_MAX))])),
    ]
    freezes = [
        (c.member, c.signature, c.body)
        for c in manager.calls
        if c.member in ("FreezeUnit", "ThawUnit")
    ]
    assert freezes == [
        ("FreezeUnit", "s", ("app.service",)),
        ("ThawUnit", "s", ("app.service",)),
    ]
    assert manager.units["app.service"]["CPUQuotaPerSecUSec"] == 500_000


def test_errors_become_enforce_errors_with_the_dbus_name(
    manager: FakeManager, units: SystemdUnits, tmp_path: Path
) -> None:
    manager.add_unit("app.service", 4242)
    with pytest.raises(UnitError) as info:
        units.unit_of(99999)
    assert info.value.error_name == NO_UNIT_FOR_PID
    assert info.value.pid == 99999
    with pytest.raises(UnitError) as info:
        units.set_memory_high("gone.service", GiB)
    assert (info.value.error_name, info.value.unit, info.value.op) == (
        NO_SUCH_UNIT,
        "gone.service",
        "SetUnitProperties",
    )
    manager.deny.add("SetUnitProperties")
    with pytest.raises(UnitError) as info:
        units.set_memory_high("app.service", GiB)
    assert info.value.error_name == ACCESS_DENIED
    assert "app.service" in str(info.value)
    # no bus at all: an EnforceError (not a UnitError, not an OSError)
    nowhere = SystemdUnits(f"unix:path={tmp_path / 'no-such-bus'}", timeout_s=1.0)
    with pytest.raises(EnforceError) as missing:
        nowhere.freeze("app.service")
    assert not isinstance(missing.value, UnitError)
    assert "no-such-bus" in str(missing.value)


# --- the enforcer through systemd -----------------------------------------------------------


def test_throttle_goes_to_the_unit_and_lifting_restores_its_previous_values(
    manager: FakeManager,
    units: SystemdUnits,
    victim: subprocess.Popen[bytes],
    tmp_path: Path,
) -> None:
    manager.add_unit("edged.service", os.getpid())
    manager.add_unit("app.service", victim.pid, memory_high=GiB, cpu_quota=2_000_000)
    store = StateStore(tmp_path / "state")
    enf = enforcer(store, units)

    mem = enf.apply(action(ActionKind.THROTTLE, victim.pid, Resource.MEMORY, 256 * MiB))
    cpu = enf.apply(action(ActionKind.THROTTLE, victim.pid, Resource.CPU, 0.25))
    assert (mem.status, cpu.status) == (Status.DONE, Status.DONE), (mem, cpu)
    assert manager.units["app.service"] == {
        "MemoryHigh": 256 * MiB,
        "CPUQuotaPerSecUSec": 250_000,
    }
    on_disk = StateStore(tmp_path / "state").data.units["app.service"]
    assert on_disk.previous_memory_high_bytes == GiB
    assert on_disk.previous_cpu_quota_usec_per_s == 2_000_000
    assert manager.units["edged.service"] == {  # edged's own unit is left alone
        "MemoryHigh": UINT64_MAX,
        "CPUQuotaPerSecUSec": UINT64_MAX,
    }

    assert enf.apply(action(ActionKind.UNTHROTTLE, victim.pid, Resource.MEMORY)).status is (
        Status.DONE
    )
    assert manager.units["app.service"]["MemoryHigh"] == GiB  # what it had, not infinity
    assert manager.units["app.service"]["CPUQuotaPerSecUSec"] == 250_000  # still held
    assert enf.apply(action(ActionKind.UNTHROTTLE, victim.pid, Resource.CPU)).status is (
        Status.DONE
    )
    assert manager.units["app.service"]["CPUQuotaPerSecUSec"] == 2_000_000
    assert StateStore(tmp_path / "state").data.empty()
    assert victim.poll() is None  # the process keeps running in its own unit


def test_freeze_and_thaw_the_unit(
    manager: FakeManager, units: SystemdUnits, victim: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    manager.add_unit("app.service", victim.pid)
    store = StateStore(tmp_path)
    enf = enforcer(store, units)
    assert enf.apply(action(ActionKind.FREEZE, victim.pid, Resource.MEMORY)).status is Status.DONE
    assert manager.frozen == {"app.service"}
    assert store.data.units["app.service"].frozen
    assert enf.apply(action(ActionKind.THAW, victim.pid, Resource.MEMORY)).status is Status.DONE
    assert manager.frozen == set()
    assert store.data.empty()


def test_freeze_falls_back_to_sigstop_without_freezeunit(
    manager: FakeManager, units: SystemdUnits, victim: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    manager.add_unit("app.service", victim.pid)
    manager.freeze_supported = False  # systemd < 246
    store = StateStore(tmp_path)
    # a cgroup backend that can freeze is there, and must not be used for a process in a unit
    enf = Enforcer(
        cast(CgroupBackend, _Untouchable()),
        Signaller(),
        store,
        dry_run=False,
        recheck=lambda a: True,
        units=units,
    )
    assert enf.apply(action(ActionKind.FREEZE, victim.pid, Resource.MEMORY)).status is Status.DONE
    assert _wait_state(victim.pid, "T")
    assert list(store.data.stopped) == [str(victim.pid)]
    assert not store.data.units
    assert enf.apply(action(ActionKind.THAW, victim.pid, Resource.MEMORY)).status is Status.DONE
    assert _wait_state(victim.pid, "SR")


class _Untouchable:
    """A cgroup backend that fails the test if the enforcer moves or freezes anything."""

    subtree = "edged"
    can_freeze = True

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"cgroup backend used for a process in a unit: {name}")


def _wait_state(pid: int, states: str, timeout_s: float = 5.0) -> bool:
    """Whether ``pid`` reaches one of ``states`` (stat field 3) in time; signals are
    delivered asynchronously."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        raw = Path(f"/proc/{pid}/stat").read_text()
        if raw[raw.rindex(")") + 2] in states:
            return True
        time.sleep(0.01)
    return False


def test_processes_in_no_unit_or_in_edgeds_own_unit_are_not_sent_to_systemd(
    manager: FakeManager,
    units: SystemdUnits,
    victim: subprocess.Popen[bytes],
    tmp_path: Path,
) -> None:
    enf = enforcer(StateStore(tmp_path), units)
    # no unit (NoUnitForPID): the cgroup backend's business; here there is none
    out = enf.apply(action(ActionKind.THROTTLE, victim.pid, Resource.MEMORY, 64 * MiB))
    assert out.status is Status.FAILED
    assert "no cgroup backend" in out.reason
    # edged's own unit: never throttled through systemd
    manager.add_unit("edged.service", victim.pid)
    enf = Enforcer(
        None,
        Signaller(),
        StateStore(tmp_path / "b"),
        dry_run=False,
        recheck=lambda a: True,
        units=units,
        own_unit="edged.service",
    )
    out = enf.apply(action(ActionKind.THROTTLE, victim.pid, Resource.MEMORY, 64 * MiB))
    assert out.status is Status.FAILED
    assert "no cgroup backend" in out.reason
    assert sets(manager) == []


def test_refusals_are_outcomes_not_crashes(
    manager: FakeManager, units: SystemdUnits, victim: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    manager.add_unit("app.service", victim.pid)
    manager.deny.add("SetUnitProperties")
    out = enforcer(StateStore(tmp_path), units).apply(
        action(ActionKind.THROTTLE, victim.pid, Resource.MEMORY, 64 * MiB)
    )
    assert out.status is Status.FAILED
    assert isinstance(out.error, UnitError)
    assert out.error.error_name == ACCESS_DENIED
    # a bus that is not there fails the action; it never falls back to writing cgroups
    nowhere = SystemdUnits(f"unix:path={tmp_path / 'none'}", timeout_s=1.0)
    out = enforcer(StateStore(tmp_path / "b"), nowhere).apply(
        action(ActionKind.THROTTLE, victim.pid, Resource.MEMORY, 64 * MiB)
    )
    assert out.status is Status.FAILED
    assert "D-Bus" in out.reason


def test_restore_after_a_crash_from_a_fresh_store(
    manager: FakeManager, units: SystemdUnits, victim: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    manager.add_unit("app.service", victim.pid, memory_high=3 * GiB)
    enf = enforcer(StateStore(tmp_path), units)
    for a in (
        action(ActionKind.THROTTLE, victim.pid, Resource.MEMORY, 128 * MiB),
        action(ActionKind.THROTTLE, victim.pid, Resource.CPU, 0.5),
        action(ActionKind.FREEZE, victim.pid, Resource.MEMORY),
    ):
        assert enf.apply(a).status is Status.DONE
    assert manager.frozen == {"app.service"}
    del enf  # "crash": nothing is undone in process; the next start reads the file

    # the next start cannot reach the bus yet: the record is kept, not dropped
    assert restore_all(StateStore(tmp_path), None, Signaller(), None) == 0
    assert "app.service" in StateStore(tmp_path).data.units

    fresh = StateStore(tmp_path)
    restarted = SystemdUnits(manager.address)  # a new connection, as after a restart
    try:
        assert restore_all(fresh, None, Signaller(), units=restarted) == 1
    finally:
        restarted.close()
    assert manager.frozen == set()
    assert manager.units["app.service"] == {
        "MemoryHigh": 3 * GiB,
        "CPUQuotaPerSecUSec": UINT64_MAX,
    }
    assert StateStore(tmp_path).data.empty()
    # twice is harmless
    assert restore_all(StateStore(tmp_path), None, Signaller(), units=units) == 0


def test_restore_forgets_a_unit_systemd_no_longer_has(
    manager: FakeManager, units: SystemdUnits, victim: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    manager.add_unit("app.service", victim.pid)
    enf = enforcer(StateStore(tmp_path), units)
    assert enf.apply(action(ActionKind.FREEZE, victim.pid, Resource.MEMORY)).status is Status.DONE
    del manager.units["app.service"]  # the unit stopped and was unloaded
    assert restore_all(StateStore(tmp_path), None, Signaller(), units=units) == 0
    assert StateStore(tmp_path).data.empty()


def test_terminate_thaws_the_frozen_unit_so_the_signal_is_acted_on(
    manager: FakeManager, units: SystemdUnits, victim: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    manager.add_unit("app.service", victim.pid)
    store = StateStore(tmp_path)
    enf = enforcer(store, units)
    assert enf.apply(action(ActionKind.FREEZE, victim.pid, Resource.MEMORY)).status is Status.DONE
    assert enf.apply(action(ActionKind.TERMINATE, victim.pid, Resource.MEMORY)).status is (
        Status.DONE
    )
    assert victim.wait(5) == -15
    assert manager.frozen == set()
    assert store.data.empty()


# --- routing: only where PID 1 is systemd ---------------------------------------------------


def test_systemd_is_chosen_only_where_the_root_says_it_is_pid_1(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    booted = tmp_path / "booted"
    (booted / "run" / "systemd" / "system").mkdir(parents=True)
    plain.mkdir()
    assert not systemd_booted(plain)
    assert systemd_booted(booted)
    for setting in ("auto", "systemd"):
        assert choose_units(setting, plain) is None
        chosen = choose_units(setting, booted, "unix:path=/nowhere")
        assert isinstance(chosen, SystemdUnits)
        assert chosen.address == "unix:path=/nowhere"
    for setting in ("cgroupfs", "signals", "none"):
        assert choose_units(setting, booted) is None


@pytest.mark.parametrize(
    ("booted", "setting"),
    [(True, "auto"), (True, "systemd"), (True, "cgroupfs"), (False, "auto"), (False, "systemd")],
)
def test_daemon_routes_by_the_configured_root(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    booted: bool,
    setting: str,
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    if booted:
        (root / "run" / "systemd" / "system").mkdir(parents=True)
    cfg = config_mod.load(
        None,
        environ={},
        overrides={"root": str(root), "enforce": {"backend": setting}},
    )
    # the state file in tmp (as root too: never the machine's /var/lib/edged)
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    daemon = Daemon(cfg, environ={"STATE_DIRECTORY": str(tmp_path / "state")})
    with caplog.at_level(logging.INFO, logger="edged"):
        daemon._start_controller()
    assert (tmp_path / "state" / "imposed.json").exists()  # its state, not the machine's
    try:
        _check_routing(daemon, caplog, booted, setting)
    finally:
        daemon._shutdown_parts()  # restores (nothing here) and closes the bus connection


def _check_routing(
    daemon: Daemon, caplog: pytest.LogCaptureFixture, booted: bool, setting: str
) -> None:
    assert daemon.controller is not None
    chosen = daemon.controller.enforcer.units
    assert isinstance(chosen, SystemdUnits) is (booted and setting != "cgroupfs")
    if setting == "systemd" and not booted:
        assert 'backend = "systemd" but PID 1 is not systemd' in caplog.text
        assert daemon.controller.enforcer.backend is None
