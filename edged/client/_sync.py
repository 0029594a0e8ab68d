"""The blocking client: stdlib ``socket``, no threads.

Notifications (``budget.shrink`` ...) share the connection with replies. This client has no
reader thread: whatever arrives while it waits for a reply is queued, and the queue is
dispatched to the callbacks, in the calling thread, right after that reply has been read (so
a callback may itself call the daemon, e.g. ``budget.update`` from ``on_shrink``). Between
calls nothing reads the socket: a program that holds a lease and does not call the daemon
calls :meth:`Client.poll` (e.g. once per training step) or :meth:`Client.serve_notifications`
to get its callbacks run. Every public method takes one lock, so one Client may be shared
between threads; callbacks run with that lock held.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

from edged.client._common import (
    IDEMPOTENT_METHODS,
    TOPIC_NOTIFICATIONS,
    Backoff,
    Callback,
    Dispatcher,
    Lease,
    budget_params,
    decode_line,
    encode_request,
    hello_params,
    lease_callbacks,
    log,
    result_of,
    socket_path,
    subscribe_params,
)
from edged.client.errors import (
    ConnectionLost,
    DaemonUnavailable,
    EdgedError,
    NoSuchLease,
    PermissionDenied,
)
from edged.server.protocol import MAX_LINE_BYTES, PERMISSION_DENIED


class _Broken(Exception):
    """The connection ended (EOF, reset); internal, turned into a reconnect or an error."""


def connect_unix(path: str, timeout_s: float) -> socket.socket:
    """A connected socket, or DaemonUnavailable / PermissionDenied saying why not."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sock.connect(path)
    except PermissionError as exc:
        sock.close()
        raise PermissionDenied(PERMISSION_DENIED, f"permission denied on {path}") from exc
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise DaemonUnavailable(f"edged is not running (no daemon on {path})", path) from exc
    except OSError as exc:
        sock.close()
        raise DaemonUnavailable(f"cannot connect to {path}: {exc}", path) from exc
    return sock


