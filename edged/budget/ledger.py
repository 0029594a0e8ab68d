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

Elastic growth
    A lease granted less than it asked (elastic: only its ``min`` fitted, or a ``budget.update``
    asked more than was free) is raised toward what it asked whenever capacity frees up
    (a release, an expiry, a resize, a capacity change; re-tried on every tick). Queued requests
    come first: the queue is admitted before anything grows, and a resource that any queued
    request asks for is not given to growth at all (a waiting request must not starve while
    elastic leases soak up what frees). What is free is then shared by class (critical, then
    normal, then besteffort) and, within a class, by max-min fairness: each elastic lease gets an
    equal part, none more than it lacks, and what a lease does not need goes to the others.

Lending idle budget (``Lending``; off unless the ledger is given one)
    A lease *lends* a resource when it holds all it asked of it, borrows none of it, and its
    usage (the larger of its last ``budget.update`` report and the daemon's measurement, see
    :meth:`Ledger.observe`) has stayed at or below ``idle_fraction`` of its grant for
    ``idle_after_s``; it lends the rest of its grant above that fraction. Loans go to elastic
    leases only, and only for the part of their grant above their ``min`` (growth): so taking a
    loan back never takes a lease below its ``min``, and a queued request (which waits for its
    ``min`` in real free capacity) never waits longer because of a loan. A lender keeps its own
    grant (and its enforced limit) throughout: loans are an overcommit backed by its idleness,
    and it takes its budget back simply by using it (usage above the fraction, reported or
    measured) or by any ``budget.update`` with ``resources``. Its loans of that resource are
    then *recalled*: each borrower is told to come down by what it borrowed within
    ``notice_s`` (a :class:`Recall`, sent as ``budget.shrink`` with reason ``reclaim``); a
    borrower that lowers its grant by then settles its loans; at the deadline the ledger lowers
    the borrower's grant by what is still lent (``Change.reclaimed``). A lender that releases
    or lowers its grant gives the capacity it held up, so its loans become the borrowers' own
    (a recall in progress is then called off: ``Change.grown`` with the grant unchanged).

Accounting: ``granted_total`` counts every grant, borrowed parts included; ``available`` (what
a new request or own growth may take) is the usable capacity minus the grants that are not
loans, so loans never reduce what a queued request can get, and the sum of grants minus loans
never exceeds the usable capacity (unless the capacity itself shrank).

Every operation returns the :class:`Change` it caused (grants of queued requests, time-outs,
revocations, growth, recalls and reclaims), so the caller (the daemon) can notify the clients
concerned; the ledger itself never talks to anyone.
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


@dataclass(frozen=True)
class Lending:
    """When idle budget is lent and how long a borrower has to give it back."""

    idle_after_s: float = 30.0  # usage at or below the fraction this long: idle
    idle_fraction: float = 0.5  # idle below this share of the grant; the rest is lent
    notice_s: float = 5.0  # a borrower's time to give a recalled loan back

    def __post_init__(self) -> None:
        if not 0 < self.idle_fraction < 1:
            raise ValueError("idle_fraction must be in (0, 1)")
        if self.idle_after_s < 0 or self.notice_s < 0:
            raise ValueError("idle_after_s and notice_s must be >= 0")


@dataclass(frozen=True)
class Loan:
    """``amount`` of ``resource`` of the lender's grant, part of the borrower's grant.
    ``recall_deadline_s`` (clock time) is set once the lender wants it back."""

    lender: int
    borrower: int
    resource: str
    amount: float
    recall_deadline_s: float | None = None


@dataclass(frozen=True)
class Recall:
    """A borrower told to come down to ``target`` (per resource recalled) by ``deadline_s``
    (clock time): its loans of those resources are being taken back."""

    lease: Lease
    target: Amounts
    deadline_s: float


