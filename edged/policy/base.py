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
    gpu_memory_bytes: float = 0.0  # summed over GPUs (NVML's per-process figure), 0 if none


@dataclass(frozen=True)
class GpuView:
    """What a strategy knows of one GPU whose power limit edged can set (NVML, as root).

    Only GPUs the enforcer has a lever for are listed, so a strategy that sees none emits no
    GPU action. ``min_limit_w``/``max_limit_w`` are the driver's constraints
    (``nvmlDeviceGetPowerManagementLimitConstraints``); a limit outside them is refused.
    """

    uuid: str  # NVML UUID, the hw.id of the GPU's readings
    power_w: float | None  # its draw on this tick (None: not read)
    limit_w: float | None  # the power limit in force on this tick (None: not read)
    min_limit_w: float
    max_limit_w: float


@dataclass(frozen=True)
class Imposed:
    """Something edged has done and not yet undone (so a strategy can lift it)."""

    kind: ActionKind  # THROTTLE or FREEZE
    pid: int  # 0 for a GPU
    resource: Resource
    since_s: float
    target: float | None = None  # the throttle level in force (bytes, cores, or GPU watts)
    gpu: str | None = None  # the GPU (UUID) whose power limit this is; None for a process


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
    gpus: tuple[GpuView, ...] = ()  # GPUs whose power limit the enforcer can lower


@dataclass(frozen=True)
class Action:
    """One step of the ladder (or its undoing) on one process, with why.

    A GPU power-limit step is ``Action(THROTTLE, pid=0, resource=POWER, gpu=<uuid>,
    target=<limit in W>, klass=NORMAL)`` and its undoing ``Action(UNTHROTTLE, pid=0,
    resource=POWER, gpu=<uuid>)``, which puts back the limit the GPU had before edged first
    lowered it. ``klass`` means nothing for a GPU and is NORMAL.
    """

    kind: ActionKind
    pid: int
    resource: Resource
    reason: str  # short, for the edged.reason attribute: "hard", "soft", "forecast", ...
    strategy: str
    klass: ProcessClass
    start_ticks: int = 0  # the enforcer refuses to act if the pid now has another start time
    target: float | None = None  # THROTTLE: level to hold (bytes, cores, or W for a GPU)
    deadline_s: float | None = None  # NOTIFY: seconds the client has to comply
    detail: str = ""  # why this victim, for the log line
    gpu: str | None = None  # a GPU power-limit action: the GPU's UUID (pid is then 0)


class Strategy(Protocol):
    """A policy. ``name`` is what config and ``edged.strategy`` call it.

    A strategy may also set ``adopts_imposed = True`` when it lifts throttles and freezes it
    finds in ``State.imposed`` that it did not send: a runtime switch to it then hands the
    old strategy's over instead of lifting them (read with ``getattr``, default False).
    """

    name: str

    def decide(self, state: State) -> list[Action]:
        """The actions this tick calls for; [] when nothing needs doing."""
        ...
