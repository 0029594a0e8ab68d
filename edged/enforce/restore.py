"""What edged has imposed, on disk, so that it can all be undone after SIGTERM or a crash.

The enforcer records every change *before* it makes it, in a small JSON file
(``$STATE_DIRECTORY/imposed.json``, else ``/var/lib/edged/imposed.json``), written atomically
(temp file, fsync, rename, fsync of the directory), so a crash at any point leaves either the
old or the new file, and the file never misses a change that was made. A recorded change that
was never made costs nothing to undo (thawing a thawed group, lifting an unset limit).

:func:`restore_all` undoes everything in the file: thaws frozen groups, sends SIGCONT to stopped
processes, lifts throttles, moves processes back to their original groups, removes edged's empty
groups, puts back the original power limit of each GPU edged lowered (through the NVML lever,
:mod:`edged.enforce.nvml`), puts back the values a systemd unit had before edged changed it
through D-Bus (and thaws the units it froze), and clears the file. It is idempotent and
tolerates vanished processes, groups and units, so it can run on SIGTERM and again at the next
start. A GPU limit or a unit that cannot be put back now (no lever: not root, no driver; no
bus) stays recorded for a later start.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import msgspec

from edged.enforce.cgroupfs import CgroupBackend
from edged.enforce.signals import (
    CgroupError,
    EnforceError,
    NoSuchProcess,
    Signaller,
    StaleProcess,
    UnitError,
)
from edged.enforce.systemd import NO_SUCH_UNIT, SystemdUnits

log = logging.getLogger(__name__)

STATE_FILE = "imposed.json"


class GpuLimitRestorer(Protocol):
    """What :func:`restore_all` needs of the NVML lever (:mod:`edged.enforce.nvml`)."""

    def restore_records(self, records: dict[str, GpuRecord]) -> tuple[int, dict[str, GpuRecord]]:
        """Put back each GPU's original limit; (how many were, the records still to do)."""
        ...


DEFAULT_STATE_DIRECTORY = Path("/var/lib/edged")


class GroupRecord(msgspec.Struct, omit_defaults=True):
    """One of edged's groups and what is set on it."""

    origins: dict[str, dict[str, str]] = {}  # pid (as text) -> controller -> original path
    frozen: bool = False
    memory_high_bytes: int | None = None
    memory_max_bytes: int | None = None
    cpu_quota_cores: float | None = None
    # how to find the group again (CgroupBackend.layout): its path per v1 controller where
    # they differ, or the values an adopted v2 group had before edged wrote it
    layout: dict[str, str] = {}

    def throttled(self) -> bool:
        """Whether any limit is in force on the group."""
        return (
            self.memory_high_bytes is not None
            or self.memory_max_bytes is not None
            or self.cpu_quota_cores is not None
        )


class StoppedRecord(msgspec.Struct):
    """A process stopped with SIGSTOP (the fallback where there is no freezer)."""

    start_ticks: int


class GpuRecord(msgspec.Struct):
    """A GPU whose power limit edged lowered: the limit it had before edged first changed it
    (read once, before that change) and the one edged set last (None: not set yet)."""

    original_limit_mw: int
    limit_mw: int | None = None


class UnitRecord(msgspec.Struct, omit_defaults=True):
    """A systemd unit edged changed through D-Bus (:mod:`edged.enforce.systemd`): which of
    its processes each change was decided for, what edged set, and what the unit had before.

    The unit is the granularity, so several victims may share one record: a change is put back
    once no process holds it any more. ``previous_*`` are the raw D-Bus values read before
    the first change (``UINT64_MAX``: none); None means edged has not changed that property.
    """

    pids: dict[str, int] = {}  # pid (as text) -> start_ticks, every process acted for
    memory_pids: list[int] = []  # processes a memory throttle is held for
    cpu_pids: list[int] = []  # processes a CPU quota is held for
    frozen_pids: list[int] = []  # processes a freeze is held for
    frozen: bool = False  # FreezeUnit was called and not yet undone
    memory_high_bytes: int | None = None  # what edged set
    cpu_quota_cores: float | None = None
    previous_memory_high_bytes: int | None = None
    previous_cpu_quota_usec_per_s: int | None = None
    # a scope edged started for a budget lease (edged.budget.enforce.ScopeLeases), its
    # MemoryMax / CPUQuotaPerSecUSec still set: released with SystemdUnits.release_scope
    lease_scope: bool = False
    # a scope edged started to hold a process that was in the root cgroup (v2 under systemd,
    # see Enforcer._root_scope): abandoned once nothing is held, its process lives on in it
    own_scope: bool = False

    def imposed(self) -> bool:
        """Whether anything is still changed on the unit."""
        return (
            self.lease_scope
            or self.own_scope
            or self.frozen
            or self.previous_memory_high_bytes is not None
            or self.previous_cpu_quota_usec_per_s is not None
        )


