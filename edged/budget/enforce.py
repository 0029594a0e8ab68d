"""A lease made real: its process in its own group, held to the granted memory and CPU.

Two ways, chosen by the daemon as the enforcement backend is (``[enforce] backend``):
:class:`ScopeLeases` where PID 1 is systemd and its bus answers (a transient scope per lease,
through systemd's D-Bus API: systemd owns the cgroup tree there, DESIGN section 5), else
:class:`CgroupLeases` (cgroupfs, v1 or v2).

The target process is moved into ``<subtree>/budget-<lease>`` through the cgroupfs backend (v1
or v2), with a hard memory limit of the granted memory (``memory.max`` /
``memory.limit_in_bytes``) and a CPU quota of the granted cores (``cpu.max`` /
``cpu.cfs_quota_us``). The change is recorded in the StateStore *before* it is made, as the
enforcer records its own, so a crash leaves nothing imposed that the next start's restore does
not lift. On release the limits are lifted first, then every process in the group (children
forked inside it too) goes back where the target came from, and the group is removed.

A resize (growth, a shrink, a reclaim of borrowed budget) sets the limits in place. Growth is
written before the client is told. cgroup v1 refuses a memory limit below what it cannot
reclaim (EBUSY, no swap): then the group keeps its previous limits, the lease stays placed, and
the refusal is shown in ``enforced`` (``error``); the strategy's ladder still acts on the
process under pressure.

GPU memory has no kernel lever: it stays cooperative. A lease whose target is already in an
edged group (a second lease for the same process, or a throttle) is not moved again and is
reported as cooperative with the reason.
"""

from __future__ import annotations

import logging
from typing import Any

from edged.budget.ledger import Lease
from edged.enforce.cgroupfs import CgroupBackend
from edged.enforce.restore import StateStore
from edged.enforce.signals import CgroupError, EnforceError, UnitError
from edged.enforce.systemd import (
    NO_SUCH_UNIT,
    NO_UNIT_FOR_PID,
    UINT64_MAX,
    UNIT_EXISTS,
    SystemdUnits,
    actable,
    cores_to_usec_per_s,
)

log = logging.getLogger(__name__)


