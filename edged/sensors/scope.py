"""The governed cgroup of ``[scope] cgroup``: its memory, CPU and pressure, and its processes.

With a scope, edged governs one cgroup (a container, a slice, a "virtual device" carved out of
a big box) instead of the whole machine: limits are judged on the group's usage, percentages
resolve against the group's limit, and only the group's processes can be victims.

The path is a cgroup path as ``/proc/PID/cgroup`` writes it (``/system.slice/foo.service``;
:func:`edged.config.cgroup_path` turns the ``/sys/fs/cgroup/...`` form a user may paste into
it), resolved per hierarchy under ``<sys>/fs/cgroup``:

- **v1**: ``memory/PATH`` (required: usage, limit, and the processes that are members),
  ``cpu,cpuacct/PATH`` or ``cpuacct/PATH`` (CPU time), ``cpu,cpuacct/PATH`` or ``cpu/PATH``
  (CFS quota). A v1 group that exists only in the memory tree has no CPU readings.
- **v2**: ``PATH`` (``memory.current`` is required: the memory controller must be enabled in
  the parent's ``cgroup.subtree_control``).

Readings, all with ``edged.scope`` = the path:

- ``edged.scope.memory.usage``: the working set, as the kubelet computes it: charged memory
  minus inactive file cache (v1 ``memory.usage_in_bytes`` - ``total_inactive_file``, v2
  ``memory.current`` - ``inactive_file``), the figure the kernel cannot simply drop.
- ``edged.scope.memory.limit``: the smallest of the group's limit and its ancestors' (v1
  ``hierarchical_memory_limit``, v2 ``memory.max`` of each non-root ancestor) and MemTotal
  ("unlimited" is the machine's memory).
- ``edged.scope.cpu.time`` (s) and ``edged.scope.cpu.usage`` (cores over the last tick; from
  the second read on), from v1 ``cpuacct.usage`` (ns) or v2 ``cpu.stat usage_usec``.
- ``edged.scope.cpu.limit``: the smallest quota/period of the group and its non-root ancestors
  (v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``, v2 ``cpu.max``), at most the CPU count.
- ``edged.scope.pressure`` {edged.resource, edged.window}: PSI ``some`` avg10/avg60 of the
  group where the kernel has per-group PSI (v2 ``memory.pressure``, ``cpu.pressure``,
  ``io.pressure``).

MemTotal and the CPU count are read once, when the scope is opened.

:class:`ScopeMembers` lists the pids of the group and every group below it (``cgroup.procs``
is not recursive). The group directories are listed when it is built and again whenever the
link count of one of them changes (kernfs counts subdirectories in it) or one vanishes, so a
group created between two ticks, such as the one edged moves a victim into, is seen on the
next tick; a tick otherwise costs one ``stat`` and one read of ``cgroup.procs`` per group
directory (a ``pread`` on v2; open, read, close on v1, whose file caches its pid list per open
descriptor).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from edged.config import ConfigError
from edged.sensors.base import KeptFile, Roots, Sensor, SensorError
from edged.sensors.cpu import parse_stat
from edged.sensors.memory import parse_meminfo
from edged.sensors.pressure import RESOURCES, parse_psi_some
from edged.snapshot import Reading

CONFIG_KEY = "scope.cgroup"
_GONE = (errno.ENOENT, errno.ENODEV, errno.ESRCH)


@dataclass(frozen=True)
class ScopeGroup:
    """Where one cgroup path lives in each hierarchy this machine has.

    ``version`` is 1 or 2. ``memory_dir`` always exists (it defines membership too);
    ``cpuacct_dir`` (CPU time) and ``cpu_dir`` (quota) are None when the group is not in those
    v1 trees or, on v2, when the cpu controller is not enabled for it. ``*_ancestors`` are the
    group's parent directories up to, not including, the hierarchy root (root groups have no
    limits of their own).
    """

    path: str
    version: int
    memory_dir: Path
    cpuacct_dir: Path | None
    cpu_dir: Path | None
    memory_ancestors: tuple[Path, ...]
    cpu_ancestors: tuple[Path, ...]
    pressure_files: tuple[tuple[str, Path], ...]

    def describe(self) -> str:
        parts = [f"cgroup v{self.version} {self.path}: memory"]
        if self.cpuacct_dir is not None:
            parts.append("cpu time")
        if self.cpu_dir is not None:
            parts.append("cpu quota")
        if self.pressure_files:
            parts.append("pressure")
        return ", ".join(parts)


def _relative(path: str) -> str:
    return path.strip("/")


def _ancestors(hierarchy_root: Path, group_dir: Path) -> tuple[Path, ...]:
    """``group_dir``'s parents below ``hierarchy_root``, nearest first."""
    out: list[Path] = []
    d = group_dir.parent
    while d != hierarchy_root and hierarchy_root in d.parents:
        out.append(d)
        d = d.parent
    return tuple(out)


