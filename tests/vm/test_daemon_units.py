"""edged as shipped, under real systemd: the units, the protection on its defaults, budget
leases as transient scopes, and recovery after a crash. Everything acts on real processes in
real units; nothing is faked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
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
    STATE_FILE,
    alive,
    cgroup_of,
    edged_status,
    prop,
    read,
    run_service,
    sh,
    start_edged,
    stop_edged,
    wait_for,
)

pytestmark = pytest.mark.vm
UNITS = Path("/etc/systemd/system")
# The hog allocates (and touches) 16 MiB at a time until something stops it; a restart of its
# service finds the marker and only sleeps, so the restarted process is the one to inspect.
HOG = (
    "import time\n"
    "held = []\n"
    "while True:\n"
    "    held.append(bytearray(b'x') * (16 << 20))\n"
    "    time.sleep(0.05)\n"
)


def events() -> list[dict[str, object]]:
    out = sh("edged", "events", "--json")
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_units_verify_with_edged_installed() -> None:
    done = subprocess.run(
        ["systemd-analyze", "verify", str(UNITS / "edged.service"), str(UNITS / "edged.socket")],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "edged" not in done.stderr  # no warning about edged's own units


def test_active_ready_and_reload() -> None:
    pid = start_edged()
    assert prop("edged.service", "Type") == "notify"
    # READY=1 made `systemctl restart` return with the unit active; STATUS= came with it
    assert prop("edged.service", "SubState") == "running"
    assert prop("edged.service", "StatusText")
    assert prop("edged.socket", "ActiveState") == "active"
    status = edged_status()  # through the socket systemd made (socket activation)
    assert status["ticks"] >= 1
    assert Path(prop("edged.service", "ControlGroup")).name == "edged.service"
    sh("systemctl", "reload", "edged.service", timeout=120)
    wait_for("reloaded and ready", lambda: prop("edged.service", "SubState") == "running")
    assert int(prop("edged.service", "MainPID")) == pid  # reloaded in place, not restarted
    assert edged_status()["uptime_s"] >= status["uptime_s"]


def test_daemon_stays_under_its_memory_high() -> None:
    start_edged()
    group = Path("/sys/fs/cgroup") / prop("edged.service", "ControlGroup").lstrip("/")
    assert read(group / "memory.min") == str(64 << 20)
    assert read(group / "memory.high") == str(128 << 20)
    assert int(read(group / "memory.current")) < 128 << 20


@pytest.mark.slow
@pytest.mark.timeout(420)  # up to ~100 s of systemd's own timeouts, several times slower on TCG
def test_watchdog_kills_a_stopped_edged_and_systemd_restarts_it() -> None:
    pid = start_edged()
    os.kill(pid, signal.SIGSTOP)  # a hung daemon: no WATCHDOG=1 any more
    try:
        # WatchdogSec=30s, then SIGABRT and, for a stopped process, SIGKILL after
        # TimeoutAbortSec (= TimeoutStopSec 30s), then RestartSec=2s and the new start
        new_pid = wait_for(
            "a new edged after the watchdog",
            lambda: prop("edged.service", "ActiveState") == "active"
            and int(prop("edged.service", "MainPID")) not in (0, pid)
            and int(prop("edged.service", "MainPID")),
            timeout_s=240,
        )
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGCONT)
    assert not alive(pid)
    assert int(prop("edged.service", "NRestarts")) >= 1
    assert new_pid != pid
    assert edged_status()["ticks"] >= 1  # the new run serves the socket
    log = sh("journalctl", "-u", "edged.service", "-b", "--no-pager")
    assert "Watchdog timeout" in log


@pytest.mark.timeout(420)
@pytest.mark.parametrize("place", ["service", "root"])
def test_plain_config_protection_kills_the_hog_and_lifts_everything(
    units_made: list[str], place: str
) -> None:
    """No config at all ("auto" levels, every process a candidate): a process that allocates
    until something stops it, in a service or outside any unit (the root cgroup). edged, not
    the kernel, must end it, every step it took must have worked under the shipped unit (on v2
    the root cgroup is 0555 and the unit has no CAP_DAC_OVERRIDE: issue 11 bug 2), and a
    restarted service must start with nothing edged imposed (bug 1: it started throttled)."""
    edged_pid = start_edged("")
    journald = int(prop("systemd-journald.service", "MainPID"))
    marker = Path("/run/lane-hog-ran")
    marker.unlink(missing_ok=True)
    proc: subprocess.Popen[bytes] | None = None
    unit = ""
    if place == "service":
        script = (
            f"if [ -e {marker} ]; then exec sleep 600; fi; touch {marker}; "
            f'exec python3 -c "{HOG}"'
        )
        unit, hog = run_service(units_made, ["sh", "-c", script], "Restart=always", "RestartSec=1")
    else:

        def to_root() -> None:
            Path("/sys/fs/cgroup/cgroup.procs").write_text(str(os.getpid()))

        proc = subprocess.Popen(["python3", "-c", HOG], preexec_fn=to_root)  # noqa: PLW1509
        hog = proc.pid
    try:
        wait_for("the hog ended", lambda: not alive(hog), timeout_s=180)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(timeout=30)
    mine = [e for e in events() if e.get("pid") == hog]
    assert {e["action"] for e in mine if e.get("status") == "done"} & {"terminate", "kill"}, mine
    assert not [e for e in mine if e.get("status") == "failed"], mine
    assert "Out of memory: Killed process" not in sh("dmesg")  # not the kernel's OOM killer
    assert int(prop("edged.service", "MainPID")) == edged_pid
    assert int(prop("systemd-journald.service", "MainPID")) == journald
    wait_for("the state file clean", lambda: str(hog) not in STATE_FILE.read_text())
    if place == "root":
        # it was acted on in a scope of its own, gone with it; nothing made in systemd's root
        wait_for("its scope collected", lambda: not list(CGROUP.glob(f"edged-pid-{hog}*")))
        assert not (CGROUP / "edged").exists()
        return
    new_pid = wait_for(
        "the restarted service",
        lambda: int(prop(unit, "MainPID")) not in (0, hog) and int(prop(unit, "MainPID")),
    )
    group = cgroup_of(new_pid)
    # lifted by edged's gc once the victim is gone (every few seconds)
    wait_for("MemoryHigh back", lambda: read(group / "memory.high") == "max")
    assert prop(unit, "MemoryHigh") == "infinity"
    assert not (group / "cpu.max").exists() or read(group / "cpu.max").startswith("max ")
    assert "frozen 0" in read(group / "cgroup.events")


def _find_child(parent: int, comm: str) -> int:
    return int(sh("pgrep", "-P", str(parent), comm).split()[0])


def test_budget_lease_is_a_transient_scope_with_its_limits() -> None:
    start_edged("")
    holder = subprocess.Popen(
        ["edged", "budget", "request", "--memory", "100MiB", "--cpu", "0.5", "--", "sleep", "600"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        pid = wait_for("the leased sleep", lambda: _find_child(holder.pid, "sleep"))
        group = wait_for(
            "the lease scope",
            lambda: cgroup_of(pid) if cgroup_of(pid).name.startswith("edged-lease-") else None,
        )
        assert group.name.endswith(".scope")
        assert read(group / "memory.max") == str(100 << 20)
        assert read(group / "cpu.max") == "50000 100000"
        assert prop(group.name, "MemoryMax") == str(100 << 20)
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.wait(timeout=60)
    # the connection closed: the lease is lifted; the scope went with its process (the CLI
    # ends COMMAND when it is stopped)
    wait_for("the scope gone", lambda: not group.exists() or read(group / "memory.max") == "max")


def test_budget_request_exits_137_when_its_command_is_killed() -> None:
    start_edged("")
    done = subprocess.run(
        ["edged", "budget", "request", "--memory", "50M", "--", "sh", "-c", "kill -9 $$"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert done.returncode == 128 + signal.SIGKILL, done.stderr
    done = subprocess.run(
        ["edged", "budget", "request", "--memory", "50M", "--", "sh", "-c", "exit 3"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr


@pytest.mark.timeout(420)
def test_a_freeze_left_by_a_killed_edged_is_thawed_by_the_restarted_one(
    units_made: list[str],
) -> None:
    """edged is SIGKILLed while a unit is frozen (the freeze recorded in its state file, as
    the enforcer records it before acting); systemd restarts it, and the new run thaws."""
    start_edged("")
    edged_pid = int(prop("edged.service", "MainPID"))
    unit, pid = run_service(units_made, ["sleep", "600"])
    stop_edged()  # the enforcer below stands in for the dead run: one writer of the state
    ticks = read_start_ticks(pid)
    assert ticks is not None
    units = SystemdUnits()
    enforcer = Enforcer(detect(), Signaller(), StateStore(STATE_FILE.parent), False,
                        lambda _a: True, units=units)  # fmt: skip
    freeze = Action(ActionKind.FREEZE, pid, Resource.MEMORY, "hard", "dynamic",
                    ProcessClass.NORMAL, start_ticks=ticks)  # fmt: skip
    throttle = Action(ActionKind.THROTTLE, pid, Resource.MEMORY, "hard", "dynamic",
                      ProcessClass.NORMAL, start_ticks=ticks, target=float(150 << 20))  # fmt: skip
    assert enforcer.apply(throttle).status is Status.DONE
    assert enforcer.apply(freeze).status is Status.DONE
    units.close()
    group = cgroup_of(pid)
    wait_for("frozen", lambda: "frozen 1" in read(group / "cgroup.events"))
    assert prop(unit, "FreezerState") == "frozen"
    # start edged, then kill it hard: systemd restarts it (Restart=on-failure), and the
    # first run after the start lifts what the state file says
    sh("systemctl", "start", "edged.service", timeout=180)
    killed = int(prop("edged.service", "MainPID"))
    assert killed != edged_pid
    sh("systemctl", "kill", "--signal=SIGKILL", "edged.service")
    wait_for(
        "edged restarted by systemd",
        lambda: prop("edged.service", "ActiveState") == "active"
        and int(prop("edged.service", "MainPID")) not in (0, killed),
        timeout_s=180,
    )
    wait_for("thawed", lambda: "frozen 0" in read(group / "cgroup.events"))
    assert prop(unit, "FreezerState") == "running"
    assert read(group / "memory.high") == "max"
    assert prop(unit, "MemoryHigh") == "infinity"
    assert alive(pid)
    time.sleep(1)
    assert str(pid) not in STATE_FILE.read_text()


@pytest.mark.timeout(420)
def test_beside_systemd_oomd_edged_acts_first_and_on_the_hog(units_made: list[str]) -> None:
    """systemd-oomd as a user would enable it for a service (``ManagedOOMMemoryPressure=kill``,
    its default 60 % limit over 30 s; Debian ships no policy of its own, so without this it
    acts on nothing), side by side with edged on its defaults: the same growing service. edged
    must end the hog, and before systemd-oomd has killed anything."""
    if prop("systemd-oomd.service", "LoadState") != "loaded":
        pytest.skip("systemd-oomd is not in this image")
    sh("systemctl", "start", "systemd-oomd.service", timeout=120)
    assert prop("systemd-oomd.service", "ActiveState") == "active"
    start_edged("")
    since = sh("date", "+%Y-%m-%d %H:%M:%S").strip()
    unit, hog = run_service(
        units_made, ["python3", "-c", HOG], "ManagedOOMMemoryPressure=kill"
    )
    wait_for("the hog ended", lambda: not alive(hog), timeout_s=180)
    mine = [e for e in events() if e.get("pid") == hog and e.get("status") == "done"]
    assert {e["action"] for e in mine} & {"terminate", "kill"}, mine
    oomd = sh("journalctl", "-u", "systemd-oomd.service", "--since", since, "--no-pager")
    assert "Killed" not in oomd, oomd
    print(f"edged ended pid {hog} in {unit}: {[e['action'] for e in mine]}; systemd-oomd: "
          f"{'nothing' if 'Killed' not in oomd else oomd}")