@dataclass
class Change:
    """What an operation did besides its own answer."""

    granted: list[Granted] = field(default_factory=list)  # queued asks admitted now
    timed_out: list[Ask] = field(default_factory=list)  # asks whose wait ran out
    revoked: list[Lease] = field(default_factory=list)  # leases whose ttl ran out
    released: list[Lease] = field(default_factory=list)  # leases ended by release/close
    cancelled: list[Ask] = field(default_factory=list)  # asks dropped with their connection
    # leases whose grant rose (growth, a loan), or whose recall was called off (grant kept)
    grown: list[Lease] = field(default_factory=list)
    recalled: list[Recall] = field(default_factory=list)  # borrowers asked to give loans back
    reclaimed: list[Lease] = field(default_factory=list)  # borrowers lowered at the deadline

    def current(self, leases: Mapping[int, Lease]) -> Change:
        """Each lease once in ``grown`` and ``reclaimed``, as it stands now (one operation may
        grow a lease twice, or reclaim and grow it); leases that ended are dropped."""
        for name in ("grown", "reclaimed"):
            ids = dict.fromkeys(lease.id for lease in getattr(self, name))
            setattr(self, name, [leases[i] for i in ids if i in leases])
        return self

    def merge(self, other: Change) -> Change:
        self.granted += other.granted
        self.timed_out += other.timed_out
        self.revoked += other.revoked
        self.released += other.released
        self.cancelled += other.cancelled
        self.grown += other.grown
        self.recalled += other.recalled
        self.reclaimed += other.reclaimed
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
    """Leases and the wait queue against a capacity and a reserve (both per resource); with
    ``lending``, idle budget lent to elastic leases and recalled with notice."""

    def __init__(
        self,
        capacity: Amounts,
        reserve: Amounts | None,
        clock: Callable[[], float],
        lending: Lending | None = None,
    ) -> None:
        self.capacity: dict[str, float] = dict(capacity)
        self.reserve: dict[str, float] = dict(reserve or {})
        self._clock = clock  # monotonic seconds; deadlines are on this clock
        self.lending = lending  # None: nothing is lent
        self.leases: dict[int, Lease] = {}
        self.queue: list[Ask] = []  # kept in admission order (class, then arrival)
        self.loans: list[Loan] = []  # in the order they were made
        self.measured: dict[int, dict[str, float]] = {}  # lease -> the daemon's measurement
        self._idle_since: dict[tuple[int, str], float] = {}  # (lease, resource) -> clock time
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
        """Every grant summed, borrowed parts included."""
        total = dict.fromkeys(RESOURCES, 0.0)
        for lease in self.leases.values():
            for key, amount in lease.granted.items():
                total[key] = total.get(key, 0.0) + amount
        return total

    def borrowed_total(self) -> dict[str, float]:
        """What is out on loan, per resource."""
        total = dict.fromkeys(RESOURCES, 0.0)
        for loan in self.loans:
            total[loan.resource] += loan.amount
        return total

    def available(self) -> dict[str, float]:
        """What a request could get now: usable minus the grants that are not loans (never
        negative). A resource with no capacity known (no GPU) has 0 available."""
        granted = self.granted_total()
        borrowed = self.borrowed_total()
        usable = self.usable()
        return {
            key: max(0.0, usable.get(key, 0.0) - (granted[key] - borrowed[key]))
            for key in RESOURCES
        }

    def lendable(self) -> dict[str, float]:
        """What idle leases could lend now on top of what they lend already."""
        sums = _LoanSums(self.loans)
        now_s = self._clock()
        total = dict.fromkeys(RESOURCES, 0.0)
        for lease in self.leases.values():
            for key in lease.granted:
                total[key] += self._lendable_of(lease, key, now_s, sums)
        return total

    def lent_by(self, lease_id: int) -> dict[str, float]:
        """What a lease has out on loan, per resource."""
        out: dict[str, float] = {}
        for loan in self.loans:
            if loan.lender == lease_id:
                out[loan.resource] = out.get(loan.resource, 0.0) + loan.amount
        return out

    def borrowed_by(self, lease_id: int) -> dict[str, float]:
        """The borrowed part of a lease's grant, per resource."""
        out: dict[str, float] = {}
        for loan in self.loans:
            if loan.borrower == lease_id:
                out[loan.resource] = out.get(loan.resource, 0.0) + loan.amount
        return out

    def recalled_of(self, lease_id: int) -> dict[str, float]:
        """What a borrower has been told to give back and still holds, per resource."""
        out: dict[str, float] = {}
        for loan in self.loans:
            if loan.borrower == lease_id and loan.recall_deadline_s is not None:
                out[loan.resource] = out.get(loan.resource, 0.0) + loan.amount
        return out

    def set_lending(self, lending: Lending | None) -> Change:
        """New lending settings (a reload). Turned off, every loan is recalled with the old
        notice and nothing more is lent."""
        change = Change()
        if lending is None and self.lending is not None:
            for lender in sorted({loan.lender for loan in self.loans}):
                change.merge(self._recall(lender, RESOURCES))
        self.lending = lending
        return change

    def set_capacity(self, capacity: Amounts, reserve: Amounts | None = None) -> Change:
        """New totals (each tick: a limit reloaded, a GPU appeared); re-tries the queue and
        growth. Leases already granted are kept even if the new capacity no longer covers
        them."""
        self.capacity = dict(capacity)
        if reserve is not None:
            self.reserve = dict(reserve)
        return self._pump().current(self.leases)

    def next_deadline_s(self) -> float | None:
        """The earliest ttl, wait or recall deadline, for the caller's timer."""
        deadlines = [a.wait_deadline_s for a in self.queue]
        deadlines += [lease.deadline_s for lease in self.leases.values() if lease.deadline_s]
        deadlines += [loan.recall_deadline_s for loan in self.loans if loan.recall_deadline_s]
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
        above what is requested. An elastic grant grows later (the next release, tick...)."""
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
        """End a lease; the queue and growth are re-tried. Raises NoSuchLease."""
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            raise NoSuchLease(lease_id)
        touched = self._forget(lease_id)
        change = Change(released=[lease])
        change.merge(self._tell(touched, touched))
        return change.merge(self._pump()).current(self.leases)

    def close(self, connection: int) -> Change:
        """A connection closed: its leases are released and its queued asks dropped."""
        change = Change()
        touched: set[int] = set()
        for lease_id, lease in list(self.leases.items()):
            if lease.connection == connection:
                del self.leases[lease_id]
                touched |= self._forget(lease_id)
                change.released.append(lease)
        kept: list[Ask] = []
        for ask in self.queue:
            (change.cancelled if ask.connection == connection else kept).append(ask)
        self.queue = kept
        change.merge(self._tell(touched, touched))
        return change.merge(self._pump()).current(self.leases)

    def expire(self) -> Change:
        """Revoke leases past their ttl, time out asks past their wait, take back recalled
        loans past their notice, re-try the queue and growth."""
        now_s = self._clock()
        change = Change()
        touched: set[int] = set()
        for lease_id, lease in list(self.leases.items()):
            if lease.deadline_s is not None and lease.deadline_s <= now_s:
                del self.leases[lease_id]
                touched |= self._forget(lease_id)
                change.revoked.append(lease)
        kept: list[Ask] = []
        for ask in self.queue:
            (change.timed_out if ask.wait_deadline_s <= now_s else kept).append(ask)
        self.queue = kept
        change.merge(self._tell(touched, touched))
        reclaimed: list[int] = []
        for loan in list(self.loans):
            if loan.recall_deadline_s is None or loan.recall_deadline_s > now_s:
                continue
            self.loans.remove(loan)
            lease = self.leases[loan.borrower]
            amount = max(
                lease.minimum.get(loan.resource, 0.0), lease.granted[loan.resource] - loan.amount
            )
            self._set_grant(lease.id, loan.resource, amount)
            if lease.id not in reclaimed:
                reclaimed.append(lease.id)
        change.reclaimed += [self.leases[i] for i in reclaimed]
        return change.merge(self._pump()).current(self.leases)

    def update(
        self,
        lease_id: int,
        resources: Amounts | None = None,
        usage: Amounts | None = None,
    ) -> tuple[Lease, Change]:
        """Resize a lease and/or store a usage report. A resource asked lower is lowered at
        once (a borrower gives back its loans first; a lender's loans become the borrowers'
        own; the queue is re-tried). One asked higher grows at once by what is free, unless a
        queued request asks for that resource (waiting requests come first); what it still
        lacks it may get later by growth. Any resize of a resource a lease lends recalls its
        loans of it (the lender wants its budget back) and restarts its idle clock. Raises
        NoSuchLease, or ValueError for an unknown resource."""
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
        blocked = {key for ask in self.queue for key in ask.requested}
        touched: set[int] = set()
        lent = self.lent_by(lease_id)
        for key, target in (resources or {}).items():
            current = granted.get(key, 0.0)
            if target <= current:
                amount = target
                # given back: borrowed loans first, then what it lent becomes the borrowers'
                left, _ = self._reduce_loans(key, current - amount, borrower=lease_id)
                touched |= self._reduce_loans(key, left, lender=lease_id)[1]
            elif key not in blocked:
                amount = current + min(target - current, available.get(key, 0.0))
            else:
                amount = current
            granted[key] = amount
            requested[key] = target
            minimum[key] = min(minimum.get(key, amount), amount)
            self._idle_since.pop((lease_id, key), None)
        self.leases[lease_id] = replace(
            lease,
            granted=granted,
            requested=requested,
            minimum=minimum,
            usage=dict(usage) if usage is not None else lease.usage,
        )
        change = self._tell(touched, touched)
        change.merge(self._recall(lease_id, [k for k in (resources or {}) if k in lent]))
        change.merge(self._check_idle(lease_id))
        change.merge(self._pump()).current(self.leases)
        return self.leases[lease_id], change

    def observe(self, lease_id: int, measured: Amounts) -> Change:
        """The daemon's measurement of what a lease's process uses (memory from its RSS, GPU
        memory from NVML), each tick: a lender whose use rises above the idle fraction has its
        loans recalled. Unknown leases are ignored (ended between sample and call)."""
        if lease_id not in self.leases:
            return Change()
        self.measured[lease_id] = {k: v for k, v in measured.items() if k in RESOURCES}
        return self._check_idle(lease_id)

    def tick(self) -> Change:
        """Each daemon tick: expiries, then the queue (the capacity may have changed)."""
        return self.expire()

    def visible_to(self, uid: int | None) -> Iterable[Lease]:
        """Leases of ``uid`` (all of them for None: root or edged-admin)."""
        return [lease for lease in self.leases.values() if uid is None or lease.owner_uid == uid]

    # ---- internals: queue and growth ------------------------------------------------------

    def _pump(self) -> Change:
        """Admit queued asks from the head while they fit (stop at the first that does not),
        then grow elastic leases."""
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
        return change.merge(self._grow())

    def _tiny(self, key: str) -> float:
        """Amounts below this are rounding, not growth (a float sum of byte counts near
        2**34 is only exact to a few microbytes)."""
        return _EPSILON * max(1.0, self.usable().get(key, 0.0))

    def _grow(self) -> Change:
        """Raise elastic leases toward what they asked: first from free capacity (per resource
        no queued request asks for), then from what idle leases lend."""
        grown: set[int] = set()
        blocked = {key for ask in self.queue for key in ask.requested}
        now_s = self._clock()
        for key in RESOURCES:
            tiny = self._tiny(key)
            if key not in blocked:
                wanting = self._wanting(key, tiny)
                for lease_id, extra in _share(wanting, self.available()[key], tiny).items():
                    self._raise(lease_id, key, extra, tiny)
                    grown.add(lease_id)
            if self.lending is None:
                continue
            wanting = self._wanting(key, tiny)
            if not wanting:
                continue
            sums = _LoanSums(self.loans)
            pool = [
                (lease.id, self._lendable_of(lease, key, now_s, sums))
                for lease in sorted(self.leases.values(), key=lambda x: x.id)
            ]
            pool = [(i, amount) for i, amount in pool if amount > tiny]
            shares = _share(wanting, sum(amount for _, amount in pool), tiny)
            for borrower, share in shares.items():
                extra = self._raise(borrower, key, share, tiny)
                grown.add(borrower)
                while extra > tiny and pool:
                    lender, amount = pool[0]
                    taken = min(amount, extra)
                    self._lend(lender, borrower, key, taken)
                    extra -= taken
                    if amount - taken > tiny:
                        pool[0] = (lender, amount - taken)
                    else:
                        pool.pop(0)
        return Change(grown=[self.leases[i] for i in sorted(grown)])

    def _wanting(self, key: str, tiny: float) -> list[tuple[int, int, float]]:
        """(class rank, lease id, what it lacks) of every elastic lease on ``key``."""
        out = []
        for lease in self.leases.values():
            lacks = lease.requested.get(key, 0.0) - lease.granted.get(key, 0.0)
            if lacks > tiny:
                out.append((CLASS_ORDER[lease.klass], lease.id, lacks))
        return sorted(out)

    def _raise(self, lease_id: int, key: str, extra: float, tiny: float) -> float:
        """Add ``extra`` to a grant (capped at what it asked); returns what was added."""
        lease = self.leases[lease_id]
        current = lease.granted.get(key, 0.0)
        asked = lease.requested[key]
        amount = asked if asked - (current + extra) <= tiny else current + extra
        self._set_grant(lease_id, key, amount)
        return amount - current

    def _set_grant(self, lease_id: int, key: str, amount: float) -> None:
        lease = self.leases[lease_id]
        self.leases[lease_id] = replace(lease, granted={**lease.granted, key: amount})

    # ---- internals: lending ---------------------------------------------------------------

    def _usage_of(self, lease: Lease, key: str) -> float | None:
        """The larger of the lease's report and the daemon's measurement (None: neither)."""
        known = [x[key] for x in (lease.usage, self.measured.get(lease.id, {})) if key in x]
        return max(known) if known else None

    def _lendable_of(self, lease: Lease, key: str, now_s: float, sums: _LoanSums) -> float:
        """What ``lease`` could lend of ``key`` now beyond what it lends already."""
        if self.lending is None:
            return 0.0
        granted = lease.granted.get(key, 0.0)
        if granted <= 0 or lease.requested.get(key, 0.0) - granted > self._tiny(key):
            return 0.0  # wants more itself
        since_s = self._idle_since.get((lease.id, key))
        if since_s is None or now_s - since_s < self.lending.idle_after_s - 1e-9:
            return 0.0
        if (lease.id, key) in sums.borrowed or (lease.id, key) in sums.recalling:
            return 0.0
        lent = sums.lent.get((lease.id, key), 0.0)
        return max(0.0, granted * (1.0 - self.lending.idle_fraction) - lent)

    def _lend(self, lender: int, borrower: int, key: str, amount: float) -> None:
        for i, loan in enumerate(self.loans):
            if (loan.lender, loan.borrower, loan.resource) == (lender, borrower, key) and (
                loan.recall_deadline_s is None
            ):
                self.loans[i] = replace(loan, amount=loan.amount + amount)
                return
        self.loans.append(Loan(lender, borrower, key, amount))

    def _check_idle(self, lease_id: int) -> Change:
        """Start or stop a lease's idle clock per resource from its usage; a lease no longer
        idle on a resource has its loans of it recalled."""
        if self.lending is None:
            return Change()
        lease = self.leases[lease_id]
        now_s = self._clock()
        busy: list[str] = []
        for key, granted in lease.granted.items():
            used = self._usage_of(lease, key)
            idle_at = self.lending.idle_fraction * granted
            if used is not None and granted > 0 and used <= idle_at + self._tiny(key):
                self._idle_since.setdefault((lease_id, key), now_s)
            else:
                self._idle_since.pop((lease_id, key), None)
                busy.append(key)
        return self._recall(lease_id, busy)

    def _recall(self, lender: int, keys: Iterable[str]) -> Change:
        """Recall ``lender``'s loans of ``keys`` that are not recalled yet."""
        keys = set(keys)
        if not keys or self.lending is None:  # (no lending: no loans, or all recalled)
            return Change()
        deadline_s = self._clock() + self.lending.notice_s
        touched: set[int] = set()
        for i, loan in enumerate(self.loans):
            if loan.lender == lender and loan.resource in keys and loan.recall_deadline_s is None:
                self.loans[i] = replace(loan, recall_deadline_s=deadline_s)
                touched.add(loan.borrower)
        return self._tell(touched, set())

    def _reduce_loans(
        self, key: str, amount: float, *, borrower: int | None = None, lender: int | None = None
    ) -> tuple[float, set[int]]:
        """Take up to ``amount`` off the loans of ``key`` of this borrower (given back) or this
        lender (become the borrower's own), recalled ones first; returns what was left of
        ``amount`` and the borrowers whose recalled loans changed."""
        touched: set[int] = set()
        order = sorted(
            (i for i, x in enumerate(self.loans) if x.resource == key
             and (x.borrower == borrower or x.lender == lender)),
            key=lambda i: self.loans[i].recall_deadline_s is None,
        )  # fmt: skip
        dropped: set[int] = set()
        for i in order:
            if amount <= 0:
                break
            loan = self.loans[i]
            taken = min(loan.amount, amount)
            amount -= taken
            if loan.recall_deadline_s is not None:
                touched.add(loan.borrower)
            if loan.amount - taken <= self._tiny(key):
                dropped.add(i)
            else:
                self.loans[i] = replace(loan, amount=loan.amount - taken)
        self.loans = [x for i, x in enumerate(self.loans) if i not in dropped]
        return max(0.0, amount), touched

    def _forget(self, lease_id: int) -> set[int]:
        """A lease ended: what it borrowed is free again, what it lent becomes the borrowers'
        own. Returns the borrowers whose recalled loans were among them."""
        touched = {x.borrower for x in self.loans if x.lender == lease_id and x.recall_deadline_s}
        self.loans = [x for x in self.loans if lease_id not in (x.lender, x.borrower)]
        self.measured.pop(lease_id, None)
        for key in RESOURCES:
            self._idle_since.pop((lease_id, key), None)
        return touched

    def _tell(self, touched: set[int], was_recalled: set[int]) -> Change:
        """For each borrower in ``touched``: a Recall with its target (its grant less what is
        recalled) and the earliest deadline, or, if nothing is recalled any more and it was,
        the call-off (``grown``, grant unchanged)."""
        change = Change()
        for borrower in sorted(touched):
            lease = self.leases.get(borrower)
            if lease is None:
                continue
            recalled = [x for x in self.loans if x.borrower == borrower and x.recall_deadline_s]
            if recalled:
                target: dict[str, float] = {}
                for loan in recalled:
                    target[loan.resource] = target.get(loan.resource, 0.0) + loan.amount
                target = {k: lease.granted[k] - v for k, v in target.items()}
                deadline_s = min(x.recall_deadline_s or 0.0 for x in recalled)
                change.recalled.append(Recall(lease, target, deadline_s))
            elif borrower in was_recalled:
                change.grown.append(lease)
        return change


