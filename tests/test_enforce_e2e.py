"""`edged run` enforcing on real processes with real cgroup v1 groups.

A hog that ignores SIGTERM grows past the soft and hard memory levels beside a `critical`
service: edged must end the hog, never touch the service, and leave no group behind. In dry
run it must decide the same things and do none of them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edged.sensors.memory import PAGE_BYTES, parse_percpu_free_pages
from tests.daemon_util import RunningDaemon, start_daemon

pytestmark = [pytest.mark.root, pytest.mark.cgroup_v1, pytest.mark.slow]

MiB = 2**20
HOG = """
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the kind of process that needs SIGKILL
step, limit = int(sys.argv[1]) * 2**20, int(sys.argv[2]) * 2**20
blocks = []
print("ready", flush=True)
while True:
    if sum(len(b) for b in blocks) < limit:
        b = bytearray(step)
        for i in range(0, step, 4096):
            b[i] = 1
        blocks.append(b)
    time.sleep(0.1)
"""
SERVICE = """
import sys, time
block = bytearray(int(sys.argv[1]) * 2**20)
for i in range(0, len(block), 4096):
    block[i] = 1
print("ready", flush=True)
while True:
    time.sleep(0.1)
"""


def used_bytes() -> int:
    """Memory in use as edged judges it: MemTotal - MemAvailable - the per-CPU free pages."""
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        info[key] = int(value.split()[0]) * 1024
    percpu = parse_percpu_free_pages(Path("/proc/zoneinfo").read_bytes()) * PAGE_BYTES
    return info["MemTotal"] - info["MemAvailable"] - percpu


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)
        if p.stdout is not None:
            p.stdout.close()


def spawn(procs: list[subprocess.Popen[str]], code: str, *args: str) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    procs.append(p)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    return p


def config(tmp_path: Path, tag: str, soft: int, hard: int) -> Path:
    path = tmp_path / "edged.toml"
    path.write_text(
        f'[sampling]\ninterval = "100ms"\nrescan = "200ms"\n'
        f"[limits.memory]\nsoft = {soft}\nhard = {hard}\n"
        f'[strategy]\nname = "dynamic"\n[strategy.dynamic]\ngrace_s = 1.0\n'
        f'[[rules]]\ncmdline = "{tag}-hog"\nclass = "besteffort"\n'
        f'[[rules]]\ncmdline = "{tag}-service"\nclass = "critical"\n'
    )
    return path


def events(daemon: RunningDaemon) -> list[dict[str, Any]]:
    """The action events; alert transitions share the ring (tests/test_alerts_e2e.py)."""
    result: list[dict[str, Any]] = daemon.call("events", {"since": 0})["events"]
    return [e for e in result if e["action"] != "alert"]


def edged_groups() -> list[Path]:
    return [
        p
        for c in ("memory", "cpu", "freezer")
        for p in [Path(f"/sys/fs/cgroup/{c}/edged")]
        if p.exists()
    ]


def run_scenario(
    tmp_path: Path, children: list[subprocess.Popen[str]], dry_run: bool
) -> tuple[RunningDaemon, subprocess.Popen[str], subprocess.Popen[str]]:
    tag = f"edged-e2e-{uuid.uuid4().hex[:8]}"
    service = spawn(children, SERVICE, "100", f"{tag}-service")
    base = used_bytes()
    soft, hard = base + 300 * MiB, base + 500 * MiB
    args = ["--config", str(config(tmp_path, tag, soft, hard))]
    if dry_run:
        args.append("--dry-run")
    daemon = start_daemon(tmp_path, *args, env={"STATE_DIRECTORY": str(tmp_path / "state")})
    hog = spawn(children, HOG, "40", "2000", f"{tag}-hog")  # 400 MiB/s up to 2 GiB
    return daemon, hog, service


def test_a_sigterm_ignoring_hog_is_ended_and_the_critical_service_survives(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    daemon, hog, service = run_scenario(tmp_path, children, dry_run=False)
    try:
        deadline = time.monotonic() + 30
        while hog.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert hog.poll() is not None, daemon.log()
        seen = events(daemon)
        on_hog = [e for e in seen if e["pid"] == hog.pid and e["status"] == "done"]
        assert on_hog, seen
        assert all(e["pid"] != service.pid for e in seen)  # critical: never acted on
        assert service.poll() is None
        assert all(e["klass"] == "besteffort" for e in on_hog)
        assert daemon.call("status")["ticks"] > 0
    finally:
        assert daemon.stop() == 0
    assert edged_groups() == [], "edged left its groups behind"
    state_file = tmp_path / "state" / "imposed.json"
    if state_file.exists():  # restore on exit clears what it lifted
        left = json.loads(state_file.read_text())
        assert not left.get("groups"), left
        assert not left.get("stopped"), left


def test_dry_run_decides_and_touches_nothing(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    daemon, hog, service = run_scenario(tmp_path, children, dry_run=True)
    try:
        deadline = time.monotonic() + 15
        decided: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not any(
            e["action"] in ("terminate", "kill") for e in decided
        ):
            decided = events(daemon)
            time.sleep(0.2)
        assert decided, daemon.log()
        assert {e["status"] for e in decided} == {"dry_run"}, decided
        assert hog.poll() is None  # nothing was done to it
        assert service.poll() is None
        assert edged_groups() == []
        with open(f"/proc/{hog.pid}/cgroup") as f:
            assert "edged" not in f.read()
        cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "edged",
                "events",
                "--json",
                "--socket",
                str(daemon.socket_path),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        printed = [json.loads(line) for line in cli.stdout.splitlines()]
        printed = [e for e in printed if e["action"] != "alert"]
        assert [e["seq"] for e in printed][: len(decided)] == [e["seq"] for e in decided]
        assert all(e["pid"] == hog.pid for e in printed)
    finally:
        assert daemon.stop() == 0
        os.kill(hog.pid, signal.SIGKILL)


def freezer_state(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "freezer" in controllers.split(","):
            state = Path(f"/sys/fs/cgroup/freezer{path}/freezer.state")
            return state.read_text().strip() if state.exists() else "THAWED"  # the root group
    return "THAWED"


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


SPINNER_ABOVE_SOFT = """
import sys, time
block = bytearray(int(sys.argv[1]) * 2**20)
for i in range(0, len(block), 4096):
    block[i] = 1
