"""edged keeps its own pages resident (``[enforce] lock_memory``, edged.memlock): the decision
with fake calls, an unprivileged real process that is refused before it tries, and a real
``edged run`` whose /proc/PID/status shows the lock (and its absence with the key off, and
after a reload that turns it off) without its resident size growing."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edged.memlock import LOCK_FLAGS, MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT, lock_memory
from tests.conftest import require
from tests.daemon_util import start_daemon

MiB = 2**20
UNLIMITED = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
NOBODY = ("--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all")


def caps_file(tmp_path: Path, cap_eff: int) -> Path:
    path = tmp_path / "status"
    path.write_text(f"Name:\tedged\nCapEff:\t{cap_eff:016x}\n")
    return path


def test_the_lock_asks_for_onfault_and_never_falls_back_to_populating(tmp_path: Path) -> None:
    """MCL_ONFAULT or nothing: a kernel that refuses it (EINVAL, Linux < 4.4) gets no lock,
    not MCL_CURRENT|MCL_FUTURE (which would make every reserved stack and arena resident)."""
    calls: list[int] = []

    def refusing(flags: int) -> int:
        calls.append(flags)
        return errno.EINVAL

    root = caps_file(tmp_path, 1 << 14)
    result = lock_memory(mlockall=refusing, status_path=root, memlock_limit=lambda: (0, 0))
    assert not result.locked
    assert "MCL_ONFAULT" in result.detail
    assert calls == [MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT] == [LOCK_FLAGS]

    ok = lock_memory(mlockall=lambda flags: 0, status_path=root, memlock_limit=lambda: (0, 0))
    assert ok.locked
    failed = lock_memory(
        mlockall=lambda flags: errno.ENOMEM, status_path=root, memlock_limit=lambda: (0, 0)
    )
    assert not failed.locked
    assert os.strerror(errno.ENOMEM) in failed.detail


def test_without_the_capability_only_an_unlimited_rlimit_is_tried(tmp_path: Path) -> None:
    """A finite RLIMIT_MEMLOCK is not tried: MCL_FUTURE counts each new mapping whole against
    it, and allocations would start failing once the address space outgrew it."""
    calls: list[int] = []

    def record(flags: int) -> int:
        calls.append(flags)
        return 0

    plain = caps_file(tmp_path, 0)
    result = lock_memory(mlockall=record, status_path=plain, memlock_limit=lambda: (8 * MiB,) * 2)
    assert not result.locked
    assert "CAP_IPC_LOCK" in result.detail
    assert "8388608 bytes" in result.detail
    assert calls == []
    assert lock_memory(mlockall=record, status_path=plain, memlock_limit=lambda: UNLIMITED).locked
    assert calls == [LOCK_FLAGS]


_PROBE = """
from edged.memlock import lock_memory
r = lock_memory()
print(r.locked, r.detail)
"""


@pytest.mark.root
def test_an_unprivileged_process_is_told_why_not() -> None:
    """A real process as nobody, no capabilities, the default finite RLIMIT_MEMLOCK: no lock,
    and the reason."""
    setpriv = require("setpriv")
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY:
        pytest.skip("RLIMIT_MEMLOCK is unlimited here: an unprivileged lock would be tried")
    result = subprocess.run(
        [setpriv, *NOBODY, sys.executable, "-c", _PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("False not locked: no CAP_IPC_LOCK"), result.stdout


def proc_status_kib(pid: int) -> dict[str, int]:
    """VmLck, VmRSS... of a live process, in KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Vm"):
            out[key] = int(value.split()[0])
    return out


@pytest.mark.root
def test_edged_run_locks_its_memory_without_growing(tmp_path: Path) -> None:
    """As root, a real `edged run` (Prometheus on, so the exporter's thread and the
    OpenTelemetry SDK are in) has its mappings locked (VmLck), says so in status and the
    log, and stays small: MCL_ONFAULT does not make the reserved thread stacks resident."""
    config = tmp_path / "edged.toml"
    config.write_text('[sampling]\ninterval = "100ms"\n[enforce]\ndry_run = true\n')
    daemon = start_daemon(
        tmp_path,
        "--config",
        str(config),
        "--prometheus",
        "127.0.0.1:0",
        env={"STATE_DIRECTORY": str(tmp_path / "state")},
    )
    try:
        assert daemon.call("status")["memory_locked"] is True
        time.sleep(1.0)  # some ticks, a thread or two started
        vm = proc_status_kib(daemon.proc.pid)
        assert vm["VmLck"] > 0, vm
        assert vm["VmRSS"] < 80 * 1024, vm  # KiB: well under MemoryMin=64M's headroom
        assert "memory: locked in memory" in daemon.log()

        # a reload that turns it off unlocks at once
        config.write_text(
            '[sampling]\ninterval = "100ms"\n[enforce]\ndry_run = true\nlock_memory = false\n'
        )
        daemon.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while daemon.call("status")["memory_locked"]:
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.05)
        assert proc_status_kib(daemon.proc.pid)["VmLck"] == 0
        assert "memory: unlocked" in daemon.log()
    finally:
        assert daemon.stop() == 0


def test_edged_run_with_the_key_off_locks_nothing(tmp_path: Path) -> None:
    daemon = start_daemon(
        tmp_path,
        "--dry-run",
        env={
            "EDGED_ENFORCE_LOCK_MEMORY": "false",
            "STATE_DIRECTORY": str(tmp_path / "state"),
        },
    )
    try:
        assert daemon.call("status")["memory_locked"] is False
        assert proc_status_kib(daemon.proc.pid)["VmLck"] == 0
        assert "memory: not locked ([enforce] lock_memory = false)" in daemon.log()
    finally:
        assert daemon.stop() == 0
