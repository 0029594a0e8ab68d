"""The enforcer with real parts: real cgroup v1 groups, real child processes, as root.

Every test works in its own subtree ``edged-test-<uuid>`` of each controller (never the
production ``edged``), and the ``lab`` fixture kills its children by pid, thaws and removes its
groups (children first) even when a test fails.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edged.enforce.cgroupfs import CgroupV1, MiB
from edged.enforce.enforcer import Enforcer, Status
from edged.enforce.restore import StateStore, restore_all
from edged.enforce.signals import (
    CgroupError,
    NoSuchProcess,
    ProtectedProcess,
    Signaller,
    StaleProcess,
    read_start_ticks,
)
from edged.policy.base import Action, ActionKind, ProcessClass, Resource

pytestmark = [pytest.mark.root, pytest.mark.cgroup_v1]

ROOT = Path("/sys/fs/cgroup")
REPO = Path(__file__).resolve().parent.parent
CONTROLLERS = ("memory", "cpu", "freezer")
TICK_S = 1 / os.sysconf("SC_CLK_TCK")
V1_UNLIMITED_BYTES = 9223372036854771712  # what v1 reads back after "-1"

SPINNER = "print('ready', flush=True)\nwhile True: pass\n"
HOG = """
import sys
blocks = []
print('ready', flush=True)
for line in sys.stdin:
    blocks.append(b'x' * (int(line) << 20))  # filled, so every page is resident
    print('ok', flush=True)
"""
TERM_IGNORER = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print('ready', flush=True)
while True: time.sleep(1)
"""