class CgroupLeases:
    """Enforces leases with a cgroup backend, recording in ``store`` (see the module doc)."""

    def __init__(self, backend: CgroupBackend, store: StateStore) -> None:
        self.backend = backend
        self.store = store

    def group_of(self, lease: Lease) -> str:
        return f"{self.backend.subtree}/budget-{lease.id}"

    def apply(self, lease: Lease) -> dict[str, Any]:
        """Place the target (first grant) and set the limits (first grant and each resize).
        A first grant that fails is undone and reported as cooperative; a resize that fails
        keeps the group at its previous limits, with ``error`` in the answer."""
        group = self.group_of(lease)
        pid = lease.target_pid
        elsewhere = self.store.group_of(pid)
        if elsewhere is not None and elsewhere != group and pid in self.backend.procs(elsewhere):
            return {"how": "cooperative", "reason": f"pid {pid} is already in {elsewhere}"}
        memory = lease.granted.get("memory")
        cores = lease.granted.get("cpu")
        memory_bytes = round(memory) if memory else None  # as the client is told (_amounts)
        quota_cores = cores if cores else None
        if memory_bytes is None and quota_cores is None:  # GPU memory only: no kernel lever
            self.lift(lease)  # a resize to zero lifts what an earlier grant imposed
            return {"how": "cooperative"}
        placed = group in self.store.data.groups and pid in self.backend.procs(group)
        record = self.store.group(group)
        before = (record.memory_max_bytes, record.cpu_quota_cores)
        try:
            if str(pid) not in record.origins:
                record.origins[str(pid)] = self.backend.where(pid)
            record.memory_max_bytes = memory_bytes
            record.cpu_quota_cores = quota_cores
            self.store.save()
            if pid not in self.backend.procs(group):
                self.backend.place(pid, group.rsplit("/", 1)[1])
            self.backend.set_memory_max(group, memory_bytes)
            self.backend.set_cpu_quota(group, quota_cores)
        except EnforceError as exc:
            if placed:  # a resize refused: the group keeps the limits it had
                log.warning("lease %d: limits not changed: %s", lease.id, exc)
                memory_bytes, quota_cores = before
                record.memory_max_bytes, record.cpu_quota_cores = before
                self.store.save()
                return {**self._how(group, memory_bytes, quota_cores), "error": str(exc)}
            log.warning("lease %d: not enforced: %s", lease.id, exc)
            self._undo(group)
            return {"how": "cooperative", "reason": str(exc)}
        return self._how(group, memory_bytes, quota_cores)

    @staticmethod
    def _how(group: str, memory_bytes: int | None, quota_cores: float | None) -> dict[str, Any]:
        how: dict[str, Any] = {"how": "cgroup", "group": group}
        if memory_bytes is not None:
            how["memory_max_bytes"] = memory_bytes
        if quota_cores is not None:
            how["cpu_quota_cores"] = quota_cores
        return how

    def lift(self, lease: Lease) -> None:
        """Lift the limits, move the processes back, remove the group (nothing if the lease
        was never placed)."""
        group = self.group_of(lease)
        if group in self.store.data.groups:
            self._undo(group)

    def _undo(self, group: str) -> None:
        record = self.store.group(group)
        try:
            self.backend.set_memory_max(group, None)
        except CgroupError as exc:  # the group is gone (or never made): nothing to lift
            log.debug("lifting memory on %s: %s", group, exc)
        try:
            self.backend.set_cpu_quota(group, None)
        except CgroupError as exc:
            log.debug("lifting cpu on %s: %s", group, exc)
        fallback = next(iter(record.origins.values()), {})
        for pid in self.backend.procs(group):
            try:
                self.backend.release(pid, record.origins.get(str(pid), fallback))
            except EnforceError as exc:
                log.warning("moving pid %d out of %s: %s", pid, group, exc)
        try:
            self.backend.remove(group)
        except CgroupError as exc:  # a process could not be moved: the restore tries again
            log.warning("keeping %s: %s", group, exc)
            return
        self.store.data.groups.pop(group, None)
        self.store.save()


