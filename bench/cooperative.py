"""The cooperative scenario of the protection benchmark: pressure incidents resolved by budget
clients shrinking, against the same incidents under the ``dynamic`` ladder.

A benchmark, not a test: it prints a markdown report, writes it to
``bench/results/cooperative-<date>-<time>.md`` with the raw runs as JSON beside it, and
asserts nothing. It needs root and cgroup v1's memory controller, nothing else (no earlyoom,
no nohang: see *Peers* below).

Why a sibling of ``protection.py`` and not one more of its scenarios: a protection scenario is
one emergency per run, judged on machine-wide MemAvailable under a memfd balloon. Here a run
is many incidents among long-lived processes that hold leases, talk to edged and are restarted
when killed, and the question is not "who was hit first" but "how was each incident resolved".
The machinery is shared (``protection.py``'s safety group, daemon handle, socket calls, the
heartbeat service; ``overhead.py``'s frozen copy of edged); the run loop and the measures are
this file's.

The fence: one cgroup, no host pressure
---------------------------------------

Every workload runs in a uniquely named v1 memory cgroup (the *safety group*), and edged
governs exactly that group (``[scope] cgroup``): its usage is the group's working set
(``memory.usage_in_bytes`` - ``total_inactive_file``), its throttle and lease groups are made
inside it, so the group's limit bounds everything the run allocates. The levels are absolute
(``[limits.memory] soft/hard`` in bytes) and a fixed amount above what the group uses when the
run starts (``B``: the protected service and the clients at their base):

* soft = B + 256 MiB, hard = B + 1024 MiB (also the budget ledger's capacity; its default
  10 % reserve leaves room for the three leases of 448 MiB);
* the safety group's limit = hard + 256 MiB: a kernel OOM kill there (counted from the
  group's ``memory.oom_control``) means "edged did not hold the group under hard".

So no host pressure is needed, nothing else on the machine counts, no sysctl is changed, and a
run peaks under B + 450 MiB (about 1 GiB here). Everything the harness starts is ended by pid, and
the group (with whatever edged left in it) is removed, in ``finally``; the workloads also get
SIGKILL if the harness dies (``PR_SET_PDEATHSIG``), edged SIGTERM.

Workloads (``bench/_coop_workload.py``), in the safety group
---------------------------------------------------------------

=============== ==========================================================================
bench-service   128 MiB, a heartbeat every 10 ms, ``critical`` (a ``[[rules]]`` entry): the
                protected service; its worst heartbeat gap is reported
bench-train     budget client (``edged.client.Client``, lease of 448 MiB, ``normal``), base
                192 MiB; complies with ``budget.shrink``: frees to the target, stops growing
                past it, reports its usage with ``budget.update``
bench-cache     the same, a second client (so there are fair shares to compute)
bench-deaf      budget client (lease of 448 MiB) that ignores ``budget.shrink``; base 32 MiB,
                started for its incident
bench-hog       unmanaged (no lease, no connection); base 32 MiB, started for its incident
=============== ==========================================================================

The clients allocate their base before edged starts (B is measured then), and connect and take
their lease once its socket exists; a client edged killed is started again before the next
incident, as a supervisor would (it allocates its base, then asks for its lease).

Incidents
---------

A run is ``--waves`` (3) client waves, alternating bench-train and bench-cache, then one
bench-deaf and one bench-hog incident. In each, the culprit is told to grow by 384 MiB at
256 MiB/s: memory crosses soft after 256 MiB (1 s) and would peak 128 MiB over it. Before
each incident the clients are back at their base (told to, and restarted if dead or stuck),
the group has stayed 5 % under soft for 1 s, and the harness waits a random 0-1 s (seeded by
the repetition, the same for every strategy) so that the crossing falls at a random point of
edged's 1 s tick. A deaf client or hog is ended by the harness once its incident is over (not
counted as killed).

An incident starts when the group's working set (read every 10 ms by a SCHED_FIFO monitor
thread, as edged computes it) crosses soft, and ends when it is back under soft (or after
``--incident-timeout``, 40 s: *unresolved*). It is judged on what happened from the culprit's
start until 1.2 s after that end (an action decided on the last tick above soft is done up to
a tick later), and counted as resolved

* **by shrink**: edged sent ``budget.shrink`` (a ``notify`` event), nobody was throttled,
  frozen, signalled or killed, and no workload died;
* **by the ladder**: a throttle, freeze, SIGTERM or SIGKILL was done, or a workload died;
* **kernel OOM**: the safety group's OOM killer fired.

Reported per strategy and per culprit kind: incidents, by shrink, by ladder, kernel OOM kills,
processes killed (workload deaths the harness did not cause), the time from the crossing of
soft to memory back under it (median and p95, nearest rank), the notice's delay after the
crossing, the clients' time from receiving ``budget.shrink`` to having freed and reported,
and the *bystanders asked* (notices to clients other than the culprit: they paid for it); per
run the protected service's worst heartbeat gap, edged's CPU seconds and peak RSS, how the
leases were enforced (``cgroup`` or ``cooperative``, from the grant) and edged's WARNING and
ERROR log lines. Each incident's edged events, with times from the crossing, are in the JSON.

Peers
-----

``edged-cooperative`` and ``edged-dynamic`` run the same incidents with the same config but
the strategy (``--strategies``); runs are interleaved (repetition, then strategy). Under
``dynamic`` nobody is asked: the ladder is its only lever. Both get ``freeze_after_s = 2`` and
``freeze_max_s = 2`` (edged's defaults: 3 and 10) so that a ladder incident ends in about 8 s
instead of 18 and a full run fits in 10 minutes; ``--ladder-defaults`` keeps edged's. edged
runs at its default 1 s interval (it ticks every 20 ms near a level, so a notice follows the
crossing by about ``hold_s``, 1 s); ``cooperative`` at its default ``deadline_s`` of 5 s.
earlyoom and nohang are left out: they act on machine-wide MemAvailable and kill any process of
the machine, so they cannot be fenced to one group without the balloon of ``protection.py``,
and they have no notion of a lease: every incident would be theirs to kill.

Usage: ``.venv/bin/python bench/cooperative.py [--runs 5] [--waves 3] [--quick]
[--strategies cooperative dynamic] [--ladder-defaults] [--working-tree]``: 5 x 5 incidents per
strategy in about 9 minutes; ``--quick``: 1 run of 2 waves (plus the deaf client and the hog)
per strategy, under 1.5 minutes.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import datetime as dt
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from overhead import snapshot_source
from protection import (
    MEMCG,
    BenchError,
    Daemon,
    SafetyGroup,
    Workload,
    cpu_seconds,
    fmt,
    hwm_bytes,
    rpc,
    set_comm,
    start_workload,
    tool_version,
    wait_for_log,
    write_results,
)

REPO = Path(__file__).resolve().parent.parent
COOP_WORKLOAD = Path(__file__).resolve().parent / "_coop_workload.py"
MiB = 1 << 20
SERVICE_MIB = 128
CLIENT_BASE_MIB = 192
LATE_BASE_MIB = 32  # the deaf client and the hog, started for their incident
GRANT_MIB = 448
WAVE_MIB = 384  # what a culprit grows by: crosses soft after SOFT_ABOVE_BASE_MIB
RATE_MIB_S = 256
SOFT_ABOVE_BASE_MIB = 256
HARD_ABOVE_BASE_MIB = 1024
SAFETY_ABOVE_HARD_MIB = 256
CALM_FRACTION = 0.95  # before an incident: the group under this share of soft for CALM_S
CALM_S = 1.0
SETTLE_S = 1.2  # after memory is back under soft: edged's 1 s tick, and its action logged
LADDER = ("throttle", "freeze", "terminate", "kill")
STRATEGIES = ("cooperative", "dynamic")
FAST_LADDER = {"freeze_after_s": 2.0, "freeze_max_s": 2.0}
CLIENTS = ("bench-train", "bench-cache")


# ---- the group's working set -------------------------------------------------------------------


def working_set_bytes(group: Path) -> int:
    """What edged's scope sensor calls the group's usage: v1 usage minus inactive file pages."""
    usage = int((group / "memory.usage_in_bytes").read_text())
    for line in (group / "memory.stat").read_text().splitlines():
        if line.startswith("total_inactive_file "):
            return usage - int(line.split()[1])
    return usage


def oom_kills(group: Path) -> int:
    """OOM kills in the group and below it (v1 ``memory.oom_control``, hierarchical)."""
    for line in (group / "memory.oom_control").read_text().splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return 0


class ScopeMonitor(threading.Thread):
    """The group's working set every 10 ms, with the time of each sample."""

    def __init__(self, group: Path) -> None:
        super().__init__(daemon=True)
        self.group = group
        self.samples: list[tuple[int, int]] = []  # (time_ns, bytes)
        self._halt = threading.Event()

    def run(self) -> None:
        # a culprit growing and edged acting may hold both CPUs: the instrument must not lag
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        while not self._halt.is_set():
            with contextlib.suppress(OSError, ValueError):  # a torn read while the group changes
                self.samples.append((time.time_ns(), working_set_bytes(self.group)))
            time.sleep(0.01)

    def now_bytes(self) -> int:
        return self.samples[-1][1] if self.samples else working_set_bytes(self.group)

    def first(self, after_ns: int, above: bool, level_bytes: int) -> int | None:
        """The time of the first sample at or after ``after_ns`` at or above (``above``) or
        below ``level_bytes``; None if there is none yet."""
        samples = self.samples[:]  # appended to by the thread meanwhile
        start = bisect.bisect_left(samples, (after_ns, -1))
        return next((t for t, v in samples[start:] if (v >= level_bytes) == above), None)

    def peak_after(self, after_ns: int, before_ns: int) -> int:
        return max((v for t, v in self.samples if after_ns <= t <= before_ns), default=0)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


# ---- workloads ---------------------------------------------------------------------------------


@dataclass
class Proc:
    """One ``_coop_workload.py`` process: its report, its stdin, and whether the harness ended
    it (a death the harness did not cause is a kill)."""

    name: str
    mode: str
    base_mib: float
    proc: subprocess.Popen[bytes]
    report: Path
    died_ns: int | None = None
    status: int | None = None
    ended_by_harness: bool = False

    def __post_init__(self) -> None:
        self._waiter = threading.Thread(target=self._wait, daemon=True)
        self._waiter.start()

    def _wait(self) -> None:
        status = self.proc.wait()
        self.died_ns = time.time_ns()
        self.status = status

    def events(self) -> list[tuple[str, int, str]]:
        if not self.report.exists():
            return []
        out = []
        for line in self.report.read_text().splitlines():
            parts = line.split(maxsplit=2)
            if len(parts) >= 2:
                out.append((parts[0], int(parts[1]), parts[2] if len(parts) > 2 else ""))
        return out

    def wait_for(self, event: str, after_ns: int = 0, timeout_s: float = 30.0) -> int:
        deadline = time.monotonic() + timeout_s
        while True:
            found = [t for e, t, _ in self.events() if e == event and t >= after_ns]
            if found:
                return found[0]
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{self.name}: no {event!r} (exit {self.proc.poll()})")
            time.sleep(0.01)

    def tell(self, line: str) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, OSError):
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.ended_by_harness = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)  # in case edged stopped it
                self.proc.kill()
        self.proc.wait(timeout=30)
        self._waiter.join(timeout=5)
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()


def start_proc(
    name: str, mode: str, base_mib: float, *, workdir: Path, src: Path, group: SafetyGroup,
    sock: Path,
) -> Proc:  # fmt: skip
    report = workdir / f"{name}-{uuid.uuid4().hex[:6]}.log"
    argv = [
        sys.executable, str(COOP_WORKLOAD), "--name", name, "--mode", mode,
        "--base-mib", str(base_mib), "--grant-mib", str(GRANT_MIB),
        "--rate-mib-s", str(RATE_MIB_S), "--socket", str(sock),
        "--cgroup-procs", str(group.procs), "--report", str(report),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGED_", "OTEL_"))}
    env["PYTHONPATH"] = str(src)  # edged.client from the same frozen copy as the daemon
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=env,
    )  # fmt: skip
    return Proc(name, mode, base_mib, proc, report)


# ---- edged -------------------------------------------------------------------------------------


def start_edged(
    strategy: str, *, workdir: Path, src: Path, group: SafetyGroup, soft_bytes: int,
    hard_bytes: int, ladder: dict[str, float],
) -> Daemon:  # fmt: skip
    tag = uuid.uuid4().hex[:6]
    log = workdir / f"edged-{strategy}-{tag}.log"
    cfg = workdir / f"edged-{tag}.toml"
    sock = workdir / "edged.sock"
    settings = "".join(f"{k} = {v}\n" for k, v in ladder.items())
    cfg.write_text(
        f'[scope]\ncgroup = "/{group.path.name}"\n'
        f"[limits.memory]\nsoft = {soft_bytes}\nhard = {hard_bytes}\n"
        f'[strategy]\nname = "{strategy}"\n'
        f"[strategy.{strategy}]\n{settings}"
        '[[rules]]\nname = "bench-service"\nclass = "critical"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGED_", "OTEL_"))}
    env["STATE_DIRECTORY"] = str(workdir / f"state-{tag}")
    argv = [
        sys.executable, "-m", "edged", "run", "--config", str(cfg), "--socket", str(sock),
        "--prometheus", "off",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["setpriv", "--pdeathsig", "TERM", *argv], cwd=src, env=env,
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    daemon = Daemon(f"edged-{strategy}", proc, log, sock)
    try:
        wait_for_log(log, " ready: ", proc, 30)
    except BenchError:
        daemon.stop()
        raise
    return daemon


def edged_events(daemon: Daemon, since: int) -> tuple[list[dict[str, Any]], int]:
    """Action events (alerts left out) after sequence ``since``, and the last sequence."""
    assert daemon.socket_path is not None
    reply = rpc(daemon.socket_path, "events", {"since": since})
    events = [e for e in reply["events"] if e["action"] != "alert"]
    return events, int(reply.get("last", since))


# ---- one run -----------------------------------------------------------------------------------


@dataclass
class Incident:
    strategy: str
    repetition: int
    index: int
    culprit: str
    kind: str  # client | deaf | hog
    outcome: str  # shrink | ladder | oom | unresolved | no crossing | by itself
    resolve_ms: float | None = None  # crossing soft -> back under soft
    notify_ms: float | None = None  # crossing -> edged's first notify
    comply_ms: float | None = None  # a client's budget.shrink received -> freed and reported
    peak_over_soft_mib: float = 0.0
    oom_kills: int = 0
    killed: list[str] = field(default_factory=list)
    bystanders_asked: list[str] = field(default_factory=list)  # clients asked, not the culprit
    actions: list[str] = field(default_factory=list)  # "+ms action name (reason) status: detail"
    culprit_log: list[str] = field(default_factory=list)  # "+ms event detail" from its report


@dataclass
class RunResult:
    strategy: str
    repetition: int
    base_mib: float
    soft_mib: float
    hard_mib: float
    incidents: list[Incident]
    service_alive: bool
    service_gap_ms: float | None
    edged_cpu_s: float | None
    edged_rss_mib: float | None
    leases: dict[str, int] = field(default_factory=dict)  # how leases were enforced: count
    edged_warnings: list[str] = field(default_factory=list)  # its WARNING and ERROR lines


class Run:
    """The processes, edged and the monitor of one run; :meth:`incident` plays one."""

    def __init__(self, strategy: str, rep: int, args: argparse.Namespace, workdir: Path,
                 src: Path) -> None:  # fmt: skip
        self.strategy = strategy
        self.rep = rep
        self.args = args
        self.workdir = workdir
        self.src = src
        self.group = SafetyGroup()
        self.sock = workdir / "edged.sock"
        self.procs: list[Proc] = []  # every one started, dead ones included
        self.clients: dict[str, Proc] = {}
        self.service: Workload | None = None
        self.daemon: Daemon | None = None
        self.monitor: ScopeMonitor | None = None
        self.seq = 0
        self.soft_bytes = 0
        self.rng = random.Random(rep)  # the same phases for every strategy of a repetition

    def start(self, name: str, mode: str, base_mib: float) -> Proc:
        p = start_proc(
            name, mode, base_mib, workdir=self.workdir, src=self.src, group=self.group,
            sock=self.sock,
        )  # fmt: skip
        self.procs.append(p)
        return p

    def restart_dead_clients(self) -> None:
        for name, p in list(self.clients.items()):
            if not p.alive:
                q = self.start(name, "client", CLIENT_BASE_MIB)
                q.wait_for("ready")
                q.wait_for("leased")
                self.clients[name] = q

    def bring_clients_to_base(self, timeout_s: float = 15.0) -> None:
        """Every client holding its base again (restarted when dead or stuck, e.g. held at a
        throttle's backstop in a page fault)."""
        self.restart_dead_clients()
        asked = time.time_ns()
        for p in self.clients.values():
            p.tell(f"hold {p.base_mib}")
        for p in list(self.clients.values()):
            try:
                p.wait_for("held", after_ns=asked, timeout_s=timeout_s)
            except BenchError:
                p.stop()
                self.restart_dead_clients()

    def wait_calm(self, timeout_s: float = 30.0) -> None:
        assert self.monitor is not None
        deadline = time.monotonic() + timeout_s
        calm_since: float | None = None
        while time.monotonic() < deadline:
            if self.monitor.now_bytes() < self.soft_bytes * CALM_FRACTION:
                calm_since = calm_since or time.monotonic()
                if time.monotonic() - calm_since >= CALM_S:
                    return
            else:
                calm_since = None
            time.sleep(0.02)

    def setup(self) -> None:
        self.service = start_workload(
            self.workdir, self.group, "bench-service", "hold", SERVICE_MIB, heartbeat=True
        )
        self.service.wait_ready()
        for name in CLIENTS:
            self.clients[name] = self.start(name, "client", CLIENT_BASE_MIB)
        for p in self.clients.values():
            p.wait_for("ready")
        time.sleep(0.3)
        base = working_set_bytes(self.group.path)
        self.base_bytes = base
        self.soft_bytes = base + SOFT_ABOVE_BASE_MIB * MiB
        self.hard_bytes = base + HARD_ABOVE_BASE_MIB * MiB
        self.group.limit(self.hard_bytes + SAFETY_ABOVE_HARD_MIB * MiB)
        ladder = {} if self.args.ladder_defaults else FAST_LADDER
        self.daemon = start_edged(
            self.strategy, workdir=self.workdir, src=self.src, group=self.group,
            soft_bytes=self.soft_bytes, hard_bytes=self.hard_bytes, ladder=ladder,
        )  # fmt: skip
        assert self.daemon.proc is not None
        self.cpu0 = cpu_seconds(self.daemon.proc.pid)
        for p in self.clients.values():
            p.wait_for("leased")
        self.monitor = ScopeMonitor(self.group.path)
        self.monitor.start()
        _, self.seq = edged_events(self.daemon, 0)
        time.sleep(1.0)  # edged has sampled every member at least once

    def incident(self, index: int, culprit_name: str) -> Incident:
        assert self.monitor is not None
        assert self.daemon is not None
        kind = "client" if culprit_name in CLIENTS else culprit_name.removeprefix("bench-")
        self.bring_clients_to_base()
        self.wait_calm()
        if kind == "client":
            culprit = self.clients[culprit_name]
        else:
            culprit = self.start(culprit_name, "deaf" if kind == "deaf" else "hog", LATE_BASE_MIB)
            culprit.wait_for("ready")
            if kind == "deaf":
                culprit.wait_for("leased")
            time.sleep(1.0)  # sampled (and, for the deaf client, watched) before it grows
        _, self.seq = edged_events(self.daemon, self.seq)
        # a random phase against edged's 1 s tick: otherwise the crossing (1 s after the
        # start) falls at the same point of every tick, and so does the detection delay
        time.sleep(self.rng.uniform(0.0, 1.0))
        oom0 = oom_kills(self.group.path)
        t0 = time.time_ns()
        culprit.tell(f"hold {culprit.base_mib + WAVE_MIB}")
        soft = self.soft_bytes
        crossed = back = None
        give_up = time.monotonic() + self.args.incident_timeout
        cross_by = time.monotonic() + 10.0  # 1.5 s of growth, on a busy box
        while time.monotonic() < give_up:
            if crossed is None:
                crossed = self.monitor.first(t0, True, soft)
                if crossed is None and time.monotonic() > cross_by:
                    break
            if crossed is not None:
                back = self.monitor.first(crossed, False, soft)
                if back is not None:
                    break
            time.sleep(0.02)
        end = back if back is not None else time.time_ns()
        # an action decided on the tick that saw memory above soft for the last time is done
        # up to a tick later: everything until then belongs to this incident
        time.sleep(SETTLE_S)
        events, self.seq = edged_events(self.daemon, self.seq)
        window = [e for e in events if e["time_unix_ns"] >= t0]
        names = {p.proc.pid: p.name for p in self.procs}
        # a process edged sent SIGTERM or SIGKILL has its grace to go (a loaded box may take
        # a while to run its handler): wait for it, so that its death is counted here
        ended = {e["pid"] for e in window if e["action"] in ("terminate", "kill")}
        wait_until = time.monotonic() + 5.0
        while any(p.alive and p.proc.pid in ended for p in self.procs):
            if time.monotonic() > wait_until:
                break
            time.sleep(0.02)
        end = time.time_ns()
        killed = [
            p.name for p in self.procs
            if not p.ended_by_harness and p.died_ns is not None and t0 <= p.died_ns <= end
        ]  # fmt: skip
        if self.service is not None and self.service.died_ns is not None:
            killed.append("bench-service")
        ooms = oom_kills(self.group.path) - oom0
        ladder = [e for e in window if e["action"] in LADDER and e["status"] == "done"]
        notified = [e for e in window if e["action"] == "notify" and e["status"] == "done"]
        bystanders = sorted({names.get(e["pid"], str(e["pid"])) for e in notified} - {culprit_name})
        if crossed is None:
            outcome = "no crossing"
        elif ooms:
            outcome = "oom"
        elif back is None:
            outcome = "unresolved"
        elif ladder or killed:
            outcome = "ladder"
        elif notified:
            outcome = "shrink"
        else:
            outcome = "by itself"
        reference = crossed if crossed is not None else t0
        comply = None
        received = [t for e, t, _ in culprit.events() if e == "shrink" and t >= t0]
        shrunk = [t for e, t, _ in culprit.events() if e == "shrunk" and t >= t0]
        if received and shrunk:
            comply = (shrunk[0] - received[0]) / 1e6
        result = Incident(
            strategy=self.strategy,
            repetition=self.rep,
            index=index,
            culprit=culprit_name,
            kind=kind,
            outcome=outcome,
            resolve_ms=(back - crossed) / 1e6 if back is not None and crossed is not None
            else None,
            notify_ms=(notified[0]["time_unix_ns"] - reference) / 1e6 if notified else None,
            comply_ms=comply,
            peak_over_soft_mib=(self.monitor.peak_after(t0, end) - soft) / MiB,
            oom_kills=ooms,
            killed=killed,
            bystanders_asked=bystanders,
            actions=[
                f"{(e['time_unix_ns'] - reference) / 1e6:+.0f} {e['action']} "
                f"{names.get(e['pid'], e['pid'])} ({e['reason']}) {e['status']}: "
                f"{e['detail'][:160]}"
                for e in events
            ],
            culprit_log=[
                f"{(t - reference) / 1e6:+.0f} {e} {detail}".rstrip()
                for e, t, detail in culprit.events() if t >= t0
            ] + ([f"{(culprit.died_ns - reference) / 1e6:+.0f} died {culprit.status}"]
                 if culprit.died_ns is not None else []),
        )  # fmt: skip
        if kind != "client":
            culprit.stop()  # its job is over; ended by the harness, not counted
        return result

    def finish(self) -> tuple[bool, float | None, float | None, float | None]:
        cpu = rss = None
        if self.daemon is not None and self.daemon.proc and self.daemon.proc.poll() is None:
            cpu = cpu_seconds(self.daemon.proc.pid) - self.cpu0
            rss = hwm_bytes(self.daemon.proc.pid) / MiB
        assert self.service is not None
        gap = self.service.worst_gap_s()
        return self.service.proc.poll() is None, None if gap is None else gap * 1e3, cpu, rss

    def teardown(self) -> None:
        if self.monitor is not None and self.monitor.is_alive():
            self.monitor.stop()
        for p in reversed(self.procs):
            p.stop()
        if self.service is not None:
            self.service.stop()
        if self.daemon is not None:
            self.daemon.stop()  # edged moves what it placed back and removes its groups
        remove_group(self.group)


def remove_group(group: SafetyGroup) -> None:
    """Remove the safety group and anything edged left below it (deepest first)."""
    if group.path.is_dir():
        for child in sorted(
            (p for p in group.path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
        ):
            with contextlib.suppress(OSError):
                child.rmdir()
    group.remove()


def run_once(strategy: str, rep: int, args: argparse.Namespace, workdir: Path,
             src: Path) -> RunResult:  # fmt: skip
    run = Run(strategy, rep, args, workdir, src)
    plan = [CLIENTS[i % len(CLIENTS)] for i in range(args.waves)] + ["bench-deaf", "bench-hog"]
    incidents: list[Incident] = []
    try:
        run.setup()
        for index, culprit in enumerate(plan):
            incident = run.incident(index, culprit)
            incidents.append(incident)
            print(progress_line(incident, args), flush=True)
        alive, gap_ms, cpu, rss = run.finish()
        leases: dict[str, int] = {}
        for p in run.procs:
            for event, _, detail in p.events():
                if event == "leased":
                    how = detail.split()[-1]
                    leases[how] = leases.get(how, 0) + 1
        warnings = []
        if run.daemon is not None:
            lines = run.daemon.log.read_text(errors="replace").splitlines()
            warnings = [line for line in lines if " WARNING " in line or " ERROR " in line]
        return RunResult(
            strategy=strategy,
            repetition=rep,
            base_mib=run.base_bytes / MiB,
            soft_mib=run.soft_bytes / MiB,
            hard_mib=run.hard_bytes / MiB,
            incidents=incidents,
            service_alive=alive,
            service_gap_ms=gap_ms,
            edged_cpu_s=cpu,
            edged_rss_mib=rss,
            leases=leases,
            edged_warnings=warnings,
        )
    finally:
        run.teardown()


# ---- the report --------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100); None for no values."""
    got = sorted(values)
    if not got:
        return None
    return got[max(0, math.ceil(q / 100 * len(got)) - 1)]


def summarize(incidents: Sequence[Incident]) -> dict[str, Any]:
    counted = [i for i in incidents if i.outcome != "no crossing"]
    resolve = [i.resolve_ms for i in counted if i.resolve_ms is not None]
    notify = [i.notify_ms for i in counted if i.notify_ms is not None]
    comply = [i.comply_ms for i in counted if i.comply_ms is not None]
    return {
        "incidents": len(counted),
        "no_crossing": len(incidents) - len(counted),
        "shrink": sum(i.outcome == "shrink" for i in counted),
        "ladder": sum(i.outcome == "ladder" for i in counted),
        "oom_incidents": sum(i.outcome == "oom" for i in counted),
        "unresolved": sum(i.outcome == "unresolved" for i in counted),
        "by_itself": sum(i.outcome == "by itself" for i in counted),
        "oom_kills": sum(i.oom_kills for i in incidents),
        "killed": sum(len(i.killed) for i in incidents),
        "bystanders": sum(len(i.bystanders_asked) for i in incidents),
        "resolve_p50_ms": statistics.median(resolve) if resolve else None,
        "resolve_p95_ms": percentile(resolve, 95),
        "notify_p50_ms": statistics.median(notify) if notify else None,
        "comply_p50_ms": statistics.median(comply) if comply else None,
    }


def report(results: Sequence[RunResult], meta: dict[str, Any]) -> str:
    out = [
        f"# Cooperative benchmark, {meta['date']}",
        "",
        f"edged {meta['commit']}; {meta['runs']} runs per strategy, each {meta['waves']} client "
        f"waves + 1 deaf client + 1 hog; ladder settings: {meta['ladder']}; kernel "
        f"{meta['kernel']}; load average at start {meta['load_start']}, at end "
        f"{meta['load_end']}.",
        "",
        f"Command: `{meta['command']}`",
        "",
        "Incidents: the safety group's working set crossing soft (B + 256 MiB). *shrink*: "
        "edged sent `budget.shrink` and nobody was throttled, frozen, signalled or killed "
        "before memory was back under soft (and 1.2 s after); *ladder*: a throttle, freeze, "
        "SIGTERM or SIGKILL, or a workload died; *OOM*: kernel OOM kills in the safety group; "
        "*killed*: workloads that died without the harness ending them; *bystanders asked*: "
        "`budget.shrink` notices to clients other than the culprit (they paid for it). Times in "
        "ms from the crossing: back under "
        "soft (median / p95, nearest rank), edged's first `notify`; *comply*: a client's "
        "`budget.shrink` received to freed and reported (median).",
        "",
        "| strategy | culprit | incidents | by shrink | by ladder | unresolved | OOM kills "
        "| killed | bystanders asked | back under soft p50 / p95 | notify | comply |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    strategies = list(dict.fromkeys(r.strategy for r in results))
    kinds = ("client", "deaf", "hog")
    labels = {
        "client": "compliant clients",
        "deaf": "deaf client",
        "hog": "unmanaged hog",
    }
    for s in strategies:
        incidents = [i for r in results if r.strategy == s for i in r.incidents]
        rows = [(labels[k], [i for i in incidents if i.kind == k]) for k in kinds]
        rows.append(("**all**", incidents))
        for label, chosen in rows:
            if not chosen:
                continue
            m = summarize(chosen)
            n = m["incidents"]
            share = f" ({100 * m['shrink'] / n:.0f} %)" if n else ""
            extra = f" (+{m['no_crossing']} no crossing)" if m["no_crossing"] else ""
            cells = [
                f"edged-{s}", label, f"{n}{extra}", f"{m['shrink']}{share}", str(m["ladder"]),
                str(m["unresolved"]), str(m["oom_kills"]), str(m["killed"]), str(m["bystanders"]),
                f"{fmt(m['resolve_p50_ms'])} / {fmt(m['resolve_p95_ms'])}",
                fmt(m["notify_p50_ms"], "+.0f"), fmt(m["comply_p50_ms"], ".1f"),
            ]  # fmt: skip
            out.append("| " + " | ".join(cells) + " |")
    out += [
        "",
        "Per run: the protected service (alive, worst heartbeat gap, 10 ms period), edged's CPU "
        "seconds and peak RSS over the run (median of the runs, max in brackets); leases held "
        "in a cgroup with the granted memory as its limit, of all leases granted; edged's "
        "WARNING and ERROR log lines (in the JSON).",
        "",
        "| strategy | service alive | worst gap ms | edged CPU s | edged RSS MiB | leases in a "
        "cgroup | edged warnings |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in strategies:
        rs = [r for r in results if r.strategy == s]
        gaps = [r.service_gap_ms for r in rs if r.service_gap_ms is not None]
        cpus = [r.edged_cpu_s for r in rs if r.edged_cpu_s is not None]
        rss = [r.edged_rss_mib for r in rs if r.edged_rss_mib is not None]

        def cell(values: list[float], spec: str) -> str:
            if not values:
                return "—"
            return f"{statistics.median(values):{spec}} ({max(values):{spec}})"

        in_group = sum(r.leases.get("cgroup", 0) for r in rs)
        granted = sum(sum(r.leases.values()) for r in rs)
        warnings = sum(len(r.edged_warnings) for r in rs)
        out.append(
            f"| edged-{s} | {sum(r.service_alive for r in rs)}/{len(rs)} | {cell(gaps, '.0f')} "
            f"| {cell(cpus, '.2f')} | {cell(rss, '.1f')} | {in_group}/{granted} | {warnings} |"
        )
    return "\n".join(out) + "\n"


def progress_line(i: Incident, args: argparse.Namespace) -> str:
    return (
        f"[{dt.datetime.now():%H:%M:%S}] {i.repetition + 1}/{args.runs} edged-{i.strategy:11} "
        f"#{i.index} {i.culprit:11} {i.outcome:11} back={fmt(i.resolve_ms):>6} ms "
        f"notify={fmt(i.notify_ms, '+.0f'):>6} ms peak={i.peak_over_soft_mib:+.0f} MiB "
        f"killed={','.join(i.killed) or '-'} oom={i.oom_kills} | "
        f"{'; '.join(a.split(':')[0] for a in i.actions)[:300]}"
    )


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--waves", type=int, default=3, help="client waves per run")
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    ap.add_argument("--incident-timeout", type=float, default=40.0, help="seconds")
    ap.add_argument("--ladder-defaults", action="store_true", help="edged's freeze timings")
    ap.add_argument("--working-tree", action="store_true", help="measure uncommitted edits")
    ap.add_argument("--quick", action="store_true", help="1 run of 2 waves")
    args = ap.parse_args(argv)
    if os.geteuid() != 0 or not MEMCG.is_dir():
        print("needs root and cgroup v1's memory controller", file=sys.stderr)
        return 2
    if args.quick:
        args.runs, args.waves = 1, 2
    command = " ".join([".venv/bin/python", "bench/cooperative.py", *(argv or sys.argv[1:])])
    set_comm("bench-harness")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))  # unwind: finally runs
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
        check=True,
    ).stdout.strip()  # fmt: skip
    results: list[RunResult] = []
    started = dt.datetime.now()
    load_start = load_average()
    with tempfile.TemporaryDirectory(prefix="edged-cooperative-") as tmp:
        workdir = Path(tmp)
        src = snapshot_source(workdir, None if args.working_tree else "HEAD")
        for rep in range(args.runs):
            for strategy in args.strategies:
                try:
                    results.append(run_once(strategy, rep, args, workdir, src))
                except BenchError as exc:
                    print(f"  edged-{strategy} run {rep + 1}: failed: {exc}", flush=True)
    meta = {
        "date": f"{started:%Y-%m-%d %H:%M}",
        "commit": commit + (" + working tree" if args.working_tree else ""),
        "runs": args.runs,
        "waves": args.waves,
        "ladder": "edged's defaults" if args.ladder_defaults else
        ", ".join(f"{k} = {v:g}" for k, v in FAST_LADDER.items()),
        "kernel": os.uname().release,
        "edged_python": tool_version([sys.executable, "--version"]),
        "load_start": load_start,
        "load_end": load_average(),
        "command": command,
        "duration_s": round((dt.datetime.now() - started).total_seconds()),
    }  # fmt: skip
    text = report(results, meta)
    print(text)
    stem = write_results(f"cooperative-{started:%Y%m%d-%H%M%S}", text, meta, results)
    print(f"written to bench/results/{stem}.md and .json ({meta['duration_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