class Lab:
    """Children and groups of one test; :meth:`teardown` undoes all of it."""

    def __init__(self, subtree: str) -> None:
        self.subtree = subtree
        self.children: list[subprocess.Popen[str]] = []

    def spawn(self, code: str) -> subprocess.Popen[str]:
        child = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.children.append(child)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        return child

    def action(
        self,
        kind: ActionKind,
        child: subprocess.Popen[str],
        resource: Resource = Resource.MEMORY,
        target: float | None = None,
    ) -> Action:
        """An action on ``child`` as a strategy would decide it (with its start time)."""
        start = read_start_ticks(child.pid)
        assert start is not None
        return Action(
            kind,
            child.pid,
            resource,
            reason="test",
            strategy="test",
            klass=ProcessClass.BESTEFFORT,
            start_ticks=start,
            target=target,
        )

    def dirs(self) -> list[Path]:
        """Every directory of the subtree in every controller, deepest first."""
        found: list[Path] = []
        for c in CONTROLLERS:
            base = ROOT / c / self.subtree
            for dirpath, _dirs, _files in os.walk(base):
                found.append(Path(dirpath))
        return sorted(found, key=lambda p: -len(p.parts))

    def teardown(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.kill()  # our own child, not yet reaped: its pid cannot be reused
        for d in self.dirs():  # a v1-frozen task does not die until thawed
            state = d / "freezer.state"
            if state.exists() and state.read_text().strip() != "THAWED":
                state.write_text("THAWED")
        for child in self.children:
            child.wait(timeout=10)
            for pipe in (child.stdin, child.stdout):
                if pipe is not None:
                    pipe.close()
        for d in self.dirs():
            d.rmdir()


@pytest.fixture
def lab() -> Iterator[Lab]:
    the_lab = Lab(f"edged-test-{uuid.uuid4().hex[:12]}")
    try:
        yield the_lab
    finally:
        the_lab.teardown()


@pytest.fixture
def backend(lab: Lab) -> CgroupV1:
    return CgroupV1(ROOT, subtree=lab.subtree)


def enforcer(backend: CgroupV1 | None, state_dir: Path, dry_run: bool = False) -> Enforcer:
    return Enforcer(backend, Signaller(), StateStore(state_dir), dry_run, lambda _a: True)


def cpu_s(pid: int) -> float:
    """utime + stime of ``pid``, seconds."""
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S


def cpu_share(pid: int, window_s: float) -> float:
    """Cores used by ``pid`` over ``window_s``."""
    before_cpu, before_s = cpu_s(pid), time.monotonic()
    time.sleep(window_s)
    return (cpu_s(pid) - before_cpu) / (time.monotonic() - before_s)


def cgroup_of(pid: int, controller: str) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _hid, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    raise AssertionError(f"{controller} not in /proc/{pid}/cgroup")


def v1_file(controller: str, group: str, name: str) -> str:
    return (ROOT / controller / group / name).read_text().strip()


# --- backend -------------------------------------------------------------------------------


def test_memory_hog_gets_soft_limit_and_backstop(lab: Lab, backend: CgroupV1) -> None:
    hog = lab.spawn(HOG)
    assert hog.stdin is not None
    assert hog.stdout is not None
    group = backend.place(hog.pid, "hog")
    assert group == f"{lab.subtree}/hog"
    assert cgroup_of(hog.pid, "memory") == f"/{group}"
    hog.stdin.write("64\n")
    hog.stdin.flush()
    assert hog.stdout.readline().strip() == "ok"
    used_bytes = backend.usage(group)
    assert 64 * MiB <= used_bytes < 128 * MiB

    backend.set_memory_high(group, 32 * MiB)
    assert int(v1_file("memory", group, "memory.soft_limit_in_bytes")) == 32 * MiB
    limit_bytes = int(v1_file("memory", group, "memory.limit_in_bytes"))
    # backstop: above current usage (so setting it stalls nothing) by max(64 MiB, 10 %)
    assert used_bytes + 60 * MiB <= limit_bytes <= used_bytes + 68 * MiB
    assert hog.poll() is None

    # growing past the backstop: held in its page fault, not OOM-killed (a throttle)
    hog.stdin.write("256\n")
    hog.stdin.flush()
    deadline = time.monotonic() + 10
    while "under_oom 1" not in v1_file("memory", group, "memory.oom_control"):
        assert time.monotonic() < deadline, v1_file("memory", group, "memory.oom_control")
        time.sleep(0.05)
    time.sleep(0.5)
    assert hog.poll() is None, "a throttle must not kill"
    assert "oom_kill 0" in v1_file("memory", group, "memory.oom_control")
    assert int(v1_file("memory", group, "memory.max_usage_in_bytes")) <= limit_bytes

    # lifted: it resumes where it stopped and finishes its allocation
    backend.set_memory_high(group, None)
    assert hog.stdout.readline().strip() == "ok"
    assert int(v1_file("memory", group, "memory.soft_limit_in_bytes")) == V1_UNLIMITED_BYTES
    assert int(v1_file("memory", group, "memory.limit_in_bytes")) == V1_UNLIMITED_BYTES


def test_the_backstop_counts_memory_charged_before_the_move(lab: Lab, backend: CgroupV1) -> None:
    """v1 leaves what a process held before the move charged to its old group: a throttle to
    the size it has now must stop its growth near there, not let it take as much again."""
    hog = lab.spawn(HOG)
    assert hog.stdin is not None
    assert hog.stdout is not None
    hog.stdin.write("200\n")
    hog.stdin.flush()
    assert hog.stdout.readline().strip() == "ok"
    group = backend.place(hog.pid, "moved")
    assert backend.usage(group) < 16 * MiB  # its 200 MiB stayed where they were charged
    backend.set_memory_high(group, 180 * MiB)
    limit_bytes = int(v1_file("memory", group, "memory.limit_in_bytes"))
    assert limit_bytes <= 80 * MiB  # room for the margin, not for another 180 MiB
    hog.stdin.write("128\n")
    hog.stdin.flush()
    deadline = time.monotonic() + 10
    while "under_oom 1" not in v1_file("memory", group, "memory.oom_control"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert hog.poll() is None
    backend.set_memory_high(group, None)
    assert hog.stdout.readline().strip() == "ok"


def test_cpu_spinner_held_to_quota(lab: Lab, backend: CgroupV1) -> None:
    spinner = lab.spawn(SPINNER)
    group = backend.place(spinner.pid, "spin")
    backend.set_cpu_quota(group, 0.2)
    assert v1_file("cpu", group, "cpu.cfs_quota_us") == "20000"
    assert v1_file("cpu", group, "cpu.cfs_period_us") == "100000"
    share = cpu_share(spinner.pid, 2.0)
    print(f"CPU share under a 0.2-core quota: {share:.3f} cores")
    assert 0.1 <= share <= 0.3
    backend.set_cpu_quota(group, None)
    assert v1_file("cpu", group, "cpu.cfs_quota_us") == "-1"
    assert cpu_share(spinner.pid, 0.5) > 0.5


def test_freeze_stops_progress_and_thaw_resumes(lab: Lab, backend: CgroupV1) -> None:
    spinner = lab.spawn(SPINNER)
    group = backend.place(spinner.pid, "frz")
    freeze_s = backend.freeze(group)
    assert v1_file("freezer", group, "freezer.state") == "FROZEN"
    assert cpu_share(spinner.pid, 0.5) <= 2 * TICK_S / 0.5
    thaw_s = backend.thaw(group)
    assert v1_file("freezer", group, "freezer.state") == "THAWED"
    assert cpu_share(spinner.pid, 0.5) > 0.5
    print(f"freeze {freeze_s * 1e3:.2f} ms, thaw {thaw_s * 1e3:.2f} ms")
    assert freeze_s < 1.0
    assert thaw_s < 1.0


def test_release_moves_back_and_remove_rmdirs(lab: Lab, backend: CgroupV1) -> None:
    child = lab.spawn(SPINNER)
    before = {c: cgroup_of(child.pid, c) for c in CONTROLLERS}
    assert backend.where(child.pid) == before
    group = backend.place(child.pid, "rel")
    assert all(cgroup_of(child.pid, c) == f"/{group}" for c in CONTROLLERS)
    assert backend.procs(group) == [child.pid]
    assert backend.release(child.pid)
    assert {c: cgroup_of(child.pid, c) for c in CONTROLLERS} == before
    assert backend.groups() == [group]
    assert backend.remove(group)
    assert not any((ROOT / c / group).exists() for c in CONTROLLERS)
    assert not backend.remove(group)  # already gone: fine


def test_remove_takes_down_every_controller_it_can(lab: Lab, backend: CgroupV1) -> None:
    # a process still in the group in one controller only (a split placement): that one
    # rmdir fails, and the others must still be removed, not left half-made for ever
    child = lab.spawn(SPINNER)
    before = {c: cgroup_of(child.pid, c) for c in CONTROLLERS}
    group = backend.place(child.pid, "split")
    held = CONTROLLERS[0]
    for c in CONTROLLERS[1:]:
        (ROOT / c / before[c].lstrip("/") / "cgroup.procs").write_text(str(child.pid))
    with pytest.raises(CgroupError, match="rmdir"):
        backend.remove(group)
    assert (ROOT / held / group).exists()
    assert not any((ROOT / c / group).exists() for c in CONTROLLERS[1:])
    assert backend.release(child.pid)
    assert backend.remove(group)
    assert not any((ROOT / c / group).exists() for c in CONTROLLERS)


def test_kill_all_kills_a_frozen_group(lab: Lab, backend: CgroupV1) -> None:
    children = [lab.spawn(SPINNER), lab.spawn(SPINNER)]
    group = ""
    for child in children:
        group = backend.place(child.pid, "killme")
    backend.freeze(group)
    assert backend.kill_all(group) == 2
    for child in children:
        child.wait(timeout=5)
        assert child.returncode == -signal.SIGKILL
    assert backend.procs(group) == []
    assert backend.remove(group)


# --- signals -------------------------------------------------------------------------------


def test_sigterm_ignorer_survives_terminate_and_dies_from_kill(lab: Lab, tmp_path: Path) -> None:
    child = lab.spawn(TERM_IGNORER)
    enf = enforcer(None, tmp_path)
    assert enf.apply(lab.action(ActionKind.TERMINATE, child)).status is Status.DONE
    time.sleep(0.3)
    assert child.poll() is None
    assert enf.apply(lab.action(ActionKind.KILL, child)).status is Status.DONE
    child.wait(timeout=5)
    assert child.returncode == -signal.SIGKILL


def test_signals_refuse_stale_pid1_and_self(lab: Lab, tmp_path: Path) -> None:
    child = lab.spawn(SPINNER)
    start = read_start_ticks(child.pid)
    assert start is not None
    signals = Signaller()
    with pytest.raises(StaleProcess, match="pid reused"):
        signals.kill(child.pid, start + 1)
    with pytest.raises(StaleProcess, match="no start time"):
        signals.kill(child.pid, 0)
    with pytest.raises(ProtectedProcess, match="pid 1"):
        signals.kill(1, read_start_ticks(1) or 1)
    with pytest.raises(ProtectedProcess, match="itself"):
        signals.kill(os.getpid(), read_start_ticks(os.getpid()) or 1)
    time.sleep(0.05)
    assert child.poll() is None  # none of that reached it

    enf = enforcer(None, tmp_path)
    stale = lab.action(ActionKind.KILL, child)
    stale = dataclasses.replace(stale, start_ticks=start + 1)
    outcome = enf.apply(stale)
    assert outcome.status is Status.SKIPPED
    assert "reused" in outcome.reason
    critical = dataclasses.replace(lab.action(ActionKind.KILL, child), klass=ProcessClass.CRITICAL)
    assert enf.apply(critical).reason == "critical class"
    me = dataclasses.replace(stale, pid=os.getpid())
    assert enf.apply(me).reason.startswith("protected")
    assert child.poll() is None

    child.kill()
    child.wait(timeout=5)
    with pytest.raises(NoSuchProcess):
        signals.kill(child.pid, start)


# --- enforcer ------------------------------------------------------------------------------


def test_enforcer_freeze_thaw_records_and_releases(
    lab: Lab, backend: CgroupV1, tmp_path: Path
) -> None:
    child = lab.spawn(SPINNER)
    origin = backend.where(child.pid)
    enf = enforcer(backend, tmp_path)
    decided_s = time.monotonic()
    outcome = enf.apply(lab.action(ActionKind.FREEZE, child), decided_at_s=decided_s)
    assert outcome.status is Status.DONE
    group = f"{lab.subtree}/pid-{child.pid}"
    assert v1_file("freezer", group, "freezer.state") == "FROZEN"
    on_disk = StateStore(tmp_path).data
    assert on_disk.groups[group].frozen
    assert on_disk.groups[group].origins == {str(child.pid): origin}
    assert cpu_share(child.pid, 0.3) <= 2 * TICK_S / 0.3

    assert enf.apply(lab.action(ActionKind.THAW, child)).status is Status.DONE
    assert cpu_share(child.pid, 0.3) > 0.5
    assert backend.where(child.pid) == origin
    assert not any((ROOT / c / group).exists() for c in CONTROLLERS)
    assert StateStore(tmp_path).data.empty()
    print(f"reaction time (decision -> frozen): {enf.reaction_time_s * 1e3:.2f} ms")
    assert 0 < enf.reaction_time_s < 0.5


def test_enforcer_throttles_until_both_lifted(lab: Lab, backend: CgroupV1, tmp_path: Path) -> None:
    child = lab.spawn(SPINNER)
    origin = backend.where(child.pid)
    enf = enforcer(backend, tmp_path)
    group = f"{lab.subtree}/pid-{child.pid}"
    cpu = lab.action(ActionKind.THROTTLE, child, Resource.CPU, 0.25)
    mem = lab.action(ActionKind.THROTTLE, child, Resource.MEMORY, float(256 * MiB))
    assert enf.apply(cpu).status is Status.DONE
    assert enf.apply(mem).status is Status.DONE
    # where the child's memory group was made by another manager (this machine's sessions run
    # in one), edged's memory group is a child of it, not of edged's subtree
    memory_group = backend.layout(group).get("memory", group)
    if origin["memory"] != "/":
        assert memory_group == f"{origin['memory'].strip('/')}/edged-pid-{child.pid}"
    assert v1_file("cpu", group, "cpu.cfs_quota_us") == "25000"
    assert int(v1_file("memory", memory_group, "memory.soft_limit_in_bytes")) == 256 * MiB
    record = StateStore(tmp_path).data.groups[group]
    assert (record.cpu_quota_cores, record.memory_high_bytes) == (0.25, 256 * MiB)

    unthrottle = lab.action(ActionKind.UNTHROTTLE, child, resource=Resource.CPU)
    assert enf.apply(unthrottle).status is Status.DONE
    assert v1_file("cpu", group, "cpu.cfs_quota_us") == "-1"
    # the memory throttle still holds it
    assert cgroup_of(child.pid, "memory") == f"/{memory_group}"
    unthrottle = lab.action(ActionKind.UNTHROTTLE, child, resource=Resource.MEMORY)
    assert enf.apply(unthrottle).status is Status.DONE
    assert backend.where(child.pid) == origin
    assert not (ROOT / "memory" / memory_group).exists()
    assert StateStore(tmp_path).data.empty()


def test_recheck_drops_a_recovered_action(lab: Lab, backend: CgroupV1, tmp_path: Path) -> None:
    child = lab.spawn(SPINNER)
    seen: list[Action] = []

    def recovered(action: Action) -> bool:
        seen.append(action)
        return False

    enf = Enforcer(backend, Signaller(), StateStore(tmp_path), False, recovered)
    outcome = enf.apply(lab.action(ActionKind.KILL, child))
    assert (outcome.status, outcome.reason) == (Status.SKIPPED, "recovered")
    assert len(seen) == 1
    assert child.poll() is None
    assert not (tmp_path / "imposed.json").exists()


def test_dry_run_changes_nothing(lab: Lab, backend: CgroupV1, tmp_path: Path) -> None:
    child = lab.spawn(SPINNER)

    def observe() -> tuple[object, ...]:
        return (
            {c: cgroup_of(child.pid, c) for c in CONTROLLERS},
            [d for d in lab.dirs()],
            sorted(p.name for p in tmp_path.iterdir()),
            child.poll(),
        )

    before = observe()
    enf = enforcer(backend, tmp_path, dry_run=True)
    for kind, resource, target in [
        (ActionKind.THROTTLE, Resource.CPU, 0.1),
        (ActionKind.THROTTLE, Resource.MEMORY, float(MiB)),
        (ActionKind.FREEZE, Resource.MEMORY, None),
        (ActionKind.TERMINATE, Resource.MEMORY, None),
        (ActionKind.KILL, Resource.MEMORY, None),
    ]:
        outcome = enf.apply(lab.action(kind, child, resource, target))
        assert outcome.status is Status.DRY_RUN
    assert observe() == before
    assert cpu_share(child.pid, 0.3) > 0.5  # still running free


def test_freeze_falls_back_to_sigstop_without_freezer(lab: Lab, tmp_path: Path) -> None:
    child = lab.spawn(SPINNER)
    enf = enforcer(None, tmp_path)
    assert enf.apply(lab.action(ActionKind.FREEZE, child)).status is Status.DONE
    assert StateStore(tmp_path).data.stopped[str(child.pid)].start_ticks == read_start_ticks(
        child.pid
    )
    time.sleep(0.05)
    assert cpu_share(child.pid, 0.3) <= 2 * TICK_S / 0.3
    # restore (SIGTERM path) resumes it even though the enforcer never thawed it
    assert restore_all(StateStore(tmp_path), None, Signaller()) == 1
    assert cpu_share(child.pid, 0.3) > 0.5
    assert StateStore(tmp_path).data.empty()


CRASHER = """
import sys, time
from pathlib import Path
from edged.enforce.cgroupfs import CgroupV1
from edged.enforce.enforcer import Enforcer
from edged.enforce.restore import StateStore
from edged.enforce.signals import Signaller
from edged.policy.base import Action, ActionKind, ProcessClass, Resource

subtree, state_dir, pid, start = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
enf = Enforcer(CgroupV1(subtree=subtree), Signaller(), StateStore(state_dir), False, lambda a: True)
for kind, resource, target in [
    (ActionKind.THROTTLE, Resource.CPU, 0.5),
    (ActionKind.FREEZE, Resource.MEMORY, None),
]:
    action = Action(kind, pid, resource, "test", "test", ProcessClass.BESTEFFORT, start, target)
    print(enf.apply(action).status.value, flush=True)
time.sleep(60)
"""


def test_restore_after_crash(lab: Lab, tmp_path: Path) -> None:
    child = lab.spawn(SPINNER)
    origin = {c: cgroup_of(child.pid, c) for c in CONTROLLERS}
    start = read_start_ticks(child.pid)
    crasher = subprocess.Popen(
        [sys.executable, "-c", CRASHER, lab.subtree, str(tmp_path), str(child.pid), str(start)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    lab.children.append(crasher)
    assert crasher.stdout is not None
    assert [crasher.stdout.readline().strip() for _ in range(2)] == ["done", "done"]
    crasher.kill()  # the daemon dies holding a frozen, throttled victim
    crasher.wait(timeout=5)
    group = f"{lab.subtree}/pid-{child.pid}"
    assert v1_file("freezer", group, "freezer.state") == "FROZEN"
    assert cpu_share(child.pid, 0.3) <= 2 * TICK_S / 0.3

    fresh = CgroupV1(ROOT, subtree=lab.subtree)  # a new daemon: knows only the state file
    assert restore_all(StateStore(tmp_path), fresh, Signaller()) == 1
    assert cpu_share(child.pid, 0.5) > 0.5  # thawed and unthrottled (> the 0.5-core quota)
    assert {c: cgroup_of(child.pid, c) for c in CONTROLLERS} == origin
    assert not any((ROOT / c / lab.subtree).exists() for c in CONTROLLERS)
    assert StateStore(tmp_path).data.empty()
    # idempotent: a second restore (next start) finds nothing to do and fails on nothing
    assert restore_all(StateStore(tmp_path), fresh, Signaller()) == 0


def test_kill_reaches_a_frozen_victim_and_gc_removes_its_group(
    lab: Lab, backend: CgroupV1, tmp_path: Path
) -> None:
    child = lab.spawn(TERM_IGNORER)
    enf = enforcer(backend, tmp_path)
    assert enf.apply(lab.action(ActionKind.FREEZE, child)).status is Status.DONE
    # a v1-frozen task acts on no signal until thawed: the enforcer thaws after SIGKILL
    assert enf.apply(lab.action(ActionKind.KILL, child)).status is Status.DONE
    child.wait(timeout=5)
    assert child.returncode == -signal.SIGKILL
    group = f"{lab.subtree}/pid-{child.pid}"
    assert not StateStore(tmp_path).data.groups[group].frozen
    assert enf.gc() == 1
    assert not any((ROOT / c / group).exists() for c in CONTROLLERS)
    assert StateStore(tmp_path).data.empty()
