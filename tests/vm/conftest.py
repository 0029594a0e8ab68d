"""Helpers for the VM lane's suite (tests/vm): real systemd as PID 1, a pure cgroup v2.

Everything here runs inside the VM that ``vm/lane.py`` boots; on any other machine the tests
skip (marker ``vm``). The checkout's wheel and units were installed by ``vm/guest/run.sh`` the
way a package installs them: units in /etc/systemd/system, edged at /usr/local/bin/edged.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

CGROUP = Path("/sys/fs/cgroup")
CONFIG = Path("/etc/edged/edged.toml")
STATE_FILE = Path("/var/lib/edged/imposed.json")
# TCG runs everything several times slower than the host: generous bounds, never a speed check
WAIT_S = 90.0


def in_vm() -> bool:
    return (
        Path("/proc/1/comm").read_text().strip() == "systemd"
        and (CGROUP / "cgroup.controllers").exists()
        and not (CGROUP / "memory").exists()
    )


HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip this folder's tests off the VM. The hook sees the whole session's items (a
    conftest hook is not scoped to its folder), so only the ones under tests/vm are marked."""
    if in_vm():
        return
    skip = pytest.mark.skip(
        reason="needs systemd as PID 1 and a pure cgroup v2: runs in the VM lane "
        "(python3 vm/lane.py)"
    )
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(skip)


def sh(*cmd: str, check: bool = True, timeout: float = 60.0) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{cmd} -> {done.returncode}: {done.stdout}{done.stderr}")
    return done.stdout


def prop(unit: str, name: str) -> str:
    return sh("systemctl", "show", "-P", name, unit).strip()


def unit_cgroup(unit: str) -> Path:
    path = prop(unit, "ControlGroup")
    assert path, f"{unit} has no control group"
    return CGROUP / path.lstrip("/")


def cgroup_of(pid: int) -> Path:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return CGROUP / line[3:].lstrip("/")
    raise AssertionError(f"pid {pid}: no v2 cgroup")


def read(path: Path) -> str:
    return path.read_text().strip()


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, AssertionError, subprocess.SubprocessError):
            last = check()
            if last:
                return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")


def proc_state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[0]


def alive(pid: int) -> bool:
    try:
        return proc_state(pid) != "Z"
    except OSError:
        return False


def name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def state() -> dict[str, Any]:
    if not STATE_FILE.exists():
        return {}
    data: dict[str, Any] = json.loads(STATE_FILE.read_text())
    return data


def edged_status() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(sh("edged", "status", "--json"))
    return data


def start_edged(config: str = "") -> int:
    """(Re)start the shipped units with ``config`` as /etc/edged/edged.toml; the main pid once
    systemd says it is active (READY=1 came)."""
    CONFIG.parent.mkdir(parents=True, exist_ok=True)
    CONFIG.write_text(config)
    sh("systemctl", "reset-failed", "edged.service", check=False)
    sh("systemctl", "restart", "edged.socket", "edged.service", timeout=180)
    assert prop("edged.service", "ActiveState") == "active"
    return int(prop("edged.service", "MainPID"))


def stop_edged() -> None:
    sh("systemctl", "stop", "edged.service", timeout=120)


@pytest.fixture
def units_made() -> Iterator[list[str]]:
    """Transient units a test starts; stopped (and reset) afterwards."""
    made: list[str] = []
    yield made
    for unit in made:
        sh("systemctl", "stop", unit, check=False, timeout=120)
        sh("systemctl", "reset-failed", unit, check=False)


def run_service(made: list[str], command: list[str], *properties: str) -> tuple[str, int]:
    """A transient service (``systemd-run --unit``); its name and main pid."""
    unit = name("lane-svc") + ".service"
    args = ["systemd-run", "--quiet", f"--unit={unit}"]
    for p in properties:
        args.append(f"--property={p}")
    sh(*args, "--", *command)
    made.append(unit)
    pid = wait_for(f"{unit} main pid", lambda: int(prop(unit, "MainPID")))
    return unit, pid
