"""Direct cgroupfs writes under a subtree edged owns (DESIGN section 5, ``cgroupfs``).

edged only ever writes groups it made, and **a victim keeps every limit it was under**
(DESIGN section 5): it is never moved out of a group that another manager (a container runtime,
a systemd unit, a user's own cgroup) made. :meth:`group_for` decides where edged acts on a
process, from ``/proc/<pid>/cgroup``:

- a process in the root group, in the group edged's subtree lives in (the root, or the governed
  ``[scope]`` group), or in one of edged's own groups: ``<subtree>/pid-<pid>`` as before;
- **v1**, a process in another manager's group ``G`` (per controller): a child group
  ``G/edged-pid-<pid>`` made *under* it, so ``G``'s limits still bind it (v1 memory is
  hierarchical: a child's charges count in its parent, and what it held before the move stays
  charged to ``G``). ``G``'s own files are never written;
- **v2**, a process alone in another manager's group (and no child groups below it): that group
  itself, its ``memory.high``, ``memory.max`` and ``cpu.max`` read first and written back when
  edged lets go (:meth:`remove`); the group is never removed. A process that shares its v2 group
  with others cannot be given a limit of its own without moving it out (the no-internal-process
  rule forbids a child group beside processes), so :meth:`group_for` raises
  :class:`NotPlaceable`: the enforcer stops it with SIGSTOP instead of freezing a group, and its
  throttle fails (the ladder goes on to freeze and terminate). Where PID 1 is systemd the
  enforcer acts on the unit through D-Bus and never gets here.

Where a process came from is read before it is moved (:meth:`where`), so :meth:`release` can
put it back and the process keeps working where it was.

Two hierarchies, one interface:

- **v2** (unified): ``memory.high`` / ``memory.max``, ``cpu.max``, ``cgroup.freeze`` (+
  ``cgroup.events`` ``frozen 1``), ``cgroup.kill``, ``memory.current``.
- **v1** (Jetson JetPack 4/5, many embedded kernels, hybrid hosts): one tree per controller; edged
  uses ``memory``, ``cpu`` and ``freezer`` and mirrors its group in each.

v1 has no ``memory.high``. Its two knobs are ``memory.soft_limit_in_bytes``, which only steers
reclaim when the *whole machine* is short of memory (it never slows a growing process on its
own), and ``memory.limit_in_bytes``, which reclaims and then OOM-kills inside the group when it
cannot. A throttle must not be a kill in disguise, yet a soft limit alone would let the process
grow unchecked until the machine is short. So :meth:`CgroupV1.set_memory_high` sets the soft
limit to the target, a hard backstop a margin (``max(64 MiB, 10 %)``) above what the process
may hold, and ``memory.oom_control`` = 1: at the backstop the kernel *holds* the process in its
page fault (as v2's ``memory.high`` slows it) instead of OOM-killing it, and it resumes when
the throttle is lifted or memory is freed. A fatal signal (SIGKILL, or SIGTERM without a
handler) still ends a held process at once; a SIGTERM handler runs only once it resumes.

v1 does not move a process's memory with it (``move_charge_at_immigrate`` is gone from recent
kernels), so what it held before edged moved it stays charged to its old group. The backstop
counts that: the group may take ``target - (resident - charged here)`` more, never less than
what it holds now, so setting the backstop never kills or stalls anything by itself.
``set_memory_max`` (a hard limit, meant to OOM-kill) turns the group's OOM killer back on.

Every reader and writer takes its roots (``root`` for cgroupfs, ``proc`` for procfs), so tests
point a backend at a fixture tree.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from edged.enforce.signals import CgroupError, NoSuchProcess

SYS_CGROUP = Path("/sys/fs/cgroup")
PROC = Path("/proc")
CPU_PERIOD_US = 100_000  # the kernel default CFS period
MIN_CPU_QUOTA_US = 1_000  # the kernel refuses quotas under 1 ms
V1_UNLIMITED = "-1"
V1_CONTROLLERS = ("memory", "cpu", "freezer")
MiB = 1 << 20
# a group edged makes inside another manager's group: <their group>/edged-pid-<pid>
NESTED_PREFIX = "edged-pid-"


class NotPlaceable(CgroupError):
    """No group edged could act in without taking the process out of limits another manager
    set (v2: it shares its group with other processes)."""


class CgroupBackend(Protocol):
    """What the enforcer asks of a cgroup hierarchy. Groups are paths relative to the
    hierarchy root (``edged/pid-123``); origins map a controller (``""`` on v2) to a path."""

    subtree: str
    can_freeze: bool

    def where(self, pid: int) -> dict[str, str]:
        """Where ``pid`` is now, per controller edged uses (read before moving it)."""
        ...

    def place(self, pid: int, group_name: str) -> str:
        """Move ``pid`` into ``<subtree>/<group_name>`` (created if needed); the group path."""
        ...

    def group_for(self, pid: int) -> str:
        """Where edged acts on ``pid`` without taking it out of any group another manager
        made (see the module docstring); raises :class:`NotPlaceable` where there is none.
        The group is not made yet: :meth:`place_in` does that."""
        ...

    def place_in(self, pid: int, group: str) -> str:
        """Make ``group`` (a :meth:`group_for` answer) if needed and move ``pid`` into it."""
        ...

    def layout(self, group: str) -> dict[str, str]:
        """What to record to find ``group`` again after a restart (see :meth:`adopt`)."""
        ...

    def adopt(self, group: str, layout: Mapping[str, str]) -> None:
        """Know ``group`` again from a recorded :meth:`layout` (the restore after a crash)."""
        ...

    def release(self, pid: int, origin: Mapping[str, str] | None = None) -> bool:
        """Move ``pid`` back to ``origin`` (default: where :meth:`place` found it). False if
        the process is gone."""
        ...

    def procs(self, group: str) -> list[int]:
        """The pids in ``group`` (empty if the group does not exist)."""
        ...

    def set_memory_high(self, group: str, limit_bytes: int | None) -> None:
        """Throttle: reclaim above ``limit_bytes`` without killing (None lifts it)."""
        ...

    def set_memory_max(self, group: str, limit_bytes: int | None) -> None:
        """Hard limit: the group's OOM killer acts above it (None lifts it)."""
        ...

    def set_cpu_quota(self, group: str, cores: float | None) -> None:
        """Hold the group to ``cores`` CPUs of time per period (None lifts it)."""
        ...

    def freeze(self, group: str, timeout_s: float = 2.0) -> float:
        """Freeze every task in the group; returns seconds until the kernel said frozen."""
        ...

    def thaw(self, group: str, timeout_s: float = 2.0) -> float:
        """Thaw the group; returns seconds until the kernel said thawed."""
        ...

    def kill_all(self, group: str) -> int:
        """SIGKILL every process in the group; returns how many were signalled."""
        ...

    def remove(self, group: str) -> bool:
        """rmdir the group if it is empty; False if it was already gone."""
        ...

    def groups(self) -> list[str]:
        """edged's groups under its subtree, deepest first (the subtree root not included)."""
        ...

    def usage(self, group: str) -> int:
        """Memory charged to the group, bytes."""
        ...


def detect(
    root: Path = SYS_CGROUP, subtree: str = "edged", proc: Path = PROC
) -> CgroupBackend | None:
    """The backend for what is mounted at ``root``: v2 when the unified root has the memory
    and cpu controllers, else v1 when the memory, cpu and freezer trees are there, else None.

    A hybrid host (v1 controllers plus an empty ``unified`` mount) is v1: the v2 mount there
    has no controllers to act with.
    """
    controllers = _read_words(root / "cgroup.controllers")
    if {"memory", "cpu"} <= controllers:
        return CgroupV2(root, subtree, proc)
    if all((root / c / "cgroup.procs").exists() for c in ("memory", "cpu")):
        return CgroupV1(root, subtree, proc)
    return None


class _Base:
    """Shared parts: path checks, file writes with errors translated once."""

    def __init__(self, root: Path, subtree: str, proc: Path) -> None:
        if not subtree or subtree.startswith("/") or ".." in subtree.split("/"):
            raise ValueError(f"subtree must be a relative path without '..': {subtree!r}")
        self.root = root
        self.subtree = subtree.strip("/")
        self.proc = proc
        self._origins: dict[int, dict[str, str]] = {}
        # the group edged's subtree sits in: "" (the root) or the governed [scope] group
        self.parent = self.subtree.rpartition("/")[0]

    def _group(self, group_name: str) -> str:
        if not group_name or "/" in group_name or group_name in (".", ".."):
            raise ValueError(f"group name must be one path component: {group_name!r}")
        return f"{self.subtree}/{group_name}"

    def _own(self, group: str) -> str:
        """Refuse any path that is not one of edged's groups: inside its subtree, or a child
        ``edged-pid-*`` group it made under another manager's group. edged never writes another
        manager's group (v2's adopted groups are reached through :meth:`_dir` only)."""
        group = group.strip("/")
        if ".." in group.split("/") or not self._is_own(group):
            raise CgroupError(group, "access", f"outside edged's subtree {self.subtree!r}")
        return group

    def _is_own(self, path: str) -> bool:
        path = path.strip("/")
        if path == self.subtree or path.startswith(self.subtree + "/"):
            return True
        return path.rpartition("/")[2].startswith(NESTED_PREFIX)

    def _in_subtree_place(self, path: str) -> bool:
        """Whether a process at ``path`` goes into edged's subtree: the root, the group the
        subtree sits in, or a group edged made."""
        path = path.strip("/")
        return path in ("", self.parent) or self._is_own(path)

    @staticmethod
    def _nested(path: str, pid: int) -> str:
        base = path.strip("/")
        if base.rpartition("/")[2].startswith(NESTED_PREFIX):  # already in one of ours
            base = base.rpartition("/")[0]
        return f"{base}/{NESTED_PREFIX}{pid}"

    def _write(self, path: Path, value: str, group: str, pid: int | None = None) -> None:
        # O_TRUNC without O_CREAT: cgroupfs files exist or the controller is missing
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        except OSError as exc:
            raise CgroupError(group, f"open {path.name}", _reason(exc), pid) from exc
        try:
            os.write(fd, value.encode())
        except OSError as exc:
            raise CgroupError(group, f"write {path.name}={value}", _reason(exc), pid) from exc
        finally:
            os.close(fd)

    def _move_back(self, directory: Path, path: str, pid: int) -> bool:
        """Write ``pid`` into ``directory``'s cgroup.procs; False (and forgotten) if it is gone."""
        try:
            self._write(directory / "cgroup.procs", str(pid), path, pid)
        except CgroupError as exc:
            if isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.ESRCH:
                self._origins.pop(pid, None)
                return False
            raise
        return True

    def _read(self, path: Path, group: str) -> str:
        try:
            return path.read_text()
        except OSError as exc:
            raise CgroupError(group, f"read {path.name}", _reason(exc)) from exc

    def _mkdir(self, path: Path, group: str) -> None:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CgroupError(group, "mkdir", _reason(exc)) from exc

    def _rmdir(self, path: Path, group: str) -> bool:
        try:
            path.rmdir()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise CgroupError(group, "rmdir", _reason(exc)) from exc
        return True

    def _read_proc_cgroup(self, pid: int) -> list[tuple[str, list[str], str]]:
        try:
            text = (self.proc / str(pid) / "cgroup").read_text()
        except (FileNotFoundError, ProcessLookupError) as exc:
            raise NoSuchProcess(pid, "where", "process has exited") from exc
        out = []
        for line in text.splitlines():
            hid, controllers, path = line.split(":", 2)
            out.append((hid, controllers.split(",") if controllers else [], path))
        return out

    @staticmethod
    def _procs_in(path: Path) -> list[int]:
        try:
            return [int(p) for p in path.read_text().split()]
        except FileNotFoundError:
            return []