class _LoanSums:
    """Loans summed per (lease, resource), for lookups in a loop over leases."""

    def __init__(self, loans: Iterable[Loan]) -> None:
        self.lent: dict[tuple[int, str], float] = {}
        self.borrowed: dict[tuple[int, str], float] = {}
        self.recalling: set[tuple[int, str]] = set()  # (lender, resource) with a loan recalled
        for loan in loans:
            lender = (loan.lender, loan.resource)
            borrower = (loan.borrower, loan.resource)
            self.lent[lender] = self.lent.get(lender, 0.0) + loan.amount
            self.borrowed[borrower] = self.borrowed.get(borrower, 0.0) + loan.amount
            if loan.recall_deadline_s is not None:
                self.recalling.add(lender)


def _share(wanting: list[tuple[int, int, float]], amount: float, tiny: float) -> dict[int, float]:
    """Split ``amount`` among (class rank, lease id, what it lacks): class by class, and
    within a class by max-min fairness (water-filling: an equal part each, none more than it
    lacks, what one does not need shared by the rest)."""
    out: dict[int, float] = {}
    left = amount
    for rank in sorted({w[0] for w in wanting}):
        if left <= tiny:
            break
        group = sorted((lacks, lease_id) for r, lease_id, lacks in wanting if r == rank)
        while group and left > tiny:
            part = left / len(group)
            lacks, lease_id = group[0]
            if lacks <= part:
                out[lease_id] = lacks
                left -= lacks
                group.pop(0)
                continue
            for _, lease_id in group:
                out[lease_id] = part
            left = 0.0
    return out


def is_finite_amount(value: object) -> bool:
    """A number usable as an amount: int or float, not bool, finite, not negative."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )
