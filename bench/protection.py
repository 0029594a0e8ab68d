"""Protection, side by side: edged's strategies against earlyoom, nohang and the kernel alone.

A benchmark, not a test: it prints a markdown report, writes it to
``bench/results/protection-<date>-<time>.md`` with the raw runs as JSON beside it, and asserts
nothing. It needs root, cgroup v1's memory controller, and Debian's ``earlyoom`` and ``nohang``.

Each daemon runs as a user runs it
----------------------------------

Every daemon is given one threshold ``T`` (bytes of MemAvailable) and nothing else about the
run: it is not told which process is the service and which the culprit, and has to choose its
victim among all the processes of the machine by itself.

* ``edged run`` with its shipped defaults plus what a user writes, and nothing more::

      [limits.memory]
      soft = <hard - 256 MiB>   # half the scenario's crossing amount where that is less
      hard = <MemTotal - T>
      [strategy]
      name = "dynamic"          # predictive, adaptive, cooperative

  No ``[[rules]]``, no ``[sampling]``: edged samples and protects what its defaults say (pid 1,
  kernel threads, edged and its ancestors, so also this harness, which is its parent; journald,
  dbus, sshd, getty). It runs at nice -5 as ``edged.service`` sets (``Nice=``; ``--flat-nice``
  runs it at 0), with ``--socket`` in the run's directory and ``--prometheus off`` (so that two
  runs never contend for the port), its default 1 s interval and its default state directory
  moved into the run's directory (``STATE_DIRECTORY``).
* ``earlyoom -M T_KiB -r 0`` (SIGTERM below T, SIGKILL below T/2, its defaults), nice 0;
* ``nohang --monitor`` with Debian's ``/etc/nohang/nohang.conf`` and ``soft_threshold_min_mem =
  T``, ``hard_threshold_min_mem = T/2``, nice 0;
* ``kernel``: no daemon; only the safety group's OOM killer (the reference).

earlyoom (``--avoid``) and nohang (``@BADNESS_ADJ_RE_NAME -1000``) are kept off the harness's own
infrastructure only: this harness (``bench-harness``), shells, sshd, tmux, the session's
``process_api`` and its ``memfd:`` helpers, ``python3``. Never off a workload: every
``bench-*`` process is theirs to choose, as for edged.

The machine: a 2 GiB device, and a fence around every workload
--------------------------------------------------------------

No sysctl is changed.

* **A memfd balloon**: the harness ``memfd_create``s a file and ``posix_fallocate``s it until
  about ``--available`` (2 GiB) of MemAvailable is left (the report prints MemAvailable before
  and after). Shared memory that nobody maps is used (``Shmem``), is not available (it is not
  page cache the kernel could drop, and there is no swap), and is in nobody's RSS, so no daemon
  and no OOM killer picks its holder. It is freed by closing the descriptor: at the end, on
  Ctrl-C or SIGTERM, and by the kernel if the harness is killed. A watchdog empties it at once
  if MemAvailable ever falls under 256 MiB (something else on the machine grew), and the
  benchmark then stops. ``--no-balloon`` leaves the machine as it is.
* **A safety memory cgroup** per run (v1, ``/sys/fs/cgroup/memory/edged-protect-<id>``) holds
  every workload. Its limit is its usage at the start (every workload loaded, before the culprit
  allocates) plus the scenario's crossing amount plus ``--margin`` (256 MiB), the same for every
  daemon. A kernel OOM kill there means the daemon was too late; the machine itself is never at
  risk. Kernel OOM kills are counted from ``/proc/vmstat`` ``oom_kill`` (memcg kills included;
  the JSON also has the groups' own ``memory.oom_control`` counts).

The threshold and the crossing
------------------------------

With the run's workloads loaded the harness reads the safety group's usage ``U0`` and
MemAvailable ``A0`` and sets ``T = A0 - cross``: memory crosses ``T`` once the culprit has
allocated ``cross`` MiB. The daemon starts after that, and the culprit one calm second later.

*The crossing* is the first read of a monitor thread (SCHED_FIFO, every 2 ms, so that a hog and
a daemon busy on both CPUs cannot delay it) where the safety group's ``memory.usage_in_bytes``
>= ``U0 + cross``, or MemAvailable < ``T``, whichever comes first. The group's charge is what
really is used, at once; MemAvailable can lag a fast fill (free pages on the per-CPU lists are
not counted in it, and this kernel sizes those lists itself), and a daemon that waits on a
lagging MemAvailable is late: that is part of what is measured, not something to hide. A daemon
that reads a figure the harness does not may act a little before or after the crossing.

Each daemon is given that one point in the measure it reads: earlyoom and nohang ``T`` in
MemAvailable; edged ``hard`` = its own *used* at the start (MemTotal - MemAvailable - the free
pages on the per-CPU lists, see edged/sensors/memory.py) + ``cross``. So all three cross it
when the culprit has allocated ``cross`` MiB, as far as what each reads is true. After a large
free (the previous run's culprit) this kernel keeps 1 GiB and more on those lists, which
MemAvailable does not count and which a new allocation takes first: MemAvailable then stands
still while memory fills, and a daemon that trusts it sees the crossing late. That is measured,
not corrected for.

MemAvailable is the whole machine's: memory that anything else on the machine takes while a
run goes on (another user's tests, a build) moves it, and the daemons with it, and may make it
cross before the group has grown ``cross`` MiB. The JSON has, per run, how far the group had
grown at the crossing and how much more MemAvailable had fallen (``growth_at_crossing_mib``,
``outside_at_crossing_mib``), and the report counts the runs that crossed by MemAvailable. Run
it on a quiet machine: on a shared one those figures show which runs were disturbed.

Scenarios
---------

Always running, in the safety group: ``bench-service``, 256 MiB, a heartbeat every 10 ms, a
service that must live. Then per scenario (``cross``: what the culprit allocates before memory
crosses T; a culprit's target is past the safety limit unless stated):

================ ==========================================================================
slow-ramp        ``bench-hog`` grows at 100 MiB/s; cross 768 MiB
fast-ramp        ``bench-hog`` grows as fast as this box faults pages; cross 768 MiB
burst            ``bench-hog`` allocates 960 MiB in one call (under the safety limit); cross
                 768 MiB
wrong-victim     ``bench-steady`` (640 MiB, a service with a heartbeat, loaded before the
                 daemon starts) beside ``bench-leak`` growing at 200 MiB/s; cross 192 MiB: the
                 right victim is the small leak, not the large steady service
sigterm-hog      ``bench-hog`` ignores SIGTERM and grows at 200 MiB/s; cross 768 MiB
benign-spike     ``bench-spike`` rises at 400 MiB/s to 384 MiB (short of T by 384 MiB, and of
                 edged's soft level), holds 0.5 s, frees it: nobody may act
limited-group    container-like: a v1 memory group nested in the safety group, its limit its
                 own usage at the start + cross + margin, holding ``bench-app`` (128 MiB, a
                 heartbeat) and ``bench-hog``, which ignores SIGTERM and grows at 200 MiB/s;
                 cross 512 MiB
slow-leak        ``bench-steady`` (640 MiB, a service) beside ``bench-leak`` growing at
                 20 MiB/s; cross 192 MiB
================ ==========================================================================

``--cpu-load N`` adds N busy loops (``bench-spin``, nice 0) in the safety group, started before
everything else and stopped with it, so every run (daemon start included) is under CPU
saturation; they are workloads like the others (a daemon that hits one hit the wrong process).

What is measured, per run
-------------------------

*Hits*: a SIGTERM a workload received (its handler notes the time), a workload's death (its
waiter thread), an edged action event on it (``events`` on edged's socket: throttle, freeze,
terminate, kill), and any process outside the workloads that a daemon acted on (edged's events,
earlyoom's and nohang's logs). *Breach→action*: the first hit, in ms from the crossing
(negative: before it). *OK*, the headline: no kernel OOM kill; every service alive and never
hit; the culprit the only process hit (so the first one), and stopped at the end (dead, or
held: below its target and not growing over the last second; frozen and throttled count);
for ``benign-spike``: nobody hit. Also: the services' worst heartbeat gap (10 ms period), and
the daemon's CPU seconds (``utime + stime``) and peak RSS (``VmHWM``) over the run.

A run ends when the culprit has died and memory is back under the crossing for 0.3 s, or
when its watch time is over (the time the culprit would take to reach the safety limit, + 3 s).

Runs are interleaved (repetition, then scenario, then daemon) so that every daemon sees the
same conditions; ``--runs`` (3) of each. The report has a summary (scenario x daemon: runs OK,
median breach→action) and the detail, and says whether ``--cpu-load`` was on.

Every process the harness starts dies with it (``PR_SET_PDEATHSIG``), is ended by pid at the
end of its run, and every group it made is removed, also on Ctrl-C and SIGTERM; a group left by
a harness that was SIGKILLed is removed at the next start.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import fcntl
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from overhead import snapshot_source  # the same frozen copy of edged as the overhead bench

REPO = Path(__file__).resolve().parent.parent
WORKLOAD = Path(__file__).resolve().parent / "_workload.py"
MiB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
CLK_TCK = os.sysconf("SC_CLK_TCK")
MEMCG = Path("/sys/fs/cgroup/memory")
FREEZER = Path("/sys/fs/cgroup/freezer")
GROUP_PREFIX = "edged-protect-"
LOCK = Path("/tmp/edged-protection.lock")
# what earlyoom and nohang must not pick: the harness and the session it runs in, nothing else
INFRASTRUCTURE = (
    "bench-harness", "bash", "sh", "sshd", "tmux", "process_api", "memfd:.*", "python3",
    "python",
)  # fmt: skip
SERVICE_MIB = 256
APP_MIB = 128
STEADY_MIB = 640
SOFT_BELOW_HARD_MIB = 256
EDGED_NICE = -5  # edged.service: Nice=-5
BALLOON_FLOOR_MIB = 256
EDGED_STRATEGIES = ("dynamic", "predictive", "adaptive", "cooperative")
ALL_DAEMONS = (*(f"edged-{s}" for s in EDGED_STRATEGIES), "earlyoom", "nohang", "kernel")
EDGED_HITS = ("throttle", "freeze", "terminate", "kill")
HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class BenchError(Exception):
    """A peer that would not start; the run cannot be measured."""


@dataclass(frozen=True)
class Scenario:
    name: str
    culprit: str
    mode: str  # _workload.py --mode
    cross_mib: float  # what the culprit allocates before memory crosses the threshold
    target_mib: float  # how far it would go if nobody stopped it
    rate_mib_s: float = 0.0  # 0: as fast as it can
    steady: bool = False  # bench-steady, a second service, loaded before the daemon
    limited: bool = False  # the culprit and bench-app in a group nested in the safety group
    ignore_term: bool = False
    benign: bool = False  # nobody may act
    watch_s: float = 0.0  # 0: until the culprit would reach the safety limit, + 3 s

    def watch(self, margin_mib: float) -> float:
        if self.watch_s:
            return self.watch_s
        return (self.cross_mib + margin_mib) / self.rate_mib_s + 3.0


# fmt: off
SCENARIOS = (
    Scenario("slow-ramp", "bench-hog", "ramp", 768, 2048, rate_mib_s=100),
    Scenario("fast-ramp", "bench-hog", "ramp", 768, 2048, watch_s=6),
    Scenario("burst", "bench-hog", "burst", 768, 960, watch_s=6),
    Scenario("wrong-victim", "bench-leak", "ramp", 192, 1024, rate_mib_s=200, steady=True),
    Scenario("sigterm-hog", "bench-hog", "ramp", 768, 2048, rate_mib_s=200, ignore_term=True),
    Scenario("benign-spike", "bench-spike", "spike", 768, 384, rate_mib_s=400, benign=True,
             watch_s=4),
    Scenario("limited-group", "bench-hog", "ramp", 512, 2048, rate_mib_s=200, limited=True,
             ignore_term=True),
    Scenario("slow-leak", "bench-leak", "ramp", 192, 1024, rate_mib_s=20, steady=True),
)
# fmt: on


# ---- /proc -------------------------------------------------------------------------------------


def meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        parts = value.split()
        out[key] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    return out


def vmstat(key: str) -> int:
    for line in Path("/proc/vmstat").read_text().splitlines():
        name, value = line.split()
        if name == key:
            return int(value)
    return 0


def cpu_seconds(pid: int) -> float:
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def hwm_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def rss_bytes(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return None


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def other_daemons(ours: int | None) -> list[str]:
    """earlyoom, nohang and edged processes on the machine that this harness did not start
    (another user's tests, a service): they act on the same memory and may hit a workload."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in (ours, os.getpid()):
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [Path(a.decode(errors="replace")).name for a in argv[:4]]
        if words and (
            words[0] in ("earlyoom", "nohang")
            or any(w == "nohang" for w in words[1:2])
            or ("edged" in words and "run" in words)
        ):
            found.append(f"{' '.join(words[:4])} [{entry.name}]")
    return found


def set_comm(name: str) -> None:
    ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Let a cleanup finish: SIGINT, SIGTERM and SIGHUP that come during it are held and raised
    again after it (main thread only)."""
    got: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in HANDLED}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if got:
            signal.raise_signal(got[0])


# ---- the machine: balloon and safety group -----------------------------------------------------


class Balloon:
    """Unmapped shared memory (a memfd) that leaves about ``available_bytes`` of MemAvailable.

    Freed by ``close`` (the descriptor is the only reference; it is close-on-exec, so no child
    holds it). A watchdog thread empties it at once if MemAvailable falls under the floor.
    """

    def __init__(self, available_bytes: int, floor_bytes: int = BALLOON_FLOOR_MIB * MiB) -> None:
        self.available_bytes = available_bytes
        self.floor_bytes = floor_bytes
        self.size_bytes = 0
        self.before_bytes = meminfo()["MemAvailable"]
        self.after_bytes = self.before_bytes
        self.popped = threading.Event()
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._fd: int | None = os.memfd_create("bench-balloon", os.MFD_CLOEXEC)
        self._watchdog = threading.Thread(target=self._watch, daemon=True)

    def inflate(self) -> None:
        step = 512 * MiB
        for _ in range(4):  # the kernel drops page cache as it goes: top up until it holds
            short = meminfo()["MemAvailable"] - self.available_bytes
            if short < 16 * MiB:
                break
            while short > 0:
                n = min(step, short)
                with self._lock:
                    if self._fd is None:
                        return
                    os.posix_fallocate(self._fd, self.size_bytes, n)
                self.size_bytes += n
                short -= n
            time.sleep(0.2)
        self.after_bytes = meminfo()["MemAvailable"]
        self._watchdog.start()

    def _watch(self) -> None:
        while not self._halt.wait(0.02):
            if meminfo()["MemAvailable"] < self.floor_bytes:
                with self._lock:
                    if self._fd is not None:
                        os.ftruncate(self._fd, 0)
                self.popped.set()
                print(
                    f"MemAvailable under {self.floor_bytes // MiB} MiB: balloon emptied, "
                    "the benchmark stops", file=sys.stderr, flush=True,
                )  # fmt: skip
                return

    def close(self) -> None:
        self._halt.set()
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        if self._watchdog.is_alive():
            self._watchdog.join(timeout=1)


@contextlib.contextmanager
def balloon(available_bytes: int | None) -> Iterator[Balloon | None]:
    if available_bytes is None:
        yield None
        return
    b = Balloon(available_bytes)
    try:
        b.inflate()
        yield b
    finally:
        b.close()


class SafetyGroup:
    """A v1 memory cgroup holding workloads of one run (``parent``: nested in another)."""

    def __init__(self, parent: Path = MEMCG, prefix: str = "edged-bench-") -> None:
        self.path = parent / f"{prefix}{uuid.uuid4().hex[:8]}"
        self.path.mkdir()

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def usage_bytes(self) -> int:
        return int((self.path / "memory.usage_in_bytes").read_text())

    def limit(self, limit_bytes: int) -> None:
        (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))

    def oom_kills(self) -> int:
        """OOM kills in the group (v1 ``memory.oom_control``; not those of a group below it
        that hit its own limit)."""
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def remove(self) -> None:
        """Remove the group and any group left below it (by edged, or nested), deepest first,
        once the processes in them are gone."""
        remove_tree(self.path)


def remove_tree(path: Path) -> bool:
    """Remove ``path`` and the groups below it, deepest first, once their processes are gone
    (waits up to 5 s for them); whether it is gone."""

    def tree() -> list[Path]:
        found = [p for p in path.rglob("*") if p.is_dir()] if path.is_dir() else []
        return [*sorted(found, key=lambda p: -len(p.parts)), path]

    def busy(d: Path) -> bool:
        try:
            return bool((d / "cgroup.procs").read_text().split())
        except OSError:
            return False

    for _ in range(50):
        if not any(busy(d) for d in tree()):
            break
        time.sleep(0.1)
    for d in tree():
        with contextlib.suppress(OSError):
            (d / "memory.force_empty").write_text("0")
        with contextlib.suppress(OSError):
            d.rmdir()
    return not path.exists()


def remove_stale_groups() -> None:
    """Groups of a harness that was SIGKILLed (its workloads died with it)."""
    for path in MEMCG.glob(f"{GROUP_PREFIX}*"):
        gone = remove_tree(path)
        print(f"a stale group {path}: {'removed' if gone else 'could not be removed'}", flush=True)


# ---- workloads ---------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    proc: subprocess.Popen[bytes]
    report: Path
    gap_file: Path | None = None
    died_ns: int | None = None
    status: int | None = None

    def __post_init__(self) -> None:
        self._waiter = threading.Thread(target=self._wait, daemon=True)
        self._waiter.start()

    def _wait(self) -> None:
        status = self.proc.wait()
        self.died_ns = time.time_ns()
        self.status = status

    def events(self) -> list[tuple[str, int]]:
        if not self.report.exists():
            return []
        out = []
        for line in self.report.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                out.append((parts[0], int(parts[1])))
        return out

    def first(self, event: str) -> int | None:
        return next((t for e, t in self.events() if e == event), None)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.first("ready") is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{self.name} did not get ready (exit {self.proc.poll()})")
            time.sleep(0.01)

    def go(self) -> None:
        """Start a ``--wait-go`` workload."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"g")
        self.proc.stdin.close()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def worst_gap_s(self) -> float | None:
        if self.gap_file is None or not self.gap_file.exists():
            return None
        raw = self.gap_file.read_bytes()
        return int.from_bytes(raw[:8], "little") / 1e9 if len(raw) >= 8 else None

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)  # in case something stopped it
                self.proc.kill()

    def reap(self) -> None:
        """Wait for a killed workload; thaw it if a freezer group still holds it."""
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            thaw(self.proc.pid)
            self.proc.wait(timeout=30)
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        self._waiter.join(timeout=5)

    def stop(self) -> None:
        self.kill()
        self.reap()


def thaw(pid: int) -> None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "freezer" in controllers.split(","):
                (FREEZER / path.lstrip("/") / "freezer.state").write_text("THAWED")


def start_workload(
    workdir: Path,
    group: SafetyGroup,
    name: str,
    mode: str,
    target_mib: float,
    *,
    rate_mib_s: float = 0.0,
    ignore_term: bool = False,
    heartbeat: bool = False,
    wait_go: bool = False,
) -> Workload:
    report = workdir / f"{name}-{uuid.uuid4().hex[:6]}.log"
    gap = workdir / f"{name}-{uuid.uuid4().hex[:6]}.gap" if heartbeat else None
    argv = [
        sys.executable, str(WORKLOAD), "--name", name, "--mode", mode,
        "--target-mib", str(target_mib), "--rate-mib-s", str(rate_mib_s),
        "--cgroup-procs", str(group.procs), "--report", str(report),
    ]  # fmt: skip
    if ignore_term:
        argv.append("--ignore-term")
    if gap is not None:
        argv += ["--gap-file", str(gap)]
    if wait_go:
        argv.append("--wait-go")
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE if wait_go else subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return Workload(name, proc, report, gap)


# ---- the memory monitor ------------------------------------------------------------------------


class Monitor(threading.Thread):
    """The safety group's usage and MemAvailable every 2 ms; when memory first crossed (usage
    >= ``line_bytes`` or MemAvailable < ``threshold_bytes``), and the extremes."""

    def __init__(self, group: SafetyGroup, line_bytes: int, threshold_bytes: int) -> None:
        super().__init__(daemon=True)
        self.usage_path = group.path / "memory.usage_in_bytes"
        self.line_bytes = line_bytes
        self.threshold_bytes = threshold_bytes
        self.crossed_ns: int | None = None
        self.crossed_by: str | None = None
        self.at_crossing: tuple[int, int] | None = None  # (available, usage) then
        self.lowest_available = math.inf
        self.peak_usage = 0
        self.samples: list[tuple[int, int, int]] = []  # (time_ns, available, usage)
        self._halt = threading.Event()

    def over(self, available: int, usage: int) -> bool:
        return usage >= self.line_bytes or available < self.threshold_bytes

    def run(self) -> None:
        # the instrument must not miss a fast fill because the hog and the daemon hold both
        # CPUs: this thread (pid 0 = the calling thread) runs SCHED_FIFO; it sleeps 2 ms a loop
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        mem = os.open("/proc/meminfo", os.O_RDONLY)
        use = os.open(self.usage_path, os.O_RDONLY)
        try:
            while not self._halt.is_set():
                raw = os.pread(mem, 8192, 0)
                at = raw.index(b"MemAvailable:")
                available = int(raw[at + 13 : raw.index(b"kB", at)]) * 1024
                usage = int(os.pread(use, 64, 0))
                now = time.time_ns()
                self.samples.append((now, available, usage))
                self.lowest_available = min(self.lowest_available, available)
                self.peak_usage = max(self.peak_usage, usage)
                if self.crossed_ns is None and self.over(available, usage):
                    self.crossed_ns = now
                    self.crossed_by = "usage" if usage >= self.line_bytes else "available"
                    self.at_crossing = (available, usage)
                time.sleep(0.002)
        finally:
            os.close(mem)
            os.close(use)

    def recovered_after(self, t_ns: int) -> int | None:
        """The first sample at or after ``t_ns`` with memory back under the crossing."""
        return next((t for t, a, u in self.samples if t >= t_ns and not self.over(a, u)), None)

    def over_now(self) -> bool:
        if not self.samples:
            return False
        _, available, usage = self.samples[-1]
        return self.over(available, usage)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


# ---- the daemons -------------------------------------------------------------------------------


EARLYOOM_HIT = re.compile(r'sending (SIG\w+) to process (\d+) uid \d+ "(.*?)"')
NOHANG_VICTIM = re.compile(r"PID:\s+(\d+), name: (.*?), state:")
NOHANG_SEND = re.compile(r"Sending (SIG\w+) to the victim")


@dataclass
class Daemon:
    name: str
    proc: subprocess.Popen[bytes] | None
    log: Path
    socket_path: Path | None = None

    def actions_ns(self) -> list[tuple[int, int, str]]:
        """edged only: (time_ns, pid, action and why) of each action it took (done or dry
        run)."""
        if self.socket_path is None or self.proc is None or self.proc.poll() is not None:
            return []
        reply = rpc(self.socket_path, "events", {"since": 0})
        return [
            (int(e["time_unix_ns"]), int(e["pid"]), f"{e['action']} ({e['detail'][:200]})")
            for e in reply["events"]
            if e.get("status") in ("done", "dry_run")
        ]

    def log_hits(self) -> list[tuple[int, str, str]]:
        """earlyoom and nohang: (pid, name, signal) of each process they signalled, from their
        logs (no times: the workloads note their own)."""
        if not self.log.exists():
            return []
        text = self.log.read_text(errors="replace")
        if self.name == "earlyoom":
            return [(int(p), n, s) for s, p, n in EARLYOOM_HIT.findall(text)]
        out: list[tuple[int, str, str]] = []
        victim: tuple[int, str] | None = None
        for line in text.splitlines():
            if m := NOHANG_VICTIM.search(line):
                victim = (int(m[1]), m[2])
            elif (m := NOHANG_SEND.search(line)) and victim is not None:
                out.append((*victim, m[1]))
        return out

    def notable_log(self, limit: int = 60) -> list[str]:
        """edged's start line, warnings, errors, alerts and action lines (the JSON keeps
        them)."""
        if not self.log.exists() or not self.name.startswith("edged-"):
            return []
        keep = (" ready: ", "WARNING", "ERROR", "CRITICAL", "Traceback", "alert", "throttle",
                "freeze", "terminate", "kill", "thaw")  # fmt: skip
        lines = self.log.read_text(errors="replace").splitlines()
        return [line[:400] for line in lines if any(k in line for k in keep)][-limit:]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)


def rpc(socket_path: Path, method: str, params: dict[str, Any]) -> Any:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(socket_path))
        request = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
        sock.sendall(json.dumps(request).encode() + b"\n")
        with sock.makefile("rb") as reader:
            reply = json.loads(reader.readline())
    if "error" in reply:
        raise BenchError(f"{method}: {reply['error']}")
    return reply["result"]


def wait_for_log(log: Path, marker: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"exited {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
        if log.exists() and marker in log.read_text(errors="replace"):
            return
        time.sleep(0.02)
    raise BenchError(f"no {marker!r} in {log} after {timeout_s} s")


def percpu_free_bytes() -> int:
    """Free pages on the per-CPU lists (``count:`` in /proc/zoneinfo): free, yet not in
    MemFree or MemAvailable. After a large free this kernel keeps over 1 GiB there, and
    drains it only as it is allocated again."""
    pages = 0
    for line in Path("/proc/zoneinfo").read_text().splitlines():
        words = line.split()
        if len(words) == 2 and words[0] == "count:":
            pages += int(words[1])
    return pages * PAGE


def edged_config(strategy: str, hard_bytes: int, soft_cap_mib: float) -> str:
    """What a user writes: the two levels and the strategy, nothing else."""
    hard = hard_bytes
    soft = hard - int(min(SOFT_BELOW_HARD_MIB, soft_cap_mib) * MiB)
    return f'[limits.memory]\nsoft = {soft}\nhard = {hard}\n\n[strategy]\nname = "{strategy}"\n'


def start_daemon(
    name: str, workdir: Path, src: Path, threshold_bytes: int, soft_cap_mib: float, *,
    edged_hard_bytes: int = 0, flat_nice: bool = False,
) -> Daemon:  # fmt: skip
    tag = uuid.uuid4().hex[:6]
    log = workdir / f"{name}-{tag}.log"
    infrastructure = "^(" + "|".join(INFRASTRUCTURE) + ")$"
    threshold_kib = threshold_bytes // 1024
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGED_", "OTEL_"))}
    nice = 0
    if name == "kernel":
        return Daemon(name, None, log)
    if name == "earlyoom":
        argv = ["earlyoom", "-M", f"{threshold_kib}", "-r", "0", "--avoid", infrastructure]
        marker = "sending SIGTERM when"
    elif name == "nohang":
        conf = workdir / f"nohang-{tag}.conf"
        base = Path("/etc/nohang/nohang.conf").read_text()
        override = {
            "soft_threshold_min_mem": f"{threshold_bytes / MiB:.0f} M",
            "hard_threshold_min_mem": f"{threshold_bytes / MiB / 2:.0f} M",
        }
        lines = []
        for line in base.splitlines():
            key = line.split("=", 1)[0].strip()
            lines.append(f"{key} = {override[key]}" if key in override else line)
        lines.append(f"@BADNESS_ADJ_RE_NAME -1000 /// {infrastructure}")
        conf.write_text("\n".join(lines) + "\n")
        argv = ["nohang", "--monitor", "--config", str(conf)]
        marker = "Monitoring has started"
    elif name.startswith("edged-"):
        cfg = workdir / f"edged-{tag}.toml"
        cfg.write_text(edged_config(name.removeprefix("edged-"), edged_hard_bytes, soft_cap_mib))
        sock = workdir / f"edged-{tag}.sock"
        env["STATE_DIRECTORY"] = str(workdir / f"state-{tag}")
        argv = [
            sys.executable, "-m", "edged", "run", "--config", str(cfg), "--socket", str(sock),
            "--prometheus", "off",
        ]  # fmt: skip
        marker = " ready: "
        nice = 0 if flat_nice else EDGED_NICE
    else:
        raise BenchError(f"unknown daemon {name}")
    with log.open("wb") as out:
        # setpriv --pdeathsig: the daemon gets SIGTERM if the harness dies; nice and setpriv
        # exec, so the daemon's parent is this harness
        proc = subprocess.Popen(
            ["nice", "-n", str(nice), "setpriv", "--pdeathsig", "TERM", *argv], cwd=src, env=env,
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    daemon = Daemon(name, proc, log, sock if name.startswith("edged-") else None)
    try:
        wait_for_log(log, marker, proc, 30)
    except BenchError:
        daemon.stop()
        raise
    return daemon


# ---- one run -----------------------------------------------------------------------------------


@dataclass
class RunResult:
    scenario: str
    daemon: str
    repetition: int
    cpu_load: int
    ok: bool
    why: list[str]  # what made it not OK
    threshold_mib: float
    crossed: bool
    crossed_by: str | None  # usage | available
    action_ms: float | None  # first hit relative to the crossing (None: no crossing or no hit)
    acted_before_crossing: bool
    recovered_ms: float | None  # memory back under the crossing, relative to the crossing
    oom_kills: int  # /proc/vmstat oom_kill over the run
    group_oom_kills: int  # the safety group's (and nested group's) memory.oom_control
    hits: list[str] = field(default_factory=list)  # in the order hit; other:<comm>[pid] last
    culprit_stopped: bool = False
    services_alive: dict[str, bool] = field(default_factory=dict)
    service_gaps_ms: dict[str, float | None] = field(default_factory=dict)
    service_gap_ms: float | None = None  # the worst of them
    daemon_cpu_s: float | None = None
    daemon_rss_mib: float | None = None
    lowest_available_mib: float = 0.0
    peak_growth_mib: float = 0.0  # the safety group's peak usage above its start
    # at the crossing: how far the group had grown, and how much more MemAvailable had fallen
    # (memory used outside the group: the daemon, the rest of the machine, the kernel's lists)
    growth_at_crossing_mib: float | None = None
    outside_at_crossing_mib: float | None = None
    duration_s: float = 0.0
    disturbed: list[str] = field(default_factory=list)  # other OOM daemons on the machine
    timeline: list[str] = field(default_factory=list)  # what happened, ms from the go
    daemon_log: list[str] = field(default_factory=list)  # edged's warnings and action lines


def held_still(samples: Sequence[tuple[float, int]], window_s: float = 1.0) -> bool:
    """Whether RSS (``(monotonic s, bytes)`` samples) grew by less than 8 MiB over the last
    ``window_s``."""
    if not samples:
        return False
    end = samples[-1][0]
    recent = [b for t, b in samples if t >= end - window_s]
    return end - samples[0][0] >= window_s and max(recent) - min(recent) < 8 * MiB


def run_once(
    scenario: Scenario, daemon_name: str, repetition: int, *, workdir: Path, src: Path,
    margin_mib: float, cpu_load: int, flat_nice: bool,
) -> RunResult:  # fmt: skip
    t_start = time.monotonic()
    group = SafetyGroup(prefix=GROUP_PREFIX)
    inner: SafetyGroup | None = None
    workloads: list[Workload] = []
    services: list[Workload] = []
    daemon: Daemon | None = None
    monitor: Monitor | None = None
    try:
        for i in range(cpu_load):
            workloads.append(start_workload(workdir, group, f"bench-spin{i}", "spin", 0))

        def service(home: SafetyGroup, name: str, mib: float) -> Workload:
            w = start_workload(workdir, home, name, "hold", mib, heartbeat=True)
            workloads.append(w)  # at once: whatever happens next, the finally ends it
            services.append(w)
            return w

        service(group, "bench-service", SERVICE_MIB)
        if scenario.steady:
            service(group, "bench-steady", STEADY_MIB)
        home = group
        if scenario.limited:
            inner = home = SafetyGroup(parent=group.path, prefix="inner-")
            service(inner, "bench-app", APP_MIB)
        culprit = start_workload(
            workdir, home, scenario.culprit, scenario.mode, scenario.target_mib,
            rate_mib_s=scenario.rate_mib_s, ignore_term=scenario.ignore_term, wait_go=True,
        )  # fmt: skip
        workloads.append(culprit)
        for w in workloads:
            w.wait_ready()
        time.sleep(0.3)
        cross = int(scenario.cross_mib * MiB)
        margin = int(margin_mib * MiB)
        usage0 = group.usage_bytes()
        info0 = meminfo()
        available0 = info0["MemAvailable"]
        threshold = available0 - cross
        # the same point in edged's own measure of used (MemTotal - MemAvailable - per-CPU
        # free pages): where it is when the culprit has allocated `cross`
        edged_hard = info0["MemTotal"] - available0 - percpu_free_bytes() + cross
        group.limit(usage0 + cross + margin)
        if inner is not None:
            inner.limit(inner.usage_bytes() + cross + margin)
        others = set(other_daemons(None))
        oom0 = vmstat("oom_kill")
        group_oom0 = group.oom_kills() + (inner.oom_kills() if inner else 0)
        # edged's soft level: 256 MiB under hard, but never below where the scenario starts
        daemon_ns = time.time_ns()
        daemon = start_daemon(
            daemon_name, workdir, src, threshold, scenario.cross_mib / 2,
            edged_hard_bytes=edged_hard, flat_nice=flat_nice,
        )  # fmt: skip
        cpu0 = cpu_seconds(daemon.proc.pid) if daemon.proc else 0.0
        time.sleep(1.0)  # a second of calm: every daemon has looked at least once
        monitor = Monitor(group, usage0 + cross, threshold)
        monitor.start()
        time.sleep(0.01)
        go_ns = time.time_ns()
        culprit.go()
        deadline = time.monotonic() + scenario.watch(margin_mib)
        calm_since: float | None = None
        culprit_rss: list[tuple[float, int]] = []
        while time.monotonic() < deadline:
            now = time.monotonic()
            rss = rss_bytes(culprit.proc.pid) if culprit.alive() else None
            if rss is not None:
                culprit_rss.append((now, rss))
            if not scenario.benign and not culprit.alive() and not monitor.over_now():
                calm_since = calm_since or now
                if now - calm_since > 0.3:
                    break
            else:
                calm_since = None
            time.sleep(0.01)
        # what the daemon did, before it is stopped
        others.update(other_daemons(daemon.proc.pid if daemon.proc else None))
        edged_actions = [a for a in daemon.actions_ns() if a[0] >= daemon_ns]
        log_hits = daemon.log_hits()
        daemon_cpu = daemon_rss = None
        if daemon.proc and daemon.proc.poll() is None:
            daemon_cpu = cpu_seconds(daemon.proc.pid) - cpu0
            daemon_rss = hwm_bytes(daemon.proc.pid) / MiB
        monitor.stop()
        oom_kills = vmstat("oom_kill") - oom0
        group_ooms = group.oom_kills() + (inner.oom_kills() if inner else 0) - group_oom0
        stopped = not culprit.alive() or (culprit.first("full") is None and held_still(culprit_rss))
        alive = {s.name: s.alive() for s in services}
        gaps = {s.name: (None if (g := s.worst_gap_s()) is None else g * 1e3) for s in services}

        # who was hit, and when
        by_pid = {w.proc.pid: w for w in workloads}
        hit_at: dict[str, int] = {}
        for w in workloads:
            times = [t for t in (w.first("term"), w.died_ns) if t is not None]
            if times:
                hit_at[w.name] = min(times)
        foreign: list[str] = []
        for t_ns, pid, action in edged_actions:
            if action.split()[0] not in EDGED_HITS:
                continue
            acted_on = by_pid.get(pid)
            if acted_on is not None:
                hit_at[acted_on.name] = min(hit_at.get(acted_on.name, t_ns), t_ns)
            elif pid:
                foreign.append(f"other:{comm(pid)}[{pid}]")
        for pid, name, _sig in log_hits:
            if pid not in by_pid:
                foreign.append(f"other:{name}[{pid}]")
        hits = sorted(hit_at, key=hit_at.__getitem__) + list(dict.fromkeys(foreign))
        name_of = {pid: w.name for pid, w in by_pid.items()}
        timeline = [
            f"{(t - go_ns) / 1e6:+.0f} edged {a} {name_of.get(p, f'pid {p}')}"
            for t, p, a in edged_actions
        ]
        timeline += [f"? {daemon_name} {sig} {name} [{pid}]" for pid, name, sig in log_hits]
        for w in workloads:
            timeline += [f"{(t - go_ns) / 1e6:+.0f} {w.name} {e}" for e, t in w.events()]
            if w.died_ns is not None:
                timeline.append(f"{(w.died_ns - go_ns) / 1e6:+.0f} {w.name} died {w.status}")
        crossed_ns = monitor.crossed_ns
        if crossed_ns is not None:
            timeline.append(f"{(crossed_ns - go_ns) / 1e6:+.0f} crossed ({monitor.crossed_by})")
        timeline.sort(key=lambda line: math.inf if line[0] == "?" else float(line.split()[0]))
        first_ns = min(hit_at.values()) if hit_at else None
        action_ms = None
        if first_ns is not None and crossed_ns is not None:
            action_ms = (first_ns - crossed_ns) / 1e6
        recovered_ms = None
        if crossed_ns is not None and first_ns is not None:
            back = monitor.recovered_after(max(first_ns, crossed_ns))
            recovered_ms = (back - crossed_ns) / 1e6 if back is not None else None

        why = []
        if oom_kills:
            why.append(f"OOM kill x{oom_kills}")
        why += [f"{name} dead" for name, ok in alive.items() if not ok]
        why += [f"{s.name} hit" for s in services if s.name in hits and alive[s.name]]
        if scenario.benign:
            if hits:
                why.append(f"acted ({hits[0]})")
        else:
            if not hits:
                why.append("nobody hit")
            elif hits[0] != scenario.culprit:
                why.append(f"first hit {hits[0]}")
            why += [
                f"{h} hit" for h in hits[1:]
                if h != scenario.culprit and h not in alive
            ]  # fmt: skip
            if not stopped:
                why.append("culprit not stopped")
        growth_c = outside_c = None
        if monitor.at_crossing is not None:
            available_c, usage_c = monitor.at_crossing
            growth_c = (usage_c - usage0) / MiB
            outside_c = (available0 - available_c) / MiB - growth_c
        return RunResult(
            scenario=scenario.name,
            daemon=daemon_name,
            repetition=repetition,
            cpu_load=cpu_load,
            ok=not why,
            why=why,
            threshold_mib=threshold / MiB,
            crossed=crossed_ns is not None,
            crossed_by=monitor.crossed_by,
            action_ms=action_ms,
            acted_before_crossing=first_ns is not None
            and (crossed_ns is None or first_ns < crossed_ns),
            recovered_ms=recovered_ms,
            oom_kills=oom_kills,
            group_oom_kills=group_ooms,
            hits=hits,
            culprit_stopped=stopped,
            services_alive=alive,
            service_gaps_ms=gaps,
            service_gap_ms=max((g for g in gaps.values() if g is not None), default=None),
            daemon_cpu_s=daemon_cpu,
            daemon_rss_mib=daemon_rss,
            lowest_available_mib=monitor.lowest_available / MiB,
            peak_growth_mib=(monitor.peak_usage - usage0) / MiB,
            growth_at_crossing_mib=growth_c,
            outside_at_crossing_mib=outside_c,
            duration_s=time.monotonic() - t_start,
            disturbed=sorted(others),
            timeline=timeline,
            daemon_log=daemon.notable_log(),
        )
    finally:
        with shielded():
            if monitor is not None and monitor.is_alive():
                monitor.stop()
            for w in workloads:
                w.kill()
            if daemon is not None:
                daemon.stop()  # edged thaws, unthrottles and removes its groups
            for w in workloads:
                w.reap()
            group.remove()


# ---- the report --------------------------------------------------------------------------------


def med(values: Sequence[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def fmt(value: float | None, spec: str = ".0f") -> str:
    return "—" if value is None else format(value, spec)


def action_text(rs: Sequence[RunResult]) -> str:
    """The median breach→action of the runs that crossed and were hit; ``before`` where every
    hit came before a crossing that never happened; ``—`` where nobody acted."""
    action = med([r.action_ms for r in rs])
    if action is not None:
        return f"{action:.0f} ms"
    if any(r.acted_before_crossing for r in rs):
        return "before"
    return "—"


def summary(results: Sequence[RunResult], scenarios: list[str], daemons: list[str]) -> list[str]:
    out = [
        "| scenario | " + " | ".join(daemons) + " |",
        "|---|" + "---|" * len(daemons),
    ]
    for s in scenarios:
        cells = []
        for d in daemons:
            rs = [r for r in results if r.scenario == s and r.daemon == d]
            cells.append(f"{sum(r.ok for r in rs)}/{len(rs)} · {action_text(rs)}" if rs else "")
        out.append(f"| {s} | " + " | ".join(cells) + " |")
    return out


def report(results: Sequence[RunResult], meta: dict[str, Any]) -> str:
    scenarios = list(dict.fromkeys(r.scenario for r in results))
    daemons = list(dict.fromkeys(r.daemon for r in results))
    out = [
        f"# Protection benchmark, {meta['date']}",
        "",
        f"edged {meta['commit']}; {meta['runs']} runs per cell; CPU load: {meta['cpu_load']}; "
        f"balloon: {meta['balloon']}; safety margin past the crossing: {meta['margin_mib']:.0f} "
        f"MiB; daemon niceness: {meta['nice']}; earlyoom {meta['earlyoom']}, nohang "
        f"{meta['nohang']}; kernel {meta['kernel']}; {meta['duration_min']:.1f} minutes "
        f"({meta['run_s']:.1f} s a run).",
        "",
        "edged ran with its defaults plus `[limits.memory] soft/hard` and `[strategy] name` "
        "only; no daemon was told which process is the service or the culprit.",
        "",
        f"Runs with another OOM daemon on the machine (earlyoom, nohang or edged that this "
        f"harness did not start; such a run's figures are not the daemon's alone): "
        f"{sum(bool(r.disturbed) for r in results)} of {len(results)}.",
        "",
        "## Summary",
        "",
        "Runs OK of all runs · median breach→action (ms from the crossing; `before`: every "
        "action came before memory crossed, so it never did; `—`: nobody acted). OK: no kernel "
        "OOM kill, the services alive and never hit, the culprit the only process hit and "
        "stopped; for benign-spike: nobody hit.",
        "",
        *summary(results, scenarios, daemons),
        "",
        "## Detail",
        "",
        "*crossed*: runs in which memory crossed (the group's usage, or MemAvailable first: "
        "then memory outside the group moved it too, see `outside_at_crossing_mib`); *first "
        "hit*: the most common first victim; *OOM*: kernel OOM kills over all runs; *gap*: the "
        "services' worst heartbeat gap over all runs (10 ms period); CPU and RSS: medians; "
        "*not OK*: why, over all runs.",
        "",
        "| scenario | daemon | OK | crossed | breach→action | first hit | OOM | services alive "
        "| gap ms | daemon CPU s | RSS MiB | not OK |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in scenarios:
        for d in daemons:
            rs = [r for r in results if r.scenario == s and r.daemon == d]
            if not rs:
                continue
            n = len(rs)
            firsts = [r.hits[0] if r.hits else "nobody" for r in rs]
            common = max(set(firsts), key=firsts.count)
            before = sum(r.acted_before_crossing for r in rs)
            act = action_text(rs) + (f" ({before}/{n} before)" if before else "")
            gaps = [r.service_gap_ms for r in rs if r.service_gap_ms is not None]
            crossed = f"{sum(r.crossed for r in rs)}/{n}"
            if by_available := sum(r.crossed_by == "available" for r in rs):
                crossed += f" ({by_available} by MemAvailable)"
            why = Counter(w for r in rs for w in r.why)
            cells = [
                s, d, f"{sum(r.ok for r in rs)}/{n}", crossed, act,
                f"{common} ({firsts.count(common)}/{n})", str(sum(r.oom_kills for r in rs)),
                f"{sum(all(r.services_alive.values()) for r in rs)}/{n}",
                fmt(max(gaps) if gaps else None), fmt(med([r.daemon_cpu_s for r in rs]), ".2f"),
                fmt(med([r.daemon_rss_mib for r in rs]), ".1f"),
                ", ".join(f"{w} ({c}/{n})" for w, c in why.most_common()) or "—",
            ]  # fmt: skip
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def progress_line(r: RunResult, runs: int) -> str:
    crossed = "-"
    if r.crossed_by is not None:
        crossed = f"{r.crossed_by}@{fmt(r.growth_at_crossing_mib)}MiB"
    return (
        f"[{dt.datetime.now():%H:%M:%S}] {r.repetition + 1}/{runs} {r.scenario:13} {r.daemon:17} "
        f"{'OK ' if r.ok else 'BAD'} crossed={crossed:17} "
        f"action={fmt(r.action_ms, '+.0f'):>6} ms hits={','.join(r.hits) or '-'} "
        f"oom={r.oom_kills} gap={fmt(r.service_gap_ms)} ms {r.duration_s:.1f} s"
        + (f"  ({'; '.join(r.why)})" if r.why else "")
        + (f"  DISTURBED by {', '.join(r.disturbed)}" if r.disturbed else "")
    )


def tool_version(argv: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        text = (done.stdout + done.stderr).strip().splitlines()
        return text[-1] if text else "?"
    return "absent"


def names(values: Sequence[str]) -> list[str]:
    """``a,b c`` -> ``[a, b, c]``: lists are given with commas, spaces or both."""
    return [v for value in values for v in value.split(",") if v]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=3)
    every = [s.name for s in SCENARIOS]
    ap.add_argument("--daemons", nargs="+", default=list(ALL_DAEMONS),
                    help=f"comma- or space-separated, of {','.join(ALL_DAEMONS)}")  # fmt: skip
    ap.add_argument("--scenarios", nargs="+", default=every,
                    help=f"comma- or space-separated, of {','.join(every)}")  # fmt: skip
    ap.add_argument("--available", type=float, default=2048, help="MiB left available")
    ap.add_argument("--no-balloon", action="store_true")
    ap.add_argument("--margin", type=float, default=256, help="MiB past the crossing")
    ap.add_argument("--cpu-load", type=int, default=0, metavar="N", help="N busy loops")
    ap.add_argument("--flat-nice", action="store_true", help="edged at nice 0, not -5")
    ap.add_argument("--working-tree", action="store_true", help="measure uncommitted edits")
    ap.add_argument("--quick", action="store_true", help="1 run of each")
    args = ap.parse_args(argv)
    daemons, wanted = names(args.daemons), names(args.scenarios)
    for bad in [d for d in daemons if d not in ALL_DAEMONS] + [s for s in wanted if s not in every]:
        ap.error(f"unknown daemon or scenario {bad!r}")
    if os.geteuid() != 0 or not MEMCG.is_dir():
        print("needs root and cgroup v1's memory controller", file=sys.stderr)
        return 2
    for tool in ("earlyoom", "nohang"):
        if tool in daemons and shutil.which(tool) is None:
            print(f"{tool} is not installed (apt-get install {tool})", file=sys.stderr)
            return 2
    lock = LOCK.open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        print(f"another protection benchmark holds {LOCK}", file=sys.stderr)
        return 2
    runs = 1 if args.quick else args.runs
    set_comm("bench-harness")
    # SIGTERM and SIGHUP unwind like Ctrl-C: processes ended, groups removed, balloon freed
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, lambda signum, frame: sys.exit(128 + signum))
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
        check=True,
    ).stdout.strip()  # fmt: skip
    remove_stale_groups()
    scenarios = [s for s in SCENARIOS if s.name in wanted]
    results: list[RunResult] = []
    started = dt.datetime.now()
    t0 = time.monotonic()
    balloon_text = "off"
    with tempfile.TemporaryDirectory(prefix="edged-protection-") as tmp:
        workdir = Path(tmp)
        src = snapshot_source(workdir, None if args.working_tree else "HEAD")
        available = None if args.no_balloon else int(args.available * MiB)
        with balloon(available) as b:
            if b is not None:
                balloon_text = (
                    f"{b.size_bytes / MiB:.0f} MiB memfd, MemAvailable "
                    f"{b.before_bytes / MiB:.0f} -> {b.after_bytes / MiB:.0f} MiB"
                )
                print(f"balloon: {balloon_text}", flush=True)
                if b.after_bytes > b.available_bytes + 256 * MiB:
                    print("warning: MemAvailable did not drop as far as asked", flush=True)
            for rep in range(runs):
                for scenario in scenarios:
                    for name in daemons:
                        if b is not None and b.popped.is_set():
                            raise SystemExit("the balloon was emptied: stopped")
                        try:
                            r = run_once(
                                scenario, name, rep, workdir=workdir, src=src,
                                margin_mib=args.margin, cpu_load=args.cpu_load,
                                flat_nice=args.flat_nice,
                            )  # fmt: skip
                        except BenchError as exc:
                            print(f"  {scenario.name} {name}: failed: {exc}", flush=True)
                            continue
                        results.append(r)
                        print(progress_line(r, runs), flush=True)
                        time.sleep(0.5)
    elapsed = time.monotonic() - t0
    meta = {
        "date": f"{started:%Y-%m-%d %H:%M}",
        "commit": commit + (" + working tree" if args.working_tree else ""),
        "runs": runs,
        "cpu_load": (
            f"on, {args.cpu_load} busy loops (nice 0, in the safety group)"
            if args.cpu_load
            else "off"
        ),
        "balloon": balloon_text,
        "margin_mib": args.margin,
        "nice": "all 0" if args.flat_nice else f"edged {EDGED_NICE} (edged.service), others 0",
        "earlyoom": tool_version(["dpkg-query", "-W", "-f=${Version}", "earlyoom"]),
        "nohang": tool_version(["dpkg-query", "-W", "-f=${Version}", "nohang"]),
        "kernel": os.uname().release,
        "duration_min": elapsed / 60,
        "run_s": elapsed / max(1, len(results)),
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    text = report(results, meta)
    print(text)
    stem = write_results(f"protection-{started:%Y%m%d-%H%M%S}", text, meta, results)
    print(f"written to bench/results/{stem}.md and .json")
    return 0


def write_results(stem: str, text: str, meta: dict[str, Any], runs: Sequence[Any]) -> str:
    """The report as ``bench/results/STEM.md`` and the raw runs (dataclasses) beside it as
    ``STEM.json``; returns the stem."""
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / f"{stem}.md").write_text(text)
    (out_dir / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "runs": [asdict(r) for r in runs]}, indent=1)
    )
    return stem


if __name__ == "__main__":
    sys.exit(main())
