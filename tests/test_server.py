"""The socket server on its own: a real listening Unix socket and real client connections, in
one asyncio loop (the server's) with the clients' sockets beside it.

What a client depends on beyond the daemon's methods: a handler that has to wait does not hold
up the connection's other requests; requests that arrive once the sampling tick is due are
answered right after it, not lost; a client that stops reading is not read from (and loses no
reply). (A client that lets notifications pile up: tests/test_subscribe_parts.py.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from edged.server import protocol
from edged.server.protocol import RpcError
from edged.server.server import (
    FLUSH_BYTES,
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
            assert sent * len(payload) < 256 << 20, "the server never stopped reading"
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


def test_a_client_that_breaks_a_handler_on_every_frame_cannot_flood_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every frame still gets its -32603 reply; the log gets one traceback per kind per
    LOG_EVERY_S, and the rest are counted."""
    from edged.server.server import LOG_EVERY_S

    now = [1000.0]

    async def broken(peer: Peer, params: Mapping[str, Any]) -> Any:
        raise KeyError("a handler bug")

    async def other(peer: Peer, params: Mapping[str, Any]) -> Any:
        raise ValueError("another bug")

    async def scenario() -> Server:
        server, sock = serve(
            tmp_path / "s.sock", {"broken": broken, "other": other}, clock=lambda: now[0]
        )
        await server.start(sock)
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "s.sock"))
        for rid in range(50):
            writer.write(request(rid, "broken"))
            assert (await read_reply(reader))["error"]["code"] == protocol.INTERNAL_ERROR
        writer.write(request(99, "other"))  # another kind is logged on its own
        assert (await read_reply(reader))["error"]["code"] == protocol.INTERNAL_ERROR
        now[0] += LOG_EVERY_S + 1
        writer.write(request(100, "broken"))  # after the period: logged, with the count
        assert (await read_reply(reader))["error"]["code"] == protocol.INTERNAL_ERROR
        writer.close()
        await server.close()
        return server

    with caplog.at_level(logging.ERROR, logger="edged.server.server"):
        server = asyncio.run(scenario())
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 3
    assert "49 more like it" in failures[2].getMessage()
    assert all(r.exc_info for r in failures)
    assert server.errors_suppressed == 49