class CgroupV1(_Base):
    """cgroup v1: edged's group mirrored in the memory, cpu and freezer trees.

    ``backstop_fraction`` / ``backstop_min_bytes``: the hard limit that
    :meth:`set_memory_high` adds above current usage (see the module docstring); a
    ``backstop_fraction`` of None sets the soft limit only.
    """

    def __init__(
        self,
        root: Path = SYS_CGROUP,
        subtree: str = "edged",
        proc: Path = PROC,
        backstop_fraction: float | None = 0.10,
        backstop_min_bytes: int = 64 * MiB,
    ) -> None:
        super().__init__(root, subtree, proc)
        # A controller is used where its tree has the subtree's parent: the root for the default
        # "edged", the governed group for a scope ("bench/edged"). edged never creates groups
        # outside its subtree, so a scope that exists only in some trees uses only those.
        parent = self.parent
        self.controllers = tuple(
            c
            for c in V1_CONTROLLERS
            if (root / c / "cgroup.procs").exists() and (root / c / parent).is_dir()
        )
        # group -> controller -> path, for groups whose path differs from the group's name
        # in some tree (a child under another manager's group: see group_for)
        self._layouts: dict[str, dict[str, str]] = {}
        self.can_freeze = "freezer" in self.controllers
        self.backstop_fraction = backstop_fraction
        self.backstop_min_bytes = backstop_min_bytes
        # the hard limit each group should have once a throttle is lifted: set_memory_max wins
        self._max_bytes: dict[str, int] = {}

    def _dir(self, controller: str, group: str) -> Path:
        layout = self._layouts.get(group.strip("/"))
        if layout is not None and controller in layout:
            return self.root / controller / self._own(layout[controller])
        return self.root / controller / self._own(group)

    def group_for(self, pid: int) -> str:
        """Per controller: edged's subtree for a process in the root (or the scope group) or
        in one of edged's groups, else a child ``edged-pid-<pid>`` under its group there."""
        where = self.where(pid)
        own = f"{self.subtree}/pid-{pid}"
        layout = {
            c: own if self._in_subtree_place(where.get(c, "/")) else self._nested(where[c], pid)
            for c in self.controllers
        }
        # named by edged's own path where some tree uses it (the key stays "<subtree>/pid-N"
        # wherever it can), else by the memory path
        group = own if own in layout.values() or not layout else layout.get("memory", own)
        if any(path != group for path in layout.values()):
            self._layouts[group] = layout
        else:
            self._layouts.pop(group, None)
        return group

    def place_in(self, pid: int, group: str) -> str:
        group = group.strip("/")
        if pid not in self._origins:
            self._origins[pid] = self.where(pid)
        for c in self.controllers:
            d = self._dir(c, group)
            self._mkdir(d, group)
            self._write(d / "cgroup.procs", str(pid), group, pid)
        return group

    def layout(self, group: str) -> dict[str, str]:
        return dict(self._layouts.get(group.strip("/"), {}))

    def adopt(self, group: str, layout: Mapping[str, str]) -> None:
        if layout:
            for path in layout.values():
                self._own(path)  # a record names only edged's groups
            self._layouts[group.strip("/")] = dict(layout)

    def where(self, pid: int) -> dict[str, str]:
        found: dict[str, str] = {}
        for _hid, controllers, path in self._read_proc_cgroup(pid):
            for c in controllers:
                if c in self.controllers:
                    found[c] = path
        return found

    def place(self, pid: int, group_name: str) -> str:
        group = self._group(group_name)
        if pid not in self._origins:
            self._origins[pid] = self.where(pid)
        for c in self.controllers:
            d = self._dir(c, group)
            self._mkdir(d, group)
            self._write(d / "cgroup.procs", str(pid), group, pid)
        return group

    def release(self, pid: int, origin: Mapping[str, str] | None = None) -> bool:
        target = dict(origin) if origin is not None else self._origins.get(pid, {})
        for c in self.controllers:
            path = target.get(c, "/")
            if not self._move_back(_existing_ancestor(self.root / c, path), path, pid):
                return False
        self._origins.pop(pid, None)
        return True

    def procs(self, group: str) -> list[int]:
        pids: set[int] = set()
        for c in self.controllers:
            pids.update(self._procs_in(self._dir(c, group) / "cgroup.procs"))
        return sorted(pids)

    def usage(self, group: str) -> int:
        return int(self._read(self._dir("memory", group) / "memory.usage_in_bytes", group))

    def set_memory_high(self, group: str, limit_bytes: int | None) -> None:
        d = self._dir("memory", group)
        if limit_bytes is None:
            self._write(d / "memory.soft_limit_in_bytes", V1_UNLIMITED, group)
            hard = self._max_bytes.get(group)
            self._write(
                d / "memory.limit_in_bytes", V1_UNLIMITED if hard is None else str(hard), group
            )
            return
        self._write(d / "memory.soft_limit_in_bytes", str(limit_bytes), group)
        if self.backstop_fraction is None:
            return
        usage = self.usage(group)
        elsewhere = max(0, self._resident_bytes(group) - usage)  # charged to the old group
        base = max(usage, limit_bytes - elsewhere)
        backstop = base + max(self.backstop_min_bytes, int(base * self.backstop_fraction))
        hard = self._max_bytes.get(group)
        if hard is not None:
            backstop = min(backstop, hard)
        else:  # hold at the backstop, do not OOM-kill (see the module docstring)
            self._write(d / "memory.oom_control", "1", group)
        self._write(d / "memory.limit_in_bytes", str(backstop), group)

    def _resident_bytes(self, group: str) -> int:
        """VmRSS summed over the group's processes (those that vanish count 0)."""
        total = 0
        for pid in self._procs_in(self._dir("memory", group) / "cgroup.procs"):
            try:
                status = (self.proc / str(pid) / "status").read_bytes()
            except OSError:
                continue
            at = status.find(b"\nVmRSS:")
            if at >= 0:
                total += int(status[at + 7 : status.index(b"kB", at)]) * 1024
        return total

    def set_memory_max(self, group: str, limit_bytes: int | None) -> None:
        d = self._dir("memory", group)
        if limit_bytes is None:
            self._max_bytes.pop(group, None)
        # v1 reclaims down to a lowered limit and fails with EBUSY if it cannot (the limit,
        # and what is remembered of it, stay as they were)
        value = V1_UNLIMITED if limit_bytes is None else str(limit_bytes)
        if limit_bytes is not None:
            self._write(d / "memory.oom_control", "0", group)  # a hard limit is meant to kill
        self._write(d / "memory.limit_in_bytes", value, group)
        if limit_bytes is not None:
            self._max_bytes[group] = limit_bytes

    def set_cpu_quota(self, group: str, cores: float | None) -> None:
        if cores is None and "cpu" not in self.controllers:
            # a scope that only the memory tree has: no group of ours in the cpu tree, so no
            # quota to lift (a memory-only lease used to fail here and go unenforced)
            return
        d = self._dir("cpu", group)
        if cores is None:
            self._write(d / "cpu.cfs_quota_us", V1_UNLIMITED, group)
            return
        self._write(d / "cpu.cfs_period_us", str(CPU_PERIOD_US), group)
        self._write(d / "cpu.cfs_quota_us", str(_quota_us(cores)), group)

    def freeze(self, group: str, timeout_s: float = 2.0) -> float:
        return self._settle(group, "FROZEN", timeout_s)

    def thaw(self, group: str, timeout_s: float = 2.0) -> float:
        return self._settle(group, "THAWED", timeout_s)

    def _settle(self, group: str, state: str, timeout_s: float) -> float:
        """Write ``state`` and wait until freezer.state reads it back: v1 passes through
        FREEZING while tasks enter the refrigerator, and a write of FROZEN retries the ones
        that have not (Documentation/admin-guide/cgroup-v1/freezer-subsystem.rst)."""
        if not self.can_freeze:
            raise CgroupError(group, state.lower(), "no freezer controller mounted")
        path = self._dir("freezer", group) / "freezer.state"
        start_s = time.monotonic()
        self._write(path, state, group)
        delay_s = 0.0005
        while self._read(path, group).strip() != state:
            if time.monotonic() - start_s > timeout_s:
                raise CgroupError(group, state.lower(), f"not {state} after {timeout_s} s")
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 0.02)
            self._write(path, state, group)
        return time.monotonic() - start_s

    def kill_all(self, group: str) -> int:
        count = _kill_listed(self.procs(group), lambda: self.procs(group))
        if self.can_freeze and (self._dir("freezer", group) / "freezer.state").exists():
            # a v1-frozen task does not act on SIGKILL until it is thawed
            self.thaw(group)
        return count

    def remove(self, group: str) -> bool:
        group = self._own(group)
        self._max_bytes.pop(group, None)
        removed = False
        failed: CgroupError | None = None
        # every controller's directory is tried: stopping at the first that fails (a process
        # forked into it meanwhile) left the others half-removed and never collected
        for c in self.controllers:
            try:
                removed |= self._rmdir(self._dir(c, group), group)
            except CgroupError as exc:
                failed = failed or exc
        if failed is not None:
            raise failed
        self._layouts.pop(group, None)
        return removed

    def groups(self) -> list[str]:
        found: set[str] = set()
        for c in self.controllers:
            found.update(_subdirs(self.root / c, self.subtree))
        return sorted(found, key=lambda g: (-g.count("/"), g))


