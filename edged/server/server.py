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

Built for a daemon whose first job is its sampling cadence:

* connections are :class:`asyncio.Protocol` objects, not stream tasks: the lines a read brings
  are answered in that one callback, a handler's coroutine is stepped inline (all of the
  daemon's handlers finish without suspending; one that suspends is finished in a task), and
  the replies go out in one write. No task, timer or future per request.
* :meth:`Server.hold` / :meth:`Server.release` bracket the tick: once its deadline has passed,
  requests wait (read, not answered) until the tick has run, so load on the socket delays a
  tick by at most the one request being answered.
* idle connections are found by one periodic sweep, not a timer per read.
* a client that does not read its replies is not read from either (backpressure).
  Notifications are written without waiting, and what waits for a client that does not read
  them is bounded (:meth:`Server.send`): the daemon's tick never waits on a subscriber.

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
import math
import os
import signal
import socket
import stat
import struct
import time
from collections.abc import Callable, Coroutine, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edged.enforce.signals import read_start_ticks
from edged.server import protocol
from edged.server.protocol import RpcError

log = logging.getLogger(__name__)

# replies and notifications a client has not read yet: past this the server stops reading its
# requests (its own backpressure) ...
WRITE_BUFFER_HIGH_BYTES = 256 * 1024
# Notifications waiting for one client beyond what the kernel's socket buffer holds (about
# 200 KiB for a Unix stream socket): room for a burst of events or several snapshots; more
# than this and the client is not reading, so it is disconnected (see Server.send).
MAX_PENDING_BYTES = 1 << 20
# a client closed for not reading gets this long to read its backlog before it is cut off
SLOW_CLOSE_GRACE_S = 5.0
# replies to the lines of one read are written together, in pieces of about this size
FLUSH_BYTES = 64 * 1024
# An error of one kind (a handler's method, a deferred reply, a close hook) is logged at most
# once in this long; the rest are counted (Server.errors_suppressed, in status)
LOG_EVERY_S = 10.0
MAX_LOG_KINDS = 256


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


