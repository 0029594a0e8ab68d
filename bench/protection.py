"""Protection, side by side: edged's strategies against earlyoom, nohang and the kernel alone.

A benchmark, not a test: it prints a markdown report, writes it to
``bench/results/protection-<date>-<time>.md`` with the raw runs as JSON beside it, and asserts
nothing. It needs root, cgroup v1's memory controller, and Debian's ``earlyoom`` and ``nohang``.

The machine is made a small device, and every workload is fenced
-------------------------------------------------------------------

* **A hugetlb balloon**: ``/proc/sys/vm/nr_hugepages`` is raised until about ``--available``
  (2 GiB) stays available, and put back in a ``finally``. Huge pages count in ``MemTotal`` and
  are never available, so every daemon sees a 2 GiB machine, and the kernel reclaims as it would
  on one.
* **Small per-CPU page lists** (``vm.percpu_pagelist_high_fraction = 4096``, put back after):
  this kernel lets them grow to ~565 MiB per CPU, uncounted in MemAvailable, which then lags a
  fast fill by up to ~1 GiB for every daemon alike; a 2 GiB device has small lists.
* **A safety memory cgroup** per run holds every workload, its limit set a margin (``--margin``,
  384 MiB) past the daemons' shared threshold. A kernel OOM kill there means "the daemon was too
  late"; the machine itself is never at risk. Kernel OOM kills are counted from ``/proc/vmstat``
  ``oom_kill`` (memcg kills included).

The same threshold for everyone
-------------------------------

Before each run the harness measures MemAvailable (with the workloads already running that the
scenario starts with) and sets the threshold ``T`` = that minus the scenario's ``cross`` figure:
memory crosses ``T`` once the scenario's hog has allocated ``cross`` MiB.

* ``earlyoom -M T_KiB`` (SIGTERM below T, SIGKILL below T/2), ``--avoid`` the protected names;
* ``nohang --monitor`` with ``soft_threshold_min_mem = T M`` and ``hard_threshold_min_mem =
  T/2 M``, the protected names at badness -1000;
* ``edged run`` (1 s interval, its default) with ``[limits.memory] hard`` = MemTotal - T (SIGTERM
  at hard, as earlyoom at T) and ``soft`` 256 MiB below it (half the scenario's ``cross``
  where that is less, so that the machine does not start above soft); ``[[rules]]`` name the
  workloads
  (the protected ones ``critical``, the others ``normal``) and ``[sampling] processes = "rules"``
  samples just those, as a deployment names the services it runs. One run per strategy
  (dynamic, predictive, adaptive). earlyoom and nohang look at every process, as they always do;
* ``kernel``: no daemon; only the safety group's OOM killer.

Scenarios
---------

Always running, in the safety group: ``bench-service``, 256 MiB, a heartbeat every 10 ms, the
protected service (critical for edged, avoided by earlyoom and nohang); its worst heartbeat gap
is reported. Then per scenario:

=============== ===========================================================================
slow-ramp       ``bench-hog`` grows at 100 MiB/s, crossing after 768 MiB
fast-ramp       ``bench-hog`` grows as fast as this box faults pages, crossing after 768 MiB
burst           ``bench-hog`` allocates 1024 MiB in one call (crossing after 768 MiB)
steady+leak     ``bench-steady`` (640 MiB, *not* protected, started before the daemon) beside
                ``bench-leak`` growing at 200 MiB/s, crossing after 192 MiB: the right victim
                is the small leak, not the large steady service
sigterm-hog     ``bench-hog`` ignores SIGTERM and grows at 200 MiB/s, crossing after 768 MiB
benign-spike    ``bench-spike`` rises at 400 MiB/s to 384 MiB (384 MiB short of the threshold),
                holds 0.5 s, frees it: nobody should act
slow-leak       ``bench-steady`` (640 MiB) beside ``bench-leak`` growing at 20 MiB/s, crossing
                after 192 MiB
=============== ===========================================================================

What is measured, per run
-------------------------

A monitor thread (SCHED_FIFO, so that a hog and a daemon busy on both CPUs cannot delay it)
reads ``/proc/meminfo`` every 2 ms. *Crossing*: the first read with
MemAvailable below T. *First action*: the earliest of a SIGTERM a workload received (each
workload notes the time in its signal handler), a workload's death (its waiter thread), and, for
edged, the time of its first action event (``events`` on its socket: throttle, freeze, ...).
*Recovered*: the first read after the first action with MemAvailable at or above T again.
Times are relative to the crossing (negative: acted before memory crossed). Also: kernel OOM
kills, which workloads were hit (signalled, killed, throttled or frozen) and whether the first
one was the right one, whether the protected service survived and its worst heartbeat gap, and
the daemon's CPU seconds (``utime + stime``) and peak RSS (``VmHWM``) over the run.

Runs are interleaved (repetition, then scenario, then daemon) so every daemon sees the same
conditions; medians of ``--runs`` (5) are reported.

Usage: ``.venv/bin/python bench/protection.py [--runs 5] [--quick] [--no-balloon]
[--daemons ...] [--scenarios ...]``. ``--no-balloon`` leaves the machine as it is (for a quick
look on a shared box; the figures are then not the benchmark's).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import json
import math
import os
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
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from overhead import snapshot_source  # the same frozen copy of edged as the overhead bench

REPO = Path(__file__).resolve().parent.parent
WORKLOAD = Path(__file__).resolve().parent / "_workload.py"
MiB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")
MEMCG = Path("/sys/fs/cgroup/memory")
PROTECTED = ("bench-service", "bench-harness")
MANAGED = ("bench-hog", "bench-leak", "bench-steady", "bench-spike")
INFRASTRUCTURE = ("bash", "sh", "sshd", "tmux", "process_api", "python3", "python")
SERVICE_MIB = 256
SOFT_BELOW_HARD_MIB = 256
EDGED_STRATEGIES = ("dynamic", "predictive", "adaptive")
ALL_DAEMONS = (*(f"edged-{s}" for s in EDGED_STRATEGIES), "earlyoom", "nohang", "kernel")


class BenchError(Exception):
    """A peer that would not start; the run cannot be measured."""


@dataclass(frozen=True)
class Scenario:
    name: str
    hog_name: str
    mode: str  # _workload.py --mode
    cross_mib: float  # what the hog allocates before memory crosses the threshold
    target_mib: float  # how far it would go if nobody stopped it
    rate_mib_s: float = 0.0
    steady_mib: float = 0.0  # bench-steady, started before the daemon
    ignore_term: bool = False
    benign: bool = False  # nobody should act
    watch_s: float = 12.0  # how long after the hog starts the run is watched at most


SCENARIOS = (
    Scenario("slow-ramp", "bench-hog", "ramp", 768, 2048, rate_mib_s=100, watch_s=14),
    Scenario("fast-ramp", "bench-hog", "ramp", 768, 2048, rate_mib_s=0, watch_s=6),
    Scenario("burst", "bench-hog", "burst", 768, 1024, watch_s=6),
    Scenario(
        "steady+leak", "bench-leak", "ramp", 192, 1024, rate_mib_s=200, steady_mib=640, watch_s=8
    ),
    Scenario(
        "sigterm-hog", "bench-hog", "ramp", 768, 2048, rate_mib_s=200, ignore_term=True, watch_s=12
    ),
    Scenario(
        "benign-spike", "bench-spike", "spike", 768, 384, rate_mib_s=400, benign=True, watch_s=4
    ),
    Scenario(
        "slow-leak", "bench-leak", "ramp", 192, 1024, rate_mib_s=20, steady_mib=640, watch_s=16
    ),
)


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


def set_comm(name: str) -> None:
    ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)


# ---- the machine: balloon and safety group -----------------------------------------------------


@contextlib.contextmanager
def balloon(available_bytes: int | None) -> Iterator[int]:
    """Reserve huge pages until about ``available_bytes`` stay available; yield how many."""
    path = Path("/proc/sys/vm/nr_hugepages")
    original = int(path.read_text())
    if available_bytes is None:
        yield 0
        return
    try:
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        info = meminfo()
        page = info["Hugepagesize"]
        want = original + max(0, (info["MemAvailable"] - available_bytes) // page)
        for _ in range(5):  # the kernel may grant fewer at first (fragmentation)
            path.write_text(f"{want}\n")
            if int(path.read_text()) >= want:
                break
            time.sleep(0.5)
        yield int(path.read_text()) - original
    finally:
        path.write_text(f"{original}\n")


@contextlib.contextmanager
def small_pcp_lists(fraction: int = 4096) -> Iterator[None]:
    """Cap the per-CPU free page lists for the run (``vm.percpu_pagelist_high_fraction``), put
    back in a ``finally``.

    Recent kernels size these lists from the zone: here up to ~565 MiB per CPU. Pages on them
    are free but not counted in MemFree, so MemAvailable misses up to ~1 GiB of allocation
    (measured: a 1 GiB allocation moved MemAvailable by 330 MiB) and every daemon, reading
    MemAvailable, would see a fill late while the safety group's charge counts it exactly. A
    2 GiB device has small zones and small lists; 4096 makes them a few MiB here too.
    """
    path = Path("/proc/sys/vm/percpu_pagelist_high_fraction")
    original = path.read_text().strip()
    try:
        path.write_text(f"{fraction}\n")
        Path("/proc/sys/vm/compact_memory").write_text("1\n")  # drains the lists
        yield
    finally:
        path.write_text(f"{original}\n")


class SafetyGroup:
    """A v1 memory cgroup holding every workload of one run."""

    def __init__(self) -> None:
        self.path = MEMCG / f"edged-bench-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def usage_bytes(self) -> int:
        return int((self.path / "memory.usage_in_bytes").read_text())

    def limit(self, limit_bytes: int) -> None:
        (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))

    def remove(self) -> None:
        for _ in range(50):
            if not (self.path / "cgroup.procs").read_text().split():
                break
            time.sleep(0.1)
        with contextlib.suppress(OSError):
            (self.path / "memory.force_empty").write_text("0")
        self.path.rmdir()


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

    def worst_gap_s(self) -> float | None:
        if self.gap_file is None or not self.gap_file.exists():
            return None
        raw = self.gap_file.read_bytes()
        return int.from_bytes(raw[:8], "little") / 1e9 if len(raw) >= 8 else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)  # in case something stopped it
                self.proc.kill()
        self.proc.wait(timeout=30)
        self._waiter.join(timeout=5)


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
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return Workload(name, proc, report, gap)


# ---- the memory monitor ------------------------------------------------------------------------


class Monitor(threading.Thread):
    """MemAvailable every 2 ms: when it first went below T, and the lowest it went."""

    def __init__(self, threshold_bytes: int) -> None:
        super().__init__(daemon=True)
        self.threshold_bytes = threshold_bytes
        self.crossed_ns: int | None = None
        self.lowest_bytes = math.inf
        self.samples: list[tuple[int, int]] = []  # (time_ns, available bytes)
        self._halt = threading.Event()

    def run(self) -> None:
        # the instrument must not miss a fast fill because the hog and the daemon hold both
        # CPUs: this thread (pid 0 = the calling thread) runs SCHED_FIFO; it sleeps 2 ms a loop
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        fd = os.open("/proc/meminfo", os.O_RDONLY)
        try:
            while not self._halt.is_set():
                raw = os.pread(fd, 8192, 0)
                at = raw.index(b"MemAvailable:")
                available = int(raw[at + 13 : raw.index(b"kB", at)]) * 1024
                now = time.time_ns()
                self.samples.append((now, available))
                self.lowest_bytes = min(self.lowest_bytes, available)
                if self.crossed_ns is None and available < self.threshold_bytes:
                    self.crossed_ns = now
                time.sleep(0.002)
        finally:
            os.close(fd)

    def recovered_after(self, t_ns: int) -> int | None:
        """The first sample at or after ``t_ns`` with MemAvailable back at or above T."""
        return next((t for t, a in self.samples if t >= t_ns and a >= self.threshold_bytes), None)

    def available_now(self) -> int:
        return self.samples[-1][1] if self.samples else meminfo()["MemAvailable"]

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


# ---- the daemons -------------------------------------------------------------------------------


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


def start_daemon(
    name: str, workdir: Path, src: Path, threshold_bytes: int, soft_cap_mib: float
) -> Daemon:
    tag = uuid.uuid4().hex[:6]
    log = workdir / f"{name}-{tag}.log"
    # earlyoom and nohang pick from every process of the machine: the shells and the session
    # that run the benchmark are kept out of their reach too (edged only sees its rules' names)
    protected = "^(" + "|".join((*PROTECTED, *INFRASTRUCTURE)) + ")$"
    threshold_kib = threshold_bytes // 1024
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGED_", "OTEL_"))}
    if name == "kernel":
        return Daemon(name, None, log)
    if name == "earlyoom":
        argv = ["earlyoom", "-M", f"{threshold_kib}", "-r", "0", "--avoid", protected]
        marker = "sending SIGTERM"
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
        lines.append(f"@BADNESS_ADJ_RE_NAME -1000 /// {protected}")
        conf.write_text("\n".join(lines) + "\n")
        argv = ["nohang", "--monitor", "--config", str(conf)]
        marker = "Monitoring has started"
    elif name.startswith("edged-"):
        strategy = name.removeprefix("edged-")
        total = meminfo()["MemTotal"]
        hard = total - threshold_bytes
        soft = hard - int(min(SOFT_BELOW_HARD_MIB, soft_cap_mib) * MiB)
        cfg = workdir / f"edged-{tag}.toml"
        rules = "".join(f'[[rules]]\nname = "{n}"\nclass = "critical"\n' for n in PROTECTED)
        rules += "".join(f'[[rules]]\nname = "{n}"\nclass = "normal"\n' for n in MANAGED)
        cfg.write_text(
            f'[sampling]\nprocesses = "rules"\n'
            f"[limits.memory]\nsoft = {soft}\nhard = {hard}\n"
            f'[strategy]\nname = "{strategy}"\n{rules}'
        )
        sock = workdir / f"edged-{tag}.sock"
        env["STATE_DIRECTORY"] = str(workdir / f"state-{tag}")
        argv = [
            sys.executable, "-m", "edged", "run", "--config", str(cfg), "--socket", str(sock),
            "--prometheus", "off",
        ]  # fmt: skip
        marker = " ready: "
    else:
        raise BenchError(f"unknown daemon {name}")
    with log.open("wb") as out:
        # setpriv --pdeathsig: the daemon gets SIGTERM if the harness dies
        proc = subprocess.Popen(
            ["setpriv", "--pdeathsig", "TERM", *argv], cwd=src, env=env,
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
    threshold_mib: float
    crossed: bool
    action_ms: float | None  # first action relative to the crossing (or to hog start)
    recovered_ms: float | None  # MemAvailable back >= T, relative to the crossing
    acted_before_crossing: bool
    oom_kills: int
    hits: list[str] = field(default_factory=list)  # workload names, in the order hit
    right: bool = False
    service_alive: bool = True
    service_gap_ms: float | None = None
    daemon_cpu_s: float | None = None
    daemon_rss_mib: float | None = None
    lowest_available_mib: float = 0.0
    timeline: list[str] = field(default_factory=list)  # what happened, ms from the hog's start


def run_once(
    scenario: Scenario, daemon_name: str, repetition: int, *, workdir: Path, src: Path,
    margin_mib: float,
) -> RunResult:  # fmt: skip
    group = SafetyGroup()
    workloads: list[Workload] = []
    daemon: Daemon | None = None
    monitor: Monitor | None = None
    try:
        service = start_workload(
            workdir, group, "bench-service", "hold", SERVICE_MIB, heartbeat=True
        )
        workloads.append(service)
        service.wait_ready()
        steady = None
        if scenario.steady_mib:
            steady = start_workload(workdir, group, "bench-steady", "hold", scenario.steady_mib)
            workloads.append(steady)
            steady.wait_ready()
        time.sleep(0.3)
        available0 = meminfo()["MemAvailable"]
        threshold = int(available0 - scenario.cross_mib * MiB)
        group.limit(group.usage_bytes() + int((scenario.cross_mib + margin_mib) * MiB))
        oom0 = vmstat("oom_kill")
        # edged's soft level: 256 MiB under hard, but never below where the scenario starts
        daemon = start_daemon(daemon_name, workdir, src, threshold, scenario.cross_mib / 2)
        cpu0 = cpu_seconds(daemon.proc.pid) if daemon.proc else 0.0
        time.sleep(1.0)  # a second of calm: every daemon has polled at least once
        monitor = Monitor(threshold)
        monitor.start()
        started_ns = time.time_ns()
        hog = start_workload(
            workdir, group, scenario.hog_name, scenario.mode, scenario.target_mib,
            rate_mib_s=scenario.rate_mib_s, ignore_term=scenario.ignore_term,
        )  # fmt: skip
        workloads.append(hog)
        deadline = time.monotonic() + scenario.watch_s
        calm_since: float | None = None
        while time.monotonic() < deadline and not scenario.benign:
            if hog.proc.poll() is not None and monitor.available_now() >= threshold:
                calm_since = calm_since or time.monotonic()
                if time.monotonic() - calm_since > 0.3:
                    break
            else:
                calm_since = None
            time.sleep(0.01)
        if scenario.benign:
            time.sleep(scenario.watch_s)
        # what the daemon did, before it is stopped
        edged_actions = daemon.actions_ns() if daemon else []
        daemon_cpu = daemon_rss = None
        if daemon and daemon.proc and daemon.proc.poll() is None:
            daemon_cpu = cpu_seconds(daemon.proc.pid) - cpu0
            daemon_rss = hwm_bytes(daemon.proc.pid) / MiB
        monitor.stop()
        oom_kills = vmstat("oom_kill") - oom0
        # who was hit, and when
        by_pid = {w.proc.pid: w for w in workloads}
        hit_at: dict[str, int] = {}
        for w in workloads:
            times = [t for t in (w.first("term"), w.died_ns) if t is not None]
            if times:
                hit_at[w.name] = min(times)
        for t_ns, pid, _action in edged_actions:
            acted_on = by_pid.get(pid)
            if acted_on is not None and t_ns >= started_ns:
                hit_at[acted_on.name] = min(hit_at.get(acted_on.name, t_ns), t_ns)
        hits = sorted(hit_at, key=hit_at.__getitem__)
        names = {pid: w.name for pid, w in by_pid.items()}
        timeline = [
            f"{(t - started_ns) / 1e6:+.0f} edged {a} {names.get(p, p)}"
            for t, p, a in edged_actions
            if t >= started_ns
        ]
        for w in workloads:
            timeline += [f"{(t - started_ns) / 1e6:+.0f} {w.name} {e}" for e, t in w.events()]
            if w.died_ns is not None:
                timeline.append(f"{(w.died_ns - started_ns) / 1e6:+.0f} {w.name} died {w.status}")
        if monitor.crossed_ns is not None:
            timeline.append(f"{(monitor.crossed_ns - started_ns) / 1e6:+.0f} crossed")
        timeline.sort(key=lambda line: float(line.split()[0]))
        first_ns = min(hit_at.values()) if hit_at else None
        crossed_ns = monitor.crossed_ns
        reference = crossed_ns if crossed_ns is not None else started_ns
        action_ms = (first_ns - reference) / 1e6 if first_ns is not None else None
        recovered_ms = None
        if crossed_ns is not None and first_ns is not None:
            back = monitor.recovered_after(max(first_ns, crossed_ns))
            recovered_ms = (back - crossed_ns) / 1e6 if back is not None else None
        expected = None if scenario.benign else scenario.hog_name
        right = hits == [] if expected is None else bool(hits) and hits[0] == expected
        if expected and "bench-service" in hits:
            right = False
        return RunResult(
            scenario=scenario.name,
            daemon=daemon_name,
            repetition=repetition,
            threshold_mib=threshold / MiB,
            crossed=crossed_ns is not None,
            action_ms=action_ms,
            recovered_ms=recovered_ms,
            acted_before_crossing=first_ns is not None
            and (crossed_ns is None or first_ns < crossed_ns),
            oom_kills=oom_kills,
            hits=hits,
            right=right,
            service_alive=service.proc.poll() is None,
            service_gap_ms=(service.worst_gap_s() or 0) * 1e3,
            daemon_cpu_s=daemon_cpu,
            daemon_rss_mib=daemon_rss,
            lowest_available_mib=monitor.lowest_bytes / MiB,
            timeline=timeline,
        )
    finally:
        if monitor is not None and monitor.is_alive():
            monitor.stop()
        for w in reversed(workloads):
            w.stop()
        if daemon is not None:
            daemon.stop()
        group.remove()


# ---- the report --------------------------------------------------------------------------------


def med(values: Sequence[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def fmt(value: float | None, spec: str = ".0f") -> str:
    return "—" if value is None else format(value, spec)


def report(results: Sequence[RunResult], meta: dict[str, Any]) -> str:
    out = [
        f"# Protection benchmark, {meta['date']}",
        "",
        f"edged {meta['commit']}; {meta['runs']} runs per cell; balloon: {meta['balloon']}; "
        f"margin past the threshold: {meta['margin_mib']} MiB; "
        f"earlyoom {meta['earlyoom']}, nohang {meta['nohang']}; kernel {meta['kernel']}.",
        "",
        "Times are medians in ms from the moment MemAvailable crossed the shared threshold "
        "(negative: before it; `no crossing`: memory never reached it). *right*: runs whose "
        "first victim was the scenario's culprit (for the benign spike: runs where nobody was "
        "hit). *OOM*: kernel OOM kills in all runs. *service*: runs in which the protected "
        "service survived, and its worst heartbeat gap (median, 10 ms period).",
        "",
        "| scenario | daemon | crossed | first action | recovered | right | hit first | OOM "
        "| service (gap) | daemon CPU s | RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    scenarios = list(dict.fromkeys(r.scenario for r in results))
    daemons = list(dict.fromkeys(r.daemon for r in results))
    for s in scenarios:
        for d in daemons:
            rs = [r for r in results if r.scenario == s and r.daemon == d]
            if not rs:
                continue
            n = len(rs)
            crossed = sum(r.crossed for r in rs)
            action = med([r.action_ms for r in rs if r.crossed])
            before = sum(r.acted_before_crossing for r in rs)
            action_text = fmt(action, "+.0f") if crossed else "no crossing"
            if before:
                action_text += f" ({before}/{n} before crossing)"
            if all(r.action_ms is None for r in rs):
                action_text = "none"
            firsts = [r.hits[0] if r.hits else "nobody" for r in rs]
            common = max(set(firsts), key=firsts.count)
            recovered = fmt(med([r.recovered_ms for r in rs]), "+.0f")
            gap = fmt(med([r.service_gap_ms for r in rs]))
            cells = [
                s, d, f"{crossed}/{n}", action_text, recovered, f"{sum(r.right for r in rs)}/{n}",
                f"{common} ({firsts.count(common)}/{n})", str(sum(r.oom_kills for r in rs)),
                f"{sum(r.service_alive for r in rs)}/{n} ({gap} ms)",
                fmt(med([r.daemon_cpu_s for r in rs]), ".2f"),
                fmt(med([r.daemon_rss_mib for r in rs]), ".1f"),
            ]  # fmt: skip
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def progress_line(r: RunResult, runs: int) -> str:
    action = fmt(r.action_ms, "+.0f")
    recovered = fmt(r.recovered_ms, "+.0f")
    return (
        f"[{dt.datetime.now():%H:%M:%S}] {r.repetition + 1}/{runs} {r.scenario:13} {r.daemon:17} "
        f"crossed={r.crossed!s:5} action={action:>6} ms recovered={recovered:>6} ms "
        f"hits={','.join(r.hits) or '-'} oom={r.oom_kills} "
        f"service={'ok' if r.service_alive else 'DEAD'}"
    )


def tool_version(argv: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        text = (done.stdout + done.stderr).strip().splitlines()
        return text[-1] if text else "?"
    return "absent"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--daemons", nargs="+", default=list(ALL_DAEMONS), choices=ALL_DAEMONS)
    ap.add_argument(
        "--scenarios", nargs="+", default=[s.name for s in SCENARIOS],
        choices=[s.name for s in SCENARIOS],
    )  # fmt: skip
    ap.add_argument("--available", type=float, default=2048, help="MiB left available")
    ap.add_argument("--no-balloon", action="store_true")
    ap.add_argument("--margin", type=float, default=384, help="MiB past the threshold")
    ap.add_argument("--working-tree", action="store_true", help="measure uncommitted edits")
    ap.add_argument("--quick", action="store_true", help="1 run of each")
    args = ap.parse_args(argv)
    if os.geteuid() != 0 or not MEMCG.is_dir():
        print("needs root and cgroup v1's memory controller", file=sys.stderr)
        return 2
    for tool in ("earlyoom", "nohang"):
        if any(d == tool for d in args.daemons) and shutil.which(tool) is None:
            print(f"{tool} is not installed (apt-get install {tool})", file=sys.stderr)
            return 2
    runs = 1 if args.quick else args.runs
    set_comm("bench-harness")
    # SIGTERM unwinds like Ctrl-C, so the balloon, the page lists and the groups are put back
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
        check=True,
    ).stdout.strip()  # fmt: skip
    scenarios = [s for s in SCENARIOS if s.name in args.scenarios]
    results: list[RunResult] = []
    started = dt.datetime.now()
    with tempfile.TemporaryDirectory(prefix="edged-protection-") as tmp:
        workdir = Path(tmp)
        src = snapshot_source(workdir, None if args.working_tree else "HEAD")
        available = None if args.no_balloon else int(args.available * MiB)
        with small_pcp_lists(), balloon(available) as pages:
            print(f"balloon: {pages} huge pages; MemAvailable "
                  f"{meminfo()['MemAvailable'] / MiB:.0f} MiB", flush=True)  # fmt: skip
            for rep in range(runs):
                for scenario in scenarios:
                    for name in args.daemons:
                        try:
                            r = run_once(
                                scenario, name, rep, workdir=workdir, src=src,
                                margin_mib=args.margin,
                            )  # fmt: skip
                        except BenchError as exc:
                            print(f"  {scenario.name} {name}: failed: {exc}", flush=True)
                            continue
                        results.append(r)
                        print(progress_line(r, runs), flush=True)
                        time.sleep(0.5)
    meta = {
        "date": f"{started:%Y-%m-%d %H:%M}",
        "commit": commit + (" + working tree" if args.working_tree else ""),
        "runs": runs,
        "balloon": "off" if args.no_balloon else f"{args.available:.0f} MiB left available",
        "margin_mib": args.margin,
        "earlyoom": tool_version(["dpkg-query", "-W", "-f=${Version}", "earlyoom"]),
        "nohang": tool_version(["dpkg-query", "-W", "-f=${Version}", "nohang"]),
        "kernel": os.uname().release,
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