def _readable(path: Path) -> bool:
    """Whether a PSI file can be read (a kernel booted with psi=0 has it and refuses reads)."""
    try:
        with open(path, "rb") as f:
            parse_psi_some(f.read())
    except (OSError, ValueError, KeyError):
        return False
    return True


def resolve(sys_root: Path, path: str) -> ScopeGroup:
    """The :class:`ScopeGroup` of cgroup ``path`` under ``sys_root`` (``/sys``).

    Raises :class:`~edged.config.ConfigError` (key ``scope.cgroup``) naming what was looked
    for when the group does not exist or has no memory accounting: governing the whole machine
    instead, or nothing, would be a silent surprise.
    """
    cgroup = sys_root / "fs" / "cgroup"
    rel = _relative(path)
    if not rel:
        raise ConfigError(f"{CONFIG_KEY}: the root group is the whole machine", key=CONFIG_KEY)
    if (cgroup / "cgroup.controllers").exists():  # unified hierarchy mounted at the root
        group_dir = cgroup / rel
        if not group_dir.is_dir():
            raise ConfigError(
                f"{CONFIG_KEY}: no cgroup /{rel} (looked for {group_dir})", key=CONFIG_KEY
            )
        if not (group_dir / "memory.current").exists():
            raise ConfigError(
                f"{CONFIG_KEY}: {group_dir} has no memory.current: enable the memory "
                f"controller in its parent's cgroup.subtree_control",
                key=CONFIG_KEY,
            )
        has_cpu = (group_dir / "cpu.stat").exists()
        has_quota = (group_dir / "cpu.max").exists()
        ancestors = _ancestors(cgroup, group_dir)
        psi = tuple(
            (r, group_dir / f"{r}.pressure")
            for r in RESOURCES
            if _readable(group_dir / f"{r}.pressure")
        )
        return ScopeGroup(
            path="/" + rel,
            version=2,
            memory_dir=group_dir,
            cpuacct_dir=group_dir if has_cpu else None,
            cpu_dir=group_dir if has_quota else None,
            memory_ancestors=tuple(d for d in ancestors if (d / "memory.max").exists()),
            cpu_ancestors=tuple(d for d in ancestors if has_quota and (d / "cpu.max").exists()),
            pressure_files=psi,
        )
    memory_root = cgroup / "memory"
    if not (memory_root / "cgroup.procs").exists():
        raise ConfigError(
            f"{CONFIG_KEY}: no cgroup hierarchy with the memory controller under {cgroup}",
            key=CONFIG_KEY,
        )
    memory_dir = memory_root / rel
    if not (memory_dir / "memory.usage_in_bytes").exists():
        raise ConfigError(
            f"{CONFIG_KEY}: no cgroup /{rel} in the memory hierarchy (looked for {memory_dir})",
            key=CONFIG_KEY,
        )
    cpuacct_dir = _first_dir(cgroup, ("cpu,cpuacct", "cpuacct"), rel, "cpuacct.usage")
    cpu_dir = _first_dir(cgroup, ("cpu,cpuacct", "cpu"), rel, "cpu.cfs_quota_us")
    cpu_ancestors: tuple[Path, ...] = ()
    if cpu_dir is not None:
        cpu_root = cpu_dir
        for _ in rel.split("/"):
            cpu_root = cpu_root.parent
        cpu_ancestors = tuple(
            d for d in _ancestors(cpu_root, cpu_dir) if (d / "cpu.cfs_quota_us").exists()
        )
    # per-group PSI on v1 only where the kernel provides it (psi=1 with cgroup1 support)
    pressure: dict[str, Path] = {}
    for d in (memory_dir, cpuacct_dir):
        for r in RESOURCES:
            if d is not None and r not in pressure and _readable(d / f"{r}.pressure"):
                pressure[r] = d / f"{r}.pressure"
    return ScopeGroup(
        path="/" + rel,
        version=1,
        memory_dir=memory_dir,
        cpuacct_dir=cpuacct_dir,
        cpu_dir=cpu_dir,
        memory_ancestors=(),  # v1 memory.stat has hierarchical_memory_limit
        cpu_ancestors=cpu_ancestors,
        pressure_files=tuple(pressure.items()),
    )


