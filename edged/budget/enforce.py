"""A lease made real: its process in its own edged group, held to the granted memory and CPU.

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
from edged.enforce.signals import CgroupError, EnforceError

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
