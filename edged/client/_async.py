"""The asyncio client: one connection, a reader task that routes every line.

Replies go to the future of the request with their id; notifications go to the callbacks as
they arrive (a callback that returns an awaitable is run as a task), so a coroutine holding a
lease needs no polling. When the reader sees the connection end, pending calls fail and the
next call reconnects with bounded exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
from collections.abc import AsyncIterator, Mapping, Sequence
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


class _Lost(Exception):
    """The connection ended before the reply came (internal); ``sent`` says whether the
    request may have reached the daemon."""

    def __init__(self, message: str, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent


class AsyncClient:
    """An asyncio connection to edged; same arguments and methods as :class:`Client`, as
    coroutines. Use ``async with AsyncClient() as client:`` (connects on entry), or call
    :meth:`connect`."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        timeout_s: float = 10.0,
        reconnect_timeout_s: float = 10.0,
    ) -> None:
        self.path = socket_path(path)
        self.timeout_s = timeout_s
        self.reconnect_timeout_s = reconnect_timeout_s
        self.dispatcher = Dispatcher()
        self.reconnects = 0
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._next_id = 1
        self._hello_name: str | None = None
        self._topics: list[str] = []  # subscribed: sent again on a new connection
        self._connected_once = False
        self._connect_lock = asyncio.Lock()

    # ---- connection -----------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect once (no retry); raises DaemonUnavailable or PermissionDenied."""
        await self._close_connection()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.path, limit=2 * MAX_LINE_BYTES),
                self.timeout_s,
            )
        except PermissionError as exc:
            raise PermissionDenied(PERMISSION_DENIED, f"permission denied on {self.path}") from exc
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonUnavailable(
                f"edged is not running (no daemon on {self.path})", self.path
            ) from exc
        except OSError as exc:
            raise DaemonUnavailable(f"cannot connect to {self.path}: {exc}", self.path) from exc
        self._reader, self._writer = reader, writer
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop(reader))
        if self._connected_once:
            self.reconnects += 1
        self._connected_once = True
        renew: list[tuple[str, dict[str, Any]]] = []
        if self._hello_name is not None:
            renew.append(("hello", hello_params(self._hello_name)))
        if self._topics:  # subscriptions die with a connection
            renew.append(("subscribe", subscribe_params(self._topics)))
        for method, params in renew:
            try:
                result_of(await self._exchange(method, params, self.timeout_s))
            except _Lost as exc:
                raise DaemonUnavailable(f"edged on {self.path} hung up", self.path) from exc

    async def _reconnect(self) -> None:
        async with self._connect_lock:
            if self._writer is not None:  # another task reconnected meanwhile
                return
            last: DaemonUnavailable | None = None
            for delay_s in [0.0, *Backoff(0.05, 2.0, self.reconnect_timeout_s).delays()]:
                await asyncio.sleep(delay_s)
                try:
                    await self.connect()
                    return
                except PermissionDenied:
                    raise
                except DaemonUnavailable as exc:
                    last = exc
            raise last or DaemonUnavailable(f"edged went away from {self.path}", self.path)

    async def _close_connection(self) -> None:
        task, writer = self._reader_task, self._writer
        self._reader_task, self._reader, self._writer = None, None, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        self._fail_pending()

    def _fail_pending(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(_Lost("connection closed"))
        self._pending.clear()

    async def close(self) -> None:
        """Close the connection and wait for running callback tasks to finish."""
        await self._close_connection()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ---- reading ------------------------------------------------------------------------------

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (OSError, ValueError) as exc:  # reset, or a line over the limit
                    log.info("connection to edged lost (%s)", exc)
                    break
                if not line.endswith(b"\n"):
                    break  # EOF (possibly after a partial line)
                try:
                    message = decode_line(line.rstrip(b"\n"))
                except EdgedError as exc:
                    log.warning("%s", exc)
                    continue
                if "id" in message:
                    rid = message["id"]
                    future = self._pending.pop(rid, None) if rid is not None else None
                    if future is None and rid is None and len(self._pending) == 1:
                        future = self._pending.popitem()[1]  # an error about our last line
                    if future is not None and not future.done():
                        future.set_result(message)
                else:
                    self._dispatch(message)
        finally:
            if self._reader is reader:  # else a newer connection owns the pending calls
                writer = self._writer
                self._reader, self._writer, self._reader_task = None, None, None
                if writer is not None:
                    writer.close()
                self._fail_pending()

    def _dispatch(self, message: Mapping[str, Any]) -> None:
        method = message.get("method")
        if not isinstance(method, str):
            return
        params = message.get("params")
        params = params if isinstance(params, dict) else {}
        for callback in self.dispatcher.targets(method, params):
            try:
                outcome = callback(params)
            except Exception as exc:  # a handler's bug must not end the reader
                self.dispatcher.report(method, exc)
                continue
            if inspect.isawaitable(outcome):
                task = asyncio.ensure_future(outcome)
                self._tasks.add(task)
                task.add_done_callback(self._task_done(method))

    def _task_done(self, method: str) -> Any:
        def done(task: asyncio.Task[Any]) -> None:
            self._tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                assert exc is not None
                self.dispatcher.report(method, exc)

        return done

    # ---- calls ----------------------------------------------------------------------------

    async def _exchange(
        self, method: str, params: Mapping[str, Any] | None, timeout_s: float
    ) -> dict[str, Any]:
        """Send one request on the current connection and await its reply; _Lost if the
        connection ends first."""
        if self._writer is None:
            raise _Lost("not connected", sent=False)
        request_id = self._next_id
        self._next_id += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            try:
                self._writer.write(encode_request(request_id, method, params))
                await self._writer.drain()
            except OSError as exc:  # the daemon closed its end: nothing of it was read
                raise _Lost(str(exc), sent=False) from exc
            try:
                return await asyncio.wait_for(future, timeout_s)
            except asyncio.TimeoutError as exc:
                raise TimeoutError(f"no reply to {method} from edged in {timeout_s:g}s") from exc
        finally:
            self._pending.pop(request_id, None)

    async def call(
        self, method: str, params: Mapping[str, Any] | None = None, timeout_s: float | None = None
    ) -> Any:
        """One JSON-RPC call; returns the result or raises the error's EdgedError subclass.
        A broken connection is reconnected once per call; a non-idempotent request whose
        reply was lost raises ConnectionLost."""
        attempts = 0
        while True:
            if self._writer is None:
                await self._reconnect()
            writer = self._writer
            try:
                message = await self._exchange(method, params, timeout_s or self.timeout_s)
                return result_of(message)
            except _Lost as exc:
                if self._writer is writer:  # the reader may not have seen the end yet
                    await self._close_connection()
                if exc.sent and method not in IDEMPOTENT_METHODS:
                    raise ConnectionLost(
                        f"connection to edged lost after sending {method}; it may or may not "
                        "have been acted on",
                        self.path,
                    ) from exc
                attempts += 1
                if attempts > 1 or self.reconnect_timeout_s <= 0:
                    raise DaemonUnavailable(
                        f"connection to edged on {self.path} lost", self.path
                    ) from exc
                log.info("connection to edged lost; reconnecting")

    async def hello(self, client_name: str = "python") -> dict[str, Any]:
        """As :meth:`Client.hello`; sent again after every reconnect."""
        result: dict[str, Any] = await self.call("hello", hello_params(client_name))
        self._hello_name = client_name
        return result

    async def status(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("status")
        return result

    async def snapshot(self) -> dict[str, Any] | None:
        result: dict[str, Any] | None = await self.call("snapshot")
        return result

    async def history(
        self, window_s: float | None = None, resources: list[str] | None = None
    ) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if window_s is not None:
            params["window"] = window_s
        if resources is not None:
            params["resources"] = resources
        result: dict[str, Any] = await self.call("history", params)
        return result

    async def events(self, since: int = 0) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("events", {"since": since})
        return result

    async def subscribe(self, topics: Sequence[str], callback: Callback | None = None) -> list[str]:
        """As :meth:`Client.subscribe`; the callbacks run as the notifications arrive (no
        polling), and ``callback`` may be a coroutine function."""
        params = subscribe_params(topics)
        registered = [(TOPIC_NOTIFICATIONS[t], callback) for t in params["topics"] if callback]
        for method, added in registered:  # before the call: the first ones may come with it
            self.dispatcher.on(method, added)
        try:
            result: dict[str, Any] = await self.call("subscribe", params)
        except BaseException:
            for method, added in registered:
                self.dispatcher.off(method, added)
            raise
        self._topics = list(params["topics"])
        return list(result.get("topics", []))

    async def set_strategy(self, name: str) -> dict[str, Any]:
        """As :meth:`Client.set_strategy`."""
        result: dict[str, Any] = await self.call("strategy.set", {"name": name})
        return result

    def on(self, method: str, callback: Callback) -> None:
        """As :meth:`Client.on`; ``callback`` may be a coroutine function."""
        self.dispatcher.on(method, callback)

    # ---- budgets ----------------------------------------------------------------------------

    async def request_budget(
        self,
        params: Mapping[str, Any],
        callbacks: Mapping[str, list[Callback]] | None = None,
    ) -> Lease:
        wait_s = float(params.get("wait", 0.0))
        result = await self.call("budget.request", params, wait_s + self.timeout_s)
        lease = Lease(
            id=result["lease"],
            granted=dict(result.get("granted") or {}),
            enforced=result.get("enforced"),
            callbacks={k: list(v) for k, v in (callbacks or {}).items()},
        )
        self.dispatcher.leases[lease.id] = lease
        return lease

    async def release(self, lease: Lease) -> None:
        """As :meth:`Client.release`."""
        if lease.released:
            return
        try:
            await self.call("budget.release", {"lease": lease.id})
        except NoSuchLease:
            log.debug("lease %s was already gone", lease.id)
        lease.released = True
        self.dispatcher.leases.pop(lease.id, None)

    async def list_budgets(self) -> Any:
        return await self.call("budget.list")

    @contextlib.asynccontextmanager
    async def budget(
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
    ) -> AsyncIterator[Lease]:
        """As :meth:`Client.budget`: ``async with client.budget(memory="2G") as lease:``."""
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
        lease = await self.request_budget(params, lease_callbacks(on_shrink, on_grow, on_revoke))
        try:
            yield lease
        except BaseException:
            try:
                await asyncio.shield(self.release(lease))
            except (EdgedError, OSError) as exc:
                log.warning("could not release lease %s: %s", lease.id, exc)
            raise
        await self.release(lease)
