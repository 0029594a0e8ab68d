"""What every sensor shares: its filesystem roots, the Sensor interface, kept-open files.

A sensor is discovered once (``discover(roots)`` in each module) and then read every tick.
``read()`` returns readings or raises; the sampler turns an exception into an "error" status for
that tick and an ``edged.sensor.errors`` increment, and goes on with the next sensor.
"""

from __future__ import annotations

import abc
import errno
import os
from dataclasses import dataclass
from pathlib import Path

from edged.snapshot import Reading


class SensorError(Exception):
    """A source that exists but could not be read on this tick."""

    def __init__(self, source: str, detail: str) -> None:
        super().__init__(f"{source}: {detail}")
        self.source = source
        self.detail = detail


@dataclass(frozen=True)
class Roots:
    """Where the kernel's pseudo-filesystems are; tests point these at fixture trees."""

    proc: Path = Path("/proc")
    sys: Path = Path("/sys")
    etc: Path = Path("/etc")

    @classmethod
    def under(cls, base: str | os.PathLike[str]) -> Roots:
        """Roots of a tree laid out like a machine: ``base/proc``, ``base/sys``, ``base/etc``."""
        b = Path(base)
        return cls(proc=b / "proc", sys=b / "sys", etc=b / "etc")


@dataclass(frozen=True)
class Absent:
    """A source that discovery looked for and did not find; reported, never read."""

    name: str
    detail: str


class Sensor(abc.ABC):
    """One source of readings, read every tick."""

    name: str = "sensor"

    @abc.abstractmethod
    def read(self) -> list[Reading]:
        """Read the source now. Raises SensorError (or OSError/ValueError) when it cannot."""

    def close(self) -> None:  # noqa: B027 - most sensors hold nothing
        """Release kept-open files and handles."""

    def describe(self) -> str:
        """One line about what was found (a board model, a GPU name); "" when nothing to add."""
        return ""


class KeptFile:
    """A file read again and again through one open descriptor and ``os.pread``.

    procfs and sysfs regenerate a file's content on a read at offset 0, so a descriptor kept
    open costs one syscall per tick instead of open+read+close. If the read fails the
    descriptor is dropped and reopened on the next call (a sysfs node can be replaced).
    """

    __slots__ = ("_fd", "path", "size_bytes")

    def __init__(self, path: str | os.PathLike[str], size_bytes: int = 65536) -> None:
        self.path = os.fspath(path)
        self.size_bytes = size_bytes
        self._fd = -1

    def read_bytes(self) -> bytes:
        """The whole file (up to ``size_bytes``). Raises OSError, e.g. ESRCH for a gone pid."""
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(self._fd, self.size_bytes, 0)
        except OSError:
            self.close()
            raise

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8", "replace")

    def read_int(self) -> int:
        """An integer file such as sysfs ``temp``; ValueError on garbage, OSError on EAGAIN."""
        raw = self.read_bytes().strip()
        if not raw:
            raise ValueError(f"{self.path}: empty")
        return int(raw)

    def close(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            finally:
                self._fd = -1

    def __del__(self) -> None:
        self.close()


def read_text(path: Path) -> str | None:
    """A small file's stripped text, or None when it does not exist or cannot be read."""
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError as exc:
        if exc.errno in (
            errno.ENOENT,
            errno.ENOTDIR,
            errno.EACCES,
            errno.EPERM,
            errno.ENODEV,
            errno.EINVAL,
            errno.EIO,
            errno.EAGAIN,
            errno.ENODATA,
        ):
            return None
        raise