class ScopeLeases:
    """Enforces leases as transient systemd scopes (where PID 1 is systemd).

    **Apply** (first grant): ``StartTransientUnit("edged-lease-<lease>-<pid>.scope", "fail",
    ...)`` with ``PIDs`` = [the target], ``MemoryMax`` (bytes) and ``CPUQuotaPerSecUSec`` (µs
    of CPU per second: 1 core = 1 000 000) of the grant, ``CollectMode=inactive-or-failed``
    (systemd drops the scope once its processes are gone, even if one was OOM-killed), a
    ``Description``, and ``Slice`` = the slice of the unit the process is in now: a lease must
    not take a process out of its user's or its service's slice and the limits set there.
    systemd moves the process into the scope when the start job runs; apply returns once the
    job is done. A name systemd already has (``UnitExists``: an abandoned scope of an earlier
    run holding the same pid) gets a suffix (``-1``, ``-2``, ...).

    **Resize**: ``SetUnitProperties(scope, runtime=true, MemoryMax, CPUQuotaPerSecUSec)``.

    **Lift** (release, ttl, the client's connection closed): a scope cannot hand a process
    back to the unit it came from, and ``StopUnit`` would kill it (a scope without a
    ``Controller`` is stopped with SIGTERM to its processes), so the limits go to infinity and
    the scope is abandoned (``AbandonScope``: "lost interest in the scope ... without wanting
    to shut down the scope entirely", org.freedesktop.systemd1(5)). The process runs on,
    unlimited, in its abandoned scope, which systemd collects when the process exits; a later
    lease for it moves it into a new scope.

    Each scope is recorded in the state store (``UnitRecord.lease_scope``) *before* it is
    started, so SIGTERM and the start after a crash release it (:func:`restore_unit`). When
    the bus is gone at lift, the record stays and the restore releases it later; the lease
    itself ends with its connection as always.

    The enforcer may throttle the same scope (it acts on a process's unit): its memory
    throttle is ``MemoryHigh``, a different property; a CPU throttle and the lease share
    ``CPUQuotaPerSecUSec``, so while a throttle holds it, a resize or lift changes only the
    value the throttle's end puts back (``previous_cpu_quota_usec_per_s``), not the throttle.
    """

    MAX_NAME_TRIES = 8

    def __init__(self, units: SystemdUnits, store: StateStore) -> None:
        self.units = units
        self.store = store
        self._scopes: dict[int, str] = {}  # lease id -> its scope, started and not released
        self._how: dict[int, dict[str, Any]] = {}  # lease id -> what is in force on it

    @staticmethod
    def scope_of(lease: Lease, attempt: int = 0) -> str:
        """The scope name for ``lease`` (``attempt`` > 0: after ``UnitExists``)."""
        suffix = f"-{attempt}" if attempt else ""
        return f"edged-lease-{lease.id}-{lease.target_pid}{suffix}.scope"

    def apply(self, lease: Lease) -> dict[str, Any]:
        """Start the lease's scope (first grant) or resize it; a failure to start leaves the
        lease cooperative, with the reason."""
        memory = lease.granted.get("memory")
        cores = lease.granted.get("cpu")
        memory_bytes = int(memory) if memory else None
        quota_cores = cores if cores else None
        if memory_bytes is None and quota_cores is None:  # GPU memory only: no kernel lever
            self.lift(lease)  # a resize to zero lifts what an earlier grant imposed
            return {"how": "cooperative"}
        scope = self._scopes.get(lease.id)
        if scope is None:
            return self._start(lease, memory_bytes, quota_cores)
        return self._resize(lease, scope, memory_bytes, quota_cores)

    def lift(self, lease: Lease) -> None:
        """Limits to infinity and abandon the scope (nothing if the lease has none)."""
        scope = self._scopes.pop(lease.id, None)
        self._how.pop(lease.id, None)
        if scope is None:
            return
        record = self.store.unit(scope)
        cpu_throttled = record.previous_cpu_quota_usec_per_s is not None
        if cpu_throttled:  # the throttle's end puts back "no quota", the lease being over
            record.previous_cpu_quota_usec_per_s = UINT64_MAX
        try:
            self.units.release_scope(scope, cpu=not cpu_throttled)
        except UnitError as exc:
            if exc.error_name != NO_SUCH_UNIT:
                self._keep(lease, scope, exc)
                return
            # the scope is gone already: its processes exited and systemd collected it
        except EnforceError as exc:  # no bus: the restore releases it when there is one
            self._keep(lease, scope, exc)
            return
        record.lease_scope = False
        self._forget_if_done(scope)
        log.info("lease %d: released %s (pid %d runs on)", lease.id, scope, lease.target_pid)

    # --- steps ---------------------------------------------------------------------------

    def _start(
        self, lease: Lease, memory_bytes: int | None, quota_cores: float | None
    ) -> dict[str, Any]:
        pid = lease.target_pid
        try:
            current = self.units.unit_of(pid)
        except UnitError as exc:
            if exc.error_name != NO_UNIT_FOR_PID:
                return _cooperative(lease, exc)
            current = None
        except EnforceError as exc:
            return _cooperative(lease, exc)
        if current is not None and current in self._scopes.values():
            holder = next(i for i, s in self._scopes.items() if s == current)
            return {"how": "cooperative", "reason": f"pid {pid} is in {current} (lease {holder})"}
        slice_ = None
        if current is not None and actable(current):
            try:
                slice_ = self.units.slice_of(current)
            except EnforceError as exc:  # systemd then picks its default slice
                log.info("lease %d: slice of %s unknown: %s", lease.id, current, exc)
        properties: list[tuple[str, tuple[str, Any]]] = [
            ("Description", ("s", f"edged budget lease {lease.id} (pid {pid})")),
            ("PIDs", ("au", [pid])),
            ("CollectMode", ("s", "inactive-or-failed")),
            ("MemoryMax", ("t", UINT64_MAX if memory_bytes is None else memory_bytes)),
            ("CPUQuotaPerSecUSec", ("t", cores_to_usec_per_s(quota_cores))),
        ]
        if slice_:
            properties.append(("Slice", ("s", slice_)))
        for attempt in range(self.MAX_NAME_TRIES):
            scope = self.scope_of(lease, attempt)
            record = self.store.unit(scope)
            record.lease_scope = True
            self.store.save()  # recorded before it exists: a crash now is undone at restart
            try:
                self.units.start_scope(scope, properties, pid=pid)
            except UnitError as exc:
                if exc.error_name:  # refused: nothing was made under this name
                    self._forget(scope)
                    if exc.error_name == UNIT_EXISTS:
                        continue
                else:  # the start job failed: the scope is collected (CollectMode)
                    self._release_quietly(scope)
                return _cooperative(lease, exc)
            except EnforceError as exc:  # no bus or no answer: maybe made, maybe not
                self._release_quietly(scope)
                return _cooperative(lease, exc)
            break
        else:
            return {"how": "cooperative", "reason": f"{self.MAX_NAME_TRIES} scope names taken"}
        self._scopes[lease.id] = scope
        how: dict[str, Any] = {"how": "scope", "unit": scope}
        if slice_:
            how["slice"] = slice_
        how.update(_limits(memory_bytes, quota_cores))
        self._how[lease.id] = how
        log.info(
            "lease %d: pid %d in %s (%s)", lease.id, pid, scope, _limits(memory_bytes, quota_cores)
        )
        return how

    def _resize(
        self, lease: Lease, scope: str, memory_bytes: int | None, quota_cores: float | None
    ) -> dict[str, Any]:
        record = self.store.unit(scope)
        quota = cores_to_usec_per_s(quota_cores)
        properties: list[tuple[str, tuple[str, Any]]] = [
            ("MemoryMax", ("t", UINT64_MAX if memory_bytes is None else memory_bytes))
        ]
        if record.previous_cpu_quota_usec_per_s is not None:  # a CPU throttle holds it
            record.previous_cpu_quota_usec_per_s = quota
            self.store.save()
        else:
            properties.append(("CPUQuotaPerSecUSec", ("t", quota)))
        before = self._how.get(lease.id, {"how": "scope", "unit": scope})
        try:
            self.units.set_properties(scope, properties)
        except EnforceError as exc:
            log.warning("lease %d: resize of %s not applied: %s", lease.id, scope, exc)
            return {**before, "error": f"resize not applied: {exc}"}
        how = {k: v for k, v in before.items() if k in ("how", "unit", "slice")}
        how.update(_limits(memory_bytes, quota_cores))
        self._how[lease.id] = how
        return how

    # --- records -------------------------------------------------------------------------

    def _keep(self, lease: Lease, scope: str, exc: EnforceError) -> None:
        self.store.save()
        log.warning(
            "lease %d: %s keeps its limits until systemd answers (the next restore releases "
            "it): %s",
            lease.id,
            scope,
            exc,
        )

    def _release_quietly(self, scope: str) -> None:
        """After a failed start: release what may have been made, or keep the record for
        the restore."""
        try:
            self.units.release_scope(scope)
        except UnitError as exc:
            if exc.error_name not in (NO_SUCH_UNIT,):
                log.info("keeping %s for the restore: %s", scope, exc)
                return
        except EnforceError as exc:
            log.info("keeping %s for the restore: %s", scope, exc)
            return
        self._forget(scope)

    def _forget(self, scope: str) -> None:
        self.store.unit(scope).lease_scope = False
        self._forget_if_done(scope)

    def _forget_if_done(self, scope: str) -> None:
        record = self.store.data.units.get(scope)
        if record is not None and not record.imposed() and not record.pids:
            del self.store.data.units[scope]
        self.store.save()


def _limits(memory_bytes: int | None, quota_cores: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if memory_bytes is not None:
        out["memory_max_bytes"] = memory_bytes
    if quota_cores is not None:
        out["cpu_quota_cores"] = quota_cores
    return out


def _cooperative(lease: Lease, exc: EnforceError) -> dict[str, Any]:
    log.warning("lease %d (pid %d) not enforced: %s", lease.id, lease.target_pid, exc)
    return {"how": "cooperative", "reason": str(exc)}
