"""Host-side checks of what the VM lane found (issue 11): the exit status of a command run under
``edged budget request`` and what counts as an exited victim. The real-systemd behaviour is
tested in tests/vm (the VM lane)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from edged.cli import shell_status
from edged.enforce.signals import exited, read_start_ticks


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGSEGV])
def test_a_command_ended_by_a_signal_exits_as_a_shell_reports_it(sig: int) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    child.send_signal(sig)
    assert shell_status(child.wait(timeout=30)) == 128 + sig
    done = subprocess.run(["sh", "-c", f"kill -{sig} $$"], check=False)
    assert shell_status(done.returncode) == 128 + sig  # what `sh -c` itself would print


@pytest.mark.parametrize("code", [0, 1, 3, 127])
def test_a_normal_exit_code_is_kept(code: int) -> None:
    assert shell_status(subprocess.run(["sh", "-c", f"exit {code}"], check=False).returncode) == (
        code
    )


def test_a_zombie_counts_as_exited_and_a_live_process_does_not() -> None:
    child = subprocess.Popen(["sleep", "60"])
    ticks = read_start_ticks(child.pid)
    assert ticks is not None
    assert not exited(child.pid, ticks)
    assert exited(child.pid, ticks + 1)  # another process with this pid
    child.kill()
    # not reaped yet: a zombie, whose memory and limits no longer matter
    for _ in range(500):
        if exited(child.pid, ticks):
            break
        time.sleep(0.01)
    assert exited(child.pid, ticks)
    child.wait(timeout=30)
    assert exited(child.pid, ticks)
