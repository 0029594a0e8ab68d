"""Alerts end to end: a real ``edged run`` on a fixture root whose meminfo the test rewrites.

The Orin Nano tree uses 2.28 GiB of its 7.44 GiB; with soft at 1 GiB and hard at 2 GiB the
daemon starts in breach of both. The test then lowers usage through the file the daemon reads
and watches the lifecycle through the real socket, the CLI and the Prometheus endpoint. Dry run
and no ``[[rules]]``: nothing is sampled as a process, nothing is acted on.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import FixtureTree
from tests.daemon_util import RunningDaemon, start_daemon
from tests.telemetry_helpers import free_port, wait_until

pytestmark = pytest.mark.slow

GIB_KB = 2**20  # meminfo counts kB


def set_used(meminfo: Path, used_gib: float) -> None:
    """Rewrite MemAvailable in place so that MemTotal - MemAvailable is ``used_gib``.

    The number keeps its width and the file is overwritten without truncating it, so a read
    racing the write never sees an empty or shortened file (the daemon keeps it open).
    """
    text = meminfo.read_text()
    total = re.search(r"^MemTotal:\s+(\d+) kB$", text, re.M)
    available = re.search(r"^MemAvailable:\s+(\d+) kB$", text, re.M)
    assert total is not None
    assert available is not None
    digits = f"{int(total.group(1)) - round(used_gib * GIB_KB):>{len(available.group(1))}}"
    assert len(digits) == len(available.group(1))
    with meminfo.open("r+b") as f:
        f.seek(available.start(1))
        f.write(digits.encode())


def alert_events(daemon: RunningDaemon) -> list[tuple[str, str, str]]:
    events = daemon.call("events", {"since": 0})["events"]
    return [(e["resource"], e["reason"], e["status"]) for e in events if e["action"] == "alert"]


def active(daemon: RunningDaemon) -> dict[str, str]:
    """severity -> state of the memory alerts ``status`` reports."""
    alerts: list[dict[str, Any]] = daemon.call("status")["alerts"]
    assert all(a["resource"] == "memory" for a in alerts), alerts
    return {a["severity"]: a["state"] for a in alerts}


def scrape_alerts(port: int) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    family = families["edged_alerts"]
    assert family.type == "gauge"  # an UpDownCounter, exposed as a gauge
    return {
        (s.labels["edged_severity"], s.labels["edged_state"]): s.value
        for s in family.samples
        if s.labels["edged_resource"] == "memory"
    }


def cli(daemon: RunningDaemon, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "edged", *args, "--socket", str(daemon.socket_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout


def test_memory_alerts_go_pending_firing_and_resolved_on_a_real_daemon(
    tmp_path: Path, fixture_tree: FixtureTree
) -> None:
    root = fixture_tree("jetson/orin-nano-jp6")
    meminfo = root / "proc/meminfo"
    config = tmp_path / "edged.toml"
    config.write_text(
        '[sampling]\ninterval = "100ms"\n'
        '[limits.memory]\nsoft = "1GiB"\nhard = "2GiB"\n'
        '[alerts]\nfor = "1s"\n'
    )
    port = free_port()
    started_s = time.monotonic()
    daemon = start_daemon(
        tmp_path,
        "--config", str(config),
        "--root", str(root),
        "--dry-run",
        "--prometheus", f"127.0.0.1:{port}",
        env={"STATE_DIRECTORY": str(tmp_path / "state")},
    )  # fmt: skip
    try:
        # above hard: critical fires at once (critical_for = 0); warning waits its second
        both = {"warning": "firing", "critical": "firing"}
        wait_until(lambda: active(daemon) == both, 10, "both alerts firing")
        assert time.monotonic() - started_s >= 1.0  # not before `for`
        assert alert_events(daemon) == [
            ("memory", "warning", "pending"),
            ("memory", "critical", "firing"),
            ("memory", "warning", "firing"),
        ]
        status = daemon.call("status")
        assert status["health"] == "critical"
        warning = next(a for a in status["alerts"] if a["severity"] == "warning")
        assert warning["since_unix_ns"] - warning["active_since_unix_ns"] >= 0.99e9
        assert warning["threshold"] == 2**30
        assert wait_until(
            lambda: scrape_alerts(port).get(("warning", "firing")) == 1.0, 10, "edged_alerts"
        )
        assert scrape_alerts(port) == {
            ("warning", "pending"): 0.0,
            ("warning", "firing"): 1.0,
            ("critical", "pending"): 0.0,
            ("critical", "firing"): 1.0,
        }

        set_used(meminfo, 1.5)  # under hard, still above soft: only critical resolves
        wait_until(lambda: active(daemon) == {"warning": "firing"}, 10, "critical resolved")
        assert daemon.call("status")["health"] == "warning"  # a sustained soft breach
        text = cli(daemon, "status")
        assert re.search(r"alert memory warning firing since \d\d:\d\d:\d\d", text), text
        assert "1.50 GiB >= soft 1.00 GiB" in text

        set_used(meminfo, 0.5)
        wait_until(lambda: active(daemon) == {}, 10, "warning resolved")
        assert daemon.call("status")["health"] == "ok"
        assert alert_events(daemon)[3:] == [
            ("memory", "critical", "resolved"),
            ("memory", "warning", "resolved"),
        ]
        wait_until(
            lambda: scrape_alerts(port).get(("warning", "firing")) == 0.0, 10, "edged_alerts 0"
        )
        lines = cli(daemon, "events").splitlines()
        assert any(re.search(r"firing\s+alert\s+memory/warning", line) for line in lines), lines
        assert all("pid" not in line for line in lines if " alert " in line), lines
    finally:
        assert daemon.stop() == 0
    log = daemon.log()
    assert re.search(r"WARNING.*alert memory warning firing", log), log
    assert "Traceback" not in log


def test_sighup_applies_new_hold_times_to_a_pending_alert(
    tmp_path: Path, fixture_tree: FixtureTree
) -> None:
    root = fixture_tree("jetson/orin-nano-jp6")  # 2.28 GiB used: above a 1 GiB soft level
    config = tmp_path / "edged.toml"
    config.write_text('[limits.memory]\nsoft = "1GiB"\n[alerts]\nfor = "1h"\n')
    daemon = start_daemon(
        tmp_path, "--config", str(config), "--root", str(root), "--dry-run",
        env={"STATE_DIRECTORY": str(tmp_path / "state")},
    )  # fmt: skip
    try:
        wait_until(lambda: active(daemon) == {"warning": "pending"}, 10, "a pending alert")
        assert daemon.call("status")["health"] == "moderate"  # above soft, not yet sustained
        config.write_text('[limits.memory]\nsoft = "1GiB"\n[alerts]\nfor = "200ms"\n')
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: active(daemon) == {"warning": "firing"}, 10, "the alert firing")
        assert daemon.call("status")["health"] == "warning"
        assert alert_events(daemon) == [
            ("memory", "warning", "pending"),
            ("memory", "warning", "firing"),
        ]
    finally:
        assert daemon.stop() == 0


def test_sighup_puts_new_limits_in_force(tmp_path: Path, fixture_tree: FixtureTree) -> None:
    """A reloaded [limits] is what the next tick judges by: health, alerts and the budgets'
    capacity follow the file, not the limits edged started with."""
    root = fixture_tree("jetson/orin-nano-jp6")  # 2.28 GiB used of 7.44 GiB
    config = tmp_path / "edged.toml"
    config.write_text('[limits.memory]\nsoft = "6GiB"\nhard = "7GiB"\n[alerts]\nfor = "200ms"\n')
    daemon = start_daemon(
        tmp_path, "--config", str(config), "--root", str(root), "--dry-run",
        env={"STATE_DIRECTORY": str(tmp_path / "state")},
    )  # fmt: skip
    try:
        wait_until(lambda: daemon.call("status")["ticks"] >= 2, 10, "two ticks")
        assert daemon.call("status")["health"] == "ok"
        capacity = daemon.call("budget.list")["capacity"]["memory"]
        assert capacity == 7 * 2**30
        config.write_text(
            '[limits.memory]\nsoft = "1GiB"\nhard = "3GiB"\n[alerts]\nfor = "200ms"\n'
        )
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: active(daemon) == {"warning": "firing"}, 10, "the alert firing")
        assert daemon.call("status")["health"] == "warning"
        assert daemon.call("budget.list")["capacity"]["memory"] == 3 * 2**30
    finally:
        assert daemon.stop() == 0
