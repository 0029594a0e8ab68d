"""The budget ledger: who holds how much of what, and who waits (pure: no I/O, clock injected).

Admission is against a capacity per resource (the configured hard limit, else the machine's
total) minus a reserve kept for everything that holds no budget, minus what is already granted.
A request is granted in full, granted elastically (per resource, the largest amount between its
``min`` and what it asked that fits), refused with what is available now, or queued for up to
``wait`` seconds.

The queue is fair: ordered by class (critical, normal, besteffort), then by arrival. Only its
head may be admitted (a large request at the head is not starved by small ones behind it), and
a new request never overtakes a queued one of the same or a higher class. The queue is
re-tried after every release, expiry and resize and on every tick (capacity may have grown).

Every operation returns the :class:`Change` it caused (grants of queued requests, time-outs,
revocations), so the caller (the daemon) can notify the clients concerned; the ledger itself
never talks to anyone.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

# the resources a budget can hold, in their base units: bytes, cores, bytes
RESOURCES = ("memory", "cpu", "gpu_memory")
CLASS_ORDER = {"critical": 0, "normal": 1, "besteffort": 2}
# a float sum of many grants can exceed what was added by a rounding error; amounts within this
# of the limit count as fitting (1e-9 of a core, of a byte)
_EPSILON = 1e-9

Amounts = Mapping[str, float]


class NoSuchLease(KeyError):
    """The lease id names no live lease (released, expired, or never granted)."""

    def __init__(self, lease: int) -> None:
        super().__init__(lease)
        self.lease = lease


@dataclass(frozen=True)
class Lease:
    """A granted budget. ``granted`` is what the holder may use; ``requested`` what it asked
    (an elastic grant may be less, never less than ``minimum``)."""

    id: int
    owner_uid: int
    owner_pid: int
    target_pid: int  # the process the budget is for (the owner's own, or one of its uid)
    klass: str
    granted: Amounts
    requested: Amounts
    minimum: Amounts
    connection: int  # the connection it dies with
    granted_at_s: float
    deadline_s: float | None = None  # ttl: revoked at this clock time
    gpu: int | None = None  # the GPU index the client named (bookkeeping only)
    usage: Amounts = field(default_factory=dict)  # the holder's last usage report


@dataclass(frozen=True)
class Ask:
    """A request waiting in the queue until ``wait_deadline_s``."""

    id: int  # becomes the lease id when granted
    seq: int  # arrival order
    owner_uid: int
    owner_pid: int
    target_pid: int
    klass: str
    requested: Amounts
    minimum: Amounts
    connection: int
    asked_at_s: float
    wait_deadline_s: float
    ttl_s: float | None = None
    gpu: int | None = None


@dataclass(frozen=True)
class Granted:
    lease: Lease
    queued: Ask | None = None  # the ask it came from, when it had to wait


@dataclass(frozen=True)
class Queued:
    ask: Ask
    available: Amounts


@dataclass(frozen=True)
class Refused:
    available: Amounts
    queued_ahead: int = 0  # queued requests it may not overtake (it may fit, yet waits its turn)


@dataclass
class Change:
    """What an operation did besides its own answer."""

    granted: list[Granted] = field(default_factory=list)  # queued asks admitted now
    timed_out: list[Ask] = field(default_factory=list)  # asks whose wait ran out
    revoked: list[Lease] = field(default_factory=list)  # leases whose ttl ran out
    released: list[Lease] = field(default_factory=list)  # leases ended by release/close
    cancelled: list[Ask] = field(default_factory=list)  # asks dropped with their connection

    def merge(self, other: Change) -> Change:
        self.granted += other.granted
        self.timed_out += other.timed_out
        self.revoked += other.revoked
        self.released += other.released
        self.cancelled += other.cancelled
        return self


def fit(requested: Amounts, minimum: Amounts, available: Amounts) -> dict[str, float] | None:
    """Per resource, the largest amount between ``minimum`` and ``requested`` that fits in
    ``available``; None when some resource cannot get even its minimum."""
    out: dict[str, float] = {}
    for key, want in requested.items():
        free = available.get(key, 0.0)
        if want <= free + _EPSILON:
            out[key] = want
            continue
        least = minimum.get(key, want)
        if least > free + _EPSILON:
            return None
        out[key] = max(least, free)
    return out


class Ledger:
    """Leases and the wait queue against a capacity and a reserve (both per resource)."""

    def __init__(
        self,
        capacity: Amounts,
        reserve: Amounts | None,
        clock: Callable[[], float],
    ) -> None:
        self.capacity: dict[str, float] = dict(capacity)
        self.reserve: dict[str, float] = dict(reserve or {})
        self._clock = clock  # monotonic seconds; deadlines are on this clock
        self.leases: dict[int, Lease] = {}
        self.queue: list[Ask] = []  # kept in admission order (class, then arrival)
        self._ids = itertools.count(1)
        self._seq = itertools.count(1)

    # ---- figures --------------------------------------------------------------------------

    def usable(self) -> dict[str, float]:
        """Capacity minus reserve, per resource (never negative)."""
        return {
            key: max(0.0, total - self.reserve.get(key, 0.0))
            for key, total in self.capacity.items()
        }

    def granted_total(self) -> dict[str, float]:
        total = dict.fromkeys(RESOURCES, 0.0)
        for lease in self.leases.values():
            for key, amount in lease.granted.items():
                total[key] = total.get(key, 0.0) + amount
        return total

    def available(self) -> dict[str, float]:
        """What a request could get now: usable minus granted (never negative). A resource
        with no capacity known (no GPU) has 0 available."""
        granted = self.granted_total()
        usable = self.usable()
        return {key: max(0.0, usable.get(key, 0.0) - granted.get(key, 0.0)) for key in RESOURCES}

    def set_capacity(self, capacity: Amounts, reserve: Amounts | None = None) -> Change:
        """New totals (each tick: a limit reloaded, a GPU appeared); re-tries the queue. Leases
        already granted are kept even if the new capacity no longer covers them."""
        self.capacity = dict(capacity)
        if reserve is not None:
            self.reserve = dict(reserve)
        return self._pump()

    def next_deadline_s(self) -> float | None:
        """The earliest ttl or wait deadline, for the caller's timer."""
        deadlines = [a.wait_deadline_s for a in self.queue]
        deadlines += [lease.deadline_s for lease in self.leases.values() if lease.deadline_s]
        return min(deadlines) if deadlines else None

    # ---- operations -----------------------------------------------------------------------

    def request(
        self,
        *,
        owner_uid: int,
        owner_pid: int,
        target_pid: int,
        requested: Amounts,
        minimum: Amounts | None = None,
        klass: str = "normal",
        wait_s: float = 0.0,
        ttl_s: float | None = None,
        connection: int = 0,
        gpu: int | None = None,
    ) -> Granted | Queued | Refused:
        """Grant, queue (``wait_s`` > 0) or refuse. ``minimum`` defaults to ``requested``
        (no elasticity). Raises ValueError for an unknown class or resource, or a minimum
        above what is requested."""
        if klass not in CLASS_ORDER:
            raise ValueError(f"unknown class {klass!r}")
        minimum = dict(requested if minimum is None else minimum)
        for key in (*requested, *minimum):
            if key not in RESOURCES:
                raise ValueError(f"unknown resource {key!r}")
        for key, least in minimum.items():
            if key not in requested or least > requested[key]:
                raise ValueError(f"min.{key} must not exceed resources.{key}")
        now_s = self._clock()
        available = self.available()
        # a queued ask of the same or a higher class is served first
        ahead = sum(1 for a in self.queue if CLASS_ORDER[a.klass] <= CLASS_ORDER[klass])
        amounts = None if ahead else fit(requested, minimum, available)
        lease_id = next(self._ids)
        if amounts is not None:
            lease = Lease(
                id=lease_id,
                owner_uid=owner_uid,
                owner_pid=owner_pid,
                target_pid=target_pid,
                klass=klass,
                granted=amounts,
                requested=dict(requested),
                minimum=minimum,
                connection=connection,
                granted_at_s=now_s,
                deadline_s=now_s + ttl_s if ttl_s is not None else None,
                gpu=gpu,
            )
            self.leases[lease_id] = lease
            return Granted(lease)
        if wait_s <= 0:
            return Refused(available, ahead)
        ask = Ask(
            id=lease_id,
            seq=next(self._seq),
            owner_uid=owner_uid,
            owner_pid=owner_pid,
            target_pid=target_pid,
            klass=klass,
            requested=dict(requested),
            minimum=minimum,
            connection=connection,
            asked_at_s=now_s,
            wait_deadline_s=now_s + wait_s,
            ttl_s=ttl_s,
            gpu=gpu,
        )
        self.queue.append(ask)
        self.queue.sort(key=lambda a: (CLASS_ORDER[a.klass], a.seq))
        return Queued(ask, available)

    def release(self, lease_id: int) -> Change:
        """End a lease; the queue is re-tried. Raises NoSuchLease."""
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            raise NoSuchLease(lease_id)
        change = Change(released=[lease])
        return change.merge(self._pump())

    def close(self, connection: int) -> Change:
        """A connection closed: its leases are released and its queued asks dropped."""
        change = Change()
        for lease_id, lease in list(self.leases.items()):
            if lease.connection == connection:
                del self.leases[lease_id]
                change.released.append(lease)
        kept: list[Ask] = []
        for ask in self.queue:
            (change.cancelled if ask.connection == connection else kept).append(ask)
        self.queue = kept
        return change.merge(self._pump())

    def expire(self) -> Change:
        """Revoke leases past their ttl, time out asks past their wait, re-try the queue."""
        now_s = self._clock()
        change = Change()
        for lease_id, lease in list(self.leases.items()):
            if lease.deadline_s is not None and lease.deadline_s <= now_s:
                del self.leases[lease_id]
                change.revoked.append(lease)
        kept: list[Ask] = []
        for ask in self.queue:
            (change.timed_out if ask.wait_deadline_s <= now_s else kept).append(ask)
        self.queue = kept
        return change.merge(self._pump())

    def update(
        self,
        lease_id: int,
        resources: Amounts | None = None,
        usage: Amounts | None = None,
    ) -> tuple[Lease, Change]:
        """Resize a lease and/or store a usage report. A resource asked lower is lowered at
        once (the queue is re-tried); one asked higher grows by what is available, and only
        while nothing is queued (waiting requests come first). Raises NoSuchLease, or
        ValueError for an unknown resource."""
        lease = self.leases.get(lease_id)
        if lease is None:
            raise NoSuchLease(lease_id)
        for key in (*(resources or {}), *(usage or {})):
            if key not in RESOURCES:
                raise ValueError(f"unknown resource {key!r}")
        granted = dict(lease.granted)
        requested = dict(lease.requested)
        minimum = dict(lease.minimum)
        available = self.available()
        for key, target in (resources or {}).items():
            current = granted.get(key, 0.0)
            if target <= current:
                amount = target
            elif not self.queue:
                amount = current + min(target - current, available.get(key, 0.0))
            else:
                amount = current
            granted[key] = amount
            requested[key] = target
            minimum[key] = min(minimum.get(key, amount), amount)
        new = replace(
            lease,
            granted=granted,
            requested=requested,
            minimum=minimum,
            usage=dict(usage) if usage is not None else lease.usage,
        )
        self.leases[lease_id] = new
        return new, self._pump()

    def tick(self) -> Change:
        """Each daemon tick: expiries, then the queue (the capacity may have changed)."""
        return self.expire()

    # ---- internals ------------------------------------------------------------------------

    def _pump(self) -> Change:
        """Admit queued asks from the head while they fit; stop at the first that does not."""
        change = Change()
        now_s = self._clock()
        while self.queue:
            head = self.queue[0]
            amounts = fit(head.requested, head.minimum, self.available())
            if amounts is None:
                break
            self.queue.pop(0)
            lease = Lease(
                id=head.id,
                owner_uid=head.owner_uid,
                owner_pid=head.owner_pid,
                target_pid=head.target_pid,
                klass=head.klass,
                granted=amounts,
                requested=head.requested,
                minimum=head.minimum,
                connection=head.connection,
                granted_at_s=now_s,
                deadline_s=now_s + head.ttl_s if head.ttl_s is not None else None,
                gpu=head.gpu,
            )
            self.leases[lease.id] = lease
            change.granted.append(Granted(lease, head))
        return change

    def visible_to(self, uid: int | None) -> Iterable[Lease]:
        """Leases of ``uid`` (all of them for None: root or edged-admin)."""
        return [lease for lease in self.leases.values() if uid is None or lease.owner_uid == uid]


def is_finite_amount(value: object) -> bool:
    """A number usable as an amount: int or float, not bool, finite, not negative."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )
