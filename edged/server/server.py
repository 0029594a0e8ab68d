"""The asyncio Unix-socket server: framing, peer credentials, bounded connections.

It runs in the daemon's event loop. A handler is ``async (peer, params) -> result``; the
method table is the daemon's (read-only methods today; budgets come with the ledger).
A line that is not JSON gets a -32700 reply with ``"id": null`` and the connection stays open;
an oversized line gets an error reply and the connection is closed; neither affects other
clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edged.server import protocol
from edged.server.protocol import RpcError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Peer:
    """A client as the kernel identifies it (SO_PEERCRED), never as it claims to be."""

    pid: int
    uid: int
    gid: int


Handler = Callable[[Peer, Mapping[str, Any]], Awaitable[Any]]


def peer_credentials(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid=pid, uid=uid, gid=gid)


def default_socket_path(environ: Mapping[str, str] | None = None) -> Path:
    """``/run/edged/edged.sock`` for root, ``$XDG_RUNTIME_DIR/edged.sock`` otherwise."""
    env = os.environ if environ is None else environ
    if os.geteuid() == 0:
        return Path("/run/edged/edged.sock")
    runtime = env.get("XDG_RUNTIME_DIR") or f"/tmp/edged-{os.geteuid()}"
    return Path(runtime) / "edged.sock"


def bind_unix_socket(path: Path) -> socket.socket:
    """A listening socket at ``path``, mode 0660, group ``edged`` when that group exists.

    A stale socket file (left by a crash) is replaced; a live one (another daemon answers on
    it) is an error rather than something to steal.
    """
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise OSError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink()
        else:
            raise OSError(f"another daemon is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o117)  # the socket is created 0660, never briefly world-writable
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    with contextlib.suppress(KeyError, PermissionError):
        os.chown(path, -1, grp.getgrnam("edged").gr_gid)
    sock.listen(128)
    return sock


class Server:
    """Serves the method table on a listening Unix socket."""

    def __init__(
        self,
        methods: Mapping[str, Handler],
        max_clients: int = 64,
        max_line_bytes: int = protocol.MAX_LINE_BYTES,
    ) -> None:
        self.methods = dict(methods)
        self.max_clients = max_clients
        self.max_line_bytes = max_line_bytes
        self.clients: set[asyncio.StreamWriter] = set()
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.closing = False

    async def start(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._server = await asyncio.start_unix_server(
            self._serve, sock=sock, limit=self.max_line_bytes + 1
        )

    async def close(self) -> None:
        self.closing = True
        if self._server is not None:
            self._server.close()
        for writer in list(self.clients):
            with contextlib.suppress(OSError, RuntimeError):
                writer.write(
                    protocol.encode_notification("shutdown", {"code": protocol.SHUTTING_DOWN})
                )
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._connection(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._tasks.discard(task)
            self.clients.discard(writer)
            writer.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        peer = peer_credentials(sock)
        if len(self.clients) >= self.max_clients:
            writer.write(
                protocol.encode_error(
                    None, protocol.TOO_MANY, f"too many clients (max {self.max_clients})"
                )
            )
            await writer.drain()
            return
        self.clients.add(writer)
        while not self.closing:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError:
                line = b""  # over the limit: the stream holds no whole line we may read
                oversized = True
            except asyncio.IncompleteReadError:
                return  # EOF (a partial last line without newline is dropped)
            else:
                oversized = len(line) > self.max_line_bytes + 1
            if oversized:
                message = f"line longer than {self.max_line_bytes} bytes; closing"
                writer.write(protocol.encode_error(None, protocol.INVALID_REQUEST, message))
                await writer.drain()
                return
            if not line.strip():
                continue
            reply = await self._dispatch(peer, line)
            if reply:
                writer.write(reply)
                await writer.drain()

    async def _dispatch(self, peer: Peer, line: bytes) -> bytes | None:
        rid: protocol.RequestId = None
        try:
            request = protocol.parse_request(line)
            rid = request.id
            handler = self.methods.get(request.method)
            if handler is None:
                raise RpcError(protocol.METHOD_NOT_FOUND, f"no such method: {request.method}")
            if self.closing:
                raise RpcError(protocol.SHUTTING_DOWN, "edged is shutting down")
            result = await handler(peer, request.params or {})
        except RpcError as exc:
            if isinstance(exc.data, dict) and "id" in exc.data and rid is None:
                rid = exc.data["id"]
                data = None
            else:
                data = exc.data
            return protocol.encode_error(rid, exc.code, exc.message, data)
        except Exception:  # a handler bug answers -32603 and is logged; the daemon goes on
            log.exception("handler for a request from pid %d failed", peer.pid)
            return protocol.encode_error(rid, protocol.INTERNAL_ERROR, "internal error")
        if not request.has_id:
            return None  # a notification gets no reply
        return protocol.encode_result(rid, result)