class Imposed(msgspec.Struct):
    """The whole file."""

    version: int = 1
    groups: dict[str, GroupRecord] = {}  # group path -> record
    stopped: dict[str, StoppedRecord] = {}  # pid (as text) -> record
    gpus: dict[str, GpuRecord] = {}  # GPU UUID -> record
    units: dict[str, UnitRecord] = {}  # systemd unit name -> record

    def empty(self) -> bool:
        """Nothing imposed."""
        return not self.groups and not self.stopped and not self.gpus and not self.units


def state_directory() -> Path:
    """``$STATE_DIRECTORY`` (systemd's StateDirectory=; first entry) or /var/lib/edged."""
    env = os.environ.get("STATE_DIRECTORY", "")
    return Path(env.split(":")[0]) if env else DEFAULT_STATE_DIRECTORY


class StateStore:
    """The imposed-changes file in ``directory``; ``data`` is the in-memory copy, and
    :meth:`save` writes it through atomically."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = state_directory() if directory is None else directory
        self.path = self.directory / STATE_FILE
        self.data = self._load()

    def _load(self) -> Imposed:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return Imposed()
        try:
            return msgspec.json.decode(raw, type=Imposed)
        except msgspec.DecodeError as exc:
            # a torn file cannot happen (atomic rename); a hand-edited bad one must not stop
            # the daemon from starting: keep it aside for the operator and start empty
            aside = self.path.with_suffix(".bad")
            log.error("state file %s unreadable (%s); moved to %s", self.path, exc, aside)
            os.replace(self.path, aside)
            return Imposed()

    def save(self) -> None:
        """Write ``data`` atomically: temp file, fsync, rename over, fsync the directory."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, msgspec.json.encode(self.data))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def group(self, group: str) -> GroupRecord:
        """The record of ``group``, created (not yet saved) if new."""
        return self.data.groups.setdefault(group, GroupRecord())

    def group_of(self, pid: int) -> str | None:
        """The edged group ``pid`` was placed in, if any."""
        key = str(pid)
        for name, record in self.data.groups.items():
            if key in record.origins:
                return name
        return None

    def unit(self, name: str) -> UnitRecord:
        """The record of systemd unit ``name``, created (not yet saved) if new."""
        return self.data.units.setdefault(name, UnitRecord())

    def unit_of(self, pid: int) -> str | None:
        """The systemd unit edged acted on for ``pid``, if any."""
        key = str(pid)
        for name, record in self.data.units.items():
            if key in record.pids:
                return name
        return None

    def clear(self) -> None:
        """Forget everything and save."""
        self.data = Imposed()
        self.save()


