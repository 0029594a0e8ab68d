"""edged's own cost, against Debian's ``prometheus-node-exporter`` and against a floor.

A benchmark, not a test: it prints a markdown report and writes it to
``bench/results/overhead-<date>-<time>.md``; it asserts nothing. It measures edged as committed
at HEAD (``--working-tree``: with uncommitted edits), copied once at the start so that every
run measures the same code while others edit the tree.

What is measured, and why
-------------------------

**Comparison** (the issue's "a monitor must not cost more than what it monitors"). In each run,
at one cadence (1 s and 0.1 s), these processes run *at the same time*, so that they see the
same machine conditions; each is its own process, so CPU accounting stays separate:

* ``edged (Prometheus)``: ``edged run --interval C --prometheus 127.0.0.1:PORT``, its
  ``/metrics`` scraped every C seconds by the harness;
* ``edged (OTLP)``: ``edged run --interval C --prometheus off --otlp http://127.0.0.1:PORT``
  pushing OTLP/HTTP to an in-harness sink that answers 200, with
  ``OTEL_METRIC_EXPORT_INTERVAL=10000`` (10 s; the SDK default of 60 s would export once a
  run). This is the configuration of the "RSS at most 40 MiB with the HTTP exporter" target;
* ``node_exporter``: ``prometheus-node-exporter --web.listen-address=127.0.0.1:PORT`` with its
  default collectors (the report lists them), scraped every C seconds;
* ``node_exporter (reduced)``: the same with only the collectors that read what edged reads
  (meminfo, stat, cpu, pressure), scraped every C seconds;
* ``floor``: a minimal Python loop that only ``pread``\\s, on kept-open descriptors, the files
  edged reads every tick (``/proc/meminfo``, ``/proc/stat``, ``/proc/pressure/*`` and
  ``stat`` of each managed process) at the same cadence, parsing nothing. It is
  the cost of "Python reading these files" without edged's structure.

Both edged instances manage the same 10 real child processes (copies of ``sleep`` matched by a
``[[rules]]`` entry), so the per-process path is exercised. The harness scrapes both
Prometheus endpoints the way Prometheus does (a new connection, ``Accept-Encoding: gzip``,
text format 0.0.4), each target from its own thread; its own cost is not counted.

For each process: CPU seconds, ``utime + stime`` of ``/proc/<pid>/stat`` (all threads, children
excluded) over a window that starts after a warm-up, and peak RSS, ``VmHWM`` of
``/proc/<pid>/status`` at the end of the window. Ratios (edged / node_exporter) are taken per
run (the pair saw the same conditions) and the median over runs is reported. The load average
is recorded at the start and end of every run, since the box is shared.

**Cadence jitter**: the tick times edged recorded (``history`` over its socket) inside the
window; deviation of each interval from the nominal one, p50/p99/max.

**Cost per managed process**: edged alone at 0.1 s with N managed processes (0, 10, 100,
1000 copies of ``sleep``, matched by rules), no exporter, so that only sampling is measured.
CPU per tick comes from the sum of ``/proc/<pid>/task/*/schedstat`` run times (nanoseconds;
``/proc/<pid>/stat`` counts in 10 ms clock ticks, too coarse for 20 s windows), divided by the
ticks edged recorded in the window. A least-squares line through the per-N medians gives µs
per tick and µs per process per tick; linearity is judged by R² and by comparing the marginal
cost per process from 10 to 100 with that from 100 to 1000. A run in which edged recorded
under 90% of its ticks is flagged in the report (``--keep-logs`` keeps every peer's log).

Every process the harness starts is stopped by pid in a ``finally``; sockets, configs and logs
live in one temporary directory that is removed at the end; everything listens on 127.0.0.1
or on a Unix socket in that directory.

Usage: ``.venv/bin/python bench/overhead.py [--runs 5] [--duration 60] [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import http.client
import inspect
import itertools
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"
REDUCED_COLLECTORS = ("meminfo", "stat", "cpu", "pressure")
OTLP_EXPORT_INTERVAL_MS = 10_000
CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024
# What Prometheus sends, minus OpenMetrics: both exporters answer in the same text format.
SCRAPE_HEADERS = {"Accept": "text/plain;version=0.0.4", "Accept-Encoding": "gzip"}
COMPARISON_MANAGED = 10  # managed processes in the comparison runs
# What edged's process sensor reads per managed process every tick (statm until 516ddb2).
PROCESS_FILES = ("stat",)
RSS_TARGET_MIB = 40.0

EDGED_PROM = "edged (Prometheus)"
EDGED_OTLP = "edged (OTLP)"
NODE = "node_exporter"
NODE_REDUCED = "node_exporter (reduced)"
FLOOR = "floor"


class BenchError(Exception):
    """A peer that would not start or answer; the run cannot be measured."""


# ---- /proc accounting ------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """``utime + stime`` of the whole process (every thread, living or exited; no children)."""
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    fields = raw[raw.rindex(b")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def run_time_ns(pid: int) -> int:
    """Nanoseconds on CPU of the process's living threads (``schedstat``'s first field).

    Exact, unlike the 10 ms clock ticks of ``stat``; but a thread that exits inside the window
    takes its time with it, so it is only used where the set of threads did not change
    (:func:`threads_and_run_time`).
    """
    return threads_and_run_time(pid)[1]


def threads_and_run_time(pid: int) -> tuple[frozenset[str], int]:
    """(thread ids, nanoseconds on CPU of those threads)."""
    tasks = frozenset(os.listdir(f"/proc/{pid}/task"))
    total = 0
    for task in tasks:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
    return tasks, total


def status_bytes(pid: int, key: str) -> int:
    """A ``kB`` line of ``/proc/<pid>/status`` (``VmHWM``, ``VmRSS``) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"/proc/{pid}/status has no {key}")


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def loadavg() -> tuple[float, float, float]:
    one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    return float(one), float(five), float(fifteen)


def source_digest(root: Path) -> str:
    """A short digest of the Python source of the ``edged`` package under ``root``."""
    digest = hashlib.sha256()
    for path in sorted((root / "edged").rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:10]


def snapshot_source(workdir: Path, commit: str | None) -> Path:
    """Put the ``edged`` package of ``commit`` (None: of the working tree, uncommitted edits
    included) into ``workdir/src`` and return that folder.

    Every edged the harness starts runs from this copy (``python -m edged`` with it as the
    working directory, which comes first on ``sys.path``), so that all runs measure the same,
    named code even while someone edits the tree; a full run is long enough for that to happen.
    """
    src = workdir / "src"
    if commit is None:
        shutil.copytree(REPO / "edged", src / "edged", ignore=shutil.ignore_patterns("__pycache__"))
        return src
    src.mkdir()
    archive = subprocess.run(
        ["git", "archive", "--format=tar", commit, "edged"], cwd=REPO, capture_output=True,
        check=False, timeout=60,
    )  # fmt: skip
    if archive.returncode != 0:
        raise BenchError(f"git archive {commit}: {archive.stderr.decode(errors='replace')}")
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True, timeout=60)
    return src


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (the peer binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ---- the floor ---------------------------------------------------------------------------------


def floor_loop(interval_s: float, paths: list[str]) -> None:
    """Read ``paths`` every ``interval_s`` on absolute deadlines, and nothing else.

    Runs in its own interpreter (``python -c`` with this function's source), importing only
    ``os`` and ``time``, so its RSS is the interpreter's and its CPU is the reads'.
    """
    import os
    import time

    fds = [os.open(p, os.O_RDONLY | os.O_CLOEXEC) for p in paths]
    deadline = time.monotonic()
    while True:
        for fd in fds:
            os.pread(fd, 65536, 0)
        deadline += interval_s
        delay = deadline - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:  # overran: start again from now rather than bunching up
            deadline = time.monotonic()


def floor_paths(managed_pids: Sequence[int]) -> list[str]:
    """The files edged reads every tick on this machine (cpufreq when present)."""
    paths = ["/proc/meminfo", "/proc/stat"]
    paths += [str(p) for p in sorted(Path("/proc/pressure").glob("*"))]
    cpu_base = Path("/sys/devices/system/cpu")
    policies = {p.resolve() for p in cpu_base.glob("cpu[0-9]*/cpufreq/scaling_cur_freq")}
    paths += [str(p) for p in sorted(policies)]
    for pid in managed_pids:
        paths += [f"/proc/{pid}/{name}" for name in PROCESS_FILES]
    return paths


# ---- peers ---------------------------------------------------------------------------------------


@dataclass
class Peer:
    """A measured process the harness started (own session, stopped by pid)."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    metrics_url: str | None = None  # scraped by the harness when set
    socket_path: Path | None = None  # edged's JSON-RPC socket

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; always reaped."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def spawn(
    name: str,
    argv: Sequence[str],
    workdir: Path,
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
    **kw: Any,
) -> Peer:
    log_path = workdir / f"{name.replace(' ', '_').strip('()')}-{time.monotonic_ns()}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    return Peer(name, proc, log_path, **kw)


def clean_env() -> dict[str, str]:
    """The harness's environment without ``EDGED_*``/``OTEL_*``, which would change the config."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("EDGED_", "OTEL_"))}


def edged_config(workdir: Path, names: Sequence[str]) -> Path:
    """A config whose rules match processes whose comm is one of ``names``."""
    path = workdir / f"edged-{time.monotonic_ns()}.toml"
    rules = "".join(f'[[rules]]\nname = "{n}"\nclass = "besteffort"\n\n' for n in names)
    path.write_text(rules)
    return path


def start_edged(
    name: str,
    workdir: Path,
    interval_s: float,
    config: Path,
    *,
    prometheus: bool,
    otlp_url: str | None = None,
    src: Path = REPO,
) -> Peer:
    """edged from the package under ``src`` (see :func:`snapshot_source`)."""
    sock = workdir / f"edged-{time.monotonic_ns()}.sock"
    argv = [
        sys.executable,
        "-m",
        "edged",
        "run",
        "--config",
        str(config),
        "--interval",
        f"{interval_s:g}",
        "--socket",
        str(sock),
        "--log-level",
        "warning",
    ]
    url = None
    if prometheus:
        port = free_port()
        argv += ["--prometheus", f"127.0.0.1:{port}"]
        url = f"http://127.0.0.1:{port}/metrics"
    else:
        argv += ["--prometheus", "off"]
    env = clean_env()
    for name_ in ("PYTHONPATH", "PYTHONSAFEPATH"):  # the working directory must come first
        env.pop(name_, None)
    if otlp_url:
        argv += ["--otlp", otlp_url]
        env["OTEL_METRIC_EXPORT_INTERVAL"] = str(OTLP_EXPORT_INTERVAL_MS)
    return spawn(name, argv, workdir, env=env, cwd=src, metrics_url=url, socket_path=sock)


def start_node_exporter(name: str, workdir: Path, collectors: Sequence[str] | None) -> Peer:
    port = free_port()
    argv = [NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{port}"]
    if collectors is not None:
        argv += ["--collector.disable-defaults", *(f"--collector.{c}" for c in collectors)]
    return spawn(
        name, argv, workdir, env=clean_env(), metrics_url=f"http://127.0.0.1:{port}/metrics"
    )


def start_floor(workdir: Path, interval_s: float, managed_pids: Sequence[int]) -> Peer:
    source = inspect.getsource(floor_loop)
    call = f"\nfloor_loop({interval_s!r}, {floor_paths(managed_pids)!r})\n"
    return spawn(FLOOR, [sys.executable, "-c", source + call], workdir, env=clean_env())


def rpc(
    socket_path: Path, method: str, params: dict[str, Any] | None = None, timeout_s: float = 10.0
) -> Any:
    """One JSON-RPC call on edged's socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(str(socket_path))
        request = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}
        sock.sendall(json.dumps(request).encode() + b"\n")
        with sock.makefile("rb") as reader:
            line = reader.readline()
    reply = json.loads(line)
    if "error" in reply:
        raise BenchError(f"{method}: {reply['error']}")
    return reply["result"]


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, int]:
    """(status, body bytes) of one GET, as a Prometheus scrape makes it."""
    rest = url.removeprefix("http://")
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    try:
        conn.request("GET", "/" + path, headers=SCRAPE_HEADERS)
        resp = conn.getresponse()
        return resp.status, len(resp.read())
    finally:
        conn.close()


def wait_ready(peer: Peer, timeout_s: float = 30.0, managed: int | None = None) -> None:
    """Until the peer answers: edged on its socket (ticking, ``managed`` processes sampled)
    and on its ``/metrics`` when it has one; node_exporter on ``/metrics``."""
    deadline = time.monotonic() + timeout_s
    last_error = ""
    while time.monotonic() < deadline:
        peer.check_alive()
        try:
            if peer.socket_path is not None:
                if rpc(peer.socket_path, "status")["ticks"] < 2:
                    raise BenchError("not ticking yet")
                if managed is not None:
                    seen = sampled_processes(peer.socket_path)
                    if seen != managed:
                        raise BenchError(f"sampling {seen} processes, want {managed}")
            if peer.metrics_url is not None:
                status, _ = http_get(peer.metrics_url)
                if status != 200:
                    raise BenchError(f"/metrics answered {status}")
            return
        except (OSError, BenchError, ValueError, http.client.HTTPException) as exc:
            last_error = str(exc)
        time.sleep(0.2)
    raise BenchError(
        f"{peer.name} not ready after {timeout_s:g}s ({last_error}):\n{peer.log_tail()}"
    )


def sampled_processes(socket_path: Path) -> int:
    snap = rpc(socket_path, "snapshot") or {}
    return sum(1 for r in snap.get("readings", []) if r["metric"] == "process.memory.usage")


def node_exporter_collectors(peer: Peer) -> list[str]:
    """The collectors node_exporter logged as enabled at start-up."""
    names: list[str] = []
    listing = False
    for line in peer.log_path.read_text(errors="replace").splitlines():
        if 'msg="Enabled collectors"' in line:
            listing = True
            continue
        if listing:
            if "collector=" in line and "msg=" not in line:
                names.append(line.rsplit("collector=", 1)[1].strip())
            else:
                listing = False
    return names


# ---- in-harness helpers (their cost is not counted) ------------------------------------------


class Scraper(threading.Thread):
    """GETs one ``/metrics`` every ``interval_s`` on absolute deadlines, like Prometheus."""

    def __init__(self, url: str, interval_s: float) -> None:
        super().__init__(daemon=True, name=f"scrape {url}")
        self.url = url
        self.interval_s = interval_s
        self.stopping = threading.Event()
        self.latencies_s: list[float] = []
        self.body_bytes: list[int] = []
        self.errors = 0

    def run(self) -> None:
        deadline = time.monotonic()
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                status, size = http_get(self.url)
                ok = status == 200
            except (OSError, http.client.HTTPException):
                ok, size = False, 0
            if ok:
                self.latencies_s.append(time.monotonic() - started)
                self.body_bytes.append(size)
            else:
                self.errors += 1
            deadline += self.interval_s
            now = time.monotonic()
            if deadline <= now:  # a slow scrape: skip the missed slots, keep the phase
                deadline += math.ceil((now - deadline) / self.interval_s) * self.interval_s
            self.stopping.wait(deadline - now)

    def mark(self) -> int:
        """Scrapes done so far (to count those inside a window)."""
        return len(self.latencies_s)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)


class _SinkHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the OTLP exporter's session expects
    server: OtlpSink

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        self.server.record(len(body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class OtlpSink(ThreadingHTTPServer):
    """A trivial OTLP/HTTP receiver on 127.0.0.1: any POST gets an empty 200 (a valid
    ``ExportMetricsServiceResponse``); requests and bytes are counted."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _SinkHandler)
        self.requests = 0
        self.bytes = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True, name="otlp sink")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def record(self, size: int) -> None:
        with self._lock:
            self.requests += 1
            self.bytes += size

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class SleepPool:
    """Real child processes for edged to manage: copies of ``sleep`` under a unique comm name
    (so that no other ``sleep`` on a shared box matches the rule), stopped by pid."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.groups: dict[str, list[subprocess.Popen[bytes]]] = {}
        self._sleep = shutil.which("sleep") or "/bin/sleep"

    def start(self, group: str, count: int) -> str:
        """Start ``count`` processes named ``eb<pid><group>``; returns that comm name."""
        name = f"eb{os.getpid()}{group}"[:15]
        binary = self.workdir / name
        if not binary.exists():
            shutil.copy2(self._sleep, binary)
        procs = self.groups.setdefault(name, [])
        for _ in range(count):
            procs.append(
                subprocess.Popen(
                    [str(binary), "3600"],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        return name

    def pids(self, name: str) -> list[int]:
        return [p.pid for p in self.groups.get(name, [])]

    def stop_all(self) -> None:
        for procs in self.groups.values():
            for p in procs:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
        for procs in self.groups.values():
            for p in procs:
                p.wait()
        self.groups.clear()


# ---- results ---------------------------------------------------------------------------------


@dataclass
class PeerResult:
    cpu_s: float  # utime + stime from /proc/<pid>/stat (10 ms resolution)
    hwm_bytes: int
    rss_bytes: int
    threads: int
    run_s: float | None  # schedstat run time, None when threads came or went in the window

    @property
    def best_cpu_s(self) -> float:
        """The exact schedstat figure where it holds, else the stat one."""
        return self.run_s if self.run_s is not None else self.cpu_s


@dataclass
class Jitter:
    """Tick interval deviations from nominal (seconds) inside one window."""

    intervals_s: list[float]
    interval_nominal_s: float
    overruns: int

    @property
    def ticks(self) -> int:
        return len(self.intervals_s) + 1 if self.intervals_s else 0

    def deviations_s(self) -> list[float]:
        return [abs(i - self.interval_nominal_s) for i in self.intervals_s]


@dataclass
class ComparisonRun:
    cadence_s: float
    index: int
    window_s: float
    load_start: tuple[float, float, float]
    load_end: tuple[float, float, float]
    peers: dict[str, PeerResult]
    jitter: dict[str, Jitter]
    scrapes: dict[str, tuple[int, int, list[float], list[int]]]  # ok, errors, lat, bytes
    otlp_exports: int


@dataclass
class ScalingRun:
    managed: int
    index: int
    interval_s: float
    load_start: tuple[float, float, float]
    load_end: tuple[float, float, float]
    run_time_s: float  # schedstat
    stat_cpu_s: float  # /proc/<pid>/stat, for comparison
    ticks: int
    jitter: Jitter
    hwm_bytes: int

    @property
    def us_per_tick(self) -> float:
        return self.run_time_s / self.ticks * 1e6 if self.ticks else math.nan


@dataclass
class Context:
    workdir: Path
    pool: SleepPool
    sink: OtlpSink | None
    telemetry: bool  # edged/telemetry.py exists: --prometheus and --otlp work
    warmup_s: float
    node_collectors: list[str] = field(default_factory=list)
    reduced: bool = True
    src: Path = REPO  # the folder holding the edged package the peers run


def tick_times(peer: Peer, t0: float, t1: float, window_s: float) -> list[float]:
    """Unix times of edged's ticks between ``t0`` and ``t1`` (from its ``history``)."""
    assert peer.socket_path is not None
    hist = rpc(
        peer.socket_path, "history", {"window": window_s + 30, "resources": ["system.memory.limit"]}
    )
    return [t for t in hist["time"] if t0 <= t <= t1]


def jitter_of(peer: Peer, interval_s: float, t0: float, t1: float) -> Jitter:
    assert peer.socket_path is not None
    times = tick_times(peer, t0, t1, t1 - t0)
    overruns = int(rpc(peer.socket_path, "status")["overruns"])
    return Jitter([b - a for a, b in itertools.pairwise(times)], interval_s, overruns)


def comparison_run(ctx: Context, cadence_s: float, index: int, duration_s: float) -> ComparisonRun:
    """One run: every peer at ``cadence_s`` at the same time, measured over one window."""
    managed_name = f"eb{os.getpid()}m"[:15]
    managed_pids = ctx.pool.pids(managed_name)
    config = edged_config(ctx.workdir, [managed_name])
    peers: list[Peer] = []
    scrapers: dict[str, Scraper] = {}
    try:
        peers.append(
            start_edged(
                EDGED_PROM, ctx.workdir, cadence_s, config, prometheus=ctx.telemetry, src=ctx.src
            )
        )
        if ctx.telemetry and ctx.sink is not None:
            peers.append(
                start_edged(
                    EDGED_OTLP,
                    ctx.workdir,
                    cadence_s,
                    config,
                    prometheus=False,
                    otlp_url=ctx.sink.url,
                    src=ctx.src,
                )
            )
        peers.append(start_node_exporter(NODE, ctx.workdir, None))
        if ctx.reduced:
            peers.append(start_node_exporter(NODE_REDUCED, ctx.workdir, REDUCED_COLLECTORS))
        peers.append(start_floor(ctx.workdir, cadence_s, managed_pids))
        for p in peers:
            wait_ready(p, managed=len(managed_pids) if p.socket_path else None)
        if not ctx.node_collectors:
            ctx.node_collectors = node_exporter_collectors(
                peers[[p.name for p in peers].index(NODE)]
            )
        for p in peers:
            if p.metrics_url is not None:
                scrapers[p.name] = Scraper(p.metrics_url, cadence_s)
                scrapers[p.name].start()
        time.sleep(ctx.warmup_s)

        load_start = loadavg()
        marks = {name: s.mark() for name, s in scrapers.items()}
        errors0 = {name: s.errors for name, s in scrapers.items()}
        exports0 = ctx.sink.requests if ctx.sink else 0
        t0_wall, t0 = time.time(), time.monotonic()
        cpu0 = {p.name: cpu_seconds(p.pid) for p in peers}
        run0 = {p.name: threads_and_run_time(p.pid) for p in peers}
        time.sleep(duration_s)
        cpu1 = {p.name: cpu_seconds(p.pid) for p in peers}
        run1 = {p.name: threads_and_run_time(p.pid) for p in peers}
        t1_wall, window_s = time.time(), time.monotonic() - t0
        exports1 = ctx.sink.requests if ctx.sink else 0
        results = {
            p.name: PeerResult(
                cpu1[p.name] - cpu0[p.name],
                status_bytes(p.pid, "VmHWM"),
                status_bytes(p.pid, "VmRSS"),
                thread_count(p.pid),
                (run1[p.name][1] - run0[p.name][1]) / 1e9
                if run1[p.name][0] == run0[p.name][0]
                else None,
            )
            for p in peers
        }
        load_end = loadavg()
        for s in scrapers.values():
            s.stop()
        for p in peers:
            p.check_alive()
        scrapes = {
            name: (
                len(s.latencies_s) - marks[name],
                s.errors - errors0[name],
                s.latencies_s[marks[name] :],
                s.body_bytes[marks[name] :],
            )
            for name, s in scrapers.items()
        }
        jitter = {
            p.name: jitter_of(p, cadence_s, t0_wall, t1_wall)
            for p in peers
            if p.socket_path is not None
        }
        return ComparisonRun(
            cadence_s,
            index,
            window_s,
            load_start,
            load_end,
            results,
            jitter,
            scrapes,
            exports1 - exports0,
        )
    finally:
        for s in scrapers.values():
            s.stop()
        for p in peers:
            p.stop()
        config.unlink(missing_ok=True)


def scaling_run(
    ctx: Context,
    names: Sequence[str],
    managed: int,
    *,
    index: int,
    interval_s: float,
    duration_s: float,
) -> ScalingRun:
    """edged alone, no exporter, sampling ``managed`` processes every ``interval_s``."""
    config = edged_config(ctx.workdir, names)
    peer = start_edged(
        f"edged N={managed}", ctx.workdir, interval_s, config, prometheus=False, src=ctx.src
    )
    try:
        wait_ready(peer, timeout_s=60, managed=managed)
        time.sleep(ctx.warmup_s)
        load_start = loadavg()
        t0_wall = time.time()
        ns0, cpu0 = run_time_ns(peer.pid), cpu_seconds(peer.pid)
        time.sleep(duration_s)
        ns1, cpu1 = run_time_ns(peer.pid), cpu_seconds(peer.pid)
        t1_wall = time.time()
        hwm = status_bytes(peer.pid, "VmHWM")
        load_end = loadavg()
        peer.check_alive()
        jitter = jitter_of(peer, interval_s, t0_wall, t1_wall)
        still = sampled_processes(peer.socket_path) if peer.socket_path else -1
        if still != managed:
            raise BenchError(f"edged sampled {still} processes at the end, want {managed}")
        return ScalingRun(
            managed,
            index,
            interval_s,
            load_start,
            load_end,
            (ns1 - ns0) / 1e9,
            cpu1 - cpu0,
            jitter.ticks,
            jitter,
            hwm,
        )
    finally:
        peer.stop()
        config.unlink(missing_ok=True)


# ---- statistics and the report ---------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def spread(values: Sequence[float], fmt: str) -> str:
    """``median (min..max)``."""
    if not values:
        return "n/a"
    return f"{format(median(values), fmt)} ({format(min(values), fmt)}..{format(max(values), fmt)})"


def ratios(runs: Sequence[ComparisonRun], num: str, den: str, attr: str) -> list[float]:
    out = []
    for r in runs:
        if num in r.peers and den in r.peers:
            a = float(getattr(r.peers[num], attr))
            b = float(getattr(r.peers[den], attr))
            out.append(a / b if b > 0 else math.inf)
    return out


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """(intercept, slope, R²) of the least-squares line."""
    slope, intercept = statistics.linear_regression(xs, ys)
    r = statistics.correlation(xs, ys)
    return intercept, slope, r * r


@dataclass
class Report:
    started: dt.datetime
    args: argparse.Namespace
    ctx: Context
    comparison: list[ComparisonRun]
    scaling: list[ScalingRun]
    finished: dt.datetime | None = None
    notes: list[str] = field(default_factory=list)
    commit: str = field(default_factory=lambda: _git("rev-parse", "--short", "HEAD") or "?")
    source: str = ""  # digest of the snapshot of edged's source that every run used

    def render(self) -> str:
        out: list[str] = []
        w = out.append
        w(f"# edged overhead, {self.started:%Y-%m-%d %H:%M}")
        w("")
        w(self._environment())
        for note in self._stalls():
            w(f"> **Note:** {note}")
            w("")
        for note in self.notes:
            w(f"> **Note:** {note}")
            w("")
        if self.comparison:
            w(self._targets())
            for cadence in self.args.cadences:
                runs = [r for r in self.comparison if r.cadence_s == cadence]
                if runs:
                    w(self._comparison_table(cadence, runs))
            w(self._jitter_table())
            w(self._scrape_table())
        if self.scaling:
            w(self._scaling_table())
        w(self._runs_table())
        return "\n".join(out)

    def _stalls(self) -> list[str]:
        """Runs in which edged recorded under 90% of the ticks its interval asks for."""
        out = []
        for r in self.comparison:
            for name, j in r.jitter.items():
                expected = r.window_s / r.cadence_s
                if j.ticks < 0.9 * expected:
                    out.append(
                        f"{name}, every {r.cadence_s:g} s, run {r.index + 1}: {j.ticks} ticks "
                        f"of {expected:.0f} expected (max gap {max(j.intervals_s, default=0):.2f}"
                        " s); that run is disturbed."
                    )
        for s in self.scaling:
            expected = self.args.scaling_duration / s.interval_s
            if s.ticks < 0.9 * expected:
                out.append(
                    f"N={s.managed}, run {s.index + 1}: {s.ticks} ticks of {expected:.0f} "
                    f"expected (max gap {max(s.jitter.intervals_s, default=0):.2f} s, "
                    f"{s.run_time_s:.2f} s CPU); that run is disturbed, the medians and the "
                    "fit absorb one such run."
                )
        return out

    def _environment(self) -> str:
        a = self.args
        commit = self.commit
        if self.args.working_tree:
            commit += " + the working tree's uncommitted edits"
        commit += f", copied at the start for every run (digest {self.source})"
        head_now = _git("rev-parse", "--short", "HEAD") or "?"
        if not (head_now.startswith(self.commit) or self.commit.startswith(head_now)):
            commit += f"; HEAD moved to {head_now} meanwhile"
        node_version = _first_line([NODE_EXPORTER, "--version"])
        lines = [
            f"- machine: {os.cpu_count()} CPUs ({_cpu_model()}), "
            f"{_mem_total_gib():.0f} GiB, Linux {platform.release()}; shared with other work "
            "(load averages per run below)",
            f"- edged {commit}, Python {platform.python_version()}; {node_version}",
            f"- comparison: {a.runs} runs x {a.duration:g} s per cadence "
            f"({', '.join(f'{c:g} s' for c in a.cadences)}), warm-up {a.warmup:g} s, "
            f"cadences interleaved; {COMPARISON_MANAGED} managed processes",
            f"- OTLP: HTTP/protobuf to an in-harness sink, OTEL_METRIC_EXPORT_INTERVAL="
            f"{OTLP_EXPORT_INTERVAL_MS} ms",
            f"- node_exporter default collectors ({len(self.ctx.node_collectors)}): "
            f"{', '.join(self.ctx.node_collectors) or '?'}",
            f"- node_exporter (reduced): --collector.disable-defaults "
            f"{' '.join('--collector.' + c for c in REDUCED_COLLECTORS)}",
        ]
        if self.scaling:
            lines.append(
                f"- per-process cost: {a.scaling_runs} runs x {a.scaling_duration:g} s "
                f"per N at {a.scaling_interval:g} s, no exporter"
            )
        if self.finished is not None:
            minutes = (self.finished - self.started).total_seconds() / 60
            lines.append(f"- total run time {minutes:.1f} min")
        return "\n".join(lines) + "\n"

    def _targets(self) -> str:
        rows = [
            "## Targets",
            "",
            "| target | measured (median of runs, min..max) | verdict |",
            "|---|---|---|",
        ]
        for cadence in self.args.cadences:
            runs = [r for r in self.comparison if r.cadence_s == cadence]
            cpu = ratios(runs, EDGED_PROM, NODE, "cpu_s")
            if cpu:
                verdict = "met" if median(cpu) <= 1 else "**missed**"
                rows.append(
                    f"| edged CPU <= node_exporter CPU, both scraped every {cadence:g} s "
                    f"| ratio {spread(cpu, '.2f')} | {verdict} |"
                )
        otlp = [
            r.peers[EDGED_OTLP].hwm_bytes / MIB for r in self.comparison if EDGED_OTLP in r.peers
        ]
        if otlp:
            verdict = "met" if max(otlp) <= RSS_TARGET_MIB else "**missed**"
            rows.append(
                f"| peak RSS <= {RSS_TARGET_MIB:g} MiB with the OTLP HTTP exporter | "
                f"{spread(otlp, '.1f')} MiB | {verdict} (judged on the max) |"
            )
        else:
            rows.append(
                f"| peak RSS <= {RSS_TARGET_MIB:g} MiB with the OTLP HTTP exporter | "
                "not measured (no telemetry module) | n/a |"
            )
        fit = self._fit()
        if fit is not None:
            intercept, slope, r2, marginal = fit
            verdict = "met" if r2 >= 0.99 else "**check**"
            rows.append(
                f"| per-tick cost linear in managed processes | {intercept:.0f} µs + "
                f"{slope:.2f} µs x N, R² {r2:.4f}; marginal µs/process "
                f"{marginal} | {verdict} |"
            )
        return "\n".join(rows) + "\n"

    def _comparison_table(self, cadence: float, runs: list[ComparisonRun]) -> str:
        window = median([r.window_s for r in runs])
        rows = [
            f"## Every {cadence:g} s ({len(runs)} runs, {window:.0f} s windows)",
            "",
            "| process | CPU s per window (stat) | CPU % of a core | CPU ms (schedstat) | "
            "peak RSS MiB | CPU / node_exporter | RSS / node_exporter | CPU / floor |",
            "|---|---|---|---|---|---|---|---|",
        ]
        names = [
            n
            for n in (EDGED_PROM, EDGED_OTLP, NODE, NODE_REDUCED, FLOOR)
            if any(n in r.peers for r in runs)
        ]
        for name in names:
            cpu = [r.peers[name].cpu_s for r in runs if name in r.peers]
            pct = [r.peers[name].cpu_s / r.window_s * 100 for r in runs if name in r.peers]
            hwm = [r.peers[name].hwm_bytes / MIB for r in runs if name in r.peers]
            exact = [r.peers[name].run_s for r in runs if name in r.peers]
            exact_ms = [x * 1000 for x in exact if x is not None]
            rows.append(
                f"| {name} | {spread(cpu, '.2f')} | {median(pct):.2f} | "
                f"{spread(exact_ms, '.0f') if len(exact_ms) == len(exact) else 'n/a'} | "
                f"{spread(hwm, '.1f')} | {spread(ratios(runs, name, NODE, 'cpu_s'), '.2f')}"
                f" | {spread(ratios(runs, name, NODE, 'hwm_bytes'), '.2f')} | "
                f"{spread(ratios(runs, name, FLOOR, 'best_cpu_s'), '.2f')} |"
            )
        rows += [
            "",
            "CPU / node_exporter: utime+stime of /proc/<pid>/stat, per run. CPU ms (schedstat): "
            "exact run time where no thread came or went in the window (n/a otherwise: "
            "prometheus_client serves each scrape on a new thread). CPU / floor uses the "
            "schedstat figure where there is one, since the floor's CPU is a few clock ticks.",
        ]
        exports = [r.otlp_exports for r in runs if EDGED_OTLP in r.peers]
        if exports:
            rows += [
                "",
                f"OTLP exports received by the sink per window: "
                f"{spread([float(e) for e in exports], '.0f')}.",
            ]
        return "\n".join(rows) + "\n"

    def _jitter_table(self) -> str:
        rows = [
            "## Cadence jitter (edged's recorded tick times; all runs pooled)",
            "",
            "| edged | cadence | intervals | p50 ms | p99 ms | max ms | overruns |",
            "|---|---|---|---|---|---|---|",
        ]
        for cadence in self.args.cadences:
            for name in (EDGED_PROM, EDGED_OTLP):
                js = [
                    r.jitter[name]
                    for r in self.comparison
                    if r.cadence_s == cadence and name in r.jitter
                ]
                if js:
                    rows.append(_jitter_row(name, cadence, js))
        rows.append("\nDeviation = |interval between consecutive ticks - nominal interval|.")
        return "\n".join(rows) + "\n"

    def _scrape_table(self) -> str:
        rows = [
            "## Scrapes (harness side)",
            "",
            "| target | cadence | scrapes ok / failed | latency p50 ms | p99 ms | bytes (gzip) |",
            "|---|---|---|---|---|---|",
        ]
        for cadence in self.args.cadences:
            runs = [r for r in self.comparison if r.cadence_s == cadence]
            for name in (EDGED_PROM, NODE, NODE_REDUCED):
                got = [r.scrapes[name] for r in runs if name in r.scrapes]
                if not got:
                    continue
                ok = sum(g[0] for g in got)
                failed = sum(g[1] for g in got)
                lat = [x * 1000 for g in got for x in g[2]]
                size = [float(x) for g in got for x in g[3]]
                rows.append(
                    f"| {name} | {cadence:g} s | {ok} / {failed} | "
                    f"{percentile(lat, 50):.1f} | {percentile(lat, 99):.1f} | "
                    f"{median(size):.0f} |"
                )
        return "\n".join(rows) + "\n"

    def _fit(self) -> tuple[float, float, float, str] | None:
        counts = sorted({r.managed for r in self.scaling})
        if len(counts) < 2:
            return None
        med = {n: median([r.us_per_tick for r in self.scaling if r.managed == n]) for n in counts}
        # fitted to the per-N medians: one disturbed run must not tilt the line
        xs = [float(n) for n in counts]
        ys = [med[n] for n in counts]
        if len(set(ys)) < 2:
            return None
        intercept, slope, r2 = fit_line(xs, ys)
        steps = [
            f"{a}→{b}: {(med[b] - med[a]) / (b - a):.2f}"
            for a, b in itertools.pairwise(counts)
            if a > 0 or len(counts) == 2
        ]
        return intercept, slope, r2, ", ".join(steps)

    def _scaling_table(self) -> str:
        counts = sorted({r.managed for r in self.scaling})
        interval = self.args.scaling_interval
        rows = [
            f"## Cost per managed process (edged alone, every {interval:g} s, no exporter)",
            "",
            "| N | ticks per run | CPU µs per tick | µs per process per tick "
            "(above N=0) | CPU % of a core | jitter p99 ms | peak RSS MiB |",
            "|---|---|---|---|---|---|---|",
        ]
        base = median([r.us_per_tick for r in self.scaling if r.managed == 0])
        for n in counts:
            runs = [r for r in self.scaling if r.managed == n]
            per_tick = [r.us_per_tick for r in runs]
            per_proc = f"{(median(per_tick) - base) / n:.2f}" if n and not math.isnan(base) else "-"
            pct = median([r.us_per_tick * 1e-6 / r.interval_s * 100 for r in runs])
            dev = [d * 1000 for r in runs for d in r.jitter.deviations_s()]
            rows.append(
                f"| {n} | {median([float(r.ticks) for r in runs]):.0f} | "
                f"{spread(per_tick, '.0f')} | {per_proc} | {pct:.2f} | "
                f"{percentile(dev, 99):.2f} | "
                f"{median([r.hwm_bytes / MIB for r in runs]):.1f} |"
            )
        fit = self._fit()
        if fit is not None:
            intercept, slope, r2, marginal = fit
            rows += [
                "",
                f"Least-squares fit to the per-N medians: **{intercept:.0f} µs + "
                f"{slope:.2f} µs x N per tick** (R² {r2:.4f}). Marginal cost per process "
                f"between successive N (µs/process/tick): {marginal}.",
            ]
        stat_ratio = [r.stat_cpu_s / r.run_time_s for r in self.scaling if r.run_time_s > 0]
        rows.append(
            f"\nCPU from schedstat (ns); /proc/<pid>/stat agreed within "
            f"{spread(stat_ratio, '.2f')} (its 10 ms clock ticks)."
        )
        return "\n".join(rows) + "\n"

    def _runs_table(self) -> str:
        names = [EDGED_PROM, EDGED_OTLP, NODE, NODE_REDUCED, FLOOR]
        rows = [
            "## Every run",
            "",
            "| phase | run | load 1m start→end | CPU s: "
            + ", ".join(names)
            + " | peak RSS MiB: same order |",
            "|---|---|---|---|---|",
        ]
        for r in self.comparison:
            cpu = " / ".join(f"{r.peers[n].cpu_s:.2f}" if n in r.peers else "-" for n in names)
            hwm = " / ".join(
                f"{r.peers[n].hwm_bytes / MIB:.1f}" if n in r.peers else "-" for n in names
            )
            rows.append(
                f"| every {r.cadence_s:g} s | {r.index + 1} | {r.load_start[0]:.2f}→"
                f"{r.load_end[0]:.2f} | {cpu} | {hwm} |"
            )
        for s in self.scaling:
            rows.append(
                f"| N={s.managed} | {s.index + 1} | {s.load_start[0]:.2f}→"
                f"{s.load_end[0]:.2f} | {s.run_time_s:.3f} over {s.ticks} ticks | "
                f"{s.hwm_bytes / MIB:.1f} |"
            )
        return "\n".join(rows) + "\n"


def _jitter_row(name: str, cadence: float, js: Sequence[Jitter]) -> str:
    dev = [d * 1000 for j in js for d in j.deviations_s()]
    overruns = sum(j.overruns for j in js)
    return (
        f"| {name} | {cadence:g} s | {len(dev)} | {percentile(dev, 50):.2f} | "
        f"{percentile(dev, 99):.2f} | {max(dev, default=math.nan):.2f} | {overruns} |"
    )


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=False, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "node_exporter ?"
    return (done.stdout or done.stderr).splitlines()[0] if (done.stdout or done.stderr) else "?"


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _mem_total_gib() -> float:
    return status_meminfo("MemTotal") / 2**30


def status_meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


# ---- main ----------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=5, help="runs per cadence (default 5)")
    p.add_argument(
        "--duration", type=float, default=60.0, help="measured window per run, seconds (default 60)"
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=5.0,
        help="seconds between start-up and the window (default 5)",
    )
    p.add_argument(
        "--cadences",
        type=float,
        nargs="+",
        default=[1.0, 0.1],
        help="sampling and scrape cadences, seconds (default 1 0.1)",
    )
    p.add_argument(
        "--no-reduced",
        action="store_true",
        help="leave out node_exporter with the reduced collector set",
    )
    p.add_argument(
        "--scaling-counts",
        type=int,
        nargs="+",
        default=[0, 10, 100, 1000],
        help="managed-process counts (default 0 10 100 1000)",
    )
    p.add_argument("--scaling-runs", type=int, default=3, help="runs per count (default 3)")
    p.add_argument(
        "--scaling-duration",
        type=float,
        default=20.0,
        help="window per scaling run, seconds (default 20)",
    )
    p.add_argument(
        "--scaling-interval",
        type=float,
        default=0.1,
        help="edged's interval in the scaling runs (default 0.1)",
    )
    p.add_argument("--skip-comparison", action="store_true")
    p.add_argument("--skip-scaling", action="store_true")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 runs x 10 s, scaling 1 run x 5 s, warm-up 2 s",
    )
    p.add_argument(
        "--working-tree",
        action="store_true",
        help="measure the working tree's edged/, uncommitted edits included (default: HEAD)",
    )
    p.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    p.add_argument(
        "--keep-logs", action="store_true", help="copy every peer's log next to the report"
    )
    return p


def _raise_on_term(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: peers and children stop


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _workspace() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="edged-bench-") as tmp:
        yield Path(tmp)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.runs, args.duration, args.warmup = 2, 10.0, 2.0
        args.scaling_runs, args.scaling_duration = 1, 5.0
    if not Path(NODE_EXPORTER).exists():
        print(
            f"overhead: {NODE_EXPORTER} is missing (apt-get install prometheus-node-exporter)",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGTERM, _raise_on_term)
    started = dt.datetime.now()
    with _workspace() as workdir:
        commit = None if args.working_tree else (_git("rev-parse", "HEAD") or None)
        src = snapshot_source(workdir, commit)
        telemetry = (src / "edged" / "telemetry.py").exists()
        pool = SleepPool(workdir)
        sink = OtlpSink() if telemetry else None
        ctx = Context(
            workdir, pool, sink, telemetry, args.warmup, reduced=not args.no_reduced, src=src
        )
        report = Report(started, args, ctx, [], [], source=source_digest(src))
        if commit is not None:
            report.commit = commit[:7]
        if not telemetry:
            report.notes.append(
                "edged/telemetry.py is missing: edged ran with `--prometheus "
                "off`, was not scraped and not exporting, and the OTLP case "
                "was not run. CPU ratios here are NOT a fair comparison."
            )
        try:
            if sink is not None:
                sink.start()
            managed = pool.start("m", COMPARISON_MANAGED)
            if not args.skip_comparison:
                for index in range(args.runs):
                    for cadence in args.cadences:  # interleaved: drifting load hits both alike
                        _log(f"comparison: every {cadence:g} s, run {index + 1}/{args.runs}")
                        report.comparison.append(comparison_run(ctx, cadence, index, args.duration))
            if not args.skip_scaling:
                groups = _scaling_groups(pool, managed, sorted(set(args.scaling_counts)))
                for index in range(args.scaling_runs):
                    for count, names in groups:
                        _log(f"per-process: N={count}, run {index + 1}/{args.scaling_runs}")
                        scaled = scaling_run(
                            ctx,
                            names,
                            count,
                            index=index,
                            interval_s=args.scaling_interval,
                            duration_s=args.scaling_duration,
                        )
                        report.scaling.append(scaled)
        finally:
            pool.stop_all()
            if sink is not None:
                sink.stop()
            if args.keep_logs:
                logs = args.output_dir / f"logs-{started:%Y%m%d-%H%M%S}"
                logs.mkdir(parents=True, exist_ok=True)
                for log in workdir.glob("*.log"):
                    shutil.copy2(log, logs / log.name)
                _log(f"peer logs kept in {logs}")
    report.finished = dt.datetime.now()
    text = report.render()
    print(text)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / f"overhead-{started:%Y%m%d-%H%M%S}.md"
    path.write_text(text + "\n")
    _log(f"written to {path}")
    return 0


def _scaling_groups(
    pool: SleepPool, managed: str, counts: Sequence[int]
) -> list[tuple[int, list[str]]]:
    """Rule names that together match exactly N processes, for each N.

    The 10 comparison processes are the first group; each larger N adds a group of the
    difference, so processes are started once and N grows by adding rules.
    """
    groups: list[tuple[int, list[str]]] = []
    names: list[str] = []
    have = 0
    for count in counts:
        if count == 0:
            groups.append((0, [f"eb{os.getpid()}none"[:15]]))  # a rule that matches nothing
            continue
        if not names:
            names.append(managed)
            have = COMPARISON_MANAGED
        while have < count:
            extra = count - have
            names.append(pool.start(f"g{len(names)}", extra))
            have += extra
        if have != count:
            raise BenchError(f"N={count} is below the {COMPARISON_MANAGED} comparison processes")
        groups.append((count, list(names)))
    return groups


if __name__ == "__main__":
    sys.exit(main())
