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

Usage: ``.venv/bin/python bench/budget.py [--clients 1 50 200] [--duration 5] [--nice -5]``.
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


def jitter_ms(sock: Path, since_s: float, until_s: float) -> tuple[float, float]:
    history = rpc(sock, "history", {"window": 120, "resources": ["system.memory.limit"]})
    times = [t for t in history["time"] if since_s <= t <= until_s]
    gaps = [abs((b - a) - 0.1) * 1000 for a, b in itertools.pairwise(times)]
    return (percentile(gaps, 99), max(gaps)) if gaps else (float("nan"), float("nan"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 50, 200])
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--nice", type=int, default=-5, help="niceness of both servers")
    args = ap.parse_args()
    rows = []
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
            for n in args.clients:
                mine, t0 = run_clients(sock, n, args.duration, floor=False)
                base, _ = run_clients(floor_sock, n, args.duration, floor=True)
                # the ticks while the load ran (not while 200 interpreters started)
                p99_jitter, max_jitter = jitter_ms(sock, t0, t0 + args.duration)
                left = rpc(sock, "budget.list", {})["leases"]
                rows.append((n, mine, base, p99_jitter, max_jitter, len(left)))
                print(f"{n} clients: edged {len(mine)} requests, floor {len(base)}", flush=True)
        finally:
            for p in (edged, floor):
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=20)
    out = [
        f"# Budget round trips, {started:%Y-%m-%d %H:%M}",
        "",
        f"{args.duration:g} s per client count; each client a process with one connection, "
        "looping budget.request (timed) + budget.release; edged --dry-run at 0.1 s sampling; "
        f"both servers at nice {args.nice}, clients at 0; "
        "floor: an asyncio JSON-lines server answering a fixed line.",
        "",
        f"edged {commit()}; command: `.venv/bin/python bench/budget.py "
        + " ".join(sys.argv[1:])
        + "`",
        "",
        "| clients | edged p50 ms | edged p99 ms | edged req/s | floor p50 ms | floor p99 ms "
        "| floor req/s | p99 ratio | throughput ratio | tick jitter p99 / max ms | leases left |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, mine, base, pj, mj, left in rows:
        e50, e99 = statistics.median(mine) * 1e3, percentile(mine, 99) * 1e3
        f50, f99 = statistics.median(base) * 1e3, percentile(base, 99) * 1e3
        ert, frt = len(mine) / args.duration, len(base) / args.duration
        out.append(
            f"| {n} | {e50:.3f} | {e99:.3f} | {ert:.0f} | {f50:.3f} | {f99:.3f} | {frt:.0f} "
            f"| {e99 / f99:.2f} | {ert / frt:.2f} | {pj:.2f} / {mj:.2f} | {left} |"
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
