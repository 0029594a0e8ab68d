"""The socket server on its own: a real listening Unix socket and real client connections, in
one asyncio loop (the server's) with the clients' sockets beside it.

What a client depends on beyond the daemon's methods: a handler that has to wait does not hold
up the connection's other requests; requests that arrive once the sampling tick is due are
answered right after it, not lost; a client that stops reading is not read from (and loses no
reply), while a client that lets notifications pile up is disconnected rather than buffered
for without bound.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edged.server import protocol
from edged.server.protocol import RpcError
from edged.server.server import (
    FLUSH_BYTES,
    MAX_UNREAD_BYTES,
    WRITE_BUFFER_HIGH_BYTES,
    Peer,
    Server,
    bind_unix_socket,
)


def request(rid: int, method: str, params: Mapping[str, Any] | None = None) -> bytes:
    body = {"jsonrpc": "2.0", "id": rid, "method": method, "params": dict(params or {})}
    return json.dumps(body).encode() + b"\n"


async def read_reply(reader: asyncio.StreamReader) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(reader.readline(), 10))  # type: ignore[no-any-return]


async def nothing_to_read(reader: asyncio.StreamReader) -> bool:
    """True when no line arrives while the loop runs for a while (the server had every chance
    to answer: it runs in this loop)."""
    try:
        await asyncio.wait_for(reader.readline(), 0.2)
    except asyncio.TimeoutError:
        return True
    return False


def serve(path: Path, methods: Mapping[str, Any], **kwargs: Any) -> tuple[Server, socket.socket]:
    return Server(methods, **kwargs), bind_unix_socket(path)


def test_a_handler_that_waits_does_not_hold_up_the_connection(tmp_path: Path) -> None:
    release_slow: asyncio.Future[int] | None = None

    async def slow(peer: Peer, params: Mapping[str, Any]) -> Any:
        assert release_slow is not None
        value = await release_slow  # suspends: finished in a task, answered from there
        if value < 0:
            raise RpcError(protocol.TIMED_OUT, "gave up", {"after": value})
        return {"slow": value}

    async def fast(peer: Peer, params: Mapping[str, Any]) -> Any:
        return {"fast": True, "pid": peer.pid}

    async def scenario() -> None:
        nonlocal release_slow
        release_slow = asyncio.get_running_loop().create_future()
        server, sock = serve(tmp_path / "s.sock", {"slow": slow, "fast": fast})
        await server.start(sock)
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "s.sock"))
        writer.write(request(1, "slow") + request(2, "slow") + request(3, "fast"))
        reply = await read_reply(reader)
        assert reply == {
            "jsonrpc": "2.0",
            "id": 3,
            "result": {"fast": True, "pid": reply["result"]["pid"]},
        }
        release_slow.set_result(7)
        assert {(await read_reply(reader))["id"] for _ in range(2)} == {1, 2}
        release_slow = asyncio.get_running_loop().create_future()
        writer.write(request(4, "slow"))
        await asyncio.sleep(0.05)
        release_slow.set_result(-1)
        error = await read_reply(reader)
        assert error["id"] == 4
        assert error["error"] == {"code": 1002, "message": "gave up", "data": {"after": -1}}
        writer.close()
        await server.close()

    asyncio.run(scenario())


def test_requests_that_arrive_once_the_tick_is_due_are_answered_after_it(tmp_path: Path) -> None:
    async def echo(peer: Peer, params: Mapping[str, Any]) -> Any:
        return dict(params)

    async def scenario() -> None:
        server, sock = serve(tmp_path / "s.sock", {"echo": echo})
        await server.start(sock)
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "s.sock"))
        server.hold(loop.time() + 60.0)  # the tick is not due yet: requests are answered
        writer.write(request(1, "echo", {"n": 1}))
        assert (await read_reply(reader))["result"] == {"n": 1}
        server.hold(loop.time())  # due now: what arrives waits for the tick
        writer.write(request(2, "echo", {"n": 2}) + request(3, "echo", {"n": 3}))
        assert await nothing_to_read(reader)
        server.release()  # the tick ran
        assert [(await read_reply(reader))["id"] for _ in range(2)] == [2, 3]
        writer.write(request(4, "echo", {"n": 4}))  # and the socket is read again
        assert (await read_reply(reader))["id"] == 4
        writer.close()
        await server.close()

    asyncio.run(scenario())


def test_a_client_that_does_not_read_is_not_read_and_loses_nothing(tmp_path: Path) -> None:
    """Backpressure: the server stops reading a connection whose replies pile up unread, so
    neither side buffers without bound; other clients are served meanwhile; once the client
    reads, every request is answered, in order."""
    payload = "x" * 4096

    async def big(peer: Peer, params: Mapping[str, Any]) -> Any:
        return {"n": params["n"], "pad": payload}

    async def scenario() -> None:
        server, sock = serve(tmp_path / "s.sock", {"big": big}, max_requests_per_s=1e9)
        await server.start(sock)
        loop = asyncio.get_running_loop()
        stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stalled.connect(str(tmp_path / "s.sock"))
        stalled.setblocking(False)
        sent = 0
        blocked_for_s = 0.0
        while blocked_for_s < 0.5:  # write until the server has stopped taking requests
            try:
                stalled.send(request(sent, "big", {"n": sent}))
            except BlockingIOError:
                await asyncio.sleep(0.05)
                blocked_for_s += 0.05
                continue
            sent += 1
            assert sent * len(payload) < 64 * MAX_UNREAD_BYTES, "the server never stopped reading"
            blocked_for_s = 0.0
            await asyncio.sleep(0)
        # bounded: what the server holds for it is its write-buffer mark, not `sent` replies
        (conn,) = server.clients.values()
        assert conn.transport is not None
        held_bytes = conn.transport.get_write_buffer_size()
        assert held_bytes <= WRITE_BUFFER_HIGH_BYTES + FLUSH_BYTES + len(payload) + 100
        assert sent * len(payload) > 2 * held_bytes  # it was owed far more than that
        # another client is served meanwhile
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "s.sock"))
        writer.write(request(1, "big", {"n": -1}))
        assert (await read_reply(reader))["result"]["n"] == -1
        # the stalled client reads: every request it sent is answered, in order
        stalled.setblocking(True)
        stalled_reader = await loop.run_in_executor(None, lambda: stalled.makefile("rb"))
        got = []
        for _ in range(sent):
            line = await loop.run_in_executor(None, stalled_reader.readline)
            got.append(json.loads(line)["id"])
        assert got == list(range(sent))
        stalled_reader.close()
        stalled.close()
        writer.close()
        await server.close()

    asyncio.run(scenario())


def test_a_client_that_lets_notifications_pile_up_is_disconnected(tmp_path: Path) -> None:
    async def hello(peer: Peer, params: Mapping[str, Any]) -> Any:
        return {"connection": peer.connection}

    closed: list[int] = []

    async def scenario() -> None:
        server, sock = serve(tmp_path / "s.sock", {"hello": hello}, on_close=closed.append)
        await server.start(sock)
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "s.sock"))
        writer.write(request(1, "hello"))
        number = (await read_reply(reader))["result"]["connection"]
        note = {"pad": "y" * 65000}
        pushed = 0
        while server.notify(number, "event", note):  # the client reads nothing meanwhile
            pushed += 1
            assert pushed * 65000 < 64 * MAX_UNREAD_BYTES, "never disconnected"
            await asyncio.sleep(0)
        assert closed == [number]
        assert number not in server.clients
        # what the kernel had taken is still delivered (whole notifications, then at most a
        # cut one that no line reader takes), then EOF: the client is not left hanging
        lines = []
        while line := await asyncio.wait_for(reader.readline(), 10):
            lines.append(line)
        whole = [line for line in lines if line.endswith(b"\n")]
        assert lines[: len(whole)] == whole
        assert len(lines) - len(whole) <= 1
        assert all(json.loads(line)["method"] == "event" for line in whole)
        assert 0 < len(whole) < pushed
        writer.close()
        await server.close()

    asyncio.run(scenario())
