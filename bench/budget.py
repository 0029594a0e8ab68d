"""Budget round trips: edged's ``budget.request`` against a floor, at 1, 50 and 200 clients.

A benchmark, not a test: it prints a markdown report and writes it to
``bench/results/budget-<date>-<time>.md``; it asserts nothing.

Each client is its own process with one connection on the Unix socket. For ``--duration``
seconds it loops: ``budget.request`` {cpu: 0.001} (timed: request sent to reply read), then
``budget.release`` of that lease (not timed). The same clients, in the same run, talk to the
**floor**: a minimal asyncio server that answers every JSON line with a fixed result line
(no parsing beyond finding the line; what any JSON-lines server costs at least). Reported per
client count: p50 and p99 of the request round trip, and requests answered per second (all
clients together), for both, and the ratios (targets: p99 within 2x the floor's, throughput at
least half of it). During the edged runs the daemon samples every 0.1 s; the jitter of its tick
times (``history``) under that load is reported too (target: under 5 ms).

edged runs with ``--dry-run`` (a lease is admitted and released, nothing is moved into a cgroup:
the ledger and the socket are what is measured), ``[server] max_clients = 512`` and a request
rate limit high enough not to refuse anything.

Both servers run at the niceness ``--nice`` (default -5: ``Nice=`` of systemd/edged.service, how
edged runs in the field); the clients at 0. With 50 or 200 busy client processes on a small
machine, a nice-0 daemon waits for the scheduler for tens of milliseconds at times whatever it
does itself; ``--nice 0`` shows that. (The unit's ``CPUQuota=50%`` is not applied here: it would
cap a saturated socket at half a core.)

The machine's own drift (a 2-core VM: the same floor run varies by 1.5x from one minute to
the next) is why each client count gets ``--rounds`` pairs of runs in ABBA order and the
ratios are the medians of the per-round ratios.

Usage: ``.venv/bin/python bench/budget.py [--clients 1 50 200] [--duration 5] [--rounds 3]
[--nice -5]``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

WORKER = r"""
import json, socket, sys, time
path, start_at, duration = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
floor = sys.argv[4] == "1"
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
for _ in range(500):
    try:
        sock.connect(path)
        break
    except (BlockingIOError, ConnectionRefusedError):
        time.sleep(0.01)
reader = sock.makefile("rb")
latencies = []
rid = 0
time.sleep(max(0.0, start_at - time.time()))
end = time.monotonic() + duration
while time.monotonic() < end:
    rid += 1
    params = {"resources": {"cpu": 0.001}}
    req = {"jsonrpc": "2.0", "id": rid, "method": "budget.request", "params": params}
    t0 = time.perf_counter()
    sock.sendall(json.dumps(req).encode() + b"\n")
    line = reader.readline()
    latencies.append(time.perf_counter() - t0)
    if not floor:
        lease = json.loads(line)["result"]["lease"]
    else:
        lease = 0
    rid += 1
    rel = {"jsonrpc": "2.0", "id": rid, "method": "budget.release", "params": {"lease": lease}}
    sock.sendall(json.dumps(rel).encode() + b"\n")
    reader.readline()
print(json.dumps(latencies))
"""

FLOOR = r"""
import asyncio, os, sys
REPLY = b'{"jsonrpc":"2.0","id":1,"result":{"lease":1,"granted":{"cpu":0.001}}}\n'
async def serve(reader, writer):
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            writer.write(REPLY)
            await writer.drain()
    finally:
        writer.close()
async def main():
    server = await asyncio.start_unix_server(serve, path=sys.argv[1], backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""


def commit() -> str:
    """The commit measured (with ``+dirty`` when the tree has changes)."""
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                          check=False, capture_output=True, text=True).stdout.strip()  # fmt: skip
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "edged"],
                           check=False, capture_output=True, text=True).stdout.strip()  # fmt: skip
    return head + ("+dirty" if dirty else "")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered)) - 1))]


def run_clients(
    path: Path, clients: int, duration_s: float, floor: bool
) -> tuple[list[float], float]:
    """Latencies of every request, and the wall time the load started (after every client
    process has started: their start-up is not part of the load)."""
    start_at = time.time() + 1.0 + clients * 0.01
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                str(path),
                str(start_at),
                str(duration_s),
                "1" if floor else "0",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(clients)
    ]
    latencies: list[float] = []
    for p in procs:
        out, _ = p.communicate(timeout=duration_s + 120)
        if p.returncode != 0:
            raise RuntimeError(f"a client failed ({p.returncode})")
        latencies += json.loads(out)
    return latencies, start_at


def rpc(path: Path, method: str, params: dict[str, Any]) -> Any:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        sock.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
                     .encode() + b"\n")  # fmt: skip
        return json.loads(sock.makefile("rb").readline())["result"]


def start_edged(tmp: Path, nice: int) -> tuple[subprocess.Popen[bytes], Path]:
    cfg = tmp / "edged.toml"
    cfg.write_text(
        '[sampling]\ninterval = "100ms"\n'
        "[server]\nmax_clients = 512\nmax_requests_per_s = 1000000\n"
    )
    sock = tmp / "edged.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGED_", "OTEL_"))}
    env["STATE_DIRECTORY"] = str(tmp / "state")
    log = (tmp / "edged.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edged", "run", "--config", str(cfg), "--socket", str(sock),
         "--prometheus", "off", "--dry-run"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    os.setpriority(os.PRIO_PROCESS, proc.pid, nice)  # before it serves anything
    for _ in range(300):
        if sock.exists():
            with contextlib.suppress(OSError):
                rpc(sock, "status", {})
                return proc, sock
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("edged did not start")


class Round:
    """One edged run and one floor run at the same client count."""

    def __init__(
        self,
        mine: list[float],
        base: list[float],
        duration_s: float,
        *,
        jitter_p99: float,
        jitter_max: float,
        left: int,
    ) -> None:
        self.e50, self.e99 = statistics.median(mine) * 1e3, percentile(mine, 99) * 1e3
        self.f50, self.f99 = statistics.median(base) * 1e3, percentile(base, 99) * 1e3
        self.ert, self.frt = len(mine) / duration_s, len(base) / duration_s
        self.jitter_p99, self.jitter_max, self.left = jitter_p99, jitter_max, left

    def line(self) -> str:
        return (
            f"edged p99 {self.e99:.2f} ms {self.ert:.0f}/s, floor p99 {self.f99:.2f} ms "
            f"{self.frt:.0f}/s, jitter p99 {self.jitter_p99:.2f} ms"
        )


def jitter_ms(sock: Path, since_s: float, until_s: float) -> tuple[float, float]:
    history = rpc(sock, "history", {"window": 120, "resources": ["system.memory.limit"]})
    times = [t for t in history["time"] if since_s <= t <= until_s]
    gaps = [abs((b - a) - 0.1) * 1000 for a, b in itertools.pairwise(times)]
    return (percentile(gaps, 99), max(gaps)) if gaps else (float("nan"), float("nan"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 50, 200])
    ap.add_argument("--duration", type=float, default=5.0, help="seconds of load per run")
    ap.add_argument("--rounds", type=int, default=3, help="edged/floor run pairs per count")
    ap.add_argument("--nice", type=int, default=-5, help="niceness of both servers")
    args = ap.parse_args()
    rounds: dict[int, list[Round]] = {n: [] for n in args.clients}
    started = dt.datetime.now()
    with tempfile.TemporaryDirectory(prefix="edged-budget-bench-") as tmp_name:
        tmp = Path(tmp_name)
        floor_sock = tmp / "floor.sock"
        floor = subprocess.Popen([sys.executable, "-c", FLOOR, str(floor_sock)],
                                 stdout=subprocess.PIPE, text=True)  # fmt: skip
        os.setpriority(os.PRIO_PROCESS, floor.pid, args.nice)
        assert floor.stdout is not None
        assert floor.stdout.readline().strip() == "ready"
        edged, sock = start_edged(tmp, args.nice)
        try:
            for r in range(args.rounds):
                for n in args.clients:
                    # ABBA: edged first in even rounds, the floor first in odd ones, so a
                    # drift of the machine over a round favours neither
                    order = (False, True) if r % 2 == 0 else (True, False)
                    got: dict[bool, tuple[list[float], float]] = {}
                    for is_floor in order:
                        got[is_floor] = run_clients(
                            floor_sock if is_floor else sock, n, args.duration, floor=is_floor
                        )
                    (mine, t0), (base, _) = got[False], got[True]
                    # the ticks while the load ran (not while 200 interpreters started)
                    p99_jitter, max_jitter = jitter_ms(sock, t0, t0 + args.duration)
                    left = len(rpc(sock, "budget.list", {})["leases"])
                    rounds[n].append(
                        Round(
                            mine,
                            base,
                            args.duration,
                            jitter_p99=p99_jitter,
                            jitter_max=max_jitter,
                            left=left,
                        )
                    )
                    print(f"round {r + 1}, {n} clients: {rounds[n][-1].line()}", flush=True)
        finally:
            for p in (edged, floor):
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=20)
    out = [
        f"# Budget round trips, {started:%Y-%m-%d %H:%M}",
        "",
        f"{args.rounds} rounds per client count, each an edged run and a floor run of "
        f"{args.duration:g} s (ABBA order); each client a process with one connection, "
        "looping budget.request (timed) + budget.release; edged --dry-run at 0.1 s sampling; "
        f"both servers at nice {args.nice}, clients at 0; "
        "floor: an asyncio JSON-lines server answering a fixed line. Figures are medians over "
        "the rounds; the ratios are the medians of each round's ratio (min..max).",
        "",
        f"edged {commit()}; command: `.venv/bin/python bench/budget.py "
        + " ".join(sys.argv[1:])
        + "`",
        "",
        "| clients | edged p50 ms | edged p99 ms | edged req/s | floor p50 ms | floor p99 ms "
        "| floor req/s | p99 ratio | throughput ratio | tick jitter p99 / max ms | leases left |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    med = statistics.median

    def spread(values: list[float]) -> str:
        return f"{med(values):.2f} ({min(values):.2f}..{max(values):.2f})"

    for n, runs in rounds.items():
        out.append(
            f"| {n} | {med(x.e50 for x in runs):.3f} | {med(x.e99 for x in runs):.3f} "
            f"| {med(x.ert for x in runs):.0f} | {med(x.f50 for x in runs):.3f} "
            f"| {med(x.f99 for x in runs):.3f} | {med(x.frt for x in runs):.0f} "
            f"| {spread([x.e99 / x.f99 for x in runs])} | {spread([x.ert / x.frt for x in runs])} "
            f"| {med(x.jitter_p99 for x in runs):.2f} / {max(x.jitter_max for x in runs):.2f} "
            f"| {max(x.left for x in runs)} |"
        )
    text = "\n".join(out) + "\n"
    print(text)
    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    path = results / f"budget-{started:%Y%m%d-%H%M%S}.md"
    path.write_text(text)
    print(f"written to {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
