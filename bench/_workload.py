"""One workload process of the protection benchmark (``bench/protection.py`` starts these).

It names itself (``comm``: ``bench-hog``, ``bench-service``, ...; what the daemons see in
``/proc/<pid>/comm``, and what the harness's reports name), joins its cgroup (the run's safety
group, or a group nested in it: ``--cgroup-procs``), and then allocates anonymous memory in one
of a few shapes, touching every page so that it is really used:

``hold``   allocate ``--target-mib`` at once, then hold it and beat a heartbeat every 10 ms
           (a service: the harness reads its worst gap);
``ramp``   grow at ``--rate-mib-s`` (0: as fast as the machine faults pages) up to the target;
``burst``  one allocation of the whole target, then hold;
``spike``  ramp to the target, hold ``--hold-s``, free it all, then idle;
``spin``   no memory: a busy loop at nice 0 (the benchmark's ``--cpu-load``).

With ``--wait-go`` a ``ramp``, ``burst`` or ``spike`` process loads, notes ``ready`` and then
waits for one byte on stdin before it allocates anything, so that the harness can measure the
groups with every interpreter loaded and start the culprit at a moment it knows.

Memory is allocated in 4 MiB steps (the whole target at once for ``burst``) so that a signal
handler runs within a step. What happens to the process is written to a report file as lines
``<event> <time_ns>`` with ``time.time_ns()`` (the harness compares them with its own clock):
``ready`` (loaded, and for ``hold`` the allocation done), ``go`` (``--wait-go``: told to start),
``full`` (the target reached), ``freed`` (``spike``), ``term`` (SIGTERM received). The worst
heartbeat gap so far (``hold`` only) is kept in a second file, 8 bytes (ns) rewritten in place.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import signal
import struct
import sys
import time
from typing import NoReturn

PAGE = 4096
MiB = 1 << 20
STEP_BYTES = 4 * MiB
PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1


def set_comm(name: str) -> None:
    """Name the process, and have it SIGKILLed if the harness dies (nothing is left behind)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def touched(size_bytes: int) -> mmap.mmap:
    """An anonymous mapping with every page written (so it is resident and charged)."""
    m = mmap.mmap(-1, size_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m[::PAGE] = b"\x01" * ((size_bytes + PAGE - 1) // PAGE)
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--mode", choices=("hold", "ramp", "burst", "spike", "spin"), required=True)
    ap.add_argument("--target-mib", type=float, default=0.0)
    ap.add_argument("--rate-mib-s", type=float, default=0.0)
    ap.add_argument("--hold-s", type=float, default=0.5)
    ap.add_argument("--ignore-term", action="store_true")
    ap.add_argument("--cgroup-procs", default="")
    ap.add_argument("--report", required=True)
    ap.add_argument("--gap-file", default="")
    ap.add_argument("--wait-go", action="store_true")
    args = ap.parse_args()

    set_comm(args.name)
    if args.cgroup_procs:
        with open(args.cgroup_procs, "w") as f:
            f.write(str(os.getpid()))
    report = os.open(args.report, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def note(event: str) -> None:
        os.write(report, f"{event} {time.time_ns()}\n".encode())

    def on_term(signum: int, frame: object) -> None:
        note("term")
        if not args.ignore_term:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    target = int(args.target_mib * MiB)
    held: list[mmap.mmap] = []

    if args.mode == "spin":
        os.setpriority(os.PRIO_PROCESS, 0, 0)
        note("ready")
        while True:
            pass

    if args.mode == "hold":
        held.append(touched(target))
        note("ready")
        heartbeat(args.gap_file)

    note("ready")
    if args.wait_go:
        sys.stdin.buffer.read(1)
        note("go")
    if args.mode == "burst":
        held.append(touched(target))
        note("full")
        while True:
            time.sleep(1)

    start = time.monotonic()
    allocated = 0
    while allocated < target:
        if args.rate_mib_s > 0:
            due = int(min(target, (time.monotonic() - start) * args.rate_mib_s * MiB))
            if due - allocated < STEP_BYTES and due < target:
                time.sleep(0.002)
                continue
        size = min(STEP_BYTES, target - allocated)
        held.append(touched(size))
        allocated += size
    note("full")
    if args.mode == "spike":
        time.sleep(args.hold_s)
        for m in held:
            m.close()
        held.clear()
        note("freed")
    while True:
        time.sleep(1)


def heartbeat(gap_file: str) -> NoReturn:
    """Beat every 10 ms; keep the worst gap between beats in ``gap_file`` (8 bytes, ns)."""
    fd = os.open(gap_file, os.O_RDWR | os.O_CREAT, 0o644) if gap_file else -1
    worst_ns = 0
    last = time.monotonic_ns()
    while True:
        time.sleep(0.01)
        now = time.monotonic_ns()
        if now - last > worst_ns:
            worst_ns = now - last
            if fd >= 0:
                os.pwrite(fd, struct.pack("<q", worst_ns), 0)
        last = now


if __name__ == "__main__":
    main()
