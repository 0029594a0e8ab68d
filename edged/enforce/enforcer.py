"""The enforcer: the only code that acts on processes (DESIGN sections 1, 4 and 5).

``Enforcer.apply(action)`` takes one :class:`~edged.policy.base.Action` and either does it,
skips it (with a reason), fails (with an :class:`~edged.enforce.signals.EnforceError`) or, in
dry-run mode, only logs it. Before acting it

1. refuses ``critical`` processes, pid 1 and itself, and a pid whose start time is no longer
   the one the strategy saw (the process exited and its pid was reused);
2. calls ``recheck(action)``: the daemon re-reads the resource right before acting, and an
   action that is no longer needed is dropped and logged ("the situation recovered while
   selecting a victim", as earlyoom does);
3. records the change in the state store *before* making it, so that
   :func:`~edged.enforce.restore.restore_all` can undo it after a crash at any point.

The ladder maps to the backends so:

======================  ==============================================================
THROTTLE memory         move into the group :meth:`CgroupBackend.group_for` names (edged's
                        ``<subtree>/pid-<pid>``, or a child ``edged-pid-<pid>`` *under* the
                        process's own group on v1, or its own group on v2 where it is alone:
                        it keeps every limit it was under) + memory high (v1: soft limit
                        and backstop, see :mod:`edged.enforce.cgroupfs`)
THROTTLE cpu            move into the group + CPU quota (``target`` cores)
FREEZE                  move into the group + freeze; SIGSTOP where there is no freezer
THAW                    thaw / SIGCONT; back to the original group once nothing else holds it
UNTHROTTLE              lift that resource's limit; back to the original group once free
TERMINATE / KILL        SIGTERM / SIGKILL through a pidfd, then thaw / SIGCONT what edged
                        froze or stopped, so the signal is acted on
THROTTLE gpu=U          lower GPU ``U``'s NVML power limit to ``target`` W, clamped
                        (:mod:`edged.enforce.nvml`; the original is recorded first)
UNTHROTTLE gpu=U        put GPU ``U``'s original power limit back
NOTIFY                  not here: the server sends ``budget.shrink``
======================  ==============================================================

A GPU action (``Action.gpu`` set, pid 0) skips the process checks; without a GPU lever (not
root, no NVIDIA driver) it is skipped with that reason.

Where PID 1 is systemd and the daemon passes ``units``
(:class:`~edged.enforce.systemd.SystemdUnits`), a THROTTLE, FREEZE and their undoing for a
process that belongs to a unit other than edged's own go to that *unit* through systemd's D-Bus
API instead (``SetUnitProperties`` ``MemoryHigh`` / ``CPUQuotaPerSecUSec`` at runtime,
``FreezeUnit`` / ``ThawUnit``), never by moving the process or writing a cgroup systemd owns;
the unit's previous values are recorded first and put back when no victim holds the change any
more. A process in no unit (or in edged's own) goes to the cgroup backend as before. A bus
that cannot be reached fails the action rather than falling back to cgroupfs. ``FreezeUnit``
missing (systemd < 246) or unsupported falls back to SIGSTOP.

``reaction_time_s`` is the running median of decision-to-effect times (from the
``decided_at_s`` the daemon passes, else from the call) over the last actions done; the
predictive strategy adds it to its horizon.
"""

from __future__ import annotations

import enum
import logging
import os
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from edged.enforce.cgroupfs import CgroupBackend, CgroupV2, NotPlaceable
from edged.enforce.nvml import GpuPowerLever
from edged.enforce.restore import StateStore, StoppedRecord, UnitRecord, restore_unit
from edged.enforce.signals import (
    EnforceError,
    NoSuchProcess,
    ProtectedProcess,
    Signaller,
    StaleProcess,
    UnitError,
    exited,
    read_start_ticks,
)
from edged.enforce.systemd import (
    NO_SUCH_UNIT,
    NO_UNIT_FOR_PID,
    NOT_SUPPORTED,
    ROOT_SLICE,
    UNIT_EXISTS,
    UNKNOWN_METHOD,
    SystemdUnits,
    actable,
    cores_to_usec_per_s,
)
from edged.policy.base import Action, ActionKind, ProcessClass, Resource

log = logging.getLogger(__name__)

