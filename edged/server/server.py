"""The asyncio Unix-socket server: framing, peer credentials, bounded connections.

It runs in the daemon's event loop. A handler is ``async (peer, params) -> result``; the
method table is the daemon's. Each connection has a number (``Peer.connection``): a handler
pushes notifications on its connection with :meth:`Server.notify`, and the ``on_close`` hook
is told the moment a connection ends (EOF, reset, the client killed), which is how a budget
dies with its connection. A handler that cannot answer yet returns :class:`Deferred`: the reply
is written when its future is done, and the connection's next lines are read meanwhile.
A line that is not JSON gets a -32700 reply with ``"id": null`` and the connection stays open;
an oversized line gets an error reply and the connection is closed; neither affects other
clients. Notifications are written without waiting, and what waits for a client that does not
read is bounded (:meth:`Server.send`): the daemon's tick never waits on a subscriber.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import itertools
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edged.server import protocol
from edged.server.protocol import RpcError

log = logging.getLogger(__name__)

# Notifications waiting for one client beyond what the kernel's socket buffer holds (about
# 200 KiB for a Unix stream socket): room for a burst of events or several snapshots; more
# than this and the client is not reading, so it is disconnected (see Server.send).
MAX_PENDING_BYTES = 1 << 20
# a client closed for not reading gets this long to read its backlog before it is cut off
SLOW_CLOSE_GRACE_S = 5.0


@dataclass(frozen=True)
class Peer:
    """A client as the kernel identifies it (SO_PEERCRED), never as it claims to be."""

    pid: int
    uid: int
    gid: int
    connection: int = field(default=0, compare=False)  # the server's number for the connection


class Deferred:
    """A reply that is not ready yet (a budget request waiting in the queue). The server
    writes the future's result (or its RpcError) as the reply when it is done, and keeps
    reading the connection meanwhile, so the client can still release other leases and its
    close is seen at once. The future is cancelled if the connection ends first."""

    def __init__(self, future: asyncio.Future[Any]) -> None:
        self.future = future


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
        on_close: Callable[[int], None] | None = None,
        *,
        max_requests_per_s: float = 200.0,
        idle_timeout_s: float = 300.0,
        holds: Callable[[int], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_pending_bytes: int = MAX_PENDING_BYTES,
        slow_close_grace_s: float = SLOW_CLOSE_GRACE_S,
    ) -> None:
        self.methods = dict(methods)
        self.max_clients = max_clients
        self.max_line_bytes = max_line_bytes
        self.on_close = on_close  # called with the connection number when one ends
        # requests per second per connection: a token bucket of twice this many
        self.max_requests_per_s = max_requests_per_s
        # a connection that sends no whole line for this long is closed, unless ``holds``
        # says it holds something (a lease, a queued request): its silence is its right
        self.idle_timeout_s = idle_timeout_s
        self.holds = holds
        self.clock = clock
        # notifications a client has not read yet, beyond the kernel's socket buffer: the
        # most one connection may have waiting (see send)
        self.max_pending_bytes = max_pending_bytes
        self.slow_close_grace_s = slow_close_grace_s
        self.skipped = 0  # droppable notifications skipped for clients that were behind
        self.closed_slow = 0  # connections closed for not reading their notifications
        self.clients: set[asyncio.StreamWriter] = set()
        self._writers: dict[int, asyncio.StreamWriter] = {}
        self._peers: dict[int, Peer] = {}
        self._numbers = itertools.count(1)
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

    def notify(self, connection: int, method: str, params: Any) -> bool:
        """Push a notification on a connection; False if it is gone (or was just closed for
        not reading, see :meth:`send`)."""
        return self.send(connection, protocol.encode_notification(method, params))

    def send(self, connection: int, data: bytes, *, droppable: bool = False) -> bool:
        """Write encoded notification bytes on a connection without waiting; False when
        they were not written.

        Never awaited, so a tick is never held up by a client. What the kernel's socket
        buffer cannot take waits in the connection's buffer here, and that is bounded:

        * ``droppable`` data (a ``snapshot`` notification: only the latest matters) is
          skipped while anything is still waiting in that buffer, i.e. while the client has
          not taken the previous ones; counted in ``skipped``.
        * anything else (``pressure``, ``event``, budget notifications: a client must not
          miss a transition) that would take the buffer over ``max_pending_bytes`` closes
          the connection instead (:meth:`close_slow`), with an error saying why.
        """
        writer = self._writers.get(connection)
        if writer is None or writer.is_closing():
            return False
        pending = writer.transport.get_write_buffer_size()
        if droppable and pending > 0:
            self.skipped += 1
            return False
        if not droppable and pending + len(data) > self.max_pending_bytes:
            self.close_slow(connection, pending)
            return False
        try:
            writer.write(data)
        except (OSError, RuntimeError):
            return False
        return True

    def broadcast(self, connections: Iterable[int], data: bytes, *, droppable: bool = False) -> int:
        """The same encoded bytes to every connection in ``connections`` (encoded once by
        the caller, however many subscribers); returns how many took them."""
        return sum(self.send(c, data, droppable=droppable) for c in list(connections))

    def pending_bytes(self) -> int:
        """Bytes waiting in the connections' buffers for clients to read them."""
        return sum(w.transport.get_write_buffer_size() for w in self._writers.values())

    def close_slow(self, connection: int, pending: int) -> None:
        """Close a connection whose client does not read what it is sent: an error (1005)
        saying why goes last; a client that is only slow reads everything up to it and then
        EOF. One that reads nothing is cut off (the buffer dropped) after
        ``slow_close_grace_s``, so its backlog cannot be held for ever."""
        writer = self._writers.get(connection)
        if writer is None or writer.is_closing():
            return
        self.closed_slow += 1
        peer = self._peers.get(connection)
        message = (
            f"notifications not read: {pending} bytes waiting, at most "
            f"{self.max_pending_bytes} allowed; closing"
        )
        log.warning(
            "closing connection %d (pid %s): %s",
            connection,
            peer.pid if peer is not None else "?",
            message,
        )
        with contextlib.suppress(OSError, RuntimeError):
            writer.write(protocol.encode_error(None, protocol.TOO_MANY, message))
        writer.close()  # flushes what is buffered first, then closes
        transport = writer.transport
        with contextlib.suppress(RuntimeError):  # no running loop: nothing left to cut off
            asyncio.get_running_loop().call_later(self.slow_close_grace_s, transport.abort)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        number = next(self._numbers)
        pending: set[asyncio.Task[None]] = set()
        try:
            await self._connection(reader, writer, number, pending)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._tasks.discard(task)
            self.clients.discard(writer)
            self._writers.pop(number, None)
            self._peers.pop(number, None)
            writer.close()
            for waiting in pending:
                waiting.cancel()
            if self.on_close is not None:
                try:
                    self.on_close(number)
                except Exception:  # a hook bug must not take the server down
                    log.exception("close hook for connection %d failed", number)

    async def _connection(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        number: int,
        pending: set[asyncio.Task[None]],
    ) -> None:
        sock = writer.get_extra_info("socket")
        creds = peer_credentials(sock)
        peer = Peer(pid=creds.pid, uid=creds.uid, gid=creds.gid, connection=number)
        if len(self.clients) >= self.max_clients:
            writer.write(
                protocol.encode_error(
                    None, protocol.TOO_MANY, f"too many clients (max {self.max_clients})"
                )
            )
            await writer.drain()
            return
        self.clients.add(writer)
        self._writers[number] = writer
        self._peers[number] = peer
        burst = 2.0 * self.max_requests_per_s
        tokens, refilled_s = burst, self.clock()
        while not self.closing:
            try:
                # a partial line stays in the reader's buffer across a timeout
                line = await asyncio.wait_for(reader.readuntil(b"\n"), self.idle_timeout_s)
            except asyncio.TimeoutError:
                if self.holds is not None and self.holds(number):
                    continue
                message = f"idle for {self.idle_timeout_s:g} s holding nothing; closing"
                writer.write(protocol.encode_error(None, protocol.TOO_MANY, message))
                await writer.drain()
                return
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
            now_s = self.clock()
            tokens = min(burst, tokens + (now_s - refilled_s) * self.max_requests_per_s)
            refilled_s = now_s
            if tokens < 1.0:
                rid = protocol.request_id_of(line)
                message = f"more than {self.max_requests_per_s:g} requests per second"
                writer.write(protocol.encode_error(rid, protocol.TOO_MANY, message))
                await writer.drain()
                continue
            tokens -= 1.0
            reply = await self._dispatch(peer, line)
            if isinstance(reply, tuple):  # deferred: answered by a task when ready
                rid, deferred = reply
                later = asyncio.ensure_future(self._answer_later(writer, rid, deferred))
                pending.add(later)
                later.add_done_callback(pending.discard)
                continue
            if reply:
                writer.write(reply)
                await writer.drain()

    async def _answer_later(
        self, writer: asyncio.StreamWriter, rid: protocol.RequestId, deferred: Deferred
    ) -> None:
        try:
            result = await deferred.future
        except RpcError as exc:
            reply = protocol.encode_error(rid, exc.code, exc.message, exc.data)
        except asyncio.CancelledError:
            deferred.future.cancel()
            raise
        except Exception:
            log.exception("a deferred reply failed")
            reply = protocol.encode_error(rid, protocol.INTERNAL_ERROR, "internal error")
        else:
            reply = protocol.encode_result(rid, result)
        if not writer.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                writer.write(reply)

    async def _dispatch(
        self, peer: Peer, line: bytes
    ) -> bytes | tuple[protocol.RequestId, Deferred] | None:
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
        if isinstance(result, Deferred):
            return (rid, result) if request.has_id else None
        if not request.has_id:
            return None  # a notification gets no reply
        return protocol.encode_result(rid, result)