class CgroupV2(_Base):
    """cgroup v2: one group ``<root>/<subtree>/<name>``, controllers enabled down to it.

    The no-internal-processes rule means the subtree root itself holds no process: victims go
    only in its leaves.
    """

    def __init__(self, root: Path = SYS_CGROUP, subtree: str = "edged", proc: Path = PROC) -> None:
        super().__init__(root, subtree, proc)
        self.can_freeze = True  # cgroup.freeze exists in every non-root group since 5.2
        # another manager's groups edged acts on (a process alone there): file -> the value
        # it had before edged wrote it, put back by remove()
        self._adopted: dict[str, dict[str, str]] = {}

    def _dir(self, group: str) -> Path:
        group = group.strip("/")
        if group in self._adopted:
            return self.root / group
        return self.root / self._own(group)

    def group_for(self, pid: int) -> str:
        """edged's subtree for a process in the root (or the scope group) or one of edged's
        groups; the process's own group where it is alone there and nothing is below it;
        else :class:`NotPlaceable` (see the module docstring)."""
        path = self.where(pid).get("", "/").strip("/")
        if self._in_subtree_place(path):
            return f"{self.subtree}/pid-{pid}"
        d = self.root / path
        if path in self._adopted or (
            self._procs_in(d / "cgroup.procs") == [pid] and not _has_subdirs(d)
        ):
            if path not in self._adopted:
                self._adopted[path] = {
                    name: self._read(d / name, path).strip()
                    for name in ("memory.high", "memory.max", "cpu.max")
                    if (d / name).exists()
                }
            return path
        raise NotPlaceable(
            path,
            "place",
            "shares its group with other processes: a limit of its own would move it out "
            "of the limits its group's manager set",
            pid,
        )

    def place_in(self, pid: int, group: str) -> str:
        group = group.strip("/")
        if group in self._adopted:
            return group  # it is already there
        if pid not in self._origins:
            self._origins[pid] = self.where(pid)
        self._enable_controllers(group)
        self._write(self._dir(group) / "cgroup.procs", str(pid), group, pid)
        return group

    def layout(self, group: str) -> dict[str, str]:
        saved = self._adopted.get(group.strip("/"))
        return {"adopted": "1", **saved} if saved is not None else {}

    def adopt(self, group: str, layout: Mapping[str, str]) -> None:
        if layout.get("adopted") == "1":
            self._adopted[group.strip("/")] = {k: v for k, v in layout.items() if k != "adopted"}

    def _enable_controllers(self, group: str) -> None:
        """``+memory +cpu`` in subtree_control of every ancestor of ``group``."""
        parts = self._own(group).split("/")
        d = self.root
        for i in range(len(parts)):
            wanted = {"memory", "cpu"} & _read_words(d / "cgroup.controllers")
            missing = wanted - _read_words(d / "cgroup.subtree_control")
            if missing:
                value = " ".join(f"+{c}" for c in sorted(missing))
                self._write(d / "cgroup.subtree_control", value, "/".join(parts[:i]) or "/")
            d = d / parts[i]
            self._mkdir(d, group)

    def where(self, pid: int) -> dict[str, str]:
        for hid, _controllers, path in self._read_proc_cgroup(pid):
            if hid == "0":
                return {"": path}
        return {}

    def place(self, pid: int, group_name: str) -> str:
        group = self._group(group_name)
        if pid not in self._origins:
            self._origins[pid] = self.where(pid)
        self._enable_controllers(group)
        self._write(self._dir(group) / "cgroup.procs", str(pid), group, pid)
        return group

    def release(self, pid: int, origin: Mapping[str, str] | None = None) -> bool:
        target = dict(origin) if origin is not None else self._origins.get(pid, {})
        path = target.get("", "/")
        if path.strip("/") in self._adopted:  # it never left its group
            self._origins.pop(pid, None)
            return True
        if not self._move_back(_existing_ancestor(self.root, path), path, pid):
            return False
        self._origins.pop(pid, None)
        return True

    def procs(self, group: str) -> list[int]:
        return self._procs_in(self._dir(group) / "cgroup.procs")

    def usage(self, group: str) -> int:
        return int(self._read(self._dir(group) / "memory.current", group))

    def set_memory_high(self, group: str, limit_bytes: int | None) -> None:
        value = "max" if limit_bytes is None else str(limit_bytes)
        self._write(self._dir(group) / "memory.high", value, group)

    def set_memory_max(self, group: str, limit_bytes: int | None) -> None:
        value = "max" if limit_bytes is None else str(limit_bytes)
        self._write(self._dir(group) / "memory.max", value, group)

    def set_cpu_quota(self, group: str, cores: float | None) -> None:
        quota = "max" if cores is None else str(_quota_us(cores))
        self._write(self._dir(group) / "cpu.max", f"{quota} {CPU_PERIOD_US}", group)

    def freeze(self, group: str, timeout_s: float = 2.0) -> float:
        return self._settle(group, True, timeout_s)

    def thaw(self, group: str, timeout_s: float = 2.0) -> float:
        return self._settle(group, False, timeout_s)

    def _settle(self, group: str, frozen: bool, timeout_s: float) -> float:
        """Write cgroup.freeze and wait for ``frozen 1|0`` in cgroup.events: the write only
        asks, the kernel reports when every task has stopped (Documentation/admin-guide/
        cgroup-v2.rst, "cgroup.freeze")."""
        d = self._dir(group)
        op = "freeze" if frozen else "thaw"
        start_s = time.monotonic()
        self._write(d / "cgroup.freeze", "1" if frozen else "0", group)
        want = "1" if frozen else "0"
        delay_s = 0.0005
        while _events(self._read(d / "cgroup.events", group)).get("frozen") != want:
            if time.monotonic() - start_s > timeout_s:
                raise CgroupError(
                    group, op, f"cgroup.events not 'frozen {want}' after {timeout_s} s"
                )
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 0.02)
        return time.monotonic() - start_s

    def kill_all(self, group: str) -> int:
        pids = self.procs(group)
        if (self._dir(group) / "cgroup.kill").exists():  # kernel 5.14+: atomic, forks included
            self._write(self._dir(group) / "cgroup.kill", "1", group)
            return len(pids)
        return _kill_listed(pids, lambda: self.procs(group))

    def remove(self, group: str) -> bool:
        """rmdir one of edged's groups; for an adopted group, put back the values it had
        (it belongs to another manager and is never removed)."""
        group = group.strip("/")
        saved = self._adopted.get(group)
        if saved is not None:
            d = self.root / group
            if not d.is_dir():  # its manager removed it (the process is gone)
                del self._adopted[group]
                return False
            for name, value in saved.items():
                if (d / name).exists():
                    self._write(d / name, value, group)
            if _events(self._read(d / "cgroup.events", group)).get("frozen") == "1":
                self._write(d / "cgroup.freeze", "0", group)
            del self._adopted[group]
            return True
        return self._rmdir(self._dir(group), group)

    def groups(self) -> list[str]:
        found = _subdirs(self.root, self.subtree)
        return sorted(found, key=lambda g: (-g.count("/"), g))


