"""Keep edged's own pages resident: ``mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)``.

Why: the protector must stay alive under the pressure it handles. In a 2 GiB VM with a hog the
kernel reclaimed edged's code and heap like any other process's; each tick then waited on page
faults behind the hog's, the loop stopped pinging systemd's watchdog for 30 s, and systemd
killed edged while the hog lived on. With its pages locked, a tick under heavy reclaim costs
what it costs on an idle machine.

``MCL_ONFAULT`` (Linux 4.4) locks pages as they are first touched instead of populating every
mapping at once: CPython's thread stacks (8 MiB reserved each) and glibc's malloc arenas (64 MiB
reserved each) stay virtual, so the resident size does not grow. ``VmLck`` in
``/proc/PID/status`` then shows the size of the locked mappings (most of the address space),
``VmRSS`` what is really resident. A kernel without ``MCL_ONFAULT`` (EINVAL) gets no lock at
all, not ``MCL_CURRENT | MCL_FUTURE``: that would make every reserved stack and arena resident
(hundreds of MiB for a daemon that needs ~40).

Who may lock: a process with ``CAP_IPC_LOCK`` (root has it; ``edged.service`` keeps it), or one
whose ``RLIMIT_MEMLOCK`` is unlimited. A finite limit is not tried: with ``MCL_FUTURE`` every new
mapping counts whole against it, so once the address space outgrew it ``mmap``, and with it
``malloc``, would fail inside a daemon that must not fail. The result is logged either way and
reported as ``memory_locked`` by the ``status`` method.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MCL_CURRENT = 1
MCL_FUTURE = 2
MCL_ONFAULT = 4  # Linux 4.4
LOCK_FLAGS = MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT
CAP_IPC_LOCK = 14  # bit in CapEff
_RLIMIT_MEMLOCK = resource.RLIMIT_MEMLOCK


@dataclass(frozen=True)
class LockResult:
    """Whether edged's memory is locked, and a sentence saying so or why not."""

    locked: bool
    detail: str


def _libc_call(name: str) -> Callable[..., int]:
    libc = ctypes.CDLL(None, use_errno=True)
    func: Callable[..., int] = getattr(libc, name)
    return func


def _mlockall(flags: int) -> int:
    """``mlockall(flags)``: 0, or the errno it failed with."""
    if _libc_call("mlockall")(ctypes.c_int(flags)) == 0:
        return 0
    return ctypes.get_errno()


def _munlockall() -> int:
    if _libc_call("munlockall")() == 0:
        return 0
    return ctypes.get_errno()


def has_ipc_lock(status_path: Path = Path("/proc/self/status")) -> bool:
    """Whether this process's effective capabilities include CAP_IPC_LOCK."""
    try:
        for line in status_path.read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_IPC_LOCK & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def lock_memory(
    *,
    mlockall: Callable[[int], int] = _mlockall,
    status_path: Path = Path("/proc/self/status"),
    memlock_limit: Callable[[], tuple[int, int]] = lambda: resource.getrlimit(_RLIMIT_MEMLOCK),
) -> LockResult:
    """Lock every page edged has and will touch (see the module's docstring); never raises.
    ``mlockall``, ``status_path`` and ``memlock_limit`` are seams for tests."""
    soft_bytes, _ = memlock_limit()
    if not has_ipc_lock(status_path) and soft_bytes != resource.RLIM_INFINITY:
        return LockResult(
            False,
            f"not locked: no CAP_IPC_LOCK and RLIMIT_MEMLOCK is {soft_bytes} bytes, not "
            "unlimited (a finite limit would make later allocations fail); run as root or "
            "with LimitMEMLOCK=infinity",
        )
    err = mlockall(LOCK_FLAGS)
    if err == 0:
        return LockResult(True, "locked in memory (mlockall MCL_CURRENT|MCL_FUTURE|MCL_ONFAULT)")
    if err == errno.EINVAL:
        return LockResult(
            False,
            "not locked: the kernel has no MCL_ONFAULT (Linux < 4.4); locking without it "
            "would make every reserved thread stack and arena resident",
        )
    return LockResult(False, f"not locked: mlockall failed: {os.strerror(err)}")


def unlock_memory(munlockall: Callable[[], int] = _munlockall) -> bool:
    """``munlockall()``: pages may be reclaimed again (``lock_memory`` turned off on reload)."""
    return munlockall() == 0
