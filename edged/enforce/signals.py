"""Signals to one process, never to a pid that has been reused by another.

A pid alone names a process only as long as it lives: once it exits the kernel may hand the
same number to a new process. Every signal here is therefore sent through a pidfd (Linux 5.3+,
``os.pidfd_open`` / ``signal.pidfd_send_signal``), opened *before* the start time in
``/proc/<pid>/stat`` (field 22) is compared with the start time the strategy knew
(``Action.start_ticks``). If the start time matches after the pidfd is open, the pidfd names
that very process; if the process then exits, ``pidfd_send_signal`` fails with ESRCH instead of
reaching whatever process got the pid next. Without pidfd support the start time is still
checked, and the remaining window is the few microseconds between the check and ``os.kill``.

pid 1 and the daemon itself are refused whatever the caller asks.

The error hierarchy of the enforcement package lives here too (psutil style: small, with
fields, translated from ``OSError`` once, at the boundary).
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable
from pathlib import Path

_HAVE_PIDFD = hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal")


class EnforceError(Exception):
    """An enforcement step could not be taken: which pid (None for a whole group), which
    operation, and why."""

    def __init__(self, pid: int | None, op: str, detail: str) -> None:
        self.pid = pid
        self.op = op
        self.detail = detail
        super().__init__(f"{op} pid={pid}: {detail}" if pid is not None else f"{op}: {detail}")


class NoSuchProcess(EnforceError):
    """The process has exited (or never existed)."""


class StaleProcess(EnforceError):
    """The pid now belongs to another process than the one the action was decided for."""


class ProtectedProcess(EnforceError):
    """pid 1, the daemon itself, or a critical-class process: never acted on."""


class CgroupError(EnforceError):
    """A cgroup file could not be read or written; ``group`` is edged's group path."""

    def __init__(self, group: str, op: str, detail: str, pid: int | None = None) -> None:
        self.group = group
        super().__init__(pid, op, f"{group}: {detail}")


class UnitError(EnforceError):
    """systemd refused or failed a D-Bus call about a unit: ``unit`` (empty when not known
    yet), and ``error_name``, the D-Bus error name (``org.freedesktop.systemd1.NoSuchUnit``,
    ``org.freedesktop.DBus.Error.AccessDenied``, ...), empty when the call got no reply."""

    def __init__(
        self, unit: str, op: str, detail: str, pid: int | None = None, error_name: str = ""
    ) -> None:
        self.unit = unit
        self.error_name = error_name
        where = unit or "unit"
        named = f" [{error_name}]" if error_name else ""
        super().__init__(pid, op, f"{where}: {detail}{named}")


def read_start_ticks(pid: int, proc: Path = Path("/proc")) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of stat); None if gone."""
    try:
        raw = (proc / str(pid) / "stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may hold spaces and ')': split after the last ')'. starttime is field 22,
    # the 20th after comm (state is the 1st).
    return int(raw[raw.rindex(b")") + 2 :].split()[19])


def exited(pid: int, start_ticks: int, proc: Path = Path("/proc")) -> bool:
    """Whether the process (pid, start_ticks) has exited: gone, its pid reused, or a zombie
    (dead, its memory freed, only its parent's wait() outstanding: nothing edged imposed on
    it still does anything)."""
    try:
        raw = (proc / str(pid) / "stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return True
    fields = raw[raw.rindex(b")") + 2 :].split()
    return int(fields[19]) != start_ticks or fields[0] == b"Z"


class Signaller:
    """Sends signals to processes identified by (pid, start_ticks).

    ``proc`` is the procfs root (tests may point it elsewhere only for start-time reads; the
    signals themselves always go to real processes). ``self_pid`` is the daemon's own pid.
    """

    def __init__(self, proc: Path = Path("/proc"), self_pid: int | None = None) -> None:
        self.proc = proc
        self._self_pid = os.getpid() if self_pid is None else self_pid

    def check(self, pid: int, start_ticks: int, op: str = "check") -> None:
        """Raise unless ``pid`` is a process other than pid 1 / ourselves that is still the
        one that started at ``start_ticks``."""
        if pid <= 1:
            raise ProtectedProcess(pid, op, "pid 1 (init) and pid <= 0 (process groups) refused")
        if pid == self._self_pid:
            raise ProtectedProcess(pid, op, "edged never acts on itself")
        if start_ticks <= 0:
            raise StaleProcess(pid, op, "no start time given; cannot tell a reused pid")
        now = read_start_ticks(pid, self.proc)
        if now is None:
            raise NoSuchProcess(pid, op, "process has exited")
        if now != start_ticks:
            raise StaleProcess(
                pid, op, f"start time is {now} ticks, action was for {start_ticks}: pid reused"
            )

    def send(self, pid: int, sig: signal.Signals, start_ticks: int) -> None:
        """Send ``sig`` to the process ``pid`` started at ``start_ticks``, or raise."""
        op = sig.name
        # refuse before opening anything: pid 1 / self never get a pidfd from us either
        if pid <= 1 or pid == self._self_pid:
            self.check(pid, start_ticks, op)
        if not _HAVE_PIDFD:
            self.check(pid, start_ticks, op)
            _translate(lambda: os.kill(pid, sig), pid, op)
            return
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as exc:
            raise _from_oserror(exc, pid, "pidfd_open") from exc
        try:
            self.check(pid, start_ticks, op)  # after the open: the pidfd is that process
            _translate(lambda: signal.pidfd_send_signal(pidfd, sig), pid, op)
        finally:
            os.close(pidfd)

    def stop(self, pid: int, start_ticks: int) -> None:
        """SIGSTOP: the process stops until SIGCONT (cannot be caught or ignored)."""
        self.send(pid, signal.SIGSTOP, start_ticks)

    def cont(self, pid: int, start_ticks: int) -> None:
        """SIGCONT: resume a stopped process."""
        self.send(pid, signal.SIGCONT, start_ticks)

    def terminate(self, pid: int, start_ticks: int) -> None:
        """SIGTERM: ask the process to exit (it may catch or ignore it)."""
        self.send(pid, signal.SIGTERM, start_ticks)

    def kill(self, pid: int, start_ticks: int) -> None:
        """SIGKILL: end the process."""
        self.send(pid, signal.SIGKILL, start_ticks)


def _from_oserror(exc: OSError, pid: int, op: str) -> EnforceError:
    if exc.errno == errno.ESRCH:
        return NoSuchProcess(pid, op, "process has exited")
    return EnforceError(pid, op, os.strerror(exc.errno or 0))


def _translate(call: Callable[[], object], pid: int, op: str) -> None:
    try:
        call()
    except OSError as exc:
        raise _from_oserror(exc, pid, op) from exc