def _quota_us(cores: float) -> int:
    if cores <= 0:
        raise ValueError(f"CPU quota must be positive cores, got {cores}")
    return max(MIN_CPU_QUOTA_US, round(cores * CPU_PERIOD_US))


def _kill_listed(pids: list[int], still_listed: Callable[[], list[int]]) -> int:
    """SIGKILL each pid of an edged group through a pidfd, after checking (pidfd open) that the
    pid is still listed in the group, so a pid that exited and was reused is never hit."""
    count = 0
    for pid in pids:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            if pid in still_listed():
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                count += 1
        except ProcessLookupError:
            continue
        finally:
            os.close(pidfd)
    return count


def _existing_ancestor(root: Path, path: str) -> Path:
    """``root/path``, or its closest existing ancestor if the original group is gone (a
    process must go somewhere when it is released)."""
    d = root / path.strip("/")
    while d != root and not d.is_dir():
        d = d.parent
    return d


def _has_subdirs(d: Path) -> bool:
    try:
        return any(entry.is_dir() for entry in os.scandir(d))
    except OSError:
        return False


def _subdirs(root: Path, subtree: str) -> set[str]:
    base = root / subtree
    found: set[str] = set()
    for dirpath, dirnames, _files in os.walk(base):
        for name in dirnames:
            found.add(str((Path(dirpath) / name).relative_to(root)))
    return found


def _events(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        out[key] = value.strip()
    return out


def _read_words(path: Path) -> set[str]:
    try:
        return set(path.read_text().split())
    except OSError:
        return set()


def _reason(exc: OSError) -> str:
    return f"{errno.errorcode.get(exc.errno or 0, '?')} {exc.strerror or ''}".strip()
