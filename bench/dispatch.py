"""The daemon's own cost of one ``budget.request`` + ``budget.release``, without the socket.

A benchmark, not a test: it asserts nothing. In one process, the real server's dispatch
(``Server._dispatch``: parse, authorize, ledger, encode) is driven with request lines while N
other leases stand, so what is measured is the Python work per request pair that every client
of the socket pays on top of the kernel's, and how it grows with the number of leases held
(the ledger keeps its sums and indexes at hand so that it should not). Budget service as the
daemon builds it, no enforcement (``--dry-run``'s view), peer = this process as root.

Usage: ``.venv/bin/python bench/dispatch.py [--standing 0 50 200] [--pairs 20000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

from edged.budget.service import BudgetService
from edged.server.server import Peer, Server

REQUEST = (
    b'{"jsonrpc": "2.0", "id": 1, "method": "budget.request",'
    b' "params": {"resources": {"cpu": 0.0001}}}\n'
)


class _Conn:
    """What ``Server._dispatch`` reads of a connection."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer


async def pair_us(standing: int, pairs: int) -> float:
    """Median over 5 batches of the microseconds one request + release pair takes."""
    service = BudgetService(lambda connection, method, params: True)
    service.set_capacity({"memory": 16e9, "cpu": 64.0}, {"memory": 1e9, "cpu": 0.1})
    server = Server(service.methods())
    conn = _Conn(Peer(pid=os.getpid(), uid=0, gid=0, connection=1))
    for _ in range(standing):
        server._dispatch(conn, REQUEST)  # type: ignore[arg-type]
    batches = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(pairs // 5):
            reply = server._dispatch(conn, REQUEST)  # type: ignore[arg-type]
            assert reply is not None
            lease = json.loads(reply)["result"]["lease"]
            release = (
                b'{"jsonrpc": "2.0", "id": 2, "method": "budget.release",'
                b' "params": {"lease": %d}}\n' % lease
            )
            server._dispatch(conn, release)  # type: ignore[arg-type]
        batches.append((time.perf_counter() - started) / (pairs // 5) * 1e6)
    service.close()
    return statistics.median(batches)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--standing", type=int, nargs="+", default=[0, 50, 200])
    ap.add_argument("--pairs", type=int, default=20000)
    args = ap.parse_args()
    print("| leases standing | µs per request + release (median of 5 batches) |")
    print("|---|---|")
    for n in args.standing:
        print(f"| {n} | {asyncio.run(pair_us(n, args.pairs)):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
