"""The enforcer on real systemd and a real cgroup v2, for a process in each place a process
lives on such a machine: a service, a scope, a user's login session and outside any unit (the
root cgroup). Each goes up the ladder and is let go, and what edged imposed must be gone
afterwards: on the unit, in /sys/fs/cgroup and in the state file (bug 1 of issue 11).

edged.service is stopped for these (its own enforcer must not act on the same processes);
the enforcer is built as the daemon builds it where PID 1 is systemd.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from edged.enforce.cgroupfs import detect
from edged.enforce.enforcer import Enforcer, Status
from edged.enforce.restore import StateStore
from edged.enforce.signals import Signaller, read_start_ticks
from edged.enforce.systemd import SystemdUnits
from edged.policy.base import Action, ActionKind, ProcessClass, Resource
from tests.vm.conftest import (
    CGROUP,
    alive,
    cgroup_of,
    name,
    proc_state,
    prop,
    read,
    run_service,
    sh,
    stop_edged,
    wait_for,
)

pytestmark = pytest.mark.vm
PLACES = ("service", "scope", "session", "root")
MEMORY_HIGH_BYTES = 200 << 20


@pytest.fixture(scope="module", autouse=True)
def _edged_stopped() -> None:
    stop_edged()


class Target:
    """A ``sleep`` in one of PLACES, ended (and its unit stopped) at teardown."""

    def __init__(self, place: str, made: list[str]) -> None:
        self.place = place
        self.unit: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        if place == "service":
            # Restart=always: a killed main process comes back, and must come back unthrottled
            self.unit, self.pid = run_service(
                made, ["sleep", "600"], "Restart=always", "RestartSec=1"
            )
        elif place == "scope":
            self.unit = name("lane-scope") + ".scope"
            self.proc = subprocess.Popen(
                ["systemd-run", "--quiet", "--scope", f"--unit={self.unit}", "--", "sleep", "600"]
            )
            self.pid = self.proc.pid  # systemd-run --scope execs the command
            wait_for(f"pid in {self.unit}", lambda: cgroup_of(self.pid).name == self.unit)
            made.append(self.unit)
        elif place == "session":
            # su's PAM stack (common-session: pam_systemd) opens a login session scope
            self.proc = subprocess.Popen(["su", "-l", "lane-user", "-c", "exec sleep 600"])
            self.pid = wait_for(
                "the session's sleep",
                lambda: int(sh("pgrep", "-P", str(self.proc.pid), "sleep").split()[0]),  # type: ignore[union-attr]
            )
            self.unit = wait_for(
                "a session scope",
                lambda: (
                    cgroup_of(self.pid).name
                    if cgroup_of(self.pid).name.startswith("session-")
                    else None
                ),
            )
        else:

            def to_root() -> None:
                Path("/sys/fs/cgroup/cgroup.procs").write_text(str(os.getpid()))

            self.proc = subprocess.Popen(["sleep", "600"], preexec_fn=to_root)  # noqa: PLW1509
            self.pid = self.proc.pid
            assert cgroup_of(self.pid) == CGROUP
        ticks = read_start_ticks(self.pid)
        assert ticks is not None
        self.start_ticks = ticks

    def action(
        self, kind: ActionKind, resource: Resource = Resource.MEMORY, target: float | None = None
    ) -> Action:
        return Action(
            kind,
            self.pid,
            resource,
            "hard",
            "dynamic",
            ProcessClass.NORMAL,
            start_ticks=self.start_ticks,
            target=target,
        )

    def end(self) -> None:
        if alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture
def enforcer(tmp_path: Path) -> Iterator[Enforcer]:
    units = SystemdUnits()
    backend = detect()
    assert backend is not None
    yield Enforcer(
        backend, Signaller(), StateStore(tmp_path / "state"), False, lambda _a: True, units=units
    )
    units.close()


@pytest.fixture(params=PLACES)
def target(request: pytest.FixtureRequest, units_made: list[str]) -> Iterator[Target]:
    t = Target(request.param, units_made)
    yield t
    t.end()


def acting_group(t: Target) -> Path:
    """Where edged's limits land: the process's own unit, or for a process from the root
    cgroup the transient scope edged made for it."""
    group = cgroup_of(t.pid)
    if t.place == "root":
        assert group.name.startswith(f"edged-pid-{t.pid}")
        assert group.name.endswith(".scope")
        assert group.parent == CGROUP  # still in -.slice: under no limit it was not under
    else:
        assert group.name == t.unit  # never moved out of its unit
    return group


def no_quota(group: Path) -> bool:
    """No CPU quota: cpu.max says max, or the cpu controller is off for the group."""
    path = group / "cpu.max"
    return not path.exists() or read(path).startswith("max ")


def frozen(group: Path, pid: int) -> bool:
    return "frozen 1" in read(group / "cgroup.events") or proc_state(pid) == "T"


def assert_lifted(enforcer: Enforcer, t: Target) -> None:
    """Nothing edged imposed is left: not in the state file, not on the unit."""
    assert enforcer.store.data.empty(), enforcer.store.data
    assert StateStore(enforcer.store.directory).data.empty()
    if t.unit is not None and t.place == "service":
        assert prop(t.unit, "MemoryHigh") == "infinity"
        assert prop(t.unit, "CPUQuotaPerSecUSec") == "infinity"
        assert prop(t.unit, "FreezerState") == "running"
    if alive(t.pid):
        group = cgroup_of(t.pid)
        assert read(group / "memory.high") == "max"
        assert no_quota(group)
        assert "frozen 0" in read(group / "cgroup.events")
        assert proc_state(t.pid) in "SR"


def test_ladder_up_and_down_leaves_nothing(enforcer: Enforcer, target: Target) -> None:
    t = target
    assert (
        enforcer.apply(t.action(ActionKind.THROTTLE, target=MEMORY_HIGH_BYTES)).status
        is Status.DONE
    )
    group = acting_group(t)
    assert read(group / "memory.high") == str(MEMORY_HIGH_BYTES)
    assert enforcer.apply(t.action(ActionKind.THROTTLE, Resource.CPU, 0.5)).status is Status.DONE
    assert read(group / "cpu.max") == "50000 100000"
    assert enforcer.apply(t.action(ActionKind.FREEZE)).status is Status.DONE
    wait_for("frozen", lambda: frozen(group, t.pid))
    assert enforcer.apply(t.action(ActionKind.THAW)).status is Status.DONE
    wait_for("thawed", lambda: not frozen(group, t.pid))
    assert enforcer.apply(t.action(ActionKind.UNTHROTTLE)).status is Status.DONE
    assert enforcer.apply(t.action(ActionKind.UNTHROTTLE, Resource.CPU)).status is Status.DONE
    assert alive(t.pid)
    assert_lifted(enforcer, t)


@pytest.mark.parametrize("end", [ActionKind.TERMINATE, ActionKind.KILL])
def test_ended_victim_leaves_nothing(enforcer: Enforcer, target: Target, end: ActionKind) -> None:
    t = target
    assert (
        enforcer.apply(t.action(ActionKind.THROTTLE, target=MEMORY_HIGH_BYTES)).status
        is Status.DONE
    )
    assert enforcer.apply(t.action(ActionKind.THROTTLE, Resource.CPU, 0.5)).status is Status.DONE
    group = acting_group(t)
    assert enforcer.apply(t.action(ActionKind.FREEZE)).status is Status.DONE
    wait_for("frozen", lambda: frozen(group, t.pid))
    # a frozen victim must still get the signal (the freeze is lifted for it)
    assert enforcer.apply(t.action(end)).status is Status.DONE
    wait_for("the victim gone", lambda: not alive(t.pid))
    enforcer.gc()  # what the daemon's controller does every few seconds
    assert_lifted(enforcer, t)
    if t.place == "service" and t.unit is not None:
        unit = t.unit
        # Restart=always brought it back: the new process must start unthrottled, unfrozen
        new_pid = wait_for(
            "the restarted service",
            lambda: int(prop(unit, "MainPID")) not in (0, t.pid) and int(prop(unit, "MainPID")),
        )
        group = cgroup_of(new_pid)
        assert read(group / "memory.high") == "max"
        assert no_quota(group)
        assert "frozen 0" in read(group / "cgroup.events")
    if t.place == "root":  # the scope edged made went with its process
        wait_for("the scope collected", lambda: not list(CGROUP.glob(f"edged-pid-{t.pid}*")))
