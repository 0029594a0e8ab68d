"""The ``cooperative`` strategy: ask budget clients to shrink before acting on them.

Budget clients are the processes that hold a lease (``ProcessView.client`` set). Everything
else is *unmanaged* and gets dynamic's ladder, unchanged.

Fair shares
    What clients may hold together is the memory level (soft, else hard) minus what the
    unmanaged processes and the rest of the machine use. It is shared by weighted max-min
    fairness (water-filling): a client that uses less than its share keeps what it uses, and
    what it leaves is shared among the others by weight. Weights: ``normal_weight`` (2) for
    ``normal`` clients, ``besteffort_weight`` (1) for ``besteffort``.
Under pressure (memory at or above soft for ``hold_s``; at once at hard)
    each client above its fair share by more than ``tolerance`` gets a NOTIFY (the server sends
    it as ``budget.shrink`` {lease, target, deadline, reason}) with its share as the target and
    ``deadline_s`` to comply. Clients are asked most-over-share first, all that are over in one
    tick (each is asked once per notice). Nobody is asked while a process edged terminated
    for memory is still listed: its memory is about to come back, and while the kernel frees
    it the process's RSS already reads 0, so the shares would charge it to nobody and ask
    the others for it.
Compliance
    a client whose memory comes down to its target (within ``tolerance``) by the deadline is
    left alone: its notice is settled and counted in :attr:`complied`. One still above at the
    deadline goes down the ladder like an unmanaged process (throttle to its target first);
    a client that exits settles its notice.
The hard level
    is dynamic's, on every process, clients included: the kernel's OOM killer is near, and
    no notice is worth a machine.

Clients are kept out of the soft-level ladder unless they ignored a notice, so its victim is an
unmanaged process or a client that ignored its notice, never one within its share or shrinking
as asked. Idle budget lending is the ledger's job, not this
strategy's. Settings come from ``[strategy.cooperative]`` (dynamic's keys are accepted too).

================== ====== ================================================================
``deadline_s``     5 s    time to free memory on request (a training step, an ``empty_cache``)
``tolerance``      0.05   5 % above target counts as done (allocators round up)
``normal_weight``  2      a ``normal`` client's share weighs twice a ``besteffort`` one's
``besteffort_weight`` 1
================== ====== ================================================================
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edged.policy.base import (
    Action,
    ActionKind,
    ProcessClass,
    ProcessView,
    Resource,
    State,
)
from edged.policy.dynamic import DYNAMIC_DEFAULTS, DynamicStrategy
from edged.policy.victims import MIB, ProcessKey, eligible, key_of

COOPERATIVE_DEFAULTS: Mapping[str, float] = {
    **DYNAMIC_DEFAULTS,
    "deadline_s": 5.0,
    "tolerance": 0.05,
    "normal_weight": 2.0,
    "besteffort_weight": 1.0,
}


def fair_shares(
    demands: Mapping[ProcessKey, float], weights: Mapping[ProcessKey, float], capacity: float
) -> dict[ProcessKey, float]:
    """Weighted max-min fair shares of ``capacity`` for these demands (water-filling).

    Everyone whose demand is under its weighted portion of what is left gets its demand; the
    rest split the remainder in proportion to their weights. Shares sum to at most
    ``capacity`` (exactly, when demand exceeds it) and never exceed a demand.
    """
    shares: dict[ProcessKey, float] = {}
    left = max(0.0, capacity)
    open_keys = [k for k in demands if weights.get(k, 0.0) > 0]
    for k in demands:
        if weights.get(k, 0.0) <= 0:
            shares[k] = 0.0
    while open_keys:
        total_weight = sum(weights[k] for k in open_keys)
        per_weight = left / total_weight
        satisfied = [k for k in open_keys if demands[k] <= per_weight * weights[k]]
        if not satisfied:
            for k in open_keys:
                shares[k] = per_weight * weights[k]
            break
        for k in satisfied:
            shares[k] = demands[k]
            left -= demands[k]
        open_keys = [k for k in open_keys if k not in satisfied]
    return shares


@dataclass
class _Notice:
    """A shrink request sent to a client and not yet settled."""

    sent_s: float
    target_bytes: float
    escalated: bool = False


class CooperativeStrategy(DynamicStrategy):
    """Fair shares and shrink notices for clients, dynamic's ladder for the rest."""

    name = "cooperative"
    # its ladder does not see clients it spares, so it could not lift another strategy's
    # throttle on one of them: a switch to it lifts what the old strategy imposed
    adopts_imposed = False
    defaults: Mapping[str, float] = COOPERATIVE_DEFAULTS

    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        super().__init__(settings)
        s = self.settings
        if not 0 <= s["tolerance"] < 1:
            raise ValueError("[strategy.cooperative] tolerance: must be in [0, 1)")
        if s["normal_weight"] <= 0 or s["besteffort_weight"] <= 0:
            raise ValueError("[strategy.cooperative] weights must be greater than zero")
        self._notices: dict[ProcessKey, _Notice] = {}
        self._pressure_since_s: float | None = None
        self.complied = 0  # notices settled by the client shrinking in time
        self.escalated = 0  # notices that ran out: the client went down the ladder
        self.shares: dict[ProcessKey, float] = {}  # the last fair shares, bytes

    def decide(self, state: State) -> list[Action]:
        self._now_s = state.now_s  # (dynamic's clock for what it sent; set again by it below)
        usage = state.usage.get(Resource.MEMORY)
        limit = state.limits.get(Resource.MEMORY)
        clients = [p for p in state.processes if p.client and eligible(p)]
        present = {key_of(p): p for p in state.processes}
        # a victim edged sent SIGTERM/SIGKILL for memory (dynamic's bookkeeping) that is still
        # listed: its memory is about to come back
        leaving = {
            k for k, t in self._terminations.items()
            if k in present and t.resource is Resource.MEMORY
        }  # fmt: skip
        actions: list[Action] = []
        self._settle(state, present, actions, leaving)
        escalated_now = {(a.pid, a.start_ticks) for a in actions}  # throttled here, this tick
        level = None if limit is None else (limit.soft if limit.soft is not None else limit.hard)
        at_hard = (
            usage is not None and limit is not None and limit.hard is not None
            and usage >= limit.hard
        )  # fmt: skip
        if usage is not None and level is not None and clients:
            self.shares = self._shares(clients, usage, level)
            if usage >= level:
                if self._pressure_since_s is None:
                    self._pressure_since_s = state.now_s
                held_s = state.now_s - self._pressure_since_s
                if (at_hard or held_s >= self.settings["hold_s"] - 1e-9) and not leaving:
                    actions.extend(self._ask(state, clients))
            else:
                self._pressure_since_s = None
        else:
            self._pressure_since_s = None
        if at_hard:
            ladder_state = state  # everyone: the OOM killer is near
        else:
            # clients stay off the soft-level ladder unless they ignored a notice (within their
            # share: nothing to ask; asked and within the deadline: shrinking as asked); one
            # escalated on this tick has its throttle already
            ignored = {k for k, n in self._notices.items() if n.escalated} - escalated_now
            # one edged is ending stays in view, so that its SIGKILL follows after the grace
            spared = {key_of(p) for p in clients} - ignored - leaving
            ladder_state = dataclasses.replace(
                state, processes=tuple(p for p in state.processes if key_of(p) not in spared)
            )
        actions.extend(super().decide(ladder_state))
        return actions

    # ---------------------------------------------------------------- shares and notices

    def _shares(
        self, clients: Sequence[ProcessView], usage: float, level: float
    ) -> dict[ProcessKey, float]:
        """Fair shares of what clients may hold together so that the machine sits at level."""
        held = sum(p.memory_bytes for p in clients)
        room = max(0.0, level * (1.0 - self.settings["throttle_cushion"]) - (usage - held))
        weight = {
            ProcessClass.NORMAL: self.settings["normal_weight"],
            ProcessClass.BESTEFFORT: self.settings["besteffort_weight"],
        }
        return fair_shares(
            {key_of(p): p.memory_bytes for p in clients},
            {key_of(p): weight.get(p.klass, 0.0) for p in clients},
            room,
        )

    def _ask(self, state: State, clients: Sequence[ProcessView]) -> list[Action]:
        tolerance = self.settings["tolerance"]
        over = [
            p
            for p in clients
            if key_of(p) not in self._notices
            and p.memory_bytes > self.shares.get(key_of(p), math.inf) * (1 + tolerance)
        ]
        over.sort(key=lambda p: p.memory_bytes - self.shares[key_of(p)], reverse=True)
        actions = []
        for p in over:
            target = self.shares[key_of(p)]
            self._notices[key_of(p)] = _Notice(state.now_s, target)
            deadline_s = self.settings["deadline_s"]
            detail = (
                f"client {p.client} uses {p.memory_bytes / MIB:.0f} MiB, fair share "
                f"{target / MIB:.0f} MiB; shrink within {deadline_s:g} s"
            )
            notice = self._action(
                ActionKind.NOTIFY, p, Resource.MEMORY, "pressure", target=target, detail=detail
            )
            actions.append(dataclasses.replace(notice, deadline_s=deadline_s))
        return actions

    def _settle(
        self,
        state: State,
        present: Mapping[ProcessKey, ProcessView],
        actions: list[Action],
        leaving: set[ProcessKey],
    ) -> None:
        """Close notices whose client complied or left; escalate those past their deadline.
        A client edged is ending is neither (its RSS reads 0 while it exits)."""
        tolerance = self.settings["tolerance"]
        for key, notice in list(self._notices.items()):
            process = present.get(key)
            if process is None:
                del self._notices[key]
                continue
            if key in leaving:
                continue  # settled when it is gone, not counted as complied
            if process.memory_bytes <= notice.target_bytes * (1 + tolerance):
                if not notice.escalated:
                    self.complied += 1
                del self._notices[key]
                continue
            late = state.now_s - notice.sent_s >= self.settings["deadline_s"] - 1e-9
            if late and not notice.escalated:
                notice.escalated = True
                self.escalated += 1
                target = max(self.settings["min_throttle_bytes"], notice.target_bytes)
                detail = (
                    f"client {process.client} still uses {process.memory_bytes / MIB:.0f} MiB "
                    f"{self.settings['deadline_s']:g} s after being asked for "
                    f"{notice.target_bytes / MIB:.0f} MiB"
                )
                actions.append(
                    self._action(
                        ActionKind.THROTTLE,
                        process,
                        Resource.MEMORY,
                        "ignored-shrink",
                        target=target,
                        detail=detail,
                    )
                )
