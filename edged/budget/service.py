"""The budget methods of the socket (DESIGN section 6): the ledger behind a JSON-RPC face.

``budget.request``, ``budget.update``, ``budget.release``, ``budget.list`` and the
notifications, pushed on the connection that holds the lease: ``budget.granted`` (a queued
request was granted), ``budget.revoked`` (a lease's ttl ran out), ``budget.grow`` {lease,
granted} (an elastic lease grew as capacity freed or idle budget was lent to it; also sent,
with the grant unchanged, when a recall is called off because its lender left), and
``budget.shrink`` {lease, target, deadline, reason} (from the strategy, reason ``pressure``;
or reason ``reclaim``: a lender wants back what this lease borrowed, and at the deadline the
grant goes down to ``target`` whether or not the client answered).

Growth is enforced before it is announced: the lease's group limits are raised first, so a
client may use its new grant as soon as ``budget.grow`` arrives. A reclaim lowers the limits at
the deadline (a client that answered with ``budget.update`` to ``target`` in time had them
lowered then). Each tick the daemon passes what lease holders use (:meth:`observe`: RSS, CPU
cores, NVML's GPU memory) so that idle leases can lend and lenders can take back.

Who may do what comes from the kernel (``Peer``: SO_PEERCRED), never from the message: a peer
may ask for itself or for a process of its own uid, and see, resize and release the leases of
its uid; root and members of group ``edged-admin`` may act on any process and lease. A lease
dies with its connection: the server's close hook releases it at once.

A queued request is answered when it is decided: the reply is the grant (just after a
``budget.granted`` notification) or error 1002 when its ``wait`` runs out. The server keeps
reading the connection meanwhile, so the client may release other leases while it waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from edged.budget.ledger import (
    CLASS_ORDER,
    RESOURCES,
    Ask,
    Change,
    Granted,
    Lease,
    Ledger,
    Lending,
    Queued,
)
from edged.config import Budget, finite_number, parse_size_bytes
from edged.policy.base import Action
from edged.server import protocol
from edged.server.protocol import RpcError
from edged.server.server import Deferred, Peer
from edged.snapshot import Reading

log = logging.getLogger(__name__)

ADMIN_GROUP = "edged-admin"
# the most a request may name: far above any machine, low enough that sums stay exact floats
MAX_AMOUNT = {"memory": float(1 << 56), "gpu_memory": float(1 << 56), "cpu": 65536.0}
MAX_WAIT_S = 86400.0
MAX_TTL_S = 30 * 86400.0
MAX_PID = (1 << 22) + 1  # the kernel's PID_MAX_LIMIT is 4194304
_BYTE_RESOURCES = ("memory", "gpu_memory")
# the readings observe() takes per process, and the resource each measures
_MEASURED = {
    "process.memory.usage": "memory",
    "process.cpu.utilization": "cpu",  # user and system, each in cores: summed
    "hw.gpu.process.memory.usage": "gpu_memory",
}


def use_by_pid(readings: Iterable[Reading]) -> dict[int, dict[str, float]]:
    """What each process uses per budget resource in one tick's readings: its RSS, its
    user + system CPU in cores, its GPU memory summed over GPUs."""
    used: dict[int, dict[str, float]] = {}
    for r in readings:
        key = _MEASURED.get(r.metric)
        pid = r.attributes.get("process.pid")
        if key is None or not isinstance(pid, int):
            continue
        per = used.setdefault(pid, {})
        per[key] = per.get(key, 0.0) + r.value
    return used


class LeaseEnforcer(Protocol):
    """Makes a granted lease real (a group with the granted limits) and lifts it again."""

    def apply(self, lease: Lease) -> dict[str, Any]:
        """Enforce ``lease``; returns how (``{"how": "cgroup", "group": ...}``)."""
        ...

    def lift(self, lease: Lease) -> None:
        """Undo :meth:`apply` (the lease was released, expired or its connection closed)."""
        ...


class Cooperative:
    """No enforcement: the client is trusted to keep to its grant (GPU memory always is)."""

    def apply(self, lease: Lease) -> dict[str, Any]:
        return {"how": "cooperative"}

    def lift(self, lease: Lease) -> None:
        return None


def capacity_of(
    capacity: Mapping[str, float], hard_limits: Mapping[str, float | None], budget: Budget
) -> tuple[dict[str, float], dict[str, float]]:
    """(capacity, reserve) for the ledger: per resource the machine has, its hard limit where
    one is set (capped by the total), else the total; the reserve resolved against that
    capacity (a percentage or an amount)."""
    out: dict[str, float] = {}
    for key in RESOURCES:
        hard = hard_limits.get(key)
        total = capacity.get(key)
        if total is None:  # not on this machine (no GPU): nothing to grant, whatever the limit
            continue
        out[key] = total if hard is None else min(hard, total)
    reserve: dict[str, float] = {}
    for key, value in (
        ("memory", budget.reserve_memory),
        ("cpu", budget.reserve_cpu),
        ("gpu_memory", budget.reserve_gpu_memory),
    ):
        if key not in out:
            continue
        if isinstance(value, str) and value.strip().endswith("%"):
            reserve[key] = float(value.strip()[:-1]) / 100.0 * out[key]
        elif key == "cpu":
            reserve[key] = float(value)
        else:
            reserve[key] = float(parse_size_bytes(value))
    return out, reserve


def lending_of(budget: Budget) -> Lending | None:
    """The ledger's lending settings from ``[budget]`` (None: ``lend = false``)."""
    if not budget.lend:
        return None
    return Lending(
        idle_after_s=budget.lend_idle_after_s,
        idle_fraction=budget.lend_fraction,
        notice_s=budget.reclaim_notice_s,
    )


class BudgetService:
    """The ledger, its timers, authorization and the notifications, for one daemon."""

    def __init__(
        self,
        notify: Callable[[int, str, Any], bool],
        *,
        proc: Path = Path("/proc"),
        watch: Callable[[int, str, str], object] | None = None,
        unwatch: Callable[[int], None] | None = None,
        enforcer: LeaseEnforcer | None = None,
        clock: Callable[[], float] = time.monotonic,
        lending: Lending | None = None,
    ) -> None:
        self.ledger = Ledger({}, {}, clock, lending)
        self._clock = clock
        self._notify = notify
        self._proc = proc
        self._watch = watch
        self._unwatch = unwatch
        self.enforcer: LeaseEnforcer = enforcer if enforcer is not None else Cooperative()
        self._enforced: dict[int, dict[str, Any]] = {}  # lease -> how it is enforced
        self._waiting: dict[int, asyncio.Future[Any]] = {}  # ask id -> its deferred reply
        self._names: dict[int, str] = {}  # connection -> the client name it gave in hello
        self._peers: dict[int, Peer] = {}  # connection -> its peer (pid identity checks)
        self._timer: asyncio.TimerHandle | None = None
        self._gpu_used: dict[int, float] = {}  # lease -> bytes NVML says its process uses
        try:
            self._admin_gid: int | None = grp.getgrnam(ADMIN_GROUP).gr_gid
        except KeyError:
            self._admin_gid = None

    # ---- the daemon's side ----------------------------------------------------------------

    def set_capacity(self, capacity: Mapping[str, float], reserve: Mapping[str, float]) -> None:
        """Each tick: the totals may have changed; expiries are checked and the queue re-tried."""
        change = self.ledger.set_capacity(capacity, reserve)
        change.merge(self.ledger.expire())
        self._apply(change)

    def configure(self, lending: Lending | None) -> None:
        """Lending settings (start, reload). Turned off, every loan out is recalled (with
        notice, as when its lender needs it)."""
        self._apply(self.ledger.set_lending(lending))

    def observe(self, readings: Iterable[Reading]) -> None:
        """Each tick: what each lease's process uses (``process.memory.usage``, the
        ``process.cpu.utilization`` readings summed as cores, ``hw.gpu.process.memory.usage``
        summed over GPUs), for idle lending and recall. A lender whose use rose gets its loans
        recalled (``budget.shrink`` reason ``reclaim`` to the borrowers)."""
        if self.ledger.lending is None or not self.ledger.leases:
            return
        used = use_by_pid(readings)
        change = Change()
        for lease in list(self.ledger.leases.values()):
            change.merge(self.ledger.observe(lease.id, used.get(lease.target_pid, {})))
        self._apply(change.current(self.ledger.leases))

    def check_gpu(self, readings: Iterable[Reading]) -> None:
        """GPU memory has no kernel lever, so a GPU-memory lease is cooperative; each tick,
        what NVML says its process uses (``hw.gpu.process.memory.usage``, summed over GPUs) is
        compared with the grant: shown by ``budget.list`` and logged when it goes over."""
        holders = [lease for lease in self.ledger.leases.values() if "gpu_memory" in lease.granted]
        if not holders:
            return
        used = use_by_pid(readings)
        for lease in holders:
            now = used.get(lease.target_pid, {}).get("gpu_memory", 0.0)
            before = self._gpu_used.get(lease.id, 0.0)
            granted = lease.granted["gpu_memory"]
            if now > granted >= before:
                log.warning(
                    "lease %d: pid %d uses %.0f MiB of GPU memory, granted %.0f MiB",
                    lease.id,
                    lease.target_pid,
                    now / (1 << 20),
                    granted / (1 << 20),
                )
            self._gpu_used[lease.id] = now

    def shrink(
        self, pid: int, target: Mapping[str, float], deadline_s: float, reason: str
    ) -> list[int]:
        """Ask the holders of leases on ``pid`` to come down to ``target`` (``{"memory":
        bytes}``) within ``deadline_s`` (a ``budget.shrink`` notification on each lease's
        connection); returns the leases told. The ledger is unchanged: the client answers with
        ``budget.update``."""
        told = []
        for lease in self.ledger.leases.values():
            if lease.target_pid != pid:
                continue
            params = {
                "lease": lease.id,
                "target": _amounts(target),
                "deadline": deadline_s,  # seconds, as DESIGN section 6 names it
                "reason": reason,
            }
            if self._notify(lease.connection, "budget.shrink", params):
                told.append(lease.id)
        return told

    def notify_action(self, action: Action) -> bool:
        """A strategy's NOTIFY as ``budget.shrink`` to the client holding a lease on its
        process (the controller's ``notify`` hook); False when no connected client holds one."""
        if action.target is None:
            return False
        target = {action.resource.value: action.target}
        return bool(self.shrink(action.pid, target, action.deadline_s or 0.0, action.reason))

    def name(self, connection: int, client: str) -> None:
        """The name a connection gave in ``hello`` (its processes' ``edged.client``)."""
        self._names[connection] = client[:64]

    def rewatch(self) -> None:
        """Watch every lease holder again (the process sensor was rebuilt on reload)."""
        for lease in self.ledger.leases.values():
            if self._watch is not None:
                client = self._names.get(lease.connection, f"pid:{lease.owner_pid}")
                self._watch(lease.target_pid, lease.klass, client)

    def holds(self, connection: int) -> bool:
        """Whether the connection holds a lease or a queued request (the server does not
        close such a connection for being idle: the lease dies with it)."""
        ledger = self.ledger
        return any(lease.connection == connection for lease in ledger.leases.values()) or any(
            ask.connection == connection for ask in ledger.queue
        )

    def connection_closed(self, connection: int) -> None:
        """The server's close hook: the connection's leases and queued requests end now."""
        self._names.pop(connection, None)
        self._apply(self.ledger.close(connection))
        self._peers.pop(connection, None)

    def close(self) -> None:
        """Shutdown: every lease is released (and its enforcement lifted)."""
        for connection in {lease.connection for lease in self.ledger.leases.values()}:
            self._apply(self.ledger.close(connection))
        if self._timer is not None:
            self._timer.cancel()

    def methods(self) -> dict[str, Callable[[Peer, Mapping[str, Any]], Any]]:
        return {
            "budget.request": self.request,
            "budget.update": self.update,
            "budget.release": self.release,
            "budget.list": self.list_leases,
        }

    def summary(self) -> dict[str, Any]:
        """For ``status``: how many leases and waiting requests, what is available."""
        return {
            "leases": len(self.ledger.leases),
            "queued": len(self.ledger.queue),
            "available": _amounts(self.ledger.available()),
            "lent": _amounts(self.ledger.borrowed_total()),
        }

    # ---- methods --------------------------------------------------------------------------

    async def request(self, peer: Peer, params: Mapping[str, Any]) -> Any:
        _only(params, {"resources", "min", "class", "pid", "wait", "ttl"})
        resources, gpu = _resources(params.get("resources"), "resources", allow_gpu=True)
        if not resources:
            raise _bad("resources must name at least one of memory, cpu, gpu_memory")
        minimum = dict(resources)
        if params.get("min") is not None:
            given, _ = _resources(params["min"], "min", allow_gpu=False)
            for key, least in given.items():
                if key not in resources:
                    raise _bad(f"min.{key}: not among the resources requested")
                if least > resources[key]:
                    raise _bad(f"min.{key} must not exceed resources.{key}")
                minimum[key] = least
        klass = params.get("class", "normal")
        if not isinstance(klass, str) or klass not in CLASS_ORDER:
            raise _bad(f"class must be one of {', '.join(CLASS_ORDER)}")
        admin = self.is_admin(peer)
        if klass == "critical" and not admin:
            raise RpcError(
                protocol.PERMISSION_DENIED, f"class critical needs root or group {ADMIN_GROUP}"
            )
        target = params.get("pid", peer.pid)
        if isinstance(target, bool) or not isinstance(target, int) or not 0 < target < MAX_PID:
            raise _bad("pid must be a process id")
        # the peer itself: the kernel vouched for it at connect; another pid: /proc says whose
        ids = None if target == peer.pid else self.ids_of(target)
        if target != peer.pid and ids is None:
            raise _bad(f"no process {target}")
        if target == peer.pid and not peer.same_process():  # the pid may be reused by now
            raise _bad(f"no process {target}: the process that connected has exited")
        self._peers[peer.connection] = peer
        if ids is not None and not admin and not _could_signal_unprivileged(ids, peer.uid):
            raise RpcError(
                protocol.PERMISSION_DENIED,
                f"process {target} belongs to another user or runs with privileges its user "
                "lacks (setuid or setgid)",
                {"pid": target},
            )
        wait_s = _seconds(params.get("wait", 0), "wait", MAX_WAIT_S, allow_zero=True)
        ttl = params.get("ttl")
        ttl_s = None if ttl is None else _seconds(ttl, "ttl", MAX_TTL_S, allow_zero=False)
        outcome = self.ledger.request(
            owner_uid=peer.uid,
            owner_pid=peer.pid,
            target_pid=target,
            requested=resources,
            minimum=minimum,
            klass=klass,
            wait_s=wait_s,
            ttl_s=ttl_s,
            connection=peer.connection,
            gpu=gpu,
        )
        if isinstance(outcome, Granted):
            self._start(outcome.lease)
            self._schedule()
            return self._grant_result(outcome.lease)
        if isinstance(outcome, Queued):
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._waiting[outcome.ask.id] = future
            ask = outcome.ask
            future.add_done_callback(lambda _f: self._abandoned(ask))
            self._schedule()
            return Deferred(future)
        data: dict[str, Any] = {
            "available": _amounts(outcome.available),
            "requested": _amounts(resources),
        }
        if outcome.queued_ahead:
            data["queued_ahead"] = outcome.queued_ahead
        raise RpcError(protocol.INSUFFICIENT_RESOURCES, "insufficient resources", data)

    async def update(self, peer: Peer, params: Mapping[str, Any]) -> Any:
        _only(params, {"lease", "resources", "usage"})
        lease = self._own_lease(peer, params.get("lease"))
        resources = usage = None
        if params.get("resources") is not None:
            resources, _ = _resources(params["resources"], "resources", allow_gpu=False)
        if params.get("usage") is not None:
            usage, _ = _resources(params["usage"], "usage", allow_gpu=False)
        if resources is None and usage is None:
            raise _bad("budget.update needs resources and/or usage")
        new, change = self.ledger.update(lease.id, resources, usage)
        if new.granted != lease.granted:
            self._enforced[new.id] = self._enforce(new)
        # the reply tells the caller its grant; no budget.grow for it on top
        self._apply(change, answered=new.id)
        return {"lease": new.id, "granted": _amounts(new.granted)}

    async def release(self, peer: Peer, params: Mapping[str, Any]) -> Any:
        _only(params, {"lease"})
        lease = self._own_lease(peer, params.get("lease"))
        self._apply(self.ledger.release(lease.id))
        return {}

    async def list_leases(self, peer: Peer, params: Mapping[str, Any]) -> Any:
        _only(params, set())
        uid = None if self.is_admin(peer) else peer.uid
        now_s = self._clock()
        return {
            "leases": [self._describe(lease, now_s) for lease in self.ledger.visible_to(uid)],
            "queued": [
                {
                    "lease": ask.id,
                    "uid": ask.owner_uid,
                    "pid": ask.owner_pid,
                    "target": ask.target_pid,
                    "class": ask.klass,
                    "requested": _amounts(ask.requested),
                    "min": _amounts(ask.minimum),
                    "waits_s": round(max(0.0, ask.wait_deadline_s - now_s), 3),
                }
                for ask in self.ledger.queue
                if uid is None or ask.owner_uid == uid
            ],
            "capacity": _amounts(self.ledger.capacity),
            "reserve": _amounts(self.ledger.reserve),
            "available": _amounts(self.ledger.available()),
            "lendable": _amounts(self.ledger.lendable()),
        }

    # ---- authorization --------------------------------------------------------------------

    def is_admin(self, peer: Peer) -> bool:
        """Root, or a member of ``edged-admin`` (primary or supplementary group of the peer's
        process, as /proc/PID/status lists them at the time of the call)."""
        if peer.uid == 0:
            return True
        if self._admin_gid is None:
            return False
        if peer.gid == self._admin_gid:
            return True
        groups = self._status_field(peer.pid, "Groups:")
        return groups is not None and str(self._admin_gid) in groups.split()

    def uid_of(self, pid: int) -> int | None:
        """The real uid of a process; None when there is no such process."""
        uids = self._status_field(pid, "Uid:")
        return int(uids.split()[0]) if uids else None

    def ids_of(self, pid: int) -> tuple[list[int], list[int]] | None:
        """(real, effective, saved, fs uids) and the same gids of a process, from
        /proc/PID/status; None when there is no such process."""
        uids = self._status_field(pid, "Uid:")
        gids = self._status_field(pid, "Gid:")
        if not uids or not gids:
            return None
        try:
            return [int(u) for u in uids.split()], [int(g) for g in gids.split()]
        except ValueError:
            return None

    def _status_field(self, pid: int, name: str) -> str | None:
        try:
            with open(self._proc / str(pid) / "status", encoding="utf-8") as f:
                for line in f:
                    if line.startswith(name):
                        return line[len(name) :].strip()
        except OSError:  # gone (ENOENT, ESRCH), or hidden from us: not a process we can vouch for
            return None
        return None

    def _own_lease(self, peer: Peer, lease_id: object) -> Lease:
        if isinstance(lease_id, bool) or not isinstance(lease_id, int):
            raise _bad("lease must be a lease id (an integer)")
        lease = self.ledger.leases.get(lease_id)
        if lease is None:
            raise RpcError(protocol.NO_SUCH_LEASE, f"no lease {lease_id}", {"lease": lease_id})
        if lease.owner_uid != peer.uid and not self.is_admin(peer):
            raise RpcError(
                protocol.PERMISSION_DENIED,
                f"lease {lease_id} belongs to another user",
                {"lease": lease_id},
            )
        return lease

    # ---- effects of ledger changes --------------------------------------------------------

    def _start(self, lease: Lease) -> None:
        """A lease was granted: watch its process, enforce it."""
        if self._watch is not None:
            client = self._names.get(lease.connection, f"pid:{lease.owner_pid}")
            self._watch(lease.target_pid, lease.klass, client)
        self._enforced[lease.id] = self._enforce(lease)

    def _enforce(self, lease: Lease) -> dict[str, Any]:
        peer = self._peers.get(lease.connection)
        if peer is not None and lease.target_pid == peer.pid and not peer.same_process():
            # granted from the queue after the client's process exited: its pid may name
            # another process by now, which must not be put under the lease's limits
            reason = f"process {lease.target_pid} has exited"
            log.warning("lease %d not enforced: %s", lease.id, reason)
            return {"how": "cooperative", "reason": reason}
        try:
            return self.enforcer.apply(lease)
        except OSError as exc:  # the lease stands; it is only not enforced (logged, shown)
            log.warning("lease %d (pid %d) not enforced: %s", lease.id, lease.target_pid, exc)
            return {"how": "cooperative", "error": str(exc)}

    def _end(self, lease: Lease) -> None:
        """A lease ended (release, close, ttl): lift its enforcement, stop watching."""
        self._enforced.pop(lease.id, None)
        self._gpu_used.pop(lease.id, None)
        try:
            self.enforcer.lift(lease)
        except OSError as exc:
            log.warning("lifting lease %d (pid %d) failed: %s", lease.id, lease.target_pid, exc)
        if self._unwatch is not None and not self.ledger.leases.on_pid(lease.target_pid):
            self._unwatch(lease.target_pid)

    def _apply(self, change: Change, answered: int | None = None) -> None:
        """Act on what the ledger did: lift, notify, answer waiting requests, enforce."""
        for lease in change.released:
            self._end(lease)
        for lease in change.revoked:
            self._end(lease)
            self._notify(lease.connection, "budget.revoked", {"lease": lease.id, "reason": "ttl"})
            log.info("lease %d of pid %d revoked: ttl expired", lease.id, lease.target_pid)
        for ask in change.timed_out:
            future = self._waiting.pop(ask.id, None)
            if future is not None and not future.done():
                future.set_exception(
                    RpcError(
                        protocol.TIMED_OUT,
                        "timed out waiting for resources",
                        {
                            "waited_s": round(self._clock() - ask.asked_at_s, 3),
                            "available": _amounts(self.ledger.available()),
                        },
                    )
                )
        for ask in change.cancelled:
            future = self._waiting.pop(ask.id, None)
            if future is not None:
                future.cancel()
        for granted in change.granted:
            # as it stands now: admitted, it may have grown in the same step
            lease = self.ledger.leases.get(granted.lease.id, granted.lease)
            self._start(lease)
            result = self._grant_result(lease)
            if granted.queued is not None:
                result["waited_s"] = round(lease.granted_at_s - granted.queued.asked_at_s, 3)
            self._notify(lease.connection, "budget.granted", result)
            future = self._waiting.pop(lease.id, None)
            if future is not None and not future.done():
                future.set_result(result)
        granted_now = {g.lease.id for g in change.granted}  # their grant says it already
        for lease in change.reclaimed:
            self._enforced[lease.id] = self._enforce(lease)
            log.info(
                "lease %d of pid %d: borrowed budget reclaimed, granted now %s",
                lease.id,
                lease.target_pid,
                _amounts(lease.granted),
            )
        for lease in change.grown:
            if lease.id in granted_now:
                continue
            # raised before it is told, so the client can use it at once
            self._enforced[lease.id] = self._enforce(lease)
            if lease.id != answered:
                params = {"lease": lease.id, "granted": _amounts(lease.granted)}
                self._notify(lease.connection, "budget.grow", params)
        now_s = self._clock()
        for recall in change.recalled:
            borrower = self.ledger.leases.get(recall.lease.id)
            recalled = self.ledger.recalled_of(recall.lease.id)
            if borrower is None or not recalled:  # ended, or settled, in the same step
                continue
            lease = borrower
            # from its grant as it stands now (it may have grown in the same step)
            target = {key: lease.granted[key] - amount for key, amount in recalled.items()}
            self._notify(
                lease.connection,
                "budget.shrink",
                {
                    "lease": lease.id,
                    "target": _amounts(target),
                    "deadline": round(max(0.0, recall.deadline_s - now_s), 3),
                    "reason": "reclaim",
                },
            )
            log.info(
                "lease %d of pid %d: borrowed budget recalled, down to %s within %.1f s",
                lease.id,
                lease.target_pid,
                _amounts(target),
                recall.deadline_s - now_s,
            )
        self._schedule()

    def _abandoned(self, ask: Ask) -> None:
        """The deferred reply was cancelled (its connection closed): drop the ask if queued."""
        self._waiting.pop(ask.id, None)
        if any(a.id == ask.id for a in self.ledger.queue):
            self.ledger.queue = [a for a in self.ledger.queue if a.id != ask.id]

    def _schedule(self) -> None:
        """One timer, at the earliest ttl or wait deadline."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline_s = self.ledger.next_deadline_s()
        if deadline_s is None:
            return
        with contextlib.suppress(RuntimeError):  # no running loop (tests of the pure parts)
            loop = asyncio.get_running_loop()
            delay_s = max(0.0, deadline_s - self._clock())
            self._timer = loop.call_later(delay_s, self._expire)

    def _expire(self) -> None:
        self._timer = None
        self._apply(self.ledger.expire())

    def _grant_result(self, lease: Lease) -> dict[str, Any]:
        result: dict[str, Any] = {
            "lease": lease.id,
            "granted": _amounts(lease.granted),
            "enforced": self._enforced.get(lease.id, {"how": "cooperative"}),
        }
        if lease.deadline_s is not None:
            result["ttl_s"] = round(lease.deadline_s - lease.granted_at_s, 3)
        return result

    def _describe(self, lease: Lease, now_s: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            "lease": lease.id,
            "uid": lease.owner_uid,
            "pid": lease.owner_pid,
            "target": lease.target_pid,
            "class": lease.klass,
            "granted": _amounts(lease.granted),
            "requested": _amounts(lease.requested),
            "min": _amounts(lease.minimum),
            "usage": _amounts(lease.usage),
            "age_s": round(now_s - lease.granted_at_s, 3),
            "enforced": self._enforced.get(lease.id, {"how": "cooperative"}),
        }
        if lease.deadline_s is not None:
            out["expires_in_s"] = round(max(0.0, lease.deadline_s - now_s), 3)
        for name, amounts in (
            ("lent", self.ledger.lent_by(lease.id)),  # of its grant, out on loan
            ("borrowed", self.ledger.borrowed_by(lease.id)),  # of its grant, on loan
            ("recalled", self.ledger.recalled_of(lease.id)),  # of that, to give back
        ):
            if amounts:
                out[name] = _amounts(amounts)
        measured = self.ledger.measured.get(lease.id)
        if measured:
            out["measured"] = _amounts(measured)
        if lease.gpu is not None:
            out["gpu"] = lease.gpu
        if lease.id in self._gpu_used:
            used = self._gpu_used[lease.id]
            out["gpu_memory_used_bytes"] = round(used)
            out["over_budget"] = ["gpu_memory"] if used > lease.granted["gpu_memory"] else []
        return out


# ---- parameter checks -------------------------------------------------------------------------


def _could_signal_unprivileged(ids: tuple[list[int], list[int]], caller_uid: int) -> bool:
    """Whether a caller of ``caller_uid`` may put a budget on a process with these ids: every
    uid of it (real, effective, saved, fs) is the caller's, so the caller could signal it
    (kill(2) checks the real and saved uid) and it holds no privilege the caller lacks (a
    setuid program run by the caller has another effective or saved uid), and it is not
    running setgid (its gids all the same). A limit on a more privileged process would be a
    lever on it that the caller could not otherwise pull."""
    uids, gids = ids
    return all(u == caller_uid for u in uids) and len(set(gids)) == 1


def _bad(message: str) -> RpcError:
    return RpcError(protocol.INVALID_PARAMS, message)


def _only(params: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise _bad(f"unknown parameter {unknown[0]!r}")


def _resources(value: object, name: str, *, allow_gpu: bool) -> tuple[dict[str, float], int | None]:
    """``{"memory": bytes, "cpu": cores, "gpu_memory": bytes}`` (and ``gpu``, an index),
    checked: known keys, numbers (a size string such as "512MiB" for bytes), not negative, not
    absurd."""
    if not isinstance(value, dict):
        raise _bad(f"{name} must be an object such as {{'memory': 1073741824, 'cpu': 1.5}}")
    out: dict[str, float] = {}
    gpu = None
    for key, raw in value.items():
        if key == "gpu" and allow_gpu:
            if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw < 1024:
                raise _bad(f"{name}.gpu must be a GPU index")
            gpu = raw
            continue
        if key not in RESOURCES:
            raise _bad(f"{name}.{key}: unknown resource (known: {', '.join(RESOURCES)})")
        amount: float
        if isinstance(raw, str) and key in _BYTE_RESOURCES:
            try:
                amount = float(parse_size_bytes(raw))
            except ValueError as exc:
                raise _bad(f"{name}.{key}: {exc}") from exc
        elif isinstance(raw, (int, float)) and not isinstance(raw, bool):
            try:
                amount = finite_number(raw, f"{name}.{key}")
            except ValueError as exc:
                raise _bad(str(exc)) from exc
        else:
            raise _bad(f"{name}.{key} must be a number")
        if not math.isfinite(amount) or amount < 0 or amount > MAX_AMOUNT[key]:
            raise _bad(f"{name}.{key} must be between 0 and {MAX_AMOUNT[key]:g}")
        out[key] = amount
    return out, gpu


def _seconds(value: object, name: str, most_s: float, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"{name} must be a number of seconds")
    try:
        value = finite_number(value, name)
    except ValueError as exc:
        raise _bad(f"{name} must be a number of seconds: {exc}") from exc
    if value < 0 or (value == 0 and not allow_zero) or value > most_s:
        low = ">= 0" if allow_zero else "> 0"
        raise _bad(f"{name} must be {low} and at most {most_s:g} s")
    return float(value)


def _amounts(amounts: Mapping[str, float]) -> dict[str, float | int]:
    """Bytes as integers, cores as they are."""
    return {
        key: (round(value) if key in _BYTE_RESOURCES else round(value, 6))
        for key, value in amounts.items()
    }