def restore_all(
    store: StateStore,
    backend: CgroupBackend | None,
    signals: Signaller,
    gpus: GpuLimitRestorer | None = None,
    units: SystemdUnits | None = None,
) -> int:
    """Undo everything recorded in ``store``; returns how many processes were resumed or
    moved back plus how many GPU power limits and systemd units were put back. Safe to call
    twice, with vanished pids, groups and units, and with no backend (only SIGSTOPs are then
    undone).

    GPU power limits are put back through ``gpus`` (the NVML lever). A GPU record that cannot
    be restored now (no lever: not root, no driver; or NVML refused) is kept in the file, so
    a later start with a working lever puts the original limit back. A unit that cannot be put
    back now because the bus is unreachable or refuses (``units`` is None, no D-Bus, access
    denied) stays in the file for the next start; a unit systemd no longer knows
    (``NoSuchUnit``) has nothing left to restore and is forgotten. Everything else is cleared."""
    data = store.data
    restored = 0
    kept_gpus: dict[str, GpuRecord] = {}
    if data.gpus:
        if gpus is None:
            log.warning(
                "restore: no GPU power lever; keeping the original limits of %s for a later start",
                sorted(data.gpus),
            )
            kept_gpus = dict(data.gpus)
        else:
            restored_now, kept_gpus = gpus.restore_records(dict(data.gpus))
            restored += restored_now
    kept: dict[str, UnitRecord] = {}
    for name, unit_record in data.units.items():
        if units is None:
            log.warning("restore: no systemd backend; keeping %s for the next start", name)
            kept[name] = unit_record
            continue
        try:
            restored += restore_unit(units, name, unit_record)
        except UnitError as exc:
            if exc.error_name == NO_SUCH_UNIT:
                log.info("restore: %s", exc)
            else:
                log.warning("restore: keeping %s for the next start: %s", name, exc)
                kept[name] = unit_record
        except EnforceError as exc:
            log.warning("restore: keeping %s for the next start: %s", name, exc)
            kept[name] = unit_record
    for pid_text, stopped in data.stopped.items():
        try:
            signals.cont(int(pid_text), stopped.start_ticks)
            restored += 1
        except (NoSuchProcess, StaleProcess) as exc:
            log.info("restore: not resuming %s: %s", pid_text, exc)
    if backend is None and data.groups:
        log.warning("restore: no cgroup backend; forgetting groups %s", sorted(data.groups))
    if backend is not None:
        for group, record in data.groups.items():
            try:
                restored += _restore_group(backend, group, record)
            except CgroupError as exc:  # e.g. a group under another [scope] than this run's
                log.warning("restore: cannot restore %s: %s", group, exc)
                continue
            if not group.startswith(backend.subtree + "/"):
                _remove(backend, group)  # a child under another's group, or an adopted one
        for group in backend.groups():  # also groups a crash left unrecorded or half-removed
            _remove(backend, group)
        _remove(backend, backend.subtree)
    store.data = Imposed(gpus=kept_gpus, units=kept)
    store.save()
    return restored


def restore_unit(units: SystemdUnits, name: str, record: UnitRecord) -> int:
    """Thaw unit ``name`` if edged froze it and put back the ``MemoryHigh`` and
    ``CPUQuotaPerSecUSec`` it had before edged changed them; a lease scope edged started is
    released last (limits to infinity, abandoned: its processes live on). 1 if anything was
    done. The record is updated as each step succeeds, so a failure part way leaves only
    what is left."""
    done = 0
    if record.frozen:
        units.thaw(name)
        record.frozen = False
        done = 1
    if record.previous_memory_high_bytes is not None:
        units.set_memory_high(name, record.previous_memory_high_bytes)
        record.previous_memory_high_bytes = record.memory_high_bytes = None
        done = 1
    if record.previous_cpu_quota_usec_per_s is not None:
        units.set_cpu_quota(name, record.previous_cpu_quota_usec_per_s)
        record.previous_cpu_quota_usec_per_s = None
        record.cpu_quota_cores = None
        done = 1
    if record.lease_scope:
        units.release_scope(name)
        record.lease_scope = False
        done = 1
    if record.own_scope:
        units.abandon_quietly(name)
        record.own_scope = False
        done = 1
    if done:
        log.info("restore: put %s back as it was", name)
    return done


def _restore_group(backend: CgroupBackend, group: str, record: GroupRecord) -> int:
    """Thaw, lift limits and move everything in ``group`` back; pids that were not placed by
    edged (children forked inside the group) go where their parent's record says."""
    if record.layout:
        backend.adopt(group, record.layout)
    if record.frozen:
        try:
            backend.thaw(group)
        except CgroupError as exc:
            log.warning("restore: %s", exc)
    if record.throttled():
        _lift(lambda: backend.set_memory_high(group, None))
        _lift(lambda: backend.set_memory_max(group, None))
        _lift(lambda: backend.set_cpu_quota(group, None))
    fallback = next(iter(record.origins.values()), None)
    moved = 0
    for pid in backend.procs(group):
        origin = record.origins.get(str(pid), fallback)
        try:
            if backend.release(pid, origin or {}):
                moved += 1
        except CgroupError as exc:
            log.warning("restore: %s", exc)
    return moved


def _lift(call: Callable[[], None]) -> None:
    try:
        call()
    except CgroupError as exc:  # the group is gone: nothing to lift
        log.info("restore: %s", exc)


def _remove(backend: CgroupBackend, group: str) -> None:
    try:
        backend.remove(group)
    except CgroupError as exc:  # not empty: a process we could not move; keep the group
        log.warning("restore: keeping %s", exc)
