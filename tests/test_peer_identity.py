"""Peer identity beyond SO_PEERCRED: a pidfd (SO_PEERPIDFD) or the start time, so that a pid
that no longer names the process that connected is never acted on.

Real processes throughout: the comparison is checked against real children (alive, exited,
and a different process's start time standing in for a reused pid, which cannot be forced);
the server runs in the test's event loop on a real Unix socket, and the clients that die are
real processes that connect, fork and exit, leaving the connection to a child.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from edged.budget.ledger import Lease
from edged.budget.service import BudgetService
from edged.enforce.signals import read_start_ticks
from edged.server import server as server_mod
from edged.server.server import Peer, PeerProcess, PidfdProbe, Server, bind_unix_socket
from tests.conftest import sleeping_process

GiB = 1 << 30


def kernel_has_peer_pidfd() -> bool:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        fd = PidfdProbe().pidfd(a)
    if fd is None:
        return False
    os.close(fd)
    return True


child = pytest.fixture(sleeping_process, name="child")


def ticks(pid: int) -> int:
    value = read_start_ticks(pid)
    assert value is not None
    return value


# --- the comparison --------------------------------------------------------------------------


def test_start_time_tells_the_same_process_from_a_dead_or_different_one(
    child: subprocess.Popen[bytes],
) -> None:
    same = PeerProcess(child.pid, None, ticks(child.pid))
    assert same.how == "start_time"
    assert same.alive()
    # the pid with another process's start time: what a reused pid looks like
    older = PeerProcess(child.pid, None, ticks(os.getpid()))
    assert not older.alive()
    # gone at accept: never vouched for
    assert not PeerProcess(child.pid, None, None).alive()
    child.kill()
    child.wait()
    assert not same.alive()


def test_a_pidfd_tells_whether_that_very_process_still_exists(
    child: subprocess.Popen[bytes],
) -> None:
    process = PeerProcess(child.pid, os.pidfd_open(child.pid), None)
    assert process.how == "pidfd"
    assert process.alive()
    fd = process.pidfd
    assert fd is not None
    child.kill()
    child.wait()  # reaped: the pid is free for another process
    assert not process.alive()
    process.close()
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)
    assert process.pidfd is None
    assert not process.alive()
    process.close()  # twice is harmless


def test_a_peer_made_without_a_process_is_trusted_as_before() -> None:
    assert Peer(pid=os.getpid(), uid=0, gid=0).same_process()


def test_a_kernel_without_the_option_is_asked_once(monkeypatch: pytest.MonkeyPatch) -> None:
    probe = PidfdProbe()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        # an option number no kernel has: the kernel's own ENOPROTOOPT, as before 6.5
        monkeypatch.setattr(server_mod, "SO_PEERPIDFD", 0x7FFF)
        assert probe.pidfd(a) is None
        assert probe.available is False
        monkeypatch.undo()
        assert probe.pidfd(a) is None  # remembered: not asked again
    assert PidfdProbe(enabled=False).available is False


# --- the server: one pidfd per connection, closed with it -------------------------------------


class Recorder:
    """A lease enforcer that records what it is asked to enforce."""

    def __init__(self) -> None:
        self.applied: list[int] = []

    def apply(self, lease: Lease) -> dict[str, Any]:
        self.applied.append(lease.target_pid)
        return {"how": "recorded"}

    def lift(self, lease: Lease) -> None:
        return None


class Harness:
    """A Server with the budget methods and ``whoami`` on ``path``, in the running loop."""

    def __init__(self, path: Path, peer_pidfds: bool) -> None:
        self.path = path
        self.closed = 0
        self.enforcer = Recorder()
        self.service = BudgetService(self._notify, enforcer=self.enforcer)
        self.server = Server(
            {**self.service.methods(), "whoami": self.whoami},
            max_clients=1000,
            on_close=self._closed,
            holds=self.service.holds,
            peer_pidfds=peer_pidfds,
        )

    def _notify(self, connection: int, method: str, params: Any) -> bool:
        return self.server.notify(connection, method, params)

    def _closed(self, connection: int) -> None:
        self.closed += 1
        self.service.connection_closed(connection)

    async def whoami(self, peer: Peer, params: Mapping[str, Any]) -> Any:
        assert peer.process is not None
        return {"pid": peer.pid, "how": peer.process.how, "same": peer.same_process()}

    async def start(self) -> None:
        self.service.set_capacity({"memory": float(GiB), "cpu": 2.0}, {})
        await self.server.start(bind_unix_socket(self.path))

    async def close(self) -> None:
        await self.server.close()
        self.service.close()


async def call(path: Path, method: str, params: dict[str, Any] | None = None) -> Any:
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        request = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}
        writer.write(json.dumps(request).encode() + b"\n")
        return json.loads(await reader.readline())
    finally:
        writer.close()
        await writer.wait_closed()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("peer_pidfds", [True, False], ids=["pidfd", "start_time"])
def test_no_descriptor_outlives_its_connection(tmp_path: Path, peer_pidfds: bool) -> None:
    connections = 300
    expected = "pidfd" if peer_pidfds and kernel_has_peer_pidfd() else "start_time"

    async def main() -> None:
        harness = Harness(tmp_path / "edged.sock", peer_pidfds)
        await harness.start()
        before = open_fds()
        try:
            for _ in range(connections):
                reply = await call(harness.path, "whoami")
                assert reply["result"] == {"pid": os.getpid(), "how": expected, "same": True}
            while harness.closed < connections:
                await asyncio.sleep(0.01)
            assert open_fds() == before
        finally:
            await harness.close()

    asyncio.run(main())
    print(f"\nkernel {os.uname().release}: peers checked by {expected}")


# --- a peer that is gone: nothing is enforced on its pid --------------------------------------

# Connects, optionally sends a request first (and waits until the server has queued it, by a
# budget.list answered after it), forks and exits. The child keeps the connection: once the
# test has reaped the parent (it says so on stdin), the child sends its line and prints the
# first line it receives.
CLIENT = r"""
import json, os, socket, sys
path, before, after = sys.argv[1], sys.argv[2], sys.argv[3]
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(path)
lines = sock.makefile("rb")
if before:
    sock.sendall(before.encode() + b"\n")
    sock.sendall(b'{"jsonrpc": "2.0", "id": 99, "method": "budget.list"}\n')
    while json.loads(lines.readline()).get("id") != 99:
        pass
if os.fork():
    os._exit(0)
sys.stdin.readline()
if after:
    sock.sendall(after.encode() + b"\n")
print(lines.readline().decode().strip(), flush=True)
"""


def spawn_at(pid: int) -> subprocess.Popen[bytes]:
    """A new process (``sleep``) with the pid ``pid``, which has just been freed: a real pid
    reuse, by setting the pid namespace's last pid (``/proc/sys/kernel/ns_last_pid``, root
    only) right before the fork. Another process on the machine may take the pid first:
    tried again a few times, else the test is skipped."""
    for _ in range(50):
        try:
            Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        except OSError as exc:
            pytest.skip(f"cannot choose the next pid: {exc}")
        proc = subprocess.Popen(["sleep", "60"])
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    pytest.skip(f"pid {pid} was taken by another process each time")


async def orphaned_client(
    path: Path, before: str, after: str, reused: list[subprocess.Popen[bytes]]
) -> tuple[int, dict[str, Any]]:
    """Run :data:`CLIENT`; once its parent (the process that connected) is reaped, give the
    parent's pid to a new process (appended to ``reused``; the caller ends it), then let the
    child go on. Returns (the pid that connected, the line the child received). Blocking
    waits run in threads: asyncio's own ``Process.wait`` would also wait for the pipes, which
    the child keeps open."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(path), before, after],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        assert await asyncio.to_thread(proc.wait, 10) == 0
        reused.append(await asyncio.to_thread(spawn_at, proc.pid))
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        line = await asyncio.to_thread(proc.stdout.readline)
    finally:
        proc.stdin.close()
        proc.stdout.close()
    return proc.pid, json.loads(line)


def request(resources: dict[str, Any], wait_s: float = 0) -> str:
    params = {"resources": resources, "wait": wait_s}
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": "budget.request", "params": params})


@pytest.mark.parametrize("peer_pidfds", [True, False], ids=["pidfd", "start_time"])
def test_a_request_for_itself_from_a_peer_that_has_exited_is_refused(
    tmp_path: Path, peer_pidfds: bool
) -> None:
    reused: list[subprocess.Popen[bytes]] = []

    async def main() -> None:
        harness = Harness(tmp_path / "edged.sock", peer_pidfds)
        await harness.start()
        try:
            ask = request({"memory": GiB // 4})
            pid, reply = await orphaned_client(harness.path, "", ask, reused)
            # the pid names a live process of the same uid now: only the identity check
            # tells it from the one that connected
            assert reused[0].pid == pid
            assert reply["error"]["code"] == -32602
            assert reply["error"]["message"] == (
                f"no process {pid}: the process that connected has exited"
            )
            assert harness.enforcer.applied == []
            # the control: a live peer asking for itself is granted and enforced
            granted = await call(harness.path, "budget.request", {"resources": {"cpu": 1.0}})
            assert granted["result"]["enforced"] == {"how": "recorded"}
            assert harness.enforcer.applied == [os.getpid()]
        finally:
            await harness.close()

    try:
        asyncio.run(main())
    finally:
        for proc in reused:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("peer_pidfds", [True, False], ids=["pidfd", "start_time"])
def test_a_queued_grant_for_a_peer_that_has_exited_is_not_enforced(
    tmp_path: Path, peer_pidfds: bool
) -> None:
    reused: list[subprocess.Popen[bytes]] = []

    async def main() -> None:
        harness = Harness(tmp_path / "edged.sock", peer_pidfds)
        await harness.start()
        holder_reader, holder = await asyncio.open_unix_connection(str(harness.path))
        try:
            take = request({"memory": GiB})
            holder.write(take.encode() + b"\n")
            lease = json.loads(await holder_reader.readline())["result"]["lease"]
            queued = request({"memory": GiB // 2}, wait_s=30)
            release = json.dumps(
                {"jsonrpc": "2.0", "id": 2, "method": "budget.release", "params": {"lease": lease}}
            )
            waiter = asyncio.ensure_future(orphaned_client(harness.path, queued, "", reused))
            # once the parent's pid names another process, free the memory: the queued
            # request is granted to a connection whose process is gone
            while not reused:
                await asyncio.sleep(0.01)
            holder.write(release.encode() + b"\n")
            pid, line = await waiter
            assert line["method"] == "budget.granted"
            assert line["params"]["enforced"] == {
                "how": "cooperative",
                "reason": f"process {pid} has exited",
            }
            assert reused[0].pid == pid
            assert harness.enforcer.applied == [os.getpid()]  # only the live holder's lease
        finally:
            holder.close()
            with contextlib.suppress(ConnectionError):
                await holder.wait_closed()
            await harness.close()

    try:
        asyncio.run(main())
    finally:
        for proc in reused:
            proc.kill()
            proc.wait()