class Client:
    """A blocking connection to edged.

    ``path``: the socket (default ``$EDGED_SOCKET``, else the daemon's default path).
    ``timeout_s``: how long a call waits for its reply (``budget.request`` adds its ``wait``).
    ``reconnect_timeout_s``: when the connection breaks (the daemon restarted), how long to
    keep reconnecting, with delays doubling from 50 ms up to 2 s, before DaemonUnavailable;
    0 disables reconnecting. ``connect=False`` defers connecting to the first call.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        timeout_s: float = 10.0,
        reconnect_timeout_s: float = 10.0,
        connect: bool = True,
    ) -> None:
        self.path = socket_path(path)
        self.timeout_s = timeout_s
        self.reconnect_timeout_s = reconnect_timeout_s
        self.dispatcher = Dispatcher()
        self.reconnects = 0  # connections made after the first, for callers and tests
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._queue: deque[dict[str, Any]] = deque()
        self._next_id = 1
        self._lock = threading.RLock()
        self._hello_name: str | None = None
        self._topics: list[str] = []  # subscribed: sent again on a new connection
        self._connected_once = False
        if connect:
            self.connect()

    # ---- connection -----------------------------------------------------------------------

    def connect(self) -> None:
        """Connect once (no retry); raises DaemonUnavailable or PermissionDenied."""
        with self._lock:
            self._close_socket()
            self._sock = connect_unix(self.path, self.timeout_s)
            if self._connected_once:
                self.reconnects += 1
            self._connected_once = True
            if self._hello_name is not None:  # the daemon knows clients by their hello
                self._handshake("hello", hello_params(self._hello_name))
            if self._topics:  # subscriptions die with a connection: renew them
                self._handshake("subscribe", subscribe_params(self._topics))

    def _handshake(self, method: str, params: dict[str, Any]) -> None:
        """One call a fresh connection starts with (no retry: we are connecting)."""
        try:
            reply = self._exchange(method, params, self.timeout_s, retry=False)
        except _Broken as exc:
            self._close_socket()
            raise DaemonUnavailable(f"edged on {self.path} hung up: {exc}", self.path) from exc
        result_of(reply)

    def _reconnect(self) -> None:
        """Connect with bounded exponential backoff (the daemon may be restarting)."""
        last: DaemonUnavailable | None = None
        for delay_s in [0.0, *Backoff(0.05, 2.0, self.reconnect_timeout_s).delays()]:
            time.sleep(delay_s)
            try:
                self.connect()
                return
            except PermissionDenied:
                raise
            except DaemonUnavailable as exc:
                last = exc
        raise last or DaemonUnavailable(f"edged went away from {self.path}", self.path)

    def _close_socket(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None
        self._buf.clear()

    def close(self) -> None:
        """Close the connection; leases still held are not released (the daemon decides)."""
        with self._lock:
            self._close_socket()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---- framing ----------------------------------------------------------------------------

    def _read_message(self, deadline: float | None) -> dict[str, Any] | None:
        """The next message, or None when ``deadline`` (monotonic) passes first."""
        assert self._sock is not None
        while True:
            newline = self._buf.find(b"\n")
            if newline >= 0:
                line = bytes(self._buf[:newline])
                del self._buf[: newline + 1]
                return decode_line(line)
            if len(self._buf) > MAX_LINE_BYTES:
                raise EdgedError(None, "daemon sent a line longer than 64 KiB")
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                return None
            except OSError as exc:
                raise _Broken(str(exc)) from exc
            if not chunk:
                raise _Broken("the daemon closed the connection")
            self._buf += chunk

    def _drain_ready(self) -> None:
        """Read what is already there without blocking: queues notifications, and finds a
        connection the daemon closed (it restarted) before a request is written into it."""
        assert self._sock is not None
        while True:
            readable, _, _ = select.select([self._sock], [], [], 0)
            if not readable:
                break
            try:
                chunk = self._sock.recv(65536)
            except OSError as exc:
                raise _Broken(str(exc)) from exc
            if not chunk:
                raise _Broken("the daemon closed the connection")
            self._buf += chunk
        while b"\n" in self._buf:
            message = self._read_message(time.monotonic())
            if message is not None and "id" not in message:
                self._queue.append(message)

    def _exchange(
        self, method: str, params: Mapping[str, Any] | None, timeout_s: float, retry: bool = True
    ) -> dict[str, Any]:
        """Send one request and return its reply message; notifications read meanwhile are
        queued. Reconnects (once per call) when the connection turns out to be broken."""
        attempts = 0
        while True:
            if self._sock is None:
                if not retry:
                    raise _Broken("not connected")
                self._reconnect()
            request_id = self._next_id
            self._next_id += 1
            sent = False
            try:
                self._drain_ready()
                assert self._sock is not None
                self._sock.settimeout(timeout_s)
                self._sock.sendall(encode_request(request_id, method, params))
                sent = True
                deadline = time.monotonic() + timeout_s
                while True:
                    message = self._read_message(deadline)
                    if message is None:
                        raise TimeoutError(f"no reply to {method} from edged in {timeout_s:g}s")
                    if "id" not in message:
                        self._queue.append(message)
                    elif message["id"] == request_id or (
                        message["id"] is None and "error" in message
                    ):
                        return message
                    # else: a late reply to a call that timed out earlier; dropped
            except (_Broken, OSError) as exc:
                if isinstance(exc, TimeoutError):
                    raise
                self._close_socket()
                if not retry:
                    raise _Broken(str(exc)) from exc
                if sent and method not in IDEMPOTENT_METHODS:
                    raise ConnectionLost(
                        f"connection to edged lost after sending {method}; it may or may not "
                        "have been acted on",
                        self.path,
                    ) from exc
                attempts += 1
                if attempts > 1 or self.reconnect_timeout_s <= 0:
                    raise DaemonUnavailable(
                        f"connection to edged on {self.path} lost: {exc}", self.path
                    ) from exc
                log.info("connection to edged lost (%s); reconnecting", exc)

    def _dispatch_queued(self) -> int:
        count = 0
        while self._queue:
            message = self._queue.popleft()
            method = message.get("method")
            params = message.get("params")
            if not isinstance(method, str):
                continue
            params = params if isinstance(params, dict) else {}
            count += 1
            for callback in self.dispatcher.targets(method, params):
                try:
                    callback(params)
                except Exception as exc:  # a handler's bug must not break the connection
                    self.dispatcher.report(method, exc)
        return count

    # ---- calls ----------------------------------------------------------------------------

    def call(
        self, method: str, params: Mapping[str, Any] | None = None, timeout_s: float | None = None
    ) -> Any:
        """One JSON-RPC call; returns the result or raises the error's EdgedError subclass."""
        with self._lock:
            try:
                message = self._exchange(method, params, timeout_s or self.timeout_s)
            finally:
                self._dispatch_queued()
            return result_of(message)

    def hello(self, client_name: str = "python") -> dict[str, Any]:
        """Introduce this client (sent again after every reconnect). Returns server, protocol,
        strategy, capabilities and the peer {pid, uid} the kernel reported."""
        with self._lock:
            result: dict[str, Any] = self.call("hello", hello_params(client_name))
            self._hello_name = client_name
            return result

    def status(self) -> dict[str, Any]:
        """Health, strategy, cadence, usage, sources, alerts (``edged status --json``)."""
        result: dict[str, Any] = self.call("status")
        return result

    def snapshot(self) -> dict[str, Any] | None:
        """The latest snapshot (seq, time_unix_ns, readings, sources); None before the first
        tick."""
        result: dict[str, Any] | None = self.call("snapshot")
        return result

    def history(
        self, window_s: float | None = None, resources: list[str] | None = None
    ) -> dict[str, Any]:
        """Samples from the ring: ``time`` (unix s) and ``series`` [{metric, attributes,
        values}], the last ``window_s`` seconds (all of it when None)."""
        params: dict[str, Any] = {}
        if window_s is not None:
            params["window"] = window_s
        if resources is not None:
            params["resources"] = resources
        result: dict[str, Any] = self.call("history", params)
        return result

    def events(self, since: int = 0) -> dict[str, Any]:
        """Actions and alert transitions after sequence ``since``: {events, last}."""
        result: dict[str, Any] = self.call("events", {"since": since})
        return result

    def subscribe(self, topics: Sequence[str], callback: Callback | None = None) -> list[str]:
        """``subscribe``: from now on the daemon pushes ``pressure`` {resource, level,
        previous} on each change of a resource's level (and each one's current level right
        away), ``event`` (as :meth:`events` returns one) for each new event, and
        ``snapshot`` each tick (skipped while this client is behind on the previous one).
        The topics replace those of an earlier call (``[]`` ends them all) and are renewed
        after a reconnect. ``callback(params)`` is added for the notifications of these
        topics (to tell them apart, use :meth:`on` per notification instead). As with every
        notification, callbacks run in :meth:`poll` or after a call's reply. Returns the
        topics the daemon accepted."""
        params = subscribe_params(topics)
        registered = [(TOPIC_NOTIFICATIONS[t], callback) for t in params["topics"] if callback]
        with self._lock:
            for method, added in registered:  # before the call: the first ones may come with it
                self.dispatcher.on(method, added)
            try:
                result: dict[str, Any] = self.call("subscribe", params)
            except BaseException:
                for method, added in registered:
                    self.dispatcher.off(method, added)
                raise
            self._topics = list(params["topics"])
            return list(result.get("topics", []))

    def set_strategy(self, name: str) -> dict[str, Any]:
        """``strategy.set`` (root or group edged-admin, else PermissionDenied): the daemon
        decides with ``name`` from its next tick. Returns {strategy, previous}."""
        result: dict[str, Any] = self.call("strategy.set", {"name": name})
        return result

    def on(self, method: str, callback: Callback) -> None:
        """Call ``callback(params)`` for every notification ``method`` (``budget.shrink``,
        ``budget.grow``, ``budget.revoked``, ``budget.granted``, ``pressure``, ``event``)."""
        with self._lock:
            self.dispatcher.on(method, callback)

    def poll(self, timeout_s: float = 0.0) -> int:
        """Wait up to ``timeout_s`` for notifications, run their callbacks, return how many
        were dispatched. Returns as soon as one has arrived. A broken connection is
        reconnected (bounded backoff) and counts as none."""
        with self._lock:
            try:
                if self._sock is None:
                    self._reconnect()
                self._drain_ready()
                if not self._queue and timeout_s > 0:
                    deadline = time.monotonic() + timeout_s
                    while not self._queue:
                        message = self._read_message(deadline)
                        if message is None:
                            break
                        if "id" not in message:
                            self._queue.append(message)
                    self._drain_ready()
            except _Broken as exc:
                log.info("connection to edged lost (%s); reconnecting", exc)
                self._close_socket()
                self._reconnect()
            return self._dispatch_queued()

    def serve_notifications(self, duration_s: float | None = None) -> None:
        """Dispatch notifications as they come, for ``duration_s`` (forever when None): for a
        thread whose only job is to follow a lease. It holds the client's lock while it
        waits (up to 1 s at a time), so another thread's call on the same Client may wait
        that long; such a thread is better off with a Client of its own."""
        end = None if duration_s is None else time.monotonic() + duration_s
        while end is None or time.monotonic() < end:
            remaining = 1.0 if end is None else max(0.0, min(1.0, end - time.monotonic()))
            self.poll(remaining)

    # ---- budgets ----------------------------------------------------------------------------

    def request_budget(
        self,
        params: Mapping[str, Any],
        callbacks: Mapping[str, list[Callback]] | None = None,
    ) -> Lease:
        """``budget.request`` with ready-made params (see :func:`budget_params`); the lease is
        registered for notifications before any queued one is dispatched."""
        wait_s = float(params.get("wait", 0.0))
        with self._lock:
            try:
                message = self._exchange("budget.request", params, wait_s + self.timeout_s)
                result = result_of(message)
                lease = Lease(
                    id=result["lease"],
                    granted=dict(result.get("granted") or {}),
                    enforced=result.get("enforced"),
                    callbacks={k: list(v) for k, v in (callbacks or {}).items()},
                )
                self.dispatcher.leases[lease.id] = lease
            finally:
                self._dispatch_queued()
            return lease

    def release(self, lease: Lease) -> None:
        """``budget.release``; a lease the daemon no longer knows (revoked, expired, daemon
        restarted) counts as released."""
        with self._lock:
            if lease.released:
                return
            try:
                self.call("budget.release", {"lease": lease.id})
            except NoSuchLease:
                log.debug("lease %s was already gone", lease.id)
            lease.released = True
            self.dispatcher.leases.pop(lease.id, None)

    def update(
        self,
        lease: Lease,
        resources: Mapping[str, Any] | None = None,
        usage: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """``budget.update``: ask for new amounts and/or report usage; returns ``granted``."""
        params: dict[str, Any] = {"lease": lease.id}
        if resources is not None:
            params["resources"] = dict(resources)
        if usage is not None:
            params["usage"] = dict(usage)
        result: dict[str, Any] = self.call("budget.update", params)
        granted = result.get("granted")
        if isinstance(granted, dict):
            lease.granted = dict(granted)
        return result

    def list_budgets(self) -> Any:
        """``budget.list``: the leases visible to this peer."""
        return self.call("budget.list")

    @contextlib.contextmanager
    def budget(
        self,
        memory: int | float | str | None = None,
        cpu: float | None = None,
        gpu_memory: int | float | str | None = None,
        *,
        gpu: int | None = None,
        min: Mapping[str, int | float | str] | None = None,  # the protocol's name
        wait: float = 0.0,
        ttl: float | None = None,
        klass: str | None = None,
        pid: int | None = None,
        on_shrink: Callback | None = None,
        on_grow: Callback | None = None,
        on_revoke: Callback | None = None,
    ) -> Iterator[Lease]:
        """Hold a budget for the ``with`` block: ``budget.request`` on entry (``wait`` s in
        the daemon's queue, ``ttl`` s deadline), ``budget.release`` on exit, also when the
        block raises (then a failing release is logged and the block's exception goes on).
        Sizes as in edged.toml (``"2G"``, ``"512MiB"``, bytes); ``cpu`` in cores."""
        params = budget_params(
            memory=memory,
            cpu=cpu,
            gpu_memory=gpu_memory,
            gpu=gpu,
            min=min,
            wait_s=wait,
            ttl_s=ttl,
            klass=klass,
            pid=pid,
        )
        lease = self.request_budget(params, lease_callbacks(on_shrink, on_grow, on_revoke))
        try:
            yield lease
        except BaseException:
            try:
                self.release(lease)
            except (EdgedError, OSError) as exc:
                log.warning("could not release lease %s: %s", lease.id, exc)
            raise
        self.release(lease)


__all__ = ["Client", "connect_unix"]
