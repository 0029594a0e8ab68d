"""Protection out of the box, on real processes and real cgroup v1 groups (issue 10).

- On a config with nothing but ``[limits.memory]`` (no ``[[rules]]``, no ``[sampling]``), a
  process nobody named that grows past the levels is acted on, and neither the service beside
  it nor edged's own ancestors (this test process) ever are. The daemon runs in ``--dry-run``
  here: on its defaults every process of the machine is a candidate, and a test must not end
  someone else's process on a shared machine; what is decided is what would be done.
- A victim keeps every limit it was under: a SIGTERM-ignoring hog and a service share one
  memory-limited group (as in a container); edged throttles, freezes and ends the hog without
  ever moving it out of that group, the group's own limit is never written, the service lives,
  and the child group edged made under it is gone once the hog is.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from edged.enforce.cgroupfs import CgroupV1
from edged.enforce.enforcer import Enforcer, Status
from edged.enforce.restore import StateStore
from edged.enforce.signals import Signaller, read_start_ticks
from edged.policy.base import Action, ActionKind, ProcessClass, Resource
from tests.daemon_util import RunningDaemon, start_daemon
from tests.test_enforce_e2e import HOG, SERVICE, spawn, used_bytes

pytestmark = [pytest.mark.root, pytest.mark.cgroup_v1]

MiB = 2**20
V1 = Path("/sys/fs/cgroup")


def memory_cgroup_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _hid, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return path
    raise AssertionError(f"no memory controller in /proc/{pid}/cgroup")


def events(daemon: RunningDaemon) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = daemon.call("events", {"since": 0})["events"]
    return [e for e in found if e["action"] not in ("alert", "strategy")]


@pytest.mark.slow
def test_only_limits_and_an_unnamed_hog_is_acted_on(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    service = spawn(children, SERVICE, "100")
    base = used_bytes()
    config = tmp_path / "edged.toml"
    # what a new user writes: a limit, nothing else
    config.write_text(f"[limits.memory]\nsoft = {base + 300 * MiB}\nhard = {base + 500 * MiB}\n")
    daemon = start_daemon(
        tmp_path, "--config", str(config), "--dry-run",
        env={"STATE_DIRECTORY": str(tmp_path / "state")},
    )  # fmt: skip
    try:
        hog = spawn(children, HOG, "20", "900")  # 200 MiB/s up to 900 MiB, ignores SIGTERM
        deadline = time.monotonic() + 30
        decided: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not any(
            e["action"] in ("terminate", "kill") for e in decided
        ):
            time.sleep(0.2)
            decided = events(daemon)
        assert any(e["action"] in ("terminate", "kill") for e in decided), daemon.log()
        assert {e["status"] for e in decided} == {"dry_run"}
        assert all(e["pid"] == hog.pid for e in decided), [(e["pid"], e["detail"]) for e in decided]
        assert all(e["klass"] == "normal" for e in decided)
        assert os.getpid() not in {e["pid"] for e in decided}  # edged's ancestor
        assert service.poll() is None
        assert hog.poll() is None
        status = daemon.call("status")
        assert status["protection"]["processes"] == "all"
        assert status["protection"]["classes"]["normal"] >= 2  # the hog and the service
        assert status["protection"]["classes"]["critical"] >= 1  # this test process, at least
        assert status["levels"]["memory"]["hard"] == base + 500 * MiB
        shown = subprocess.run(
            [sys.executable, "-m", "edged", "status", "--socket", str(daemon.socket_path)],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
        assert "watching" in shown, shown
        assert "memory levels: soft" in shown, shown
    finally:
        assert daemon.stop() == 0


class Box:
    """A memory-limited v1 group another manager made (a container runtime, say)."""

    def __init__(self, limit_bytes: int) -> None:
        self.name = f"edged-test-box-{uuid.uuid4().hex[:10]}"
        self.dir = V1 / "memory" / self.name
        self.dir.mkdir()
        (self.dir / "memory.limit_in_bytes").write_text(str(limit_bytes))

    def add(self, pid: int) -> None:
        (self.dir / "cgroup.procs").write_text(str(pid))

    def limit_bytes(self) -> int:
        return int((self.dir / "memory.limit_in_bytes").read_text())

    def remove(self) -> None:
        for child in self.dir.iterdir():
            if child.is_dir():
                for pid in (child / "cgroup.procs").read_text().split():
                    (self.dir / "cgroup.procs").write_text(pid)
                child.rmdir()
        for pid in (self.dir / "cgroup.procs").read_text().split():
            (V1 / "memory" / "cgroup.procs").write_text(pid)
        self.dir.rmdir()


def action(kind: ActionKind, pid: int, target: float | None = None) -> Action:
    start = read_start_ticks(pid)
    assert start is not None
    return Action(
        kind, pid, Resource.MEMORY, "hard", "test", ProcessClass.NORMAL,
        start_ticks=start, target=target,
    )  # fmt: skip


def test_a_hog_in_a_limited_group_is_held_and_ended_inside_it(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    limit = 700 * MiB
    box = Box(limit)
    subtree = f"edged-test-{uuid.uuid4().hex[:10]}"
    backend = CgroupV1(V1, subtree=subtree)
    try:
        service = spawn(children, SERVICE, "100")
        hog = spawn(children, HOG, "10", "300")  # ignores SIGTERM
        box.add(service.pid)
        box.add(hog.pid)
        time.sleep(0.5)  # it allocates on in the box
        enforcer = Enforcer(backend, Signaller(), StateStore(tmp_path), False, lambda _a: True)

        throttle = enforcer.apply(action(ActionKind.THROTTLE, hog.pid, float(200 * MiB)))
        assert throttle.status is Status.DONE, throttle.reason
        held_in = memory_cgroup_of(hog.pid)
        assert held_in == f"/{box.name}/edged-pid-{hog.pid}"  # under its group, not out of it
        assert box.limit_bytes() == limit  # the manager's limit is never written
        assert memory_cgroup_of(service.pid) == f"/{box.name}"

        frozen = enforcer.apply(action(ActionKind.FREEZE, hog.pid))
        assert frozen.status is Status.DONE, frozen.reason
        assert memory_cgroup_of(hog.pid) == held_in

        assert enforcer.apply(action(ActionKind.TERMINATE, hog.pid)).status is Status.DONE
        time.sleep(0.3)
        assert hog.poll() is None  # it ignores SIGTERM: the ladder's next step is needed
        assert memory_cgroup_of(hog.pid) == held_in
        assert enforcer.apply(action(ActionKind.KILL, hog.pid)).status is Status.DONE
        assert hog.wait(timeout=10) == -signal.SIGKILL

        assert service.poll() is None
        assert enforcer.gc() >= 1  # what edged made for the hog goes with it
        assert not (box.dir / f"edged-pid-{hog.pid}").exists()
        assert box.limit_bytes() == limit
        assert StateStore(tmp_path).data.empty()
        assert memory_cgroup_of(service.pid) == f"/{box.name}"
    finally:
        for p in children:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        for group in backend.groups():
            backend.remove(group)
        for c in ("memory", "cpu", "freezer"):
            if (V1 / c / subtree).is_dir():
                (V1 / c / subtree).rmdir()
        box.remove()


def test_a_process_in_the_root_group_still_goes_into_edgeds_subtree(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    """Nothing to keep: a process in no manager's group is placed under edged's subtree."""
    subtree = f"edged-test-{uuid.uuid4().hex[:10]}"
    backend = CgroupV1(V1, subtree=subtree)
    child = spawn(children, SERVICE, "10")
    origin = memory_cgroup_of(child.pid)
    (V1 / "memory" / "cgroup.procs").write_text(str(child.pid))
    try:
        group = backend.group_for(child.pid)
        assert group == f"{subtree}/pid-{child.pid}"
        assert backend.layout(group) == {}
    finally:
        (V1 / "memory" / origin.strip("/") / "cgroup.procs").write_text(str(child.pid))
        child.kill()
        child.wait(timeout=10)