REACTION_WINDOW = 63  # actions the running median covers
DEFAULT_REACTION_TIME_S = 0.05  # until something has been measured (State's default too)
_UNDO = (ActionKind.THAW, ActionKind.UNTHROTTLE)
ROOT_SCOPE_NAME_TRIES = 4  # edged-pid-N.scope, then -1.. -3 (an older scope still loaded)


class Status(str, enum.Enum):
    """What became of an action."""

    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"
    DRY_RUN = "dry_run"


@dataclass(frozen=True)
class Outcome:
    """The result of :meth:`Enforcer.apply`: ``reason`` for skips, ``error`` for failures,
    ``reaction_s`` (decision to effect) for actions done."""

    status: Status
    reason: str = ""
    error: EnforceError | None = None
    reaction_s: float | None = None

    @classmethod
    def done(cls, reaction_s: float) -> Outcome:
        return cls(Status.DONE, reaction_s=reaction_s)

    @classmethod
    def skipped(cls, reason: str) -> Outcome:
        return cls(Status.SKIPPED, reason=reason)

    @classmethod
    def failed(cls, error: EnforceError) -> Outcome:
        return cls(Status.FAILED, reason=str(error), error=error)

    @classmethod
    def dry_run(cls) -> Outcome:
        return cls(Status.DRY_RUN)


