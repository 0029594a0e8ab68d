"""Alerts on the configured limits: pure, clock-injected, Prometheus-like lifecycles.

Each resource with a configured limit has up to two alerting rules, one per level:

=============  =================================  ==========================================
severity       condition                          holds for
=============  =================================  ==========================================
``warning``    usage at or above ``soft``         ``[alerts] for`` (default 30 s)
``critical``   usage at or above ``hard``         ``[alerts] critical_for`` (default 0 s)
=============  =================================  ==========================================

"At or above" matches the rest of edged: ``health`` reports ``moderate``, the tick shortens
and the ``dynamic`` strategy's soft ladder starts at ``usage >= soft``.

Every rule has the lifecycle of a Prometheus alerting rule:

* inactive -> ``pending`` on the first tick its condition is true;
* ``pending`` -> ``firing`` on the first tick the condition has held for the rule's hold time
  (with a hold time of 0 the alert fires on that first tick and no ``pending`` is reported,
  as Prometheus does with ``for: 0s``);
* ``firing`` -> ``resolved`` on the first tick the condition is false; a ``pending`` alert whose
  condition clears just disappears, with no transition, so flapping shorter than the hold time
  is never reported.

The two rules of a resource are independent, as two Prometheus rules are: a climb past hard
*escalates* by raising the ``critical`` alert (at once on the default ``critical_for = 0``)
while the ``warning`` alert keeps firing, and a fall back under hard resolves only the
``critical`` one. Above hard both are active, as with Alertmanager and no inhibition rule.

A tick without a usage reading or a resolvable limit for a resource (a sensor error, a
``"90%"`` limit whose total was not read) is no evidence either way: the resource's alerts are
left exactly as they were, neither advanced nor cleared, so a failing sensor read never
resolves and re-raises an alert.

The tracker reads no clock: callers pass ``now_s`` (edged passes the snapshot's monotonic
time), so a recorded trace replayed through it gives the same transitions every time.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

from edged.policy.base import Limit, Resource

# Float slack on the hold-time comparison: 0.1 s ticks summed ten times are not exactly 1.0 s
# (the dynamic strategy compares its hold times the same way).
_EPSILON_S = 1e-9


class Severity(str, enum.Enum):
    WARNING = "warning"  # at or above soft
    CRITICAL = "critical"  # at or above hard


class AlertState(str, enum.Enum):
    """Where an alert is in its lifecycle. Only PENDING and FIRING alerts are kept;
    RESOLVED appears only in the transition that ends an alert."""

    PENDING = "pending"
    FIRING = "firing"
    RESOLVED = "resolved"


SEVERITIES: tuple[Severity, ...] = (Severity.WARNING, Severity.CRITICAL)
ACTIVE_STATES: tuple[AlertState, ...] = (AlertState.PENDING, AlertState.FIRING)


@dataclass(frozen=True)
class Alert:
    """One alert as it stands (or, in a RESOLVED transition, as it ended).

    Times are in the clock the tracker is given (monotonic seconds in edged).
    """

    resource: Resource
    severity: Severity
    state: AlertState
    active_since_s: float  # when the condition became true (Prometheus' activeAt)
    state_since_s: float  # when the alert entered ``state``
    value: float  # the latest usage seen, in the resource's base unit
    threshold: float  # the soft (warning) or hard (critical) level it is compared with


def threshold_of(limit: Limit, severity: Severity) -> float | None:
    """The level a rule compares usage with: soft for warning, hard for critical."""
    return limit.soft if severity is Severity.WARNING else limit.hard


class AlertTracker:
    """The alerts of every resource, advanced one evaluation (tick) at a time."""

    def __init__(self, for_s: float = 30.0, critical_for_s: float = 0.0) -> None:
        if for_s < 0 or critical_for_s < 0:
            raise ValueError("alert hold times cannot be negative")
        self.for_s = for_s
        self.critical_for_s = critical_for_s
        self._active: dict[tuple[Resource, Severity], Alert] = {}
        # Every rule that has had a level configured, in first-seen order: the edged.alerts
        # series are exported for these, so the set of series does not change from tick to tick.
        self._rules: dict[tuple[Resource, Severity], None] = {}

    def hold_s(self, severity: Severity) -> float:
        """How long a condition must hold before an alert of ``severity`` fires."""
        return self.for_s if severity is Severity.WARNING else self.critical_for_s

    def update(
        self, now_s: float, usage: Mapping[Resource, float], limits: Mapping[Resource, Limit]
    ) -> list[Alert]:
        """Evaluate every rule at ``now_s``; returns the transitions (pending, firing, resolved),
        in resource then severity order. ``now_s`` must not go backwards."""
        transitions: list[Alert] = []
        for resource in Resource:
            limit = limits.get(resource)
            used = usage.get(resource)
            for severity in SEVERITIES:
                key = (resource, severity)
                threshold = threshold_of(limit, severity) if limit is not None else None
                if threshold is not None:
                    self._rules.setdefault(key, None)
                if threshold is None or used is None:
                    continue  # no evidence this tick: leave the alert as it is
                changed = self._evaluate(key, now_s, used, threshold)
                if changed is not None:
                    transitions.append(changed)
        return transitions

    def _evaluate(
        self, key: tuple[Resource, Severity], now_s: float, used: float, threshold: float
    ) -> Alert | None:
        resource, severity = key
        current = self._active.get(key)
        if used < threshold:
            if current is None:
                return None
            del self._active[key]
            if current.state is AlertState.PENDING:
                return None  # cleared before it fired: no resolved, like Prometheus
            return replace(current, state=AlertState.RESOLVED, state_since_s=now_s, value=used)
        if current is None:
            current = Alert(resource, severity, AlertState.PENDING, now_s, now_s, used, threshold)
            changed: Alert | None = current
        else:
            current = replace(current, value=used, threshold=threshold)
            changed = None
        if (
            current.state is AlertState.PENDING
            and now_s - current.active_since_s >= self.hold_s(severity) - _EPSILON_S
        ):
            current = replace(current, state=AlertState.FIRING, state_since_s=now_s)
            changed = current
        self._active[key] = current
        return changed

    def active(self) -> list[Alert]:
        """The pending and firing alerts, in resource then severity order."""
        order = {key: i for i, key in enumerate((r, s) for r in Resource for s in SEVERITIES)}
        return sorted(self._active.values(), key=lambda a: order[(a.resource, a.severity)])

    def firing(self) -> bool:
        """Whether any alert is firing (health is at least ``warning`` then)."""
        return any(a.state is AlertState.FIRING for a in self._active.values())

    def firing_resources(self) -> frozenset[Resource]:
        """The resources with a firing alert (their ``pressure`` level is at least
        ``warning``)."""
        return frozenset(a.resource for a in self._active.values() if a.state is AlertState.FIRING)

    def series(self) -> Iterator[tuple[Resource, Severity, AlertState, int]]:
        """(resource, severity, state, count 0 or 1) for every rule that has had a level and
        both active states: what ``edged.alerts`` exports. Zeros are exported too, so each
        series exists from the first tick its limit is known and never disappears."""
        for resource, severity in self._rules:
            alert = self._active.get((resource, severity))
            for state in ACTIVE_STATES:
                yield resource, severity, state, int(alert is not None and alert.state is state)


_GIB = float(2**30)


def format_value(resource: Resource, value: float) -> str:
    """A usage or level in the resource's unit, for log lines and ``edged status``."""
    if resource in (Resource.MEMORY, Resource.GPU_MEMORY):
        return f"{value / _GIB:.2f} GiB"
    if resource is Resource.CPU:
        return f"{value:.2f} cores"
    if resource is Resource.POWER:
        return f"{value:.1f} W"
    return f"{value:.1f} °C"


def describe(alert: Alert) -> str:
    """``memory 7.20 GiB >= soft 6.00 GiB`` (or ``<`` once resolved)."""
    level = "soft" if alert.severity is Severity.WARNING else "hard"
    op = "<" if alert.state is AlertState.RESOLVED else ">="
    return (
        f"{alert.resource.value} {format_value(alert.resource, alert.value)} {op} "
        f"{level} {format_value(alert.resource, alert.threshold)}"
    )
