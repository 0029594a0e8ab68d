"""Kernel notifications that wake the daemon between two ticks when memory runs short.

A fixed tick sees a fast fill late: at 1 s and a process faulting 1 GiB/s, memory can cross a
level and use up a 256 MiB reserve before the next look. Polling faster costs CPU all the time
for the seconds in a year that matter, so edged asks the kernel to tell it instead (as
``systemd-oomd`` does with PSI triggers), and ticks at once when told:

- **v1 memory thresholds** (``cgroup.event_control`` with an eventfd on
  ``memory.usage_in_bytes``, Documentation/admin-guide/cgroup-v1/memory.rst, section 9): the
  kernel signals the eventfd when usage crosses a threshold, checked every 128 page events per
  CPU (~512 KiB), so within a millisecond of the crossing. edged's levels are on *used*
  (MemTotal - MemAvailable), the threshold file on the group's usage (which counts page cache),
  so each threshold is put at ``usage now + (level - used now)``, and moved when the two drift
  apart by more than ``REARM_BYTES``. One eventfd carries a threshold at soft and one at hard.
  The root group's usage is the machine's; with a ``[scope]`` the governed group's.
- **PSI triggers** (``/proc/pressure/memory``, Documentation/accounting/psi.rst): ``some``
  stall of ``PSI_STALL_US`` within a ``PSI_WINDOW_US`` window. The window is 2 s, the least an
  unprivileged trigger may use (a process without CAP_SYS_RESOURCE is refused shorter ones);
  the kernel then signals at most once per window. This catches thrashing that the levels do
  not show (page cache counted available while it is being evicted and read back).

Where neither exists (cgroup v2 without PSI, a kernel without either), the daemon keeps its
adaptive tick alone. Every file here is opened once; re-arming costs one ``write``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
from pathlib import Path

log = logging.getLogger(__name__)

PSI_STALL_US = 100_000  # 100 ms of stall in the window: 5 % of it
PSI_WINDOW_US = 2_000_000
REARM_BYTES = 32 << 20  # a threshold this far from where it should be is moved


class MemoryWake:
    """An epoll descriptor that becomes readable when the kernel reports memory pressure.

    ``memcg`` is the v1 memory group whose usage is watched (``/sys/fs/cgroup/memory`` for the
    machine), None where there is no v1 memory controller; ``pressure`` the PSI file, None to
    skip it. :meth:`fileno` goes to the event loop; :meth:`drain` clears what fired.
    """

    def __init__(self, memcg: Path | None, pressure: Path | None) -> None:
        self._epoll = select.epoll()
        self._usage_fd: int | None = None
        self._control: Path | None = None
        self._event_fd: int | None = None
        self._thresholds: tuple[int, ...] = ()
        self._psi_fd: int | None = None
        self.sources: list[str] = []
        if memcg is not None and (memcg / "cgroup.event_control").exists():
            try:
                self._usage_fd = os.open(memcg / "memory.usage_in_bytes", os.O_RDONLY)
                self._control = memcg / "cgroup.event_control"
                self.sources.append(f"v1 thresholds on {memcg}")
            except OSError as exc:
                log.info("no memory thresholds on %s: %s", memcg, exc)
        if pressure is not None:
            try:
                fd = os.open(pressure, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                log.info("no PSI trigger on %s: %s", pressure, exc)
            else:
                try:
                    os.write(fd, f"some {PSI_STALL_US} {PSI_WINDOW_US}\n".encode())
                    self._epoll.register(fd, select.EPOLLPRI)
                    self._psi_fd = fd
                    self.sources.append(f"PSI trigger on {pressure}")
                except OSError as exc:
                    os.close(fd)
                    log.info("no PSI trigger on %s: %s", pressure, exc)

    def fileno(self) -> int:
        return self._epoll.fileno()

    def arm(self, used_bytes: float, levels_bytes: tuple[float, ...]) -> None:
        """Put the v1 thresholds where usage will be when *used* reaches each level."""
        if self._usage_fd is None or self._control is None or not levels_bytes:
            return
        try:
            usage = int(os.pread(self._usage_fd, 32, 0))
        except (OSError, ValueError):
            return
        wanted = tuple(sorted(max(1, int(usage + level - used_bytes)) for level in levels_bytes))
        if len(wanted) == len(self._thresholds) and all(
            abs(a - b) <= REARM_BYTES for a, b in zip(wanted, self._thresholds, strict=True)
        ):
            return
        old = self._event_fd
        try:
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError:
            return
        try:
            for threshold in wanted:
                with open(self._control, "w") as control:
                    control.write(f"{fd} {self._usage_fd} {threshold}")
            self._epoll.register(fd, select.EPOLLIN)
        except OSError as exc:
            os.close(fd)
            log.info("memory threshold not armed: %s", exc)
            return
        self._event_fd, self._thresholds = fd, wanted
        if old is not None:  # closing the old eventfd unregisters its thresholds
            self._epoll.unregister(old)
            os.close(old)

    def drain(self) -> list[str]:
        """What fired since the last call: ``"threshold"``, ``"psi"``."""
        fired: list[str] = []
        for fd, _mask in self._epoll.poll(0):
            if fd == self._event_fd:
                with contextlib.suppress(OSError):
                    os.eventfd_read(fd)
                fired.append("threshold")
            elif fd == self._psi_fd:
                fired.append("psi")
        return fired

    def close(self) -> None:
        for fd in (self._event_fd, self._psi_fd, self._usage_fd):
            if fd is not None:
                os.close(fd)
        self._event_fd = self._psi_fd = self._usage_fd = None
        self._epoll.close()
