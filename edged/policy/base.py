"""The contract between strategies and the enforcer: State in, Actions out.

A strategy is pure: ``decide(state) -> list[Action]`` reads nothing but ``state`` (no files,
no clock, no globals). It may keep its own memory between calls (hysteresis timers, forecast
state) in its instance, keyed by the times it is given in ``state.now_s``, so a recorded trace
replayed through it gives the same actions every time.

Units are in the names: bytes, cores, watts, degrees Celsius, seconds.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol


class Resource(str, enum.Enum):
    MEMORY = "memory"  # bytes, used = MemTotal - MemAvailable (or the governed cgroup's usage)
    CPU = "cpu"  # cores in use
    GPU_MEMORY = "gpu_memory"  # bytes
    POWER = "power"  # watts (package/board input)
    TEMPERATURE = "temperature"  # degrees Celsius of the hottest (or named) zone


class ProcessClass(str, enum.Enum):
    CRITICAL = "critical"  # never acted on
    NORMAL = "normal"
    BESTEFFORT = "besteffort"


class ActionKind(str, enum.Enum):
    """The ladder, mildest first, and the steps that undo it."""

    NOTIFY = "notify"  # ask a connected client to shrink (budget.shrink)
    THROTTLE = "throttle"  # memory.high / soft limit, CPU quota, GPU power limit
    FREEZE = "freeze"  # cgroup freezer / SIGSTOP, time-bounded
    TERMINATE = "terminate"  # SIGTERM
    KILL = "kill"  # SIGKILL, after a grace period for a process that ignored SIGTERM
    UNTHROTTLE = "unthrottle"
    THAW = "thaw"


LADDER: tuple[ActionKind, ...] = (
    ActionKind.NOTIFY,
    ActionKind.THROTTLE,
    ActionKind.FREEZE,
    ActionKind.TERMINATE,
    ActionKind.KILL,
)


@dataclass(frozen=True)
class Limit:
    """Resolved soft and hard levels of one resource, in its base unit (None: not set)."""

    resource: Resource
    soft: float | None
    hard: float | None


@dataclass(frozen=True)
class ProcessView:
    """What a strategy knows of one process (or managed group) on this tick."""

    pid: int
    name: str
    klass: ProcessClass
    memory_bytes: float
    cpu_cores: float  # share of one CPU summed over modes (1.5 = one and a half cores)
    start_ticks: int = 0  # tells a reused pid from the process the strategy knew
    group: str | None = None  # the cgroup edged placed it in, if any
    client: str | None = None  # budget client name, if it holds a lease
    budget: Mapping[Resource, float] = field(default_factory=dict)  # its own limits, if any
    protected: bool = False  # pid 1, edged itself, kernel threads: never a victim


@dataclass(frozen=True)
class Imposed:
    """Something edged has done and not yet undone (so a strategy can lift it)."""

    kind: ActionKind  # THROTTLE or FREEZE
    pid: int
    resource: Resource
    since_s: float
    target: float | None = None  # the throttle level in force (bytes or cores)


@dataclass(frozen=True)
class State:
    """Everything a strategy may look at on one tick."""

    now_s: float  # monotonic seconds, from the snapshot
    interval_s: float  # the configured sampling interval
    usage: Mapping[Resource, float]  # machine (or governed scope) usage per resource
    capacity: Mapping[Resource, float]  # totals: MemTotal bytes, CPU count, GPU memory ...
    limits: Mapping[Resource, Limit]
    processes: tuple[ProcessView, ...] = ()
    pressure: Mapping[Resource, float] = field(default_factory=dict)  # PSI some avg10, 0..1
    imposed: tuple[Imposed, ...] = ()
    reaction_time_s: float = 0.05  # measured time from decision to effect (enforcer's figure)


@dataclass(frozen=True)
class Action:
    """One step of the ladder (or its undoing) on one process, with why."""

    kind: ActionKind
    pid: int
    resource: Resource
    reason: str  # short, for the edged.reason attribute: "hard", "soft", "forecast", ...
    strategy: str
    klass: ProcessClass
    start_ticks: int = 0  # the enforcer refuses to act if the pid now has another start time
    target: float | None = None  # THROTTLE: the level to hold (bytes for memory, cores for CPU)
    deadline_s: float | None = None  # NOTIFY: seconds the client has to comply
    detail: str = ""  # why this victim, for the log line


class Strategy(Protocol):
    """A policy. ``name`` is what config and ``edged.strategy`` call it."""

    name: str

    def decide(self, state: State) -> list[Action]:
        """The actions this tick calls for; [] when nothing needs doing."""
        ...
