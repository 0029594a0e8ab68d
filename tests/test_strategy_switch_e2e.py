"""``strategy.set`` on an enforcing ``edged run`` with real cgroup v1 groups: what the old
strategy imposed is not left behind.

A CPU spinner is held to a CPU quota by ``dynamic`` (CPU soft level far below one busy core).
Switching to ``adaptive``, which undoes only what it set itself, lifts that quota on the next
tick: the spinner leaves edged's group and the group is removed.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_util import RunningDaemon, start_daemon
from tests.telemetry_helpers import wait_until

pytestmark = [pytest.mark.root, pytest.mark.cgroup_v1, pytest.mark.slow]

SPINNER = "import sys\nprint('ready', flush=True)\nwhile True:\n    pass\n"


@pytest.fixture
def spinner() -> Iterator[tuple[subprocess.Popen[str], str]]:
    tag = f"edged-switch-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        [sys.executable, "-c", SPINNER, f"{tag}-spin"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield proc, tag
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def cpu_group(pid: int) -> str:
    """The spinner's group in the v1 cpu hierarchy."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            return path
    raise AssertionError(f"no cpu controller for {pid}")


def on(daemon: RunningDaemon, pid: int) -> list[tuple[str, str, str, str]]:
    return [
        (e["action"], e["reason"], e["strategy"], e["status"])
        for e in daemon.call("events", {"since": 0})["events"]
        if e["pid"] == pid
    ]


def test_switching_to_adaptive_lifts_dynamics_cpu_quota(
    tmp_path: Path, spinner: tuple[subprocess.Popen[str], str]
) -> None:
    proc, tag = spinner
    home = cpu_group(proc.pid)
    config = tmp_path / "edged.toml"
    config.write_text(
        '[sampling]\ninterval = "100ms"\nrescan = "200ms"\n'
        "[limits.cpu]\nsoft = 0.2\n"
        '[strategy]\nname = "dynamic"\n'
        "[strategy.dynamic]\ncpu_hold_s = 0.3\nfreeze_after_s = 600\nrecover_hold_s = 600\n"
        f'[[rules]]\ncmdline = "{tag}-spin"\nclass = "besteffort"\n'
    )
    daemon = start_daemon(
        tmp_path, "--config", str(config), env={"STATE_DIRECTORY": str(tmp_path / "state")}
    )
    try:
        throttled = ("throttle", "soft", "dynamic", "done")
        wait_until(lambda: throttled in on(daemon, proc.pid), 30, "dynamic throttles")
        held = cpu_group(proc.pid)
        assert held != home
        assert "/edged/" in f"{held}/"
        quota_file = Path("/sys/fs/cgroup/cpu") / held.lstrip("/") / "cpu.cfs_quota_us"
        assert int(quota_file.read_text()) > 0

        switched: dict[str, Any] = daemon.call("strategy.set", {"name": "adaptive"})
        assert switched == {"strategy": "adaptive", "previous": "dynamic"}
        lifted = ("unthrottle", "strategy-switch", "dynamic", "done")
        wait_until(lambda: lifted in on(daemon, proc.pid), 10, "the quota lifted")
        assert cpu_group(proc.pid) == home  # back where it was, unlimited
        assert not quota_file.exists()  # edged's group is gone
        assert daemon.call("status")["strategy"] == "adaptive"
    finally:
        assert daemon.stop() == 0