Handler = Callable[[Peer, Mapping[str, Any]], Coroutine[Any, Any, Any]]


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
        max_pending_bytes: int = MAX_PENDING_BYTES,
        slow_close_grace_s: float = SLOW_CLOSE_GRACE_S,
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
        # notifications a client has not read yet, beyond the kernel's socket buffer: the
        # most one connection may have waiting (see send)
        self.max_pending_bytes = max_pending_bytes
        self.slow_close_grace_s = slow_close_grace_s
        self.skipped = 0  # droppable notifications skipped for clients that were behind
        self.closed_slow = 0  # connections closed for not reading their notifications
        # error logs by kind: the last time one was written, and how many were left out since
        # (a client that makes a handler fail on every frame must not flood the journal)
        self._logged_at_s: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self.errors_suppressed = 0  # in status: error logs left out in all
        # a pidfd per peer where the kernel has SO_PEERPIDFD (False: start times only)
        self.pidfds = PidfdProbe(peer_pidfds)
        self.proc = proc  # where the fallback reads a peer's start time
        self.clients: dict[int, _Connection] = {}  # connection number -> connection
        self._numbers = itertools.count(1)
        self._server: asyncio.AbstractServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()  # handlers that suspended
        self.closing = False
        # the sampling tick's next deadline (loop time), set by the daemon: from then until
        # :meth:`release` the server answers no more requests (it still reads them), so that
        # a busy socket delays the tick by at most the request being answered (see hold)
        self.tick_due_s = math.inf
        self._held: set[_Connection] = set()

    async def start(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._server = await loop.create_unix_server(lambda: _Connection(self), sock=sock)
        self._sweep_later()

    async def close(self) -> None:
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        shutdown = protocol.encode_notification("shutdown", {"code": protocol.SHUTTING_DOWN})
        for conn in list(self.clients.values()):
            with contextlib.suppress(OSError, RuntimeError):
                conn.close_with(shutdown)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    def notify(self, connection: int, method: str, params: Any) -> bool:
        """Push a notification on a connection; False if it is gone."""
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
        conn = self.clients.get(connection)
        if conn is None or conn.transport is None or conn.transport.is_closing():
            return False
        pending = conn.transport.get_write_buffer_size()
        if droppable and pending > 0:
            self.skipped += 1
            return False
        if not droppable and pending + len(data) > self.max_pending_bytes:
            self.close_slow(connection, pending)
            return False
        return conn.write(data)

    def broadcast(self, connections: Iterable[int], data: bytes, *, droppable: bool = False) -> int:
        """The same encoded bytes to every connection in ``connections`` (encoded once by
        the caller, however many subscribers); returns how many took them."""
        return sum(self.send(c, data, droppable=droppable) for c in list(connections))

    def pending_bytes(self) -> int:
        """Bytes waiting in the connections' buffers for clients to read them."""
        return sum(
            c.transport.get_write_buffer_size()
            for c in self.clients.values()
            if c.transport is not None
        )

    def close_slow(self, connection: int, pending: int) -> None:
        """Close a connection whose client does not read what it is sent: an error (1005)
        saying why goes last; a client that is only slow reads everything up to it and then
        EOF. One that reads nothing is cut off (the buffer dropped) after
        ``slow_close_grace_s``, so its backlog cannot be held for ever."""
        conn = self.clients.get(connection)
        if conn is None or conn.transport is None or conn.transport.is_closing():
            return
        self.closed_slow += 1
        message = (
            f"notifications not read: {pending} bytes waiting, at most "
            f"{self.max_pending_bytes} allowed; closing"
        )
        log.warning(
            "closing connection %d (pid %s): %s",
            connection,
            conn.peer.pid if conn.peer is not None else "?",
            message,
        )
        transport = conn.transport
        transport.write(protocol.encode_error(None, protocol.TOO_MANY, message))
        transport.close()  # flushes what is buffered first, then closes (connection_lost)
        if self._loop is not None:
            self._loop.call_later(self.slow_close_grace_s, transport.abort)

    # ---- the sampling tick comes first ----------------------------------------------------

    def loop_time(self) -> float:
        loop = self._loop
        return loop.time() if loop is not None else 0.0

    def hold(self, deadline_s: float) -> None:
        """The tick is due at ``deadline_s`` (loop time): requests that arrive after it wait
        for :meth:`release`. Without this, every connection with a request ready in the loop
        iteration in which the deadline passes would be answered before the tick's timer runs
        (asyncio runs the I/O callbacks of an iteration before its due timers)."""
        self.tick_due_s = deadline_s

    def release(self) -> None:
        """The tick is done: answer what waited for it."""
        self.tick_due_s = math.inf
        held, self._held = self._held, set()
        for conn in held:
            conn._held = False
            if not conn.closed:
                conn._serve()

    def _hold(self, conn: _Connection) -> None:
        conn._held = True
        self._held.add(conn)

    # ---- idle connections -----------------------------------------------------------------

    def _sweep_later(self) -> None:
        if self._loop is None or self.closing or not math.isfinite(self.idle_timeout_s):
            return
        period_s = min(max(self.idle_timeout_s / 4.0, 0.05), 30.0)
        self._sweeper = self._loop.call_later(period_s, self._sweep)

    def _sweep(self) -> None:
        """Close connections that sent no whole line for ``idle_timeout_s`` and hold nothing:
        one timer for all connections, not one per request."""
        now_s = self.clock()
        for number, conn in list(self.clients.items()):
            if now_s - conn.last_line_s < self.idle_timeout_s or conn._pending:
                continue
            if self.holds is not None and self.holds(number):
                continue
            message = f"idle for {self.idle_timeout_s:g} s holding nothing; closing"
            conn.close_with(protocol.encode_error(None, protocol.TOO_MANY, message))
        self._sweep_later()

    # ---- requests -------------------------------------------------------------------------

    def log_limited(
        self, kind: str, message: str, *args: object, exc_info: BaseException | bool = True
    ) -> None:
        """``log.exception(message)`` at most once per ``LOG_EVERY_S`` for each ``kind``; the
        ones left out are counted (``errors_suppressed``) and their number is said in the next
        one written."""
        now_s = self.clock()
        last_s = self._logged_at_s.get(kind)
        if last_s is not None and now_s - last_s < LOG_EVERY_S:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            self.errors_suppressed += 1
            return
        self._logged_at_s[kind] = now_s
        if len(self._logged_at_s) > MAX_LOG_KINDS:  # kinds come from method names: bounded
            oldest = min(self._logged_at_s, key=self._logged_at_s.__getitem__)
            del self._logged_at_s[oldest]
            self._suppressed.pop(oldest, None)
        left_out = self._suppressed.pop(kind, 0)
        suffix = f" ({left_out} more like it in the last {LOG_EVERY_S:g} s not logged)"
        log.error(message + (suffix if left_out else ""), *args, exc_info=exc_info)

    def _dispatch(self, conn: _Connection, line: bytes) -> bytes | None:
        """The reply to one line (None for a notification or a reply that comes later)."""
        peer = conn.peer
        assert peer is not None
        rid: protocol.RequestId = None
        has_id = True
        method = "?"
        try:
            request = protocol.parse_request(line)
            method = request.method
            rid, has_id = request.id, request.has_id
            handler = self.methods.get(request.method)
            if handler is None:
                raise RpcError(protocol.METHOD_NOT_FOUND, f"no such method: {request.method}")
            if self.closing:
                raise RpcError(protocol.SHUTTING_DOWN, "edged is shutting down")
            coro = handler(peer, request.params or {})
            try:
                suspended_on = coro.send(None)
            except StopIteration as done:
                result = done.value
            else:  # the handler awaits something: finish it in a task, answer from there
                _unblock(suspended_on)
                task = asyncio.ensure_future(_finish(coro, suspended_on))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                result = Deferred(task)
        except RpcError as exc:
            if isinstance(exc.data, dict) and "id" in exc.data and rid is None:
                rid = exc.data["id"]
                data = None
            else:
                data = exc.data
            return protocol.encode_error(rid, exc.code, exc.message, data)
        except (RecursionError, OverflowError) as exc:
            # a value in the params that no conversion can hold (nested too deeply, a number
            # past the float range) where a handler did not check it itself: the client's
            # input, not edged's bug, so -32602 and no traceback
            kind = "nested too deeply" if isinstance(exc, RecursionError) else "out of range"
            return protocol.encode_error(rid, protocol.INVALID_PARAMS, f"params: a value {kind}")
        except Exception:  # a handler bug answers -32603 and is logged; the daemon goes on
            self.log_limited(
                f"handler:{method}",
                "handler for a request from pid %d failed",
                peer.pid,
            )
            return protocol.encode_error(rid, protocol.INTERNAL_ERROR, "internal error")
        if isinstance(result, Deferred):
            if has_id:
                conn.defer(rid, result)
            return None
        if not has_id:
            return None  # a notification gets no reply
        return protocol.encode_result(rid, result)


class _Resume:
    """Yields the future a handler coroutine suspended on to the task that finishes it."""

    def __init__(self, future: Any) -> None:
        self.future = future

    def __await__(self) -> Generator[Any, None, None]:
        if asyncio.isfuture(self.future):
            self.future._asyncio_future_blocking = True  # as the handler's await left it
        yield self.future


def _unblock(future: Any) -> None:
    """A future yields itself with ``_asyncio_future_blocking`` set, and a task clears the flag
    when it takes the future over. Stepping a coroutine by hand, we clear it ourselves: another
    handler awaiting the same future before our task runs would otherwise be refused
    ("await wasn't used with future")."""
    if asyncio.isfuture(future):
        future._asyncio_future_blocking = False


async def _finish(coro: Coroutine[Any, Any, Any], suspended_on: Any) -> Any:
    """Run a handler coroutine to its end after its first step ran inline in
    :meth:`Server._dispatch` and suspended on ``suspended_on``: the task waits on that future
    as the coroutine would have, then steps the coroutine on (throwing in a cancellation)."""
    while True:
        try:
            await _Resume(suspended_on)
        except BaseException as exc:  # cancelled while waiting: the handler sees it
            try:
                suspended_on = coro.throw(exc)
            except StopIteration as done:
                return done.value
            _unblock(suspended_on)
            continue
        try:
            suspended_on = coro.send(None)
        except StopIteration as done:
            return done.value
        _unblock(suspended_on)


class _Connection(asyncio.Protocol):
    """One client connection: framing, rate limit, dispatch, replies, close.

    A protocol object rather than a stream-reader task: the event loop calls
    :meth:`data_received` with what the socket had, and every whole line in it is answered in
    that one callback (handlers that do not suspend run inline), the replies written with one
    ``write``. No task, future or timer per request: that is most of what a request costs in
    asyncio streams, and what lets the server keep up without crowding the sampling tick.
    """

    def __init__(self, server: Server) -> None:
        self.server = server
        self.number = next(server._numbers)
        self.peer: Peer | None = None
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the buffer already searched for a newline
        burst = 2.0 * server.max_requests_per_s
        self._burst = burst
        self._tokens = burst
        self._refilled_s = server.clock()
        self.last_line_s = self._refilled_s  # for the idle sweep
        self._reading_paused = False
        self._held = False  # its lines wait for the sampling tick (see Server.hold)
        self._write_blocked = False  # paused because the client does not read its replies
        self._pending: set[asyncio.Future[Any]] = set()  # deferred replies not yet written
        self.closed = False

    # ---- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        server = self.server
        sock = transport.get_extra_info("socket")
        try:
            creds = peer_credentials(sock)
        except OSError:  # gone before we asked: nothing to serve
            self.closed = True
            transport.abort()
            return
        self.peer = Peer(pid=creds.pid, uid=creds.uid, gid=creds.gid, connection=self.number)
        if len(server.clients) >= server.max_clients or server.closing:
            message = f"too many clients (max {server.max_clients})"
            code = protocol.TOO_MANY
            if server.closing:
                message, code = "edged is shutting down", protocol.SHUTTING_DOWN
            transport.write(protocol.encode_error(None, code, message))
            self.closed = True  # never registered: no close hook for it
            transport.close()
            return
        server.clients[self.number] = self
        # the peer's process: a pidfd (closed in _end), else its start time read now
        pidfd = server.pidfds.pidfd(sock)
        ticks = None if pidfd is not None else read_start_ticks(creds.pid, server.proc)
        process = PeerProcess(creds.pid, pidfd, ticks, server.proc)
        self.peer = Peer(creds.pid, creds.uid, creds.gid, connection=self.number, process=process)
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH_BYTES)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self._buffer += data
        if self._held:  # waiting for the tick: answered by Server.release
            self._update_reading()
            return
        self._serve()

    def eof_received(self) -> bool:
        # the client shut down its side: whole lines were answered, a partial one is dropped;
        # a lease dies with its connection, so this is its end as much as a close
        self._end()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()

    def pause_writing(self) -> None:
        # the client does not read its replies: stop reading its requests until it does
        self._write_blocked = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_blocked = False
        self._update_reading()
        if not self._held:
            self._serve()

    # ---- serving --------------------------------------------------------------------------

    def _serve(self) -> None:
        """Answer every whole line in the buffer, unless the tick is due or the client is not
        reading (then the rest waits, its socket unread: backpressure, not buffering)."""
        server = self.server
        replies: list[bytes] = []
        pending_bytes = 0
        buffer = self._buffer
        transport = self.transport
        while not self.closed:
            if self._write_blocked or transport is None or transport.is_closing():
                break
            if server.loop_time() >= server.tick_due_s:
                server._hold(self)
                break
            end = buffer.find(b"\n", self._scanned)
            if end < 0:
                if len(buffer) > server.max_line_bytes:
                    self._fatal(replies, f"line longer than {server.max_line_bytes} bytes")
                    return
                self._scanned = len(buffer)
                break
            if end > server.max_line_bytes:
                self._fatal(replies, f"line longer than {server.max_line_bytes} bytes")
                return
            line = bytes(buffer[: end + 1])
            del buffer[: end + 1]
            self._scanned = 0
            self.last_line_s = now_s = server.clock()
            if not line.strip():
                continue
            self._tokens = min(
                self._burst, self._tokens + (now_s - self._refilled_s) * server.max_requests_per_s
            )
            self._refilled_s = now_s
            if self._tokens < 1.0:
                rid = protocol.request_id_of(line)
                message = f"more than {server.max_requests_per_s:g} requests per second"
                replies.append(protocol.encode_error(rid, protocol.TOO_MANY, message))
                continue
            self._tokens -= 1.0
            reply = server._dispatch(self, line)
            if reply:
                replies.append(reply)
                pending_bytes += len(reply)
                if pending_bytes >= FLUSH_BYTES:  # one read can hold thousands of requests
                    self.write(b"".join(replies))  # may call pause_writing: the loop stops
                    replies.clear()
                    pending_bytes = 0
        if replies:
            self.write(b"".join(replies))
        self._update_reading()

    def _fatal(self, replies: list[bytes], message: str) -> None:
        """An oversized line: what was answered, then an error, then the connection ends."""
        replies.append(protocol.encode_error(None, protocol.INVALID_REQUEST, f"{message}; closing"))
        self.close_with(b"".join(replies))

    def close_with(self, data: bytes) -> None:
        """Write ``data`` (flushed before the socket closes) and end the connection."""
        if self.transport is not None and not self.closed:
            self.transport.write(data)
            self.transport.close()
        self._end()

    def _update_reading(self) -> None:
        if self.transport is None or self.closed:
            return
        # held for the tick: keep reading (a pause and resume are two epoll_ctl calls per
        # connection per tick) unless the client keeps writing past a line's worth
        held_full = self._held and len(self._buffer) > self.server.max_line_bytes
        want_paused = held_full or self._write_blocked
        if want_paused and not self._reading_paused:
            self.transport.pause_reading()
            self._reading_paused = True
        elif not want_paused and self._reading_paused:
            self.transport.resume_reading()
            self._reading_paused = False

    def write(self, data: bytes) -> bool:
        """Write a reply or notification; False when the connection is gone."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return False
        self.transport.write(data)
        return True

    def defer(self, rid: protocol.RequestId, deferred: Deferred) -> None:
        """Write the deferred reply when its future is done (cancelled if we close first)."""
        future = deferred.future
        self._pending.add(future)

        def done(f: asyncio.Future[Any]) -> None:
            self._pending.discard(f)
            if f.cancelled():
                return
            exc = f.exception()
            if isinstance(exc, RpcError):
                reply = protocol.encode_error(rid, exc.code, exc.message, exc.data)
            elif exc is not None:
                self.server.log_limited("deferred", "a deferred reply failed", exc_info=exc)
                reply = protocol.encode_error(rid, protocol.INTERNAL_ERROR, "internal error")
            else:
                result = f.result()
                if isinstance(result, Deferred):  # a suspended handler that deferred in turn
                    self.defer(rid, result)
                    return
                reply = protocol.encode_result(rid, result)
            self.write(reply)

        future.add_done_callback(done)

    def _end(self) -> None:
        if self.closed:
            return
        self.closed = True
        server = self.server
        server.clients.pop(self.number, None)
        server._held.discard(self)
        if self.transport is not None:
            self.transport.close()
        for future in list(self._pending):
            future.cancel()
        self._pending.clear()
        if server.on_close is not None:
            try:
                server.on_close(self.number)
            except Exception:  # a hook bug must not take the server down
                server.log_limited("close-hook", "close hook for connection %d failed", self.number)
        if self.peer is not None and self.peer.process is not None:
            self.peer.process.close()