print("ready", flush=True)
while True:
    pass  # burns CPU, so "it runs" is visible in its CPU time
"""


def test_sigkill_of_the_daemon_while_a_process_is_frozen_then_restart_thaws_it(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    tag = f"edged-e2e-{uuid.uuid4().hex[:8]}"
    # The spinner runs first and the soft level sits 300 MiB under the usage measured with it:
    # memory freed late by an earlier test cannot then leave the machine under soft.
    hog = spawn(children, SPINNER_ABOVE_SOFT, "600", f"{tag}-hog")
    used = used_bytes()
    cfg = tmp_path / "edged.toml"
    cfg.write_text(  # above soft, never near hard: the ladder throttles, then freezes
        f'[sampling]\ninterval = "100ms"\nrescan = "200ms"\n'
        f"[limits.memory]\nsoft = {used - 300 * MiB}\nhard = {used + 4096 * MiB}\n"
        f'[strategy]\nname = "dynamic"\n[strategy.dynamic]\nfreeze_after_s = 0.5\n'
        f"hold_s = 0.2\nfreeze_max_s = 60\n"
        f'[[rules]]\ncmdline = "{tag}-hog"\nclass = "besteffort"\n'
    )
    env = {"STATE_DIRECTORY": str(tmp_path / "state")}
    daemon = start_daemon(tmp_path, "--config", str(cfg), env=env)
    try:
        deadline = time.monotonic() + 20
        while freezer_state(hog.pid) != "FROZEN" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert freezer_state(hog.pid) == "FROZEN", daemon.log()
        daemon.proc.kill()  # a crash: no restore on the way out
        daemon.proc.wait(timeout=10)
        ticks = cpu_ticks(hog.pid)
        time.sleep(0.5)
        assert cpu_ticks(hog.pid) == ticks  # still frozen, with nobody left to thaw it
    finally:
        if daemon.proc.poll() is None:
            daemon.stop()
    # the next start lifts what the crashed run left (no limits now: it decides nothing new)
    cfg.write_text('[sampling]\ninterval = "100ms"\n')
    again = start_daemon(tmp_path, "--config", str(cfg), env=env)
    try:
        assert freezer_state(hog.pid) == "THAWED"
        ticks = cpu_ticks(hog.pid)
        time.sleep(0.5)
        assert cpu_ticks(hog.pid) > ticks  # it runs again
        with open(f"/proc/{hog.pid}/cgroup") as f:
            assert "/edged/" not in f.read()  # and is back where it was
        assert "previous run left in force" in again.log()
    finally:
        assert again.stop() == 0
    assert edged_groups() == []
