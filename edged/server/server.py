"""The asyncio Unix-socket server: framing, peer credentials, bounded connections.

It runs in the daemon's event loop. A handler is ``async (peer, params) -> result``; the
method table is the daemon's. Each connection has a number (``Peer.connection``): a handler
pushes notifications on its connection with :meth:`Server.notify`, and the ``on_close`` hook
is told the moment a connection ends (EOF, reset, the client killed), which is how a budget
dies with its connection. A handler that cannot answer yet returns :class:`Deferred`: the reply
is written when its future is done, and the connection's next lines are read meanwhile.
A line that is not JSON gets a -32700 reply with ``"id": null`` and the connection stays open;
an oversized line gets an error reply and the connection is closed; neither affects other
clients.

Peer identity is taken at accept: ``SO_PEERCRED`` (pid, uid, gid), and a pidfd of the peer's
process where the kernel has ``SO_PEERPIDFD`` (Linux >= 6.5), else the process's start time
from ``/proc/PID/stat``. Either one tells later whether the pid still names the process that
connected (:meth:`Peer.same_process`), which rules out acting on a reused pid. The pidfd is
closed when the connection ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import itertools
import logging
import os
import signal
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edged.enforce.signals import read_start_ticks
from edged.server import protocol
from edged.server.protocol import RpcError

log = logging.getLogger(__name__)

# Python 3.11's socket module has no name for it. 77 is its number in asm-generic/socket.h,
# which x86, arm, arm64, riscv, powerpc, s390 and loongarch use; alpha, mips, parisc and sparc
# number their socket options differently, and there 77 could be another option whose integer
# would be taken for a file descriptor: those get no pidfd (the start-time fallback).
_GENERIC_SOCKET_H = ("x86_64", "i386", "i686", "aarch64", "arm", "riscv", "ppc", "s390", "loong")
SO_PEERPIDFD: int | None = getattr(socket, "SO_PEERPIDFD", None)
if SO_PEERPIDFD is None and os.uname().machine.startswith(_GENERIC_SOCKET_H):
    SO_PEERPIDFD = 77


class PeerProcess:
    """The peer's process as it was when it connected, to tell later whether its pid still
    names that process (and not a new one that got the pid after it exited).

    With a pidfd (``SO_PEERPIDFD``) the kernel answers exactly: ``pidfd_send_signal(pidfd,
    0)`` fails with ESRCH once that process is gone, whatever has the pid since. Without one,
    the start time (``/proc/PID/stat`` field 22) read at accept is compared with the one the
    pid has now: a new process with the same pid has a later start time (a reused pid within
    the same clock tick is the one case this cannot see). ``start_ticks`` None means the
    process was already gone (or hidden) at accept: never vouched for.
    """

    def __init__(
        self,
        pid: int,
        pidfd: int | None,
        start_ticks: int | None,
        proc: Path = Path("/proc"),
    ) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.start_ticks = start_ticks
        self.proc = proc

    @property
    def how(self) -> str:
        """How the identity is checked: ``pidfd`` or ``start_time``."""
        return "pidfd" if self.pidfd is not None else "start_time"

    def alive(self) -> bool:
        """Whether the process that connected still exists (a zombie still does: its pid
        cannot be reused before it is reaped)."""
        if self.pidfd is not None:
            try:
                signal.pidfd_send_signal(self.pidfd, 0)
            except ProcessLookupError:
                return False
            except PermissionError:  # it exists; this daemon may just not signal it
                return True
            return True
        if self.start_ticks is None:
            return False
        return read_start_ticks(self.pid, self.proc) == self.start_ticks

    def close(self) -> None:
        """Close the pidfd (the connection ended). Afterwards nothing is vouched for."""
        if self.pidfd is not None:
            fd, self.pidfd = self.pidfd, None
            self.start_ticks = None
            os.close(fd)


@dataclass(frozen=True)
class Peer:
    """A client as the kernel identifies it (SO_PEERCRED), never as it claims to be."""

    pid: int
    uid: int
    gid: int
    connection: int = field(default=0, compare=False)  # the server's number for the connection
    # the process behind ``pid`` at accept (None: not known, e.g. a Peer made by a test)
    process: PeerProcess | None = field(default=None, compare=False, repr=False)

    def same_process(self) -> bool:
        """Whether ``pid`` still names the process that connected. The daemon asks before it
        acts on the peer's own pid (a lease for the peer itself); with nothing known about the
        process (``process`` None) it trusts the pid, as SO_PEERCRED alone would."""
        return self.process is None or self.process.alive()


class Deferred:
    """A reply that is not ready yet (a budget request waiting in the queue). The server
    writes the future's result (or its RpcError) as the reply when it is done, and keeps
    reading the connection meanwhile, so the client can still release other leases and its
    close is seen at once. The future is cancelled if the connection ends first."""

    def __init__(self, future: asyncio.Future[Any]) -> None:
        self.future = future


Handler = Callable[[Peer, Mapping[str, Any]], Awaitable[Any]]


def peer_credentials(sock: socket.socket) -> Peer:
    """pid, uid and gid of the process that connected (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid=pid, uid=uid, gid=gid)