def _first_dir(cgroup: Path, mounts: tuple[str, ...], rel: str, wanted: str) -> Path | None:
    for mount in mounts:
        d = cgroup / mount / rel
        if (d / wanted).exists():
            return d
    return None


def _stat_values(raw: bytes, wanted: tuple[bytes, ...]) -> dict[bytes, int]:
    """``key value`` lines (memory.stat, cpu.stat) -> the wanted keys as integers."""
    out: dict[bytes, int] = {}
    for line in raw.splitlines():
        key, _, value = line.partition(b" ")
        if key in wanted:
            out[key] = int(value)
    return out


def _machine_totals(roots: Roots) -> tuple[int | None, int]:
    """(MemTotal bytes or None, logical CPU count), read once."""
    try:
        mem_total: int | None = parse_meminfo((roots.proc / "meminfo").read_bytes())["MemTotal"]
    except (OSError, ValueError, KeyError):
        mem_total = None
    try:
        cpus = len(parse_stat((roots.proc / "stat").read_bytes()))
    except (OSError, ValueError):
        cpus = os.cpu_count() or 1
    return mem_total, cpus


class ScopeSensor(Sensor):
    """The ``edged.scope.*`` readings of one :class:`ScopeGroup`."""

    name = "scope"

    def __init__(
        self, group: ScopeGroup, roots: Roots, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.group = group
        self._clock = clock
        self.mem_total_bytes, self.cpu_count = _machine_totals(roots)
        g = group
        self._attrs = {"edged.scope": g.path}
        self._pressure_attrs = {
            (r, w): {"edged.scope": g.path, "edged.resource": r, "edged.window": w}
            for r, _ in g.pressure_files
            for w in ("10s", "60s")
        }
        if g.version == 1:
            self._usage = KeptFile(g.memory_dir / "memory.usage_in_bytes", 64)
            self._inactive_key = b"total_inactive_file"
            self._mem_limits = [KeptFile(g.memory_dir / "memory.limit_in_bytes", 64)]
        else:
            self._usage = KeptFile(g.memory_dir / "memory.current", 64)
            self._inactive_key = b"inactive_file"
            self._mem_limits = [
                KeptFile(d / "memory.max", 64) for d in (g.memory_dir, *g.memory_ancestors)
            ]
        self._stat = KeptFile(g.memory_dir / "memory.stat", 16384)
        self._cpu_time: KeptFile | None = None
        if g.cpuacct_dir is not None:
            name = "cpuacct.usage" if g.version == 1 else "cpu.stat"
            self._cpu_time = KeptFile(g.cpuacct_dir / name, 4096)
        self._cpu_limits: list[tuple[KeptFile, KeptFile | None]] = []
        if g.cpu_dir is not None:
            for d in (g.cpu_dir, *g.cpu_ancestors):
                if g.version == 1:
                    self._cpu_limits.append(
                        (
                            KeptFile(d / "cpu.cfs_quota_us", 64),
                            KeptFile(d / "cpu.cfs_period_us", 64),
                        )
                    )
                else:
                    self._cpu_limits.append((KeptFile(d / "cpu.max", 64), None))
        self._pressure = [(r, KeptFile(p, 4096)) for r, p in g.pressure_files]
        self._last_cpu: tuple[float, float] | None = None  # (monotonic s, CPU seconds)

    def describe(self) -> str:
        return self.group.describe()

    def _files(self) -> Iterator[KeptFile]:
        yield self._usage
        yield self._stat
        yield from self._mem_limits
        if self._cpu_time is not None:
            yield self._cpu_time
        for quota, period in self._cpu_limits:
            yield quota
            if period is not None:
                yield period
        for _, f in self._pressure:
            yield f

    def memory(self) -> tuple[float, float | None]:
        """(working set bytes, limit bytes or None when unlimited and MemTotal is unknown),
        read now. The daemon's re-check before acting calls this too."""
        try:
            charged = self._usage.read_int()
            stat = _stat_values(
                self._stat.read_bytes(), (self._inactive_key, b"hierarchical_memory_limit")
            )
            hierarchical = stat.get(b"hierarchical_memory_limit")  # v1: ancestors' too
            limits = [] if hierarchical is None else [hierarchical]
            for f in self._mem_limits:
                raw = f.read_bytes().strip()
                if raw != b"max":
                    limits.append(int(raw))
        except OSError as exc:
            self._if_gone(exc)
            raise
        working_set = max(0, charged - stat.get(self._inactive_key, 0))
        if self.mem_total_bytes is not None:
            limits.append(self.mem_total_bytes)
        return float(working_set), float(min(limits)) if limits else None

    def _if_gone(self, exc: OSError) -> None:
        """Raise SensorError if ``exc`` says the group was removed. A removed group fails every
        kept descriptor (ENODEV); all are closed at once, so the first read after the group
        is back (a container restarted) reopens them all instead of failing on one stale
        file a tick."""
        if exc.errno in _GONE:
            self.close()
            raise SensorError(self.name, f"cgroup {self.group.path} is gone") from exc

    def _cpu_seconds(self) -> float | None:
        if self._cpu_time is None:
            return None
        raw = self._cpu_time.read_bytes()
        if self.group.version == 1:
            return int(raw) / 1e9
        try:
            return _stat_values(raw, (b"usage_usec",))[b"usage_usec"] / 1e6
        except KeyError as exc:
            raise SensorError(self.name, "cpu.stat has no usage_usec") from exc

    def _cpu_limit_cores(self) -> float:
        cores = float(self.cpu_count)
        for quota_file, period_file in self._cpu_limits:
            if period_file is None:  # v2 "max 100000" or "50000 100000"
                quota_raw, _, period_raw = quota_file.read_bytes().strip().partition(b" ")
                if quota_raw == b"max":
                    continue
                quota, period = int(quota_raw), int(period_raw or b"100000")
            else:
                quota, period = quota_file.read_int(), period_file.read_int()
                if quota < 0:  # -1: no quota
                    continue
            if period > 0:
                cores = min(cores, quota / period)
        return cores

    def read(self) -> list[Reading]:
        working_set, limit = self.memory()
        try:
            cpu_s = self._cpu_seconds()
            cpu_limit = self._cpu_limit_cores() if self._cpu_limits else float(self.cpu_count)
            psi = [(r, parse_psi_some(f.read_bytes())) for r, f in self._pressure]
        except OSError as exc:
            self._if_gone(exc)
            raise
        now_s = self._clock()
        out = [Reading("edged.scope.memory.usage", working_set, self._attrs)]
        if limit is not None:
            out.append(Reading("edged.scope.memory.limit", limit, self._attrs))
        if cpu_s is not None:
            out.append(Reading("edged.scope.cpu.time", cpu_s, self._attrs))
            last = self._last_cpu
            if last is not None and now_s > last[0]:
                cores = max(0.0, cpu_s - last[1]) / (now_s - last[0])
                out.append(Reading("edged.scope.cpu.usage", cores, self._attrs))
            self._last_cpu = (now_s, cpu_s)
        out.append(Reading("edged.scope.cpu.limit", cpu_limit, self._attrs))
        for resource, (avg10, avg60, _total) in psi:
            out.append(
                Reading(
                    "edged.scope.pressure", avg10 / 100.0, self._pressure_attrs[(resource, "10s")]
                )
            )
            out.append(
                Reading(
                    "edged.scope.pressure", avg60 / 100.0, self._pressure_attrs[(resource, "60s")]
                )
            )
        return out

    def close(self) -> None:
        for f in self._files():
            f.close()


class ScopeMembers:
    """The pids in a group and in every group below it, re-listed when the tree changes.

    ``top`` is the directory whose tree defines membership (the v1 memory group, the v2
    group). :meth:`pids` raises :class:`SensorError` when ``top`` itself is gone.

    ``keep_open``: read each ``cgroup.procs`` with ``pread`` on a kept descriptor (v2, whose
    file restarts its task walk at offset 0: checked on the 6.18 kernel's v2 mount). A v1
    ``cgroup.procs`` caches its pid list per open file and a ``pread`` at 0 returns the stale
    list (same kernel: a process added after the first read never shows), so v1 opens the
    file for every read.
    """

    def __init__(self, top: Path, keep_open: bool = True) -> None:
        self.top = top
        self.keep_open = keep_open
        self._links: dict[Path, int] = {}  # group dir -> its link count at the last listing
        self._files: dict[Path, KeptFile] = {}  # kept cgroup.procs (keep_open only)
        self.refresh()

    def refresh(self) -> None:
        """List the tree again (new groups are added, vanished ones closed)."""
        if not self.top.is_dir():
            raise SensorError("processes", f"scope cgroup {self.top} is gone")
        links: dict[Path, int] = {}
        for dirpath, _dirs, _files in os.walk(self.top):
            d = Path(dirpath)
            try:
                links[d] = os.stat(d).st_nlink
            except FileNotFoundError:
                continue
        for d in [d for d in self._files if d not in links]:
            self._files.pop(d).close()
        self._links = links

    def _changed(self) -> bool:
        for d, links in self._links.items():
            try:
                if os.stat(d).st_nlink != links:
                    return True
            except FileNotFoundError:
                return True
        return False

    def _read(self, d: Path) -> bytes:
        if not self.keep_open:
            return _read_whole(d / "cgroup.procs")
        f = self._files.get(d)
        if f is None:
            f = self._files[d] = KeptFile(d / "cgroup.procs")
        raw = f.read_bytes()
        while len(raw) >= f.size_bytes:  # more pids than the buffer holds
            f.size_bytes *= 4
            raw = f.read_bytes()
        return raw

    def pids(self) -> set[int]:
        """Every pid in the tree now."""
        if self._changed():
            self.refresh()
        out: set[int] = set()
        stale = False
        for d in self._links:
            try:
                out.update(int(p) for p in self._read(d).split())
            except OSError as exc:
                if exc.errno not in _GONE:
                    raise
                if d == self.top:
                    raise SensorError("processes", f"scope cgroup {d} is gone") from exc
                stale = True  # a subgroup removed since the listing: its pids left with it
        if stale:
            self.refresh()
        return out

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def _read_whole(path: Path) -> bytes:
    """A file read through a fresh descriptor, to its end."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def open_scope(roots: Roots, path: str) -> tuple[ScopeSensor, ScopeMembers]:
    """The sensor and the member list of ``[scope] cgroup`` (ConfigError when it is absent)."""
    group = resolve(roots.sys, path)
    return ScopeSensor(group, roots), ScopeMembers(group.memory_dir, keep_open=group.version == 2)
