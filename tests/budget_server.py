"""A small real JSON-lines budget server for client tests, following DESIGN section 6.

The client library and ``edged budget`` are tested against this server where a test must
make the daemon's side happen on demand (a ``budget.shrink`` now, a queue that times out): a
real Unix socket, one JSON-RPC 2.0 object per line, a thread per connection, the peer from
SO_PEERCRED. The real daemon's ``budget.*`` methods have their own tests.

What it implements: ``hello``, ``budget.request`` (capacity-checked: 1001 with
``data.available``; ``wait`` queues up to that many seconds, then 1002; a ``pid`` owned by
another uid is 1003 unless the peer's uid is in ``admin_uids``), ``budget.update``,
``budget.release`` (1004 for an unknown lease), ``budget.list``, -32601 for anything else;
and :meth:`BudgetServer.notify` to push a notification (``budget.shrink`` ...) to the
connection that holds a lease.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class RpcFailure(Exception):
    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code, self.message, self.data = code, message, data


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        raw = self.request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        peer_pid, peer_uid, _ = struct.unpack("3i", raw)
        owner = self.server.owner
        conn = _Connection(self.request)
        with owner.lock:
            owner.connections.append(conn)
        try:
            for line in self.rfile:
                try:
                    message = json.loads(line)
                except ValueError:
                    conn.send(
                        {
                            "jsonrpc": "2.0",
                            "id": None,
                            "error": {"code": -32700, "message": "parse error"},
                        }
                    )
                    continue
                rid = message.get("id")
                try:
                    result = owner.handle(
                        conn, peer_pid, peer_uid, message["method"], message.get("params") or {}
                    )
                    reply: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "result": result}
                except RpcFailure as exc:
                    error: dict[str, Any] = {"code": exc.code, "message": exc.message}
                    if exc.data is not None:
                        error["data"] = exc.data
                    reply = {"jsonrpc": "2.0", "id": rid, "error": error}
                conn.send(reply)
        finally:
            with owner.lock:
                owner.connections.remove(conn)
                # a lease dies with its connection, as in the daemon (DESIGN section 6)
                for lease_id in [k for k, v in owner.leases.items() if v["conn"] is conn]:
                    del owner.leases[lease_id]
                owner.lock.notify_all()


class _Connection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.send_lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        with self.send_lock:
            self.sock.sendall(json.dumps(message).encode() + b"\n")


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    owner: BudgetServer


class BudgetServer:
    """``capacity``: resource -> amount (bytes, cores) the server can grant in all."""

    def __init__(
        self,
        path: Path,
        capacity: dict[str, float],
        admin_uids: Iterable[int] = (0,),
    ) -> None:
        self.path = path
        self.capacity = dict(capacity)
        self.admin_uids = frozenset(admin_uids)
        self.lock = threading.Condition()
        self.connections: list[_Connection] = []
        self.leases: dict[str, dict[str, Any]] = {}
        self.requests: list[dict[str, Any]] = []  # every budget.request's params, in order
        self.releases: list[str] = []
        self.updates: list[dict[str, Any]] = []  # every budget.update's params, in order
        self._next = 1
        self._server = _Server(str(path), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> BudgetServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        with self.lock:
            for conn in self.connections:
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
        self.path.unlink(missing_ok=True)

    def available(self) -> dict[str, float]:
        used: dict[str, float] = dict.fromkeys(self.capacity, 0.0)
        for lease in self.leases.values():
            for name, amount in lease["granted"].items():
                if name in used:
                    used[name] += amount
        return {name: self.capacity[name] - used[name] for name in self.capacity}

    def notify(self, lease_id: str, method: str, params: dict[str, Any]) -> None:
        """Push a notification to the connection that holds ``lease_id``."""
        with self.lock:
            conn = self.leases[lease_id]["conn"]
        conn.send({"jsonrpc": "2.0", "method": method, "params": params})

    def handle(
        self, conn: _Connection, peer_pid: int, peer_uid: int, method: str, params: dict[str, Any]
    ) -> Any:
        if method == "hello":
            return {
                "server": "budget-test-server",
                "protocol": 1,
                "strategy": "cooperative",
                "capabilities": ["budget.list", "budget.release", "budget.request", "hello"],
                "peer": {"pid": peer_pid, "uid": peer_uid},
            }
        if method == "budget.request":
            return self._request(conn, peer_pid, peer_uid, params)
        if method == "budget.release":
            with self.lock:
                lease_id = params.get("lease")
                if lease_id not in self.leases:
                    raise RpcFailure(1004, f"no such lease {lease_id!r}")
                del self.leases[lease_id]
                self.releases.append(lease_id)
                self.lock.notify_all()
            return {}
        if method == "budget.update":
            with self.lock:
                self.updates.append(dict(params))
                lease = self.leases.get(str(params.get("lease")))
                if lease is None:
                    raise RpcFailure(1004, "no such lease")
                return {"granted": lease["granted"]}
        if method == "budget.list":
            with self.lock:
                return [
                    {"lease": k, "pid": v["pid"], "class": v["class"], "granted": v["granted"]}
                    for k, v in self.leases.items()
                ]
        raise RpcFailure(-32601, f"no such method {method!r}")

    def _request(
        self, conn: _Connection, peer_pid: int, peer_uid: int, params: dict[str, Any]
    ) -> Any:
        resources = params.get("resources")
        if not isinstance(resources, dict) or not resources:
            raise RpcFailure(-32602, "resources must be a non-empty object")
        pid = params.get("pid", peer_pid)
        try:
            owner_uid = os.stat(f"/proc/{pid}").st_uid
        except FileNotFoundError:
            raise RpcFailure(-32602, f"no process {pid}") from None
        if owner_uid != peer_uid and peer_uid not in self.admin_uids:
            raise RpcFailure(1003, f"process {pid} belongs to uid {owner_uid}")
        wanted = {k: float(v) for k, v in resources.items() if k in self.capacity}
        deadline = time.monotonic() + float(params.get("wait", 0))
        with self.lock:
            self.requests.append(params)
            while True:
                available = self.available()
                if all(wanted[k] <= available[k] for k in wanted):
                    break
                remaining = deadline - time.monotonic()
                if params.get("wait", 0) and remaining <= 0:
                    raise RpcFailure(1002, "timed out waiting for resources")
                if not params.get("wait", 0):
                    raise RpcFailure(1001, "insufficient resources", {"available": available})
                self.lock.wait(remaining)
            lease_id = f"L{self._next}"
            self._next += 1
            self.leases[lease_id] = {
                "conn": conn,
                "pid": pid,
                "class": params.get("class", "normal"),
                "granted": wanted,
            }
        return {"lease": lease_id, "granted": wanted, "enforced": "cooperative"}
