"""A real ``edged run`` that enforces leases as systemd scopes, on a fake systemd.

The daemon is pointed at a machine root where PID 1 "is" systemd (``run/systemd/system``
exists, as ``sd_booted()`` checks it), whose ``proc`` is the real /proc and whose ``sys`` is
empty (so no cgroup of this machine is touched), and at a private dbus-daemon through
``DBUS_SYSTEM_BUS_ADDRESS``, where :class:`tests.systemd_bus.FakeManager` answers as
systemd's manager. The client is a real process (socat) and the lease is for a real process
(``sleep``). The lease must be lifted (limits to infinity, scope abandoned, never stopped)
within 100 ms of the client's SIGKILL.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edged.enforce.systemd import UINT64_MAX
from tests.budget_util import ClientProcess
from tests.conftest import sleeping_process
from tests.daemon_util import RunningDaemon, start_daemon
from tests.systemd_bus import FakeManager, dbus_daemon, start_bus, stop_bus

pytestmark = [
    pytest.mark.skipif(dbus_daemon() is None, reason="needs dbus-daemon (Debian package dbus)"),
    pytest.mark.slow,
]

MiB = 1 << 20


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[FakeManager]:
    (tmp_path / "bus").mkdir()
    proc, address = start_bus(tmp_path / "bus")
    fake = FakeManager(address)
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()
        stop_bus(proc)


def systemd_root(tmp_path: Path) -> Path:
    """A machine root where PID 1 is systemd, with the real /proc and an empty /sys."""
    root = tmp_path / "root"
    if not root.exists():
        (root / "run" / "systemd" / "system").mkdir(parents=True)
        (root / "sys").mkdir()
        (root / "etc").mkdir()
        (root / "proc").symlink_to("/proc")
    return root


def start(tmp_path: Path, manager: FakeManager, name: str) -> RunningDaemon:
    """``edged run`` on :func:`systemd_root`, its system bus the fake's, state in tmp."""
    (tmp_path / name).mkdir()
    return start_daemon(
        tmp_path / name,
        "--interval",
        "0.2",
        "--root",
        str(systemd_root(tmp_path)),
        env={
            "DBUS_SYSTEM_BUS_ADDRESS": manager.address,
            "STATE_DIRECTORY": str(tmp_path / "state"),
        },
    )


@pytest.fixture
def daemon(tmp_path: Path, manager: FakeManager) -> Iterator[RunningDaemon]:
    running = start(tmp_path, manager, "run")
    try:
        yield running
    finally:
        assert running.stop() == 0


holder = pytest.fixture(sleeping_process, name="holder")


def test_a_lease_is_a_scope_lifted_within_100_ms_of_the_clients_death(
    daemon: RunningDaemon, manager: FakeManager, holder: subprocess.Popen[bytes]
) -> None:
    assert "budget leases are enforced as systemd scopes" in daemon.log()
    with ClientProcess(daemon.socket_path) as client:
        got = client.call(
            "budget.request", {"resources": {"memory": 256 * MiB, "cpu": 0.2}, "pid": holder.pid}
        )
        scope = f"edged-lease-{got['lease']}-{holder.pid}.scope"
        assert got["enforced"] == {
            "how": "scope",
            "unit": scope,
            "memory_max_bytes": 256 * MiB,
            "cpu_quota_cores": 0.2,
        }
        assert manager.pids[holder.pid] == scope
        assert manager.units[scope]["MemoryMax"] == 256 * MiB
        assert manager.units[scope]["CPUQuotaPerSecUSec"] == 200_000

        resized = client.call(
            "budget.update", {"lease": got["lease"], "resources": {"memory": 128 * MiB}}
        )
        assert resized["granted"]["memory"] == 128 * MiB
        assert manager.units[scope]["MemoryMax"] == 128 * MiB
        (entry,) = client.call("budget.list")["leases"]
        assert entry["enforced"] == {
            "how": "scope",
            "unit": scope,
            "memory_max_bytes": 128 * MiB,
            "cpu_quota_cores": 0.2,  # the CPU grant is unchanged
        }

        killed_s = client.kill()
        while "AbandonScope" not in manager.members():
            assert time.monotonic() - killed_s < 2.0, "scope not abandoned"
            time.sleep(0.001)
    (abandon,) = [c for c in manager.calls if c.member == "AbandonScope"]
    lifted_s = abandon.at_s - killed_s
    print(f"\nlease scope lifted {lifted_s * 1000:.1f} ms after SIGKILL of its client")
    assert lifted_s < 0.1
    assert abandon.body == (scope,)
    assert manager.units[scope]["MemoryMax"] == UINT64_MAX
    assert manager.units[scope]["CPUQuotaPerSecUSec"] == UINT64_MAX
    assert manager.scopes[scope].state == "abandoned"
    assert "StopUnit" not in manager.members()
    assert holder.poll() is None  # the process runs on in its abandoned scope
    assert daemon.call("budget.list")["leases"] == []


def test_a_scope_left_by_a_killed_daemon_is_released_at_the_next_start(
    tmp_path: Path, manager: FakeManager, holder: subprocess.Popen[bytes]
) -> None:
    first = start(tmp_path, manager, "first")
    try:
        with ClientProcess(first.socket_path) as client:
            got = client.call(
                "budget.request", {"resources": {"memory": 64 * MiB}, "pid": holder.pid}
            )
            scope = got["enforced"]["unit"]
            first.proc.kill()  # no chance to lift anything
            first.proc.wait()
    finally:
        if first.proc.poll() is None:
            first.stop()
    assert manager.units[scope]["MemoryMax"] == 64 * MiB  # still held
    assert manager.scopes[scope].state == "running"
    second = start(tmp_path, manager, "second")
    try:
        assert manager.units[scope]["MemoryMax"] == UINT64_MAX
        assert manager.scopes[scope].state == "abandoned"
        assert "lifted 1 changes a previous run left in force" in second.log()
    finally:
        assert second.stop() == 0
    assert holder.poll() is None
