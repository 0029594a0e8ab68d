"""The decide-and-enforce half of a tick: State -> alerts, strategy -> enforcer -> events.

The controller is the one place that knows what edged has imposed (so strategies can lift it)
and the one place actions become events: a log line, an ``edged.actions`` increment (through
``on_event``) and an entry in the bounded events ring that ``edged events`` reads. Alert
transitions (:mod:`edged.alerts`) go into the same ring, as events with ``action="alert"``.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec

from edged.alerts import Alert, AlertState, AlertTracker, describe
from edged.config import Limits
from edged.enforce.enforcer import Enforcer, Outcome, Status
from edged.enforce.signals import EnforceError
from edged.policy.base import (
    Action,
    ActionKind,
    Imposed,
    Limit,
    ProcessClass,
    Resource,
    State,
    Strategy,
)
from edged.policy.inputs import build_state
from edged.snapshot import Reading, Snapshot

log = logging.getLogger(__name__)

_IMPOSING = {ActionKind.THROTTLE: ActionKind.THROTTLE, ActionKind.FREEZE: ActionKind.FREEZE}
_LIFTING = {ActionKind.UNTHROTTLE: ActionKind.THROTTLE, ActionKind.THAW: ActionKind.FREEZE}
_ENDING = (ActionKind.TERMINATE, ActionKind.KILL)


ALERT_ACTION = "alert"
STRATEGY_ACTION = "strategy"
# the reason of the unthrottle/thaw events that undo an old strategy's work after a switch
SWITCH_REASON = "strategy-switch"
# while edged holds anything, groups and units of exited processes are looked for this often
GC_INTERVAL_S = 5.0


class Event(msgspec.Struct, frozen=True):
    """One action and what became of it, as ``events`` returns it.

    An alert transition has the same shape: ``action="alert"``, ``pid=0``, ``resource``,
    ``reason`` = the severity (warning, critical), ``status`` = the state it entered (pending,
    firing, resolved), ``detail`` = the usage against the level; ``strategy`` and ``klass``
    are empty.

    A strategy switch (``strategy.set``, or a reload that changed ``[strategy]``) has
    ``action="strategy"``, ``pid=0``, ``resource=""``, ``reason`` = what switched it (``set``,
    ``reload``), ``strategy`` = the new strategy, ``status="done"``, ``detail`` = ``old -> new``
    and who asked.
    """

    seq: int
    time_unix_ns: int
    action: str
    pid: int
    resource: str
    reason: str
    strategy: str
    klass: str
    status: str  # done | skipped | failed | dry_run; alerts: pending | firing | resolved
    detail: str = ""
    outcome: str = ""  # the skip reason or the error
    reaction_s: float | None = None
    gpu: str = ""  # the GPU (UUID) of a power-limit action; pid is then 0


@dataclass
class Controller:
    """Runs one strategy against one enforcer."""

    strategy: Strategy
    enforcer: Enforcer
    limits: Limits
    on_event: Callable[[Event], None] = lambda event: None
    events_capacity: int = 1000
    alerts: AlertTracker = field(default_factory=AlertTracker)
    scoped: bool = False  # [scope] cgroup set: memory and CPU are the governed group's
    # delivers a NOTIFY to its client as budget.shrink; True when it was sent (the server's)
    notify: Callable[[Action], bool] | None = None

    def __post_init__(self) -> None:
        self.events: deque[Event] = deque(maxlen=self.events_capacity)
        self._seq = 0
        # (pid, kind, resource, gpu uuid or None) -> what is in force
        self.imposed: dict[tuple[int, ActionKind, Resource, str | None], Imposed] = {}
        self.last_state: State | None = None
        # cumulative edged.actions per attribute set, exported as an observable counter
        self.action_counts: dict[tuple[str, str, str, str], int] = {}
        # (monotonic s, unix ns) of the last snapshot: turns alert times into wall-clock times
        self._clock: tuple[float, int] | None = None
        # after a switch to a strategy that does not adopt what is imposed: the old
        # strategy's name, whose throttles and freezes the next tick lifts
        self._lift_for: str | None = None
        self._gc_at_s = -math.inf  # the last Enforcer.gc (see _collect)

    def step(
        self, snapshot: Snapshot, interval_s: float, start_ticks: Mapping[int, int]
    ) -> list[Event]:
        """Evaluate the alerts, then decide on this snapshot and act. Imposed entries of
        processes that are gone are dropped first (the kernel undid them when the process
        exited); GPU limits stay. Returns the action events (alert transitions go to the ring
        only)."""
        gone = [k for k in self.imposed if k[3] is None and k[0] not in start_ticks]
        for key in gone:
            del self.imposed[key]
        self._collect(snapshot.monotonic_s, bool(gone))
        lever = self.enforcer.gpus
        state = build_state(
            snapshot,
            self.limits,
            interval_s,
            start_ticks,
            imposed=tuple(self.imposed.values()),
            reaction_time_s=self.enforcer.reaction_time_s,
            gpu_constraints_w=lever.constraints_w() if lever is not None else None,
            scoped=self.scoped,
        )
        self.last_state = state
        self._clock = (snapshot.monotonic_s, snapshot.time_unix_ns)
        for transition in self.alerts.update(state.now_s, state.usage, state.limits):
            self._alert_event(transition, snapshot.time_unix_ns)
        events: list[Event] = []
        if self._lift_for is not None:
            lifts = self._lifts(state, self._lift_for, start_ticks)
            events = [self._apply(a, state) for a in lifts]
            self._lift_for = None
            state = replace(state, imposed=tuple(self.imposed.values()))
            self.last_state = state
        actions = self.strategy.decide(state)
        return events + [self._apply(action, state) for action in actions]

    def _collect(self, now_s: float, someone_left: bool) -> None:
        """Lift what edged imposed on processes that have exited (a unit's MemoryHigh, a
        child group under another manager's group, edged's own ``pid-N`` groups): at once
        when a victim left, else every ``GC_INTERVAL_S`` while anything is recorded. A
        killed hog's unit must not keep edged's limit into its restart."""
        data = self.enforcer.store.data
        if self.enforcer.dry_run or not (data.groups or data.units or data.stopped):
            return
        if not someone_left and now_s - self._gc_at_s < GC_INTERVAL_S:
            return
        self._gc_at_s = now_s
        try:
            removed = self.enforcer.gc()
        except EnforceError as exc:
            log.warning("gc: %s", exc)
            return
        if removed:
            log.info("gc: removed %d group(s) of exited processes", removed)

    def switch(self, strategy: Strategy, reason: str, who: str = "") -> Event:
        """Decide with ``strategy`` from the next tick on; returns the switch event.

        What the old strategy imposed is not left without an owner: a strategy that lifts
        the throttles and freezes it finds in ``State.imposed`` (``adopts_imposed``: dynamic,
        predictive, cooperative) takes them over and lifts them with its own hysteresis; for
        one that does not (adaptive only undoes what it sent itself), the next tick lifts
        them all (unthrottle/thaw events, reason ``strategy-switch``) before it decides, as a
        restart would. Pending terminations of the old strategy are not carried over: the new
        one decides from the reading."""
        old = self.strategy.name
        self.strategy = strategy
        held = len(self.imposed)
        if getattr(strategy, "adopts_imposed", False):
            self._lift_for = None
            fate = f"{held} throttles/freezes handed over" if held else ""
        else:
            self._lift_for = old if self._lift_for is None else self._lift_for
            fate = f"{held} throttles/freezes lifted at the next tick" if held else ""
        detail = f"{old} -> {strategy.name}" + (f" ({who})" if who else "")
        if fate:
            detail += f"; {fate}"
        self._seq += 1
        event = Event(
            seq=self._seq,
            time_unix_ns=time.time_ns(),
            action=STRATEGY_ACTION,
            pid=0,
            resource="",
            reason=reason,
            strategy=strategy.name,
            klass="",
            status=Status.DONE.value,
            detail=detail,
        )
        self.events.append(event)
        log.warning("strategy switched: %s", detail)
        self.on_event(event)
        return event

    def _lifts(self, state: State, strategy: str, start_ticks: Mapping[int, int]) -> list[Action]:
        """UNTHROTTLE/THAW for everything imposed, freezes first (a frozen process cannot
        use the memory or CPU a lifted throttle gives back anyway)."""
        views = {p.pid: p for p in state.processes}
        out: list[Action] = []
        for (pid, kind, resource, gpu), imposed in sorted(
            self.imposed.items(), key=lambda kv: kv[0][1] is not ActionKind.FREEZE
        ):
            view = views.get(pid)
            out.append(
                Action(
                    kind=ActionKind.THAW if kind is ActionKind.FREEZE else ActionKind.UNTHROTTLE,
                    pid=pid,
                    resource=resource,
                    reason=SWITCH_REASON,
                    strategy=strategy,
                    klass=view.klass if view is not None else ProcessClass.NORMAL,
                    start_ticks=start_ticks.get(pid, 0),
                    gpu=gpu,
                    detail=f"imposed since {imposed.since_s:.1f}s; the new strategy does not "
                    "take it over",
                )
            )
        return out

    def _apply(self, action: Action, state: State) -> Event:
        if action.kind is ActionKind.NOTIFY:
            return self._event(action, self._notify(action))
        outcome = self.enforcer.apply(action, decided_at_s=state.now_s)
        if outcome.status in (Status.DONE, Status.DRY_RUN):
            self._track(action, state.now_s)
        return self._event(action, outcome)

    def _notify(self, action: Action) -> Outcome:
        """A NOTIFY goes to the client through the server (``budget.shrink``), not the
        enforcer: done when ``notify`` delivered it, skipped when there is no server or the
        client is not connected (the strategy escalates when its deadline passes)."""
        if self.notify is None:
            return Outcome.skipped("no budget server to deliver it")
        if self.enforcer.dry_run:
            return Outcome.dry_run()
        if not self.notify(action):
            return Outcome.skipped("the client is not connected")
        return Outcome.done(0.0)

    def _track(self, action: Action, now_s: float) -> None:
        if action.kind in _IMPOSING:
            key = (action.pid, action.kind, action.resource, action.gpu)
            previous = self.imposed.get(key)
            since = previous.since_s if previous else now_s
            self.imposed[key] = Imposed(
                action.kind, action.pid, action.resource, since, action.target, action.gpu
            )
        elif action.kind in _LIFTING:
            key = (action.pid, _LIFTING[action.kind], action.resource, action.gpu)
            self.imposed.pop(key, None)
        elif action.kind is ActionKind.KILL:
            for key in [k for k in self.imposed if k[0] == action.pid]:
                del self.imposed[key]

    def _event(self, action: Action, outcome: Outcome) -> Event:
        self._seq += 1
        event = Event(
            seq=self._seq,
            time_unix_ns=time.time_ns(),
            action=action.kind.value,
            pid=action.pid,
            resource=action.resource.value,
            reason=action.reason,
            strategy=action.strategy,
            klass=action.klass.value,
            status=outcome.status.value,
            detail=action.detail,
            outcome=outcome.reason,
            reaction_s=outcome.reaction_s,
            gpu=action.gpu or "",
        )
        self.events.append(event)
        if outcome.status in (Status.DONE, Status.DRY_RUN):
            key = (event.action, event.reason, event.strategy, event.klass)
            self.action_counts[key] = self.action_counts.get(key, 0) + 1
        level = logging.WARNING if outcome.status is Status.FAILED else logging.INFO
        log.log(
            level,
            "%s %s %s (%s, %s, class %s): %s%s%s",
            event.status,
            event.action,
            f"gpu={event.gpu}" if event.gpu else f"pid={event.pid}",
            event.resource,
            event.reason,
            event.klass,
            event.detail or "-",
            f"; {event.outcome}" if event.outcome else "",
            f"; {event.reaction_s * 1000:.1f} ms" if event.reaction_s is not None else "",
        )
        self.on_event(event)
        return event

    def _alert_event(self, alert: Alert, time_unix_ns: int) -> Event:
        self._seq += 1
        hold_s = self.alerts.hold_s(alert.severity)
        detail = describe(alert)
        if alert.state is AlertState.FIRING and hold_s > 0:
            detail += f" for {hold_s:g}s"
        event = Event(
            seq=self._seq,
            time_unix_ns=time_unix_ns,
            action=ALERT_ACTION,
            pid=0,
            resource=alert.resource.value,
            reason=alert.severity.value,
            strategy="",
            klass="",
            status=alert.state.value,
            detail=detail,
        )
        self.events.append(event)
        level = logging.WARNING if alert.state is AlertState.FIRING else logging.INFO
        log.log(level, "alert %s %s %s: %s", event.resource, event.reason, event.status, detail)
        self.on_event(event)
        return event

    def alert_status(self) -> list[dict[str, Any]]:
        """The pending and firing alerts as ``status`` returns them, with wall-clock times."""
        if self._clock is None:
            return []
        mono_s, unix_ns = self._clock

        def wall_ns(t_s: float) -> int:
            return unix_ns + round((t_s - mono_s) * 1e9)

        return [
            {
                "resource": a.resource.value,
                "severity": a.severity.value,
                "state": a.state.value,
                "since_unix_ns": wall_ns(a.state_since_s),
                "active_since_unix_ns": wall_ns(a.active_since_s),
                "active_s": round(mono_s - a.active_since_s, 3),
                "value": a.value,
                "threshold": a.threshold,
                "detail": describe(a),
            }
            for a in self.alerts.active()
        ]

    def since(self, seq: int) -> list[Event]:
        """Events after ``seq`` still in the ring (oldest first)."""
        return [e for e in self.events if e.seq > seq]


def still_needed(
    reread: Callable[[Resource], float | None], limits: Callable[[], Mapping[Resource, Limit]]
) -> Callable[[Action], bool]:
    """The enforcer's re-check: an action that imposes is dropped when a fresh read of its
    resource is back under the soft level (under hard for terminate/kill), as earlyoom does
    ("the situation recovered while selecting a victim"). Undoing is always allowed."""

    def check(action: Action) -> bool:
        if action.kind not in (
            ActionKind.THROTTLE,
            ActionKind.FREEZE,
            ActionKind.TERMINATE,
            ActionKind.KILL,
        ):
            return True
        limit = limits().get(action.resource)
        if limit is None:
            return True
        level = limit.soft if limit.soft is not None else limit.hard
        if action.kind in _ENDING and limit.hard is not None and action.reason == "hard":
            level = limit.hard
        if level is None:
            return True
        now = reread(action.resource)
        return now is None or now >= level

    return check


HEALTH_LEVELS = ("ok", "moderate", "warning", "critical")


def resource_levels(
    state: State | None,
    forecasts: Mapping[Resource, float] | None = None,
    firing: Collection[Resource] = (),
) -> dict[Resource, str]:
    """The health level of each resource that has a limit, an alert firing or a forecast:
    critical at or above hard; warning when an alert on it fires (a sustained breach) or its
    forecast reaches a hard limit within a minute; moderate at or above soft; else ok. A
    resource without a reading this tick is judged on its alert and forecast only. The
    ``pressure`` notifications carry these; ``health`` is the worst of them."""
    if state is None:
        return {}
    levels: dict[Resource, int] = {}
    for resource, limit in state.limits.items():
        used = state.usage.get(resource)
        level = 0
        if used is not None:
            if limit.hard is not None and used >= limit.hard:
                level = 3
            elif limit.soft is not None and used >= limit.soft:
                level = 1
        levels[resource] = level
    for resource in firing:
        levels[resource] = max(levels.get(resource, 0), 2)
    for resource, seconds in (forecasts or {}).items():
        if seconds < 60.0:
            levels[resource] = max(levels.get(resource, 0), 2)
    return {resource: HEALTH_LEVELS[level] for resource, level in levels.items()}


def health(
    state: State | None,
    forecasts: Mapping[Resource, float] | None = None,
    firing: Collection[Resource] = (),
) -> str:
    """The machine's level: the worst of :func:`resource_levels` (ok when there is none)."""
    levels = resource_levels(state, forecasts, firing).values()
    return max(levels, key=HEALTH_LEVELS.index, default="ok")


_ATTRS: dict[tuple[str, ...], dict[str, str]] = {}


def _attrs(*pairs: str) -> dict[str, str]:
    """One shared attribute dict per distinct set: these readings repeat every tick, and the
    history and telemetry key their series by the dicts (a fresh dict a tick is garbage)."""
    found = _ATTRS.get(pairs)
    if found is None:
        found = _ATTRS[pairs] = dict(zip(pairs[::2], pairs[1::2], strict=True))
    return found


def policy_readings(controller: Controller, forecasts: Mapping[Resource, float]) -> list[Reading]:
    """What the policy adds to a tick's snapshot: health, limits, forecasts, action counts,
    alerts."""
    state = controller.last_state
    out: list[Reading] = []
    current = health(state, forecasts, controller.alerts.firing_resources())
    for level in HEALTH_LEVELS:
        value = 1.0 if level == current else 0.0
        out.append(Reading("edged.health", value, _attrs("edged.level", level)))
    if state is not None:
        for resource, limit in state.limits.items():
            for kind, bound in (("soft", limit.soft), ("hard", limit.hard)):
                if bound is not None:
                    attrs = _attrs("edged.resource", resource.value, "edged.level", kind)
                    out.append(Reading("edged.limit", bound, attrs))
    for resource, seconds in forecasts.items():
        if seconds != float("inf"):
            attrs = _attrs("edged.resource", resource.value)
            out.append(Reading("edged.forecast.time_to_limit", seconds, attrs))
    for (action, reason, strategy, klass), count in controller.action_counts.items():
        attrs = _attrs(
            "edged.action",
            action,
            "edged.reason",
            reason,
            "edged.strategy",
            strategy,
            "edged.class",
            klass,
        )
        out.append(Reading("edged.actions", float(count), attrs))
    for resource, severity, alert_state, active in controller.alerts.series():
        attrs = _attrs(
            "edged.resource",
            resource.value,
            "edged.severity",
            severity.value,
            "edged.state",
            alert_state.value,
        )
        out.append(Reading("edged.alerts", float(active), attrs))
    return out
