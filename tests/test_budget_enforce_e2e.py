"""A lease enforced on real cgroup v1 groups by a real ``edged run``.

A CPU spinner gets a lease asked for it by a client process (socat); it must be placed in its
own group with the granted memory as hard limit and the granted cores as quota, be held to that
quota, and be back where it was, with the group gone, within 100 ms of the client's SIGKILL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.budget_util import ClientProcess
from tests.daemon_util import RunningDaemon, start_daemon

pytestmark = [pytest.mark.root, pytest.mark.cgroup_v1, pytest.mark.slow]

MiB = 1 << 20
CGROUP = Path("/sys/fs/cgroup")
SPIN = "import sys\nprint('ready', flush=True)\nwhile True:\n    pass\n"


def memory_cgroup(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return path
    raise AssertionError(f"pid {pid} has no memory cgroup")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cores_used(pid: int, over_s: float = 1.0) -> float:
    start_cpu, start_s = cpu_seconds(pid), time.monotonic()
    time.sleep(over_s)
    return (cpu_seconds(pid) - start_cpu) / (time.monotonic() - start_s)


@pytest.fixture
def spinner() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", SPIN], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    yield proc
    proc.kill()
    proc.wait()
    proc.stdout.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[RunningDaemon]:
    running = start_daemon(
        tmp_path, "--interval", "0.2", env={"STATE_DIRECTORY": str(tmp_path / "state")}
    )
    try:
        yield running
    finally:
        assert running.stop() == 0
    left = sorted(p.name for p in (CGROUP / "memory" / "edged").glob("budget-*"))
    assert left == [], f"groups left behind: {left}"
    state = tmp_path / "state" / "imposed.json"
    if state.exists():
        assert not json.loads(state.read_text()).get("groups")


def test_a_lease_is_enforced_and_lifted_within_100_ms_of_the_clients_death(
    daemon: RunningDaemon, spinner: subprocess.Popen[str]
) -> None:
    origin = memory_cgroup(spinner.pid)
    with ClientProcess(daemon.socket_path) as client:
        got = client.call(
            "budget.request",
            {"resources": {"memory": 256 * MiB, "cpu": 0.2}, "pid": spinner.pid},
        )
        lease = got["lease"]
        group = f"edged/budget-{lease}"
        assert got["enforced"] == {
            "how": "cgroup",
            "group": group,
            "memory_max_bytes": 256 * MiB,
            "cpu_quota_cores": 0.2,
        }
        assert memory_cgroup(spinner.pid) == f"/{group}"
        memory_dir = CGROUP / "memory" / group
        assert int((memory_dir / "memory.limit_in_bytes").read_text()) == 256 * MiB
        assert int((CGROUP / "cpu" / group / "cpu.cfs_quota_us").read_text()) == 20_000
        assert cores_used(spinner.pid) < 0.3  # held to its quota (it would spin a whole core)

        # a resize changes the limits in place
        resized = client.call("budget.update", {"lease": lease, "resources": {"memory": 128 * MiB}})
        assert resized["granted"]["memory"] == 128 * MiB
        assert int((memory_dir / "memory.limit_in_bytes").read_text()) == 128 * MiB
        (entry,) = client.call("budget.list")["leases"]
        assert entry["enforced"]["memory_max_bytes"] == 128 * MiB

        killed_s = client.kill()
        while memory_cgroup(spinner.pid) != origin:
            assert time.monotonic() - killed_s < 2.0, "not moved back"
            time.sleep(0.001)
        moved_back_s = time.monotonic() - killed_s
        while memory_dir.exists():
            assert time.monotonic() - killed_s < 2.0, "group not removed"
            time.sleep(0.001)
        removed_s = time.monotonic() - killed_s
    print(
        f"\nlease lifted after SIGKILL of its client: pid back in {origin} after "
        f"{moved_back_s * 1000:.1f} ms, group removed after {removed_s * 1000:.1f} ms"
    )
    assert moved_back_s < 0.1
    assert removed_s < 0.1
    assert not (CGROUP / "cpu" / group).exists()
    assert daemon.call("budget.list")["leases"] == []


def test_a_lease_left_by_a_killed_daemon_is_lifted_at_the_next_start(
    tmp_path: Path, spinner: subprocess.Popen[str]
) -> None:
    origin = memory_cgroup(spinner.pid)
    env = {"STATE_DIRECTORY": str(tmp_path / "state")}
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = start_daemon(tmp_path / "first", "--interval", "0.2", env=env)
    try:
        with ClientProcess(first.socket_path) as client:
            got = client.call(
                "budget.request", {"resources": {"memory": 256 * MiB}, "pid": spinner.pid}
            )
            group = got["enforced"]["group"]
            assert memory_cgroup(spinner.pid) == f"/{group}"
            first.proc.kill()  # no chance to lift anything
            first.proc.wait()
        assert memory_cgroup(spinner.pid) == f"/{group}"  # still held
        recorded = json.loads((tmp_path / "state" / "imposed.json").read_text())["groups"]
        assert recorded[group]["memory_max_bytes"] == 256 * MiB
    finally:
        if first.proc.poll() is None:
            first.stop()
    second = start_daemon(tmp_path / "second", "--interval", "0.2", env=env)
    try:
        assert memory_cgroup(spinner.pid) == origin
        assert not (CGROUP / "memory" / group).exists()
        assert "lifted 1 changes a previous run left in force" in second.log()
    finally:
        assert second.stop() == 0


def test_a_memory_lease_is_enforced_in_a_scope_that_only_the_memory_tree_has(
    tmp_path: Path, spinner: subprocess.Popen[str]
) -> None:
    """``[scope]`` on a group that exists in the memory hierarchy only (as a container or a
    benchmark's fence often does): a memory-only lease must still be a real group inside the
    scope with the granted limit, not fall back to cooperative because there is no cpu tree to
    lift a quota in."""
    scope = CGROUP / "memory" / f"edged-test-{uuid.uuid4().hex[:8]}"
    scope.mkdir()
    running = None
    try:
        (scope / "cgroup.procs").write_text(str(spinner.pid))
        cfg = tmp_path / "edged.toml"
        cfg.write_text(f'[scope]\ncgroup = "/{scope.name}"\n')
        running = start_daemon(
            tmp_path, "--config", str(cfg), "--interval", "0.2",
            env={"STATE_DIRECTORY": str(tmp_path / "state")},
        )  # fmt: skip
        with ClientProcess(running.socket_path) as client:
            got = client.call(
                "budget.request", {"resources": {"memory": 64 * MiB}, "pid": spinner.pid}
            )
            group = f"{scope.name}/edged/budget-{got['lease']}"
            assert got["enforced"] == {
                "how": "cgroup",
                "group": group,
                "memory_max_bytes": 64 * MiB,
            }, running.log()
            assert memory_cgroup(spinner.pid) == f"/{group}"
            assert int((CGROUP / "memory" / group / "memory.limit_in_bytes").read_text()) == (
                64 * MiB
            )
            client.call("budget.release", {"lease": got["lease"]})
            assert memory_cgroup(spinner.pid) == f"/{scope.name}"  # back in the scope
            assert not (CGROUP / "memory" / group).exists()
            # a CPU quota has no tree to go in: said so, not half enforced
            with_cpu = client.call(
                "budget.request",
                {"resources": {"memory": 64 * MiB, "cpu": 0.5}, "pid": spinner.pid},
            )
            assert with_cpu["enforced"]["how"] == "cooperative"
            assert "cpu" in with_cpu["enforced"]["reason"]
            assert memory_cgroup(spinner.pid) == f"/{scope.name}"
    finally:
        if running is not None:
            assert running.stop() == 0
        spinner.kill()
        spinner.wait()
        for child in sorted(scope.rglob("*"), key=lambda p: -len(p.parts)):
            if child.is_dir():
                child.rmdir()
        scope.rmdir()
