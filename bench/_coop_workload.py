"""One workload process of the cooperative benchmark (``bench/cooperative.py`` starts these).

It names itself (``comm``), joins the safety cgroup, allocates ``--base-mib`` of anonymous
memory, and then holds whatever amount the harness asks for on stdin, one command a line:

``hold <MiB>``  grow (at ``--rate-mib-s``, in 4 MiB steps) or free (at once) to hold this much.

Modes:

``client``  a budget client that complies: it connects to edged with
            :class:`edged.client.Client` (once the daemon's socket exists), holds a lease
            (``client.budget(memory=--grant-mib)``) for as long as it lives, and on
            ``budget.shrink`` frees memory until its resident set is at the target (3 % under
            it, as an allocator that rounds would), stops growing past it, and reports its
            usage with ``budget.update``. A training job that drops a cache, or shrinks its
            batch, when asked.
``deaf``    the same client, but it ignores ``budget.shrink`` (it only notes it) and keeps
            growing to what the harness asked.
``hog``     no lease, no connection: an unmanaged process that grows when told.

It notes what happens to it in a report file, one line ``<event> <time_ns> [detail]``
(``time.time_ns()``): ``ready`` (base allocated), ``leased <id> <how>`` (``how`` the lease is
enforced: ``cgroup`` or ``cooperative``), ``held <MiB>`` (reached a
``hold`` target), ``shrink <target bytes>`` (a ``budget.shrink`` arrived), ``shrunk <rss
bytes>`` (freed down to the target and reported it), ``term`` (SIGTERM). Notifications are
read between allocation steps and every 20 ms while idle (``client.poll``), as a training loop
polls once per step.
"""

from __future__ import annotations

import argparse
import mmap
import os
import select
import signal
import sys
import time
from collections.abc import Mapping
from typing import Any

from _workload import set_comm, touched

MiB = 1 << 20
STEP_BYTES = 4 * MiB
PAGE = os.sysconf("SC_PAGE_SIZE")
SHRINK_BELOW = 0.97  # free to 3 % under the target: edged counts 5 % over it as done


def rss_bytes() -> int:
    """This process's resident set, as edged reads it (``/proc/PID/stat`` rss pages)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE


class Memory:
    """Anonymous memory in 4 MiB mappings, every page touched (resident and charged)."""

    def __init__(self) -> None:
        self.chunks: list[mmap.mmap] = []

    @property
    def held_bytes(self) -> int:
        return sum(len(m) for m in self.chunks)

    def grow_step(self, limit_bytes: int) -> None:
        size = min(STEP_BYTES, limit_bytes - self.held_bytes)
        if size > 0:
            self.chunks.append(touched(size))

    def free_to(self, held_bytes: int) -> None:
        while self.chunks and self.held_bytes > held_bytes:
            self.chunks.pop().close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--mode", choices=("client", "deaf", "hog"), required=True)
    ap.add_argument("--base-mib", type=float, required=True)
    ap.add_argument("--grant-mib", type=float, default=0.0)
    ap.add_argument("--rate-mib-s", type=float, default=256.0)
    ap.add_argument("--socket", default="")
    ap.add_argument("--cgroup-procs", default="")
    ap.add_argument("--report", required=True)
    args = ap.parse_args()

    set_comm(args.name)
    if args.cgroup_procs:
        with open(args.cgroup_procs, "w") as f:
            f.write(str(os.getpid()))
    report = os.open(args.report, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def note(event: str, detail: object = "") -> None:
        os.write(report, f"{event} {time.time_ns()} {detail}".rstrip().encode() + b"\n")

    def on_term(signum: int, frame: object) -> None:
        note("term")
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    memory = Memory()
    goal_bytes = int(args.base_mib * MiB)
    while memory.held_bytes < goal_bytes:
        memory.grow_step(goal_bytes)
    note("ready")
    if args.mode == "hog":
        serve(args, memory, goal_bytes, note, client=None, lease=None)
        return

    from edged.client import Client  # from the harness's frozen copy of edged (PYTHONPATH)

    while not os.path.exists(args.socket):  # the daemon starts once every base is measured
        time.sleep(0.05)
    with Client(args.socket) as client:
        client.hello(args.name)
        pending: dict[str, Any] = {}

        def on_shrink(params: Mapping[str, Any]) -> None:
            target = params.get("target") or {}
            note("shrink", int(target.get("memory", 0)))
            if args.mode == "client" and "memory" in target:
                pending["target"] = int(target["memory"])

        with client.budget(memory=int(args.grant_mib * MiB), wait=10, on_shrink=on_shrink) as lease:
            how = lease.enforced.get("how") if isinstance(lease.enforced, dict) else None
            note("leased", f"{lease.id} {how}")  # how: cgroup (a group with the grant), else
            # cooperative (nothing holds it to the grant)
            serve(args, memory, goal_bytes, note, client=client, lease=lease, pending=pending)


def serve(
    args: argparse.Namespace,
    memory: Memory,
    goal_bytes: int,
    note: Any,
    *,
    client: Any,
    lease: Any,
    pending: dict[str, Any] | None = None,
) -> None:
    """Follow ``hold`` commands; between steps read notifications and obey a shrink."""
    rate_bytes_s = args.rate_mib_s * MiB
    grow_from: tuple[float, int] | None = None  # (monotonic s, held bytes) when a grow began
    cap_bytes: int | None = None  # a shrink target caps the goal until the next command
    reached = True
    while True:
        readable, _, _ = select.select([sys.stdin], [], [], 0)
        if readable:
            line = sys.stdin.readline()
            if not line:
                return  # the harness went away
            parts = line.split()
            if len(parts) == 2 and parts[0] == "hold":
                goal_bytes = int(float(parts[1]) * MiB)
                cap_bytes = None
                grow_from = (time.monotonic(), memory.held_bytes)
                reached = False
        if client is not None:
            client.poll(0)
        if pending and "target" in pending:
            target = pending.pop("target")
            overhead = rss_bytes() - memory.held_bytes  # the interpreter, the client library
            cap_bytes = max(0, int(target * SHRINK_BELOW) - overhead)
            memory.free_to(cap_bytes)
            rss = rss_bytes()
            client.update(lease, usage={"memory": rss})
            note("shrunk", rss)
        goal = goal_bytes if cap_bytes is None else min(goal_bytes, cap_bytes)
        if memory.held_bytes > goal:
            memory.free_to(goal)
        elif memory.held_bytes < goal and grow_from is not None:
            started_s, from_bytes = grow_from
            due = from_bytes + (time.monotonic() - started_s) * rate_bytes_s
            if due - memory.held_bytes >= STEP_BYTES or due >= goal:
                memory.grow_step(goal)
                continue
        if not reached and memory.held_bytes == goal:
            reached = True
            note("held", f"{memory.held_bytes / MiB:.0f}")
        if client is not None:
            client.poll(0.005 if memory.held_bytes < goal else 0.02)
        else:
            time.sleep(0.005 if memory.held_bytes < goal else 0.02)


if __name__ == "__main__":
    main()
