"""Kernel notifications between ticks (edged/sensors/wake.py), on this machine's real kernel.

A v1 memory threshold armed on the root group's usage fires when a real child process faults
memory past it; a PSI trigger is accepted with the 2 s window an unprivileged daemon may use;
and a running daemon is woken by the kernel when a hog crosses its level (its status counts
the notifications).
"""

from __future__ import annotations

import select
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from edged.sensors.wake import MemoryWake
from tests.daemon_util import start_daemon
from tests.test_enforce_e2e import HOG, spawn, used_bytes

MiB = 2**20
MEMCG = Path("/sys/fs/cgroup/memory")
PSI = Path("/proc/pressure/memory")

needs_v1 = pytest.mark.skipif(
    not (MEMCG / "cgroup.event_control").exists(), reason="no cgroup v1 memory controller"
)


@needs_v1
@pytest.mark.root
def test_a_threshold_fires_when_memory_crosses_it(
    children: list[subprocess.Popen[str]],
) -> None:
    wake = MemoryWake(MEMCG, None)
    try:
        assert wake.sources == [f"v1 thresholds on {MEMCG}"]
        used = used_bytes()
        wake.arm(used, (used + 100 * MiB,))
        assert wake.drain() == []  # nothing crossed yet
        spawn(children, HOG, "50", "300")  # 300 MiB in 50 MiB steps
        ready, _, _ = select.select([wake.fileno()], [], [], 30)
        assert ready, "no threshold event"
        assert "threshold" in wake.drain()
        # re-arming at the same place is a no-op; a level far away moves it
        wake.arm(used_bytes(), (used_bytes() + 1024 * MiB,))
        assert wake.drain() == []
    finally:
        wake.close()


@pytest.mark.skipif(not PSI.exists(), reason="no PSI on this kernel")
def test_a_psi_trigger_is_armed_with_an_unprivileged_window() -> None:
    wake = MemoryWake(None, PSI)
    try:
        assert wake.sources == [f"PSI trigger on {PSI}"]
        assert wake.drain() == []  # an idle machine does not stall 100 ms in 2 s
    finally:
        wake.close()


def test_nothing_to_watch_leaves_no_source(tmp_path: Path) -> None:
    wake = MemoryWake(tmp_path, tmp_path / "absent")
    assert wake.sources == []
    wake.arm(1.0, (2.0,))  # harmless without a threshold file
    wake.close()


@needs_v1
@pytest.mark.root
@pytest.mark.slow
def test_the_kernel_wakes_a_running_daemon(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    base = used_bytes()
    config = tmp_path / "edged.toml"
    config.write_text(
        '[sampling]\ninterval = "30s"\n'
        f"[limits.memory]\nsoft = {base + 150 * MiB}\nhard = {base + 300 * MiB}\n"
    )
    daemon = start_daemon(
        tmp_path, "--config", str(config), "--dry-run",
        env={"STATE_DIRECTORY": str(tmp_path / "state")},
    )  # fmt: skip
    try:
        status = daemon.call("status")
        assert status["protection"]["woken_by"], status
        hog = spawn(children, HOG, "50", "500")
        decided: list[dict[str, Any]] = []
        deadline = time.monotonic() + 60
        while not decided and time.monotonic() < deadline:
            time.sleep(0.2)
            decided = [
                e
                for e in daemon.call("events", {"since": 0})["events"]
                if e["action"] not in ("alert", "strategy")
            ]
        assert decided, daemon.log()
        assert {e["pid"] for e in decided} == {hog.pid}
        # the kernel told the daemon the level was crossed
        assert daemon.call("status")["wakeups"] >= 1
    finally:
        assert daemon.stop() == 0