class Enforcer:
    """Applies actions through a cgroup ``backend`` (None: signals only) and ``signals``,
    recording every imposed change in ``state_store`` first.

    ``recheck(action)`` returns whether the action is still needed now; ``clock`` is monotonic
    seconds (the same clock as ``decided_at_s``); ``gpus`` is the NVML power-limit lever
    (None: GPU actions are skipped). ``units`` is systemd's D-Bus API, given only where PID 1 is
    systemd; ``own_unit`` is edged's own unit (None: asked of systemd when first needed).
    """

    def __init__(
        self,
        backend: CgroupBackend | None,
        signals: Signaller,
        state_store: StateStore,
        dry_run: bool,
        recheck: Callable[[Action], bool],
        *,
        clock: Callable[[], float] = time.monotonic,
        gpus: GpuPowerLever | None = None,
        units: SystemdUnits | None = None,
        own_unit: str | None = None,
        root_scopes: bool | None = None,
    ) -> None:
        self.backend = backend
        # a process in the root cgroup goes into a transient scope of its own (see
        # _root_scope): on cgroup v2 under systemd, where the root belongs to systemd (mode
        # 0555: edged cannot, and must not, make groups there). Default: wherever systemd's
        # API is given and the cgroup backend is v2 (a v1 root is edged's to use).
        if root_scopes is None:
            root_scopes = units is not None and isinstance(backend, CgroupV2)
        self.root_scopes = root_scopes
        self.gpus = gpus
        self.units = units
        self._own_unit = own_unit
        self.signals = signals
        self.store = state_store
        self.dry_run = dry_run
        self.recheck = recheck
        self.clock = clock
        self._reactions_s: deque[float] = deque(maxlen=REACTION_WINDOW)

    @property
    def reaction_time_s(self) -> float:
        """Median decision-to-effect time of the recent actions done, seconds."""
        if not self._reactions_s:
            return DEFAULT_REACTION_TIME_S
        return statistics.median(self._reactions_s)

    def apply(self, action: Action, decided_at_s: float | None = None) -> Outcome:
        """Check, re-check, record, act; never raises an EnforceError (it is the outcome)."""
        start_s = self.clock() if decided_at_s is None else decided_at_s
        what = f"{action.kind.value} {action.resource.value} pid={action.pid}"
        if action.kind is ActionKind.NOTIFY:
            return Outcome.skipped("notify is sent by the server, not the enforcer")
        if action.gpu is not None:
            return self._apply_gpu(action, action.gpu, start_s)
        if action.klass is ProcessClass.CRITICAL:
            log.warning("refusing %s: class critical (%s)", what, action.strategy)
            return Outcome.skipped("critical class")
        try:
            self.signals.check(action.pid, action.start_ticks, action.kind.value)
        except ProtectedProcess as exc:
            log.warning("refusing %s: %s", what, exc.detail)
            return Outcome.skipped(f"protected: {exc.detail}")
        except (NoSuchProcess, StaleProcess) as exc:
            if action.kind in _UNDO and not self.dry_run:
                try:
                    self._forget(action.pid)  # its group and records are still ours to clean
                except EnforceError as cleanup:
                    log.warning("cleaning up after pid=%d: %s", action.pid, cleanup)
            log.info("dropping %s: %s", what, exc.detail)
            return Outcome.skipped(f"gone: {exc.detail}")
        if not self.recheck(action):
            log.info("dropping %s: the situation recovered while selecting a victim", what)
            return Outcome.skipped("recovered")
        if self.dry_run:
            return self._dry_run(what, action)
        try:
            skip = self._act(action)
        except (NoSuchProcess, StaleProcess) as exc:  # it exited while we acted
            log.info("dropping %s: %s", what, exc.detail)
            return Outcome.skipped(f"gone: {exc.detail}")
        except EnforceError as exc:
            log.warning("failed %s: %s", what, exc)
            return Outcome.failed(exc)
        if skip is not None:
            log.info("skipping %s: %s", what, skip)
            return Outcome.skipped(skip)
        reaction_s = self.clock() - start_s
        self._reactions_s.append(reaction_s)
        log.info(
            "%s (reason=%s, strategy=%s, target=%s) in %.1f ms %s",
            what,
            action.reason,
            action.strategy,
            action.target,
            reaction_s * 1e3,
            action.detail,
        )
        return Outcome.done(reaction_s)

    @staticmethod
    def _dry_run(what: str, action: Action, unit: str = "") -> Outcome:
        """Log the decision a dry run does not carry out."""
        log.info(
            "dry run: would %s (target=%s%s, reason=%s, strategy=%s) %s",
            what,
            action.target,
            unit,
            action.reason,
            action.strategy,
            action.detail,
        )
        return Outcome.dry_run()

    def _apply_gpu(self, action: Action, uuid: str, start_s: float) -> Outcome:
        """A GPU power-limit action: no process to check; re-check, record, act."""
        what = f"{action.kind.value} power limit of GPU {uuid}"
        if action.kind not in (ActionKind.THROTTLE, ActionKind.UNTHROTTLE):
            return Outcome.skipped(f"{action.kind.value} does not apply to a GPU")
        if self.gpus is None:
            log.info("skipping %s: no GPU power lever", what)
            return Outcome.skipped("no GPU power lever (needs root and an NVIDIA driver)")
        if not self.recheck(action):
            log.info("dropping %s: the situation recovered", what)
            return Outcome.skipped("recovered")
        if self.dry_run:
            return self._dry_run(what, action, " W")
        try:
            if action.kind is ActionKind.THROTTLE:
                if action.target is None or action.target <= 0:
                    raise EnforceError(None, "gpu power limit", f"bad target {action.target}")
                set_mw = self.gpus.set_limit(uuid, action.target)
                result = f"limit now {set_mw / 1000.0:.1f} W"
            else:
                restored_mw = self.gpus.lift(uuid)
                if restored_mw is None:
                    log.info("skipping %s: nothing imposed on it", what)
                    return Outcome.skipped("nothing imposed on it")
                result = f"limit back to {restored_mw / 1000.0:.1f} W"
        except EnforceError as exc:
            log.warning("failed %s: %s", what, exc)
            return Outcome.failed(exc)
        reaction_s = self.clock() - start_s
        self._reactions_s.append(reaction_s)
        log.info(
            "%s (reason=%s, strategy=%s): %s in %.1f ms %s",
            what,
            action.reason,
            action.strategy,
            result,
            reaction_s * 1e3,
            action.detail,
        )
        return Outcome.done(reaction_s)

    def gc(self) -> int:
        """Remove records and groups of processes that have exited; returns groups removed.
        The daemon calls it now and then (a killed victim leaves an empty group)."""
        removed = 0
        for pid_text, stopped in list(self.store.data.stopped.items()):
            if read_start_ticks(int(pid_text), self.signals.proc) != stopped.start_ticks:
                del self.store.data.stopped[pid_text]
        for name, unit in list(self.store.data.units.items()):
            for pid_text, ticks in list(unit.pids.items()):
                if exited(int(pid_text), ticks, self.signals.proc):
                    self._unit_drop(name, int(pid_text))
            try:
                self._unit_settle(name)
            except EnforceError as exc:  # the bus is down: next time
                log.info("gc: keeping %s: %s", name, exc)
        if self.backend is not None:
            for group in list(self.store.data.groups):
                if self.backend.procs(group):
                    continue
                try:
                    self.backend.remove(group)
                except EnforceError as exc:  # a process forked in since: next time
                    log.info("gc: keeping %s", exc)
                    continue
                del self.store.data.groups[group]
                removed += 1
        self.store.save()
        return removed

    # --- the ladder -------------------------------------------------------------------------

    def _act(self, a: Action) -> str | None:
        """Do ``a``; a string is a reason to skip it, None means done."""
        if a.kind is ActionKind.THROTTLE:
            return self._throttle(a)
        if a.kind is ActionKind.UNTHROTTLE:
            return self._unthrottle(a)
        if a.kind is ActionKind.FREEZE:
            return self._freeze(a)
        if a.kind is ActionKind.THAW:
            return self._thaw(a)
        if a.kind in (ActionKind.TERMINATE, ActionKind.KILL):
            unit = self.store.unit_of(a.pid)
            if unit is not None and self.store.unit(unit).frozen:
                # thaw the unit first: on v2 a fatal signal ends even a frozen task, the unit
                # then stops before ThawUnit reaches it, and systemd 252 keeps
                # FreezerState=frozen into the service's restart (tests/vm)
                self._unfreeze(a.pid, a.start_ticks)
        if a.kind is ActionKind.TERMINATE:
            self.signals.terminate(a.pid, a.start_ticks)
            self._let_signal_through(a)
            return None
        if a.kind is ActionKind.KILL:
            self.signals.kill(a.pid, a.start_ticks)
            self._let_signal_through(a)
            return None
        return f"no enforcement for {a.kind.value}"

    def _need_backend(self, a: Action) -> CgroupBackend:
        if self.backend is None:
            raise EnforceError(a.pid, a.kind.value, "no cgroup backend on this machine")
        return self.backend

    def _group_for(self, backend: CgroupBackend, a: Action) -> tuple[str, bool]:
        """The edged group for ``a.pid`` and whether it still has to be moved there; where it
        is now is noted in the record (saved by the caller, with the change, in one write)."""
        group = self.store.group_of(a.pid)
        if group is not None and a.pid in backend.procs(group):
            return group, False
        # new, or a record left by an earlier process with this pid (not yet gc'd): re-place,
        # where the process keeps every limit it is under (CgroupBackend.group_for)
        group = backend.group_for(a.pid)
        record = self.store.group(group)
        record.origins[str(a.pid)] = backend.where(a.pid)
        record.layout = backend.layout(group)
        return group, True

    def _place(self, backend: CgroupBackend, a: Action, group: str, move: bool) -> None:
        if move:
            backend.place_in(a.pid, group)

    def _throttle(self, a: Action) -> str | None:
        if a.target is None or a.target <= 0:
            raise EnforceError(a.pid, "throttle", f"needs a positive target, got {a.target}")
        # Over a temperature or power limit the CPU lever takes a target in cores; the GPU
        # power-limit lever is an action with ``gpu`` set (see _apply_gpu).
        unit = self._unit_for(a)
        if unit is not None:
            return self._throttle_unit(a, unit, a.target)
        backend = self._need_backend(a)
        group, move = self._group_for(backend, a)
        record = self.store.group(group)
        if a.resource is Resource.MEMORY:
            record.memory_high_bytes = int(a.target)
            self.store.save()
            self._place(backend, a, group, move)
            backend.set_memory_high(group, int(a.target))
        else:
            record.cpu_quota_cores = a.target
            self.store.save()
            self._place(backend, a, group, move)
            backend.set_cpu_quota(group, a.target)
        return None

    def _unthrottle(self, a: Action) -> str | None:
        unit = self.store.unit_of(a.pid)
        if unit is not None:
            unit_record = self.store.unit(unit)
            held = (
                unit_record.memory_pids if a.resource is Resource.MEMORY else unit_record.cpu_pids
            )
            if a.pid not in held:
                return "nothing imposed on it"
            held.remove(a.pid)
            self.store.save()
            self._unit_settle(unit)
            return None
        group = self.store.group_of(a.pid)
        if group is None or self.backend is None:
            return "nothing imposed on it"
        record = self.store.group(group)
        if a.resource is Resource.MEMORY:
            self.backend.set_memory_high(group, None)
            record.memory_high_bytes = None
        else:  # CPU, and the CPU quota that holds temperature or power
            self.backend.set_cpu_quota(group, None)
            record.cpu_quota_cores = None
        self.store.save()
        self._release_if_free(group)
        return None

    def _freeze(self, a: Action) -> str | None:
        unit = self._unit_for(a)
        if unit is not None and self._freeze_unit(a, unit):
            return None
        backend = self.backend
        # a process in a unit systemd cannot freeze gets SIGSTOP, never edged's cgroup freezer:
        # that would move it out of a cgroup systemd owns
        if unit is None and backend is not None and backend.can_freeze:
            try:
                group, move = self._group_for(backend, a)
            except NotPlaceable as exc:  # no group of its own without leaving its limits
                log.info("freezing pid=%d with SIGSTOP: %s", a.pid, exc.detail)
            else:
                self.store.group(group).frozen = True
                self.store.save()
                self._place(backend, a, group, move)
                backend.freeze(group)
                return None
        self.store.data.stopped[str(a.pid)] = StoppedRecord(a.start_ticks)
        self.store.save()
        self.signals.stop(a.pid, a.start_ticks)
        return None

    def _thaw(self, a: Action) -> str | None:
        unit = self.store.unit_of(a.pid)
        if unit is not None and a.pid in self.store.unit(unit).frozen_pids:
            self.store.unit(unit).frozen_pids.remove(a.pid)
            self.store.save()
            self._unit_settle(unit)
            return None
        group = self.store.group_of(a.pid)
        stopped = str(a.pid) in self.store.data.stopped
        if not stopped and (group is None or not self.store.group(group).frozen):
            return "not frozen by edged"
        self._unfreeze(a.pid, a.start_ticks)
        if group is not None:
            self._release_if_free(group)
        return None

    def _unfreeze(self, pid: int, start_ticks: int) -> None:
        """Thaw the group / SIGCONT the process edged froze; records updated after (undoing
        twice is harmless, missing an undo is not). A frozen unit is thawed whole: the
        signal must reach the process, and it shares the unit's freezer with the rest."""
        unit = self.store.unit_of(pid)
        if unit is not None and self.store.unit(unit).frozen:
            self.store.unit(unit).frozen_pids.clear()
            self.store.save()
            self._unit_settle(unit)
        group = self.store.group_of(pid)
        if group is not None and self.backend is not None and self.store.group(group).frozen:
            self.backend.thaw(group)
            self.store.group(group).frozen = False
            self.store.save()
        if str(pid) in self.store.data.stopped:
            self.signals.cont(pid, start_ticks)
            del self.store.data.stopped[str(pid)]
            self.store.save()

    def _let_signal_through(self, a: Action) -> None:
        """A frozen (v1) or stopped process does not act on TERM or KILL until it runs."""
        try:
            self._unfreeze(a.pid, a.start_ticks)
        except NoSuchProcess:  # SIGKILL already took it
            self.store.data.stopped.pop(str(a.pid), None)
            self.store.save()

    def _release_if_free(self, group: str) -> None:
        """Once nothing is imposed on ``group``, move its processes back where they came from
        and remove it."""
        record = self.store.group(group)
        if record.frozen or record.throttled() or self.backend is None:
            return
        fallback = next(iter(record.origins.values()), {})
        for pid in self.backend.procs(group):
            self.backend.release(pid, record.origins.get(str(pid), fallback))
        self.backend.remove(group)
        del self.store.data.groups[group]
        self.store.save()

    def _forget(self, pid: int) -> None:
        """Clean up after a process that exited while edged held it."""
        self.store.data.stopped.pop(str(pid), None)
        unit = self.store.unit_of(pid)
        if unit is not None:
            self._unit_drop(unit, pid)
            self._unit_settle(unit)
        group = self.store.group_of(pid)
        if group is not None and self.backend is not None:
            record = self.store.group(group)
            if record.frozen:
                self.backend.thaw(group)
                record.frozen = False
            if record.throttled():
                self.backend.set_memory_high(group, None)
                self.backend.set_cpu_quota(group, None)
                record.memory_high_bytes = record.cpu_quota_cores = None
            self._release_if_free(group)
        self.store.save()

    # --- systemd units (where PID 1 is systemd) ---------------------------------------------

    def _unit_for(self, a: Action) -> str | None:
        """The unit to act on for ``a.pid`` through systemd, or None for the cgroup backend:
        no systemd, a process in no unit, in edged's own unit, or in a unit that is not a
        service or scope (``-.slice`` for the root cgroup, ``init.scope``)."""
        if self.units is None:
            return None
        known = self.store.unit_of(a.pid)
        if known is not None:
            if self.store.unit(known).pids.get(str(a.pid)) == a.start_ticks:
                return known
            self._unit_drop(known, a.pid)  # a record of an earlier process with this pid
            self._unit_settle(known)
        try:
            unit: str | None = self.units.unit_of(a.pid)
        except UnitError as exc:
            if exc.error_name != NO_UNIT_FOR_PID:
                raise
            unit = None  # systemd 252 says so for a process in the root cgroup
        if unit in (None, ROOT_SLICE) and self.root_scopes and self._cgroup_of(a.pid) == "/":
            return self._root_scope(a)
        if unit is None or unit == self._own() or not actable(unit):
            return None
        return unit

    def _cgroup_of(self, pid: int) -> str | None:
        """The process's cgroup v2 path (the ``0::`` line of /proc/PID/cgroup), None if
        unreadable."""
        try:
            text = (self.signals.proc / str(pid) / "cgroup").read_text()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith("0::"):
                return line[3:]
        return None

    def _root_scope(self, a: Action) -> str:
        """A transient scope ``edged-pid-N.scope`` in ``-.slice`` holding only ``a.pid``, a
        process in the root cgroup, so systemd can limit or freeze it as a unit.

        Why a scope and not a group of edged's own: on v2 under systemd the root cgroup is
        systemd's (mode 0555; the shipped unit has no CAP_DAC_OVERRIDE, and systemd's
        delegation rules forbid other writers there), and ``Delegate=yes`` groups under
        edged's own unit would charge the victim to edged's ``MemoryMax`` and kill it with
        edged at stop (``KillMode=mixed``). ``-.slice`` is where the process was, so it stays
        under exactly the limits it had (none above it but the machine's). The scope is
        recorded first (a crash after the start is undone at restart) and abandoned once
        nothing is held: the process runs on in it, limit-free, and systemd collects it when
        the process exits (``CollectMode=inactive-or-failed``, also after a kill)."""
        units = self._units()
        properties: list[tuple[str, tuple[str, object]]] = [
            ("Description", ("s", f"edged: pid {a.pid}, from the root cgroup")),
            ("PIDs", ("au", [a.pid])),
            ("Slice", ("s", ROOT_SLICE)),
            ("CollectMode", ("s", "inactive-or-failed")),
        ]
        for attempt in range(ROOT_SCOPE_NAME_TRIES):
            name = f"edged-pid-{a.pid}" + (f"-{attempt}" if attempt else "") + ".scope"
            record = self.store.unit(name)
            record.own_scope = True
            record.pids[str(a.pid)] = a.start_ticks
            self.store.save()
            try:
                units.start_scope(name, properties, pid=a.pid)
            except UnitError as exc:
                if exc.error_name:  # refused: nothing was made under this name
                    del self.store.data.units[name]
                    self.store.save()
                    if exc.error_name == UNIT_EXISTS:
                        continue
                raise
            log.info("pid=%d was in the root cgroup: now alone in %s", a.pid, name)
            return name
        raise EnforceError(a.pid, "scope", f"{ROOT_SCOPE_NAME_TRIES} scope names taken")

    def _own(self) -> str:
        """edged's own unit ("" when it runs in none)."""
        if self._own_unit is None:
            assert self.units is not None
            try:
                self._own_unit = self.units.unit_of(os.getpid())
            except UnitError as exc:
                if exc.error_name != NO_UNIT_FOR_PID:
                    raise
                self._own_unit = ""
        return self._own_unit

    def _units(self) -> SystemdUnits:
        if self.units is None:
            raise EnforceError(None, "systemd", "systemd units recorded but no D-Bus backend")
        return self.units

    def _throttle_unit(self, a: Action, unit: str, target: float) -> str | None:
        """MemoryHigh / CPUQuotaPerSecUSec on the unit, its previous value recorded first."""
        units = self._units()
        record = self.store.unit(unit)
        record.pids[str(a.pid)] = a.start_ticks
        if a.resource is Resource.MEMORY:
            if record.previous_memory_high_bytes is None:
                record.previous_memory_high_bytes = units.memory_high_bytes(unit)
            record.memory_high_bytes = int(target)
            if a.pid not in record.memory_pids:
                record.memory_pids.append(a.pid)
            self.store.save()
            units.set_memory_high(unit, int(target))
        else:
            if record.previous_cpu_quota_usec_per_s is None:
                record.previous_cpu_quota_usec_per_s = units.cpu_quota_usec_per_s(unit)
            record.cpu_quota_cores = target
            if a.pid not in record.cpu_pids:
                record.cpu_pids.append(a.pid)
            self.store.save()
            units.set_cpu_quota(unit, cores_to_usec_per_s(target))
        return None

    def _freeze_unit(self, a: Action, unit: str) -> bool:
        """FreezeUnit; False where systemd cannot freeze (then SIGSTOP does it)."""
        units = self._units()
        record = self.store.unit(unit)
        record.pids[str(a.pid)] = a.start_ticks
        if a.pid not in record.frozen_pids:
            record.frozen_pids.append(a.pid)
        record.frozen = True
        self.store.save()
        try:
            units.freeze(unit)
        except UnitError as exc:
            if exc.error_name not in (NOT_SUPPORTED, UNKNOWN_METHOD):
                raise
            log.info("%s cannot be frozen by systemd (%s): SIGSTOP instead", unit, exc.detail)
            record.frozen_pids.remove(a.pid)
            record.frozen = bool(record.frozen_pids)
            if a.pid not in record.memory_pids and a.pid not in record.cpu_pids:
                record.pids.pop(str(a.pid), None)
            if not record.imposed() and not (record.memory_pids or record.cpu_pids):
                del self.store.data.units[unit]
            self.store.save()
            return False
        return True

    def _unit_drop(self, unit: str, pid: int) -> None:
        """Forget ``pid`` (it exited) in ``unit``'s record; what it held is put back by
        :meth:`_unit_settle`."""
        record = self.store.unit(unit)
        for held in (record.memory_pids, record.cpu_pids, record.frozen_pids):
            if pid in held:
                held.remove(pid)
        record.pids.pop(str(pid), None)

    def _unit_settle(self, unit: str) -> None:
        """Put back on ``unit`` what no process holds any more (thaw, previous MemoryHigh /
        CPUQuotaPerSecUSec); forget the unit once nothing is held. Records are updated after
        each change succeeds."""
        record = self.store.unit(unit)
        lift = UnitRecord(
            frozen=record.frozen and not record.frozen_pids,
            previous_memory_high_bytes=(
                None if record.memory_pids else record.previous_memory_high_bytes
            ),
            previous_cpu_quota_usec_per_s=(
                None if record.cpu_pids else record.previous_cpu_quota_usec_per_s
            ),
            # the scope edged made for a root-cgroup process, once nothing is held in it
            own_scope=record.own_scope
            and not (record.memory_pids or record.cpu_pids or record.frozen_pids),
        )
        abandon = lift.own_scope  # restore_unit clears it in `lift` once done
        if lift.imposed():
            try:
                restore_unit(self._units(), unit, lift)
            except UnitError as exc:
                if exc.error_name != NO_SUCH_UNIT:
                    raise
                # stopped and unloaded (a transient unit whose process died): nothing is
                # left to put back
                log.info("%s is gone: forgetting what edged set on it", unit)
                del self.store.data.units[unit]
                self.store.save()
                return
            if not record.frozen_pids:
                record.frozen = False
            if not record.memory_pids:
                record.previous_memory_high_bytes = record.memory_high_bytes = None
            if not record.cpu_pids:
                record.previous_cpu_quota_usec_per_s = None
                record.cpu_quota_cores = None
            if abandon:
                record.own_scope = False
        if not record.imposed() and not (
            record.memory_pids or record.cpu_pids or record.frozen_pids
        ):
            del self.store.data.units[unit]
        self.store.save()