class PidfdProbe:
    """Gets a pidfd of a socket's peer (``SO_PEERPIDFD``), and remembers when the kernel has
    none, so that later connections do not ask again."""

    def __init__(self, enabled: bool = True) -> None:
        usable = enabled and SO_PEERPIDFD is not None
        self.available: bool | None = None if usable else False  # None: not asked yet

    def pidfd(self, sock: socket.socket) -> int | None:
        """The pidfd (the caller closes it), or None: no such option here (ENOPROTOOPT, a
        kernel before 6.5: remembered), or none for this peer (EINVAL or ESRCH: before
        Linux 6.9 the kernel refuses a pidfd for a peer that has already exited; the start
        time is then the fallback, and it finds the process gone)."""
        if self.available is False or SO_PEERPIDFD is None:
            return None
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, struct.calcsize("i"))
        except OSError as exc:
            if exc.errno == errno.ENOPROTOOPT:
                log.info("this kernel has no SO_PEERPIDFD: peers are checked by start time")
                self.available = False
            else:
                log.debug("no pidfd for a peer: %s", exc)
            return None
        self.available = True
        (fd,) = struct.unpack("i", raw)
        return int(fd)


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
        peer_pidfds: bool = True,
        proc: Path = Path("/proc"),
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
        # a pidfd per peer where the kernel has SO_PEERPIDFD (False: start times only)
        self.pidfds = PidfdProbe(peer_pidfds)
        self.proc = proc  # where the fallback reads a peer's start time
        self.clients: set[asyncio.StreamWriter] = set()
        self._writers: dict[int, asyncio.StreamWriter] = {}
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
        """Push a notification on a connection; False if it is gone. Not awaited: messages
        are small and a client that does not read will be closed by the kernel's buffer
        limits long before it matters."""
        writer = self._writers.get(connection)
        if writer is None or writer.is_closing():
            return False
        try:
            writer.write(protocol.encode_notification(method, params))
        except (OSError, RuntimeError):
            return False
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        number = next(self._numbers)
        pending: set[asyncio.Task[None]] = set()
        peer: Peer | None = None
        try:
            peer = self._identify(writer, number)
            await self._connection(reader, writer, peer, pending)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._tasks.discard(task)
            self.clients.discard(writer)
            self._writers.pop(number, None)
            writer.close()
            for waiting in pending:
                waiting.cancel()
            if self.on_close is not None:
                try:
                    self.on_close(number)
                except Exception:  # a hook bug must not take the server down
                    log.exception("close hook for connection %d failed", number)
            if peer is not None and peer.process is not None:
                peer.process.close()

    def _identify(self, writer: asyncio.StreamWriter, number: int) -> Peer:
        """The peer of a new connection: SO_PEERCRED, and its process (a pidfd, else its
        start time read now)."""
        sock = writer.get_extra_info("socket")
        creds = peer_credentials(sock)
        pidfd = self.pidfds.pidfd(sock)
        ticks = None if pidfd is not None else read_start_ticks(creds.pid, self.proc)
        process = PeerProcess(creds.pid, pidfd, ticks, self.proc)
        return Peer(creds.pid, creds.uid, creds.gid, connection=number, process=process)

    async def _connection(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: Peer,
        pending: set[asyncio.Task[None]],
    ) -> None:
        number = peer.connection
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
