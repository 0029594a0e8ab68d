"""Budgets through edged.client and ``edged budget``, against tests/budget_server.py.

The real daemon's ``budget.*`` methods come from another branch (the ledger) and are not on
main yet. These tests run the client against a small real JSON-lines server in the test
(tests/budget_server.py: a real Unix socket, a thread per connection, SO_PEERCRED) that follows
DESIGN section 6: ``budget.request`` checked against a capacity (1001 with ``data.available``,
``wait`` queueing then 1002, 1003 for another uid's pid), ``budget.release`` (1004 for an
unknown lease), ``budget.list``, and notifications pushed to the lease holder.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from edged.client import (
    AsyncClient,
    Client,
    InsufficientResources,
    InvalidParams,
    MethodNotFound,
    NoSuchLease,
    TimedOut,
)
from tests.budget_server import BudgetServer

GIB = 2**30


@pytest.fixture
def server(tmp_path: Path) -> Iterator[BudgetServer]:
    with BudgetServer(tmp_path / "budget.sock", {"memory": 4 * GIB, "cpu": 4.0}) as srv:
        yield srv


def test_budget_is_requested_with_parsed_sizes_and_released_on_exit(server: BudgetServer) -> None:
    with Client(server.path) as client:
        with client.budget(
            memory="2GiB", cpu=1.5, min={"memory": "512MiB"}, klass="batch"
        ) as lease:
            assert lease.granted == {"memory": 2 * GIB, "cpu": 1.5}
            assert lease.enforced == "cooperative"
            assert set(server.leases) == {lease.id}
        assert server.leases == {}
        assert server.releases == [lease.id]
        assert lease.released
    sent = server.requests[0]
    assert sent["resources"] == {"memory": 2 * GIB, "cpu": 1.5}
    assert sent["min"] == {"memory": 512 * 2**20}
    assert sent["class"] == "batch"
    assert sent["wait"] == 0.0


def test_budget_is_released_when_the_block_raises(server: BudgetServer) -> None:
    with Client(server.path) as client:
        held: list[int] = []

        def body() -> None:
            with client.budget(memory="1G"):
                held.append(len(server.leases))
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            body()
        assert held == [1]
        assert server.leases == {}
        assert len(server.releases) == 1


def test_insufficient_resources_carries_what_is_available(server: BudgetServer) -> None:
    with Client(server.path) as client, client.budget(memory=3 * GIB):
        with pytest.raises(InsufficientResources) as info:
            client.budget(memory="2GiB").__enter__()
        assert info.value.code == 1001
        assert info.value.available["memory"] == pytest.approx(1 * GIB)
        assert info.value.available["cpu"] == pytest.approx(4.0)


def test_wait_queues_until_granted_or_times_out(server: BudgetServer) -> None:
    with Client(server.path) as client, Client(server.path) as other:
        held = client.budget(memory=4 * GIB)
        lease = held.__enter__()
        started = time.monotonic()
        with pytest.raises(TimedOut):
            other.budget(memory=GIB, wait=0.3).__enter__()
        assert time.monotonic() - started >= 0.3
        releaser = threading.Timer(0.3, held.__exit__, (None, None, None))
        releaser.start()
        with other.budget(memory=GIB, wait=5) as queued:
            assert queued.granted == {"memory": GIB}
        releaser.join()
        assert lease.released


def test_release_of_an_unknown_lease_and_bad_params_are_typed_errors(
    server: BudgetServer,
) -> None:
    with Client(server.path) as client:
        with pytest.raises(NoSuchLease):
            client.call("budget.release", {"lease": "L999"})
        with pytest.raises(InvalidParams):
            client.call("budget.request", {"resources": {}})
        with pytest.raises(MethodNotFound) as info:
            client.call("budget.frobnicate")
        assert info.value.code == -32601
        # a lease the daemon dropped (revoked, restarted) counts as released
        with client.budget(memory="1G") as lease:
            client.call("budget.release", {"lease": lease.id})
        assert lease.released


def test_bad_sizes_are_refused_before_anything_is_sent(server: BudgetServer) -> None:
    with Client(server.path) as client:
        with pytest.raises(ValueError, match="512MiB"):
            client.budget(memory="lots").__enter__()
        with pytest.raises(ValueError, match="at least one"):
            client.budget().__enter__()
    assert server.requests == []


def test_shrink_grow_revoke_reach_the_lease_and_its_callbacks(server: BudgetServer) -> None:
    seen: list[tuple[str, Mapping[str, Any]]] = []
    with Client(server.path) as client:
        client.on("budget.shrink", lambda p: seen.append(("global shrink", p)))
        with client.budget(
            memory="2G",
            on_shrink=lambda p: seen.append(("shrink", p)),
            on_grow=lambda p: seen.append(("grow", p)),
            on_revoke=lambda p: seen.append(("revoke", p)),
        ) as lease:
            assert client.poll(0) == 0
            shrink = {"lease": lease.id, "target": {"memory": GIB}, "deadline": 5, "reason": "x"}
            server.notify(lease.id, "budget.shrink", shrink)
            assert client.poll(5.0) == 1
            assert seen == [("shrink", shrink), ("global shrink", shrink)]
            assert lease.shrink_target == {"memory": GIB}
            assert lease.shrink_deadline_s == 5.0

            # a notification that arrives while a call waits for its reply is dispatched
            # as soon as that call has its reply, without poll()
            server.notify(lease.id, "budget.grow", {"lease": lease.id, "granted": {"memory": 3e9}})
            time.sleep(0.2)  # it is in the socket before the request is sent
            client.list_budgets()
            assert seen[-1] == ("grow", {"lease": lease.id, "granted": {"memory": 3e9}})
            assert lease.granted == {"memory": 3e9}
            assert lease.shrink_target is None

            granted: list[Mapping[str, Any]] = []
            client.on("budget.granted", granted.append)
            server.notify(lease.id, "budget.granted", {"lease": lease.id, "granted": {}})
            assert client.poll(5.0) == 1
            assert granted == [{"lease": lease.id, "granted": {}}]

            server.notify(lease.id, "budget.revoked", {"lease": lease.id, "reason": "hard"})
            assert client.poll(5.0) == 1
            assert lease.revoked
            assert lease.revoke_reason == "hard"
            assert seen[-1][0] == "revoke"


def test_a_failing_callback_is_logged_and_the_connection_goes_on(
    server: BudgetServer, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(params: Mapping[str, Any]) -> None:
        raise ZeroDivisionError("bug in the handler")

    with Client(server.path) as client, client.budget(memory="1G", on_shrink=broken) as lease:
        server.notify(lease.id, "budget.shrink", {"lease": lease.id, "target": {}})
        assert client.poll(5.0) == 1
        assert "bug in the handler" in caplog.text
        assert client.list_budgets()[0]["lease"] == lease.id


def test_async_client_budget_and_notifications_without_polling(server: BudgetServer) -> None:
    async def scenario() -> None:
        shrunk = asyncio.Event()
        received: list[Mapping[str, Any]] = []

        async def on_shrink(params: Mapping[str, Any]) -> None:
            received.append(params)
            shrunk.set()

        async with AsyncClient(server.path) as client:
            hello = await client.hello("async-test")
            assert hello["peer"]["pid"] > 0
            async with client.budget(memory="1G", cpu=2, on_shrink=on_shrink) as lease:
                assert lease.granted == {"memory": 1e9, "cpu": 2.0}
                server.notify(lease.id, "budget.shrink", {"lease": lease.id, "target": {"cpu": 1}})
                await asyncio.wait_for(shrunk.wait(), 5)
                assert lease.shrink_target == {"cpu": 1}
                with pytest.raises(InsufficientResources) as info:
                    async with client.budget(memory="4GiB"):
                        pass
                assert info.value.available["memory"] == pytest.approx(4 * GIB - 1e9)
            assert server.leases == {}
            with pytest.raises(RuntimeError):
                async with client.budget(cpu=1):
                    raise RuntimeError("inside")
            assert server.leases == {}
            assert len(server.releases) == 2

    asyncio.run(scenario())


# ---- edged budget (the CLI) -----------------------------------------------------------------


def edged(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edged", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_budget_cli_request_list_release(server: BudgetServer) -> None:
    """``request`` holds its lease (a lease lives as long as its connection) until it is
    interrupted; ``list`` shows it; ``release`` gives it back."""
    sock = str(server.path)
    holder = subprocess.Popen(
        [sys.executable, "-m", "edged", "budget", "request", "--socket", sock,
         "--memory", "1GiB", "--cpu", "0.5", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        granted = json.loads(holder.stdout.readline())
        lease = granted["lease"]
        assert granted["granted"] == {"memory": GIB, "cpu": 0.5}
        # without --pid or a command, the budget is for the process that ran edged
        assert server.requests[0]["pid"] == os.getpid()
        listed = edged("budget", "list", "--socket", sock)
        assert listed.returncode == 0
        assert lease in listed.stdout
        assert "1.00 GiB" in listed.stdout
        released = edged("budget", "release", lease, "--socket", sock)
        assert released.returncode == 0
        assert f"released {lease}" in released.stdout
        assert server.leases == {}
        again = edged("budget", "release", lease, "--socket", sock)
        assert again.returncode == 1
        assert "no such lease" in again.stderr
    finally:
        holder.terminate()
        code = holder.wait(timeout=10)
        for stream in (holder.stdout, holder.stderr):
            if stream is not None:
                stream.close()
    assert code == 0  # interrupted: a clean exit


def test_budget_cli_runs_a_command_under_its_lease(server: BudgetServer) -> None:
    """``request -- COMMAND``: the lease is for COMMAND's pid, held while it runs, released
    when it exits, and the exit code is COMMAND's."""
    sock = str(server.path)
    out = edged(
        "budget", "request", "--socket", sock, "--memory", "1GiB", "--json",
        "--", sys.executable, "-c", "import sys, time; time.sleep(0.3); sys.exit(7)",
    )  # fmt: skip
    assert out.returncode == 7, out.stderr
    lease = json.loads(out.stderr.splitlines()[0])["lease"]  # stdout is the command's
    assert server.requests[0]["pid"] not in (0, os.getpid())
    deadline = time.monotonic() + 5
    while lease in server.leases and time.monotonic() < deadline:  # released with the connection
        time.sleep(0.02)
    assert lease not in server.leases


def test_budget_cli_exit_codes(server: BudgetServer, tmp_path: Path) -> None:
    sock = str(server.path)
    too_big = edged("budget", "request", "--socket", sock, "--memory", "5GiB")
    assert too_big.returncode == 1
    assert "available now: memory 4.00 GiB" in too_big.stderr
    bad_size = edged("budget", "request", "--socket", sock, "--memory", "lots")
    assert bad_size.returncode == 2
    assert edged("budget", "request", "--socket", sock).returncode == 2  # nothing asked for
    assert edged("budget", "frob").returncode == 2
    missing = edged("budget", "list", "--socket", str(tmp_path / "none.sock"))
    assert missing.returncode == 3
    assert "not running" in missing.stderr
    assert [r["resources"] for r in server.requests] == [{"memory": 5 * GIB}]  # nothing else sent


@pytest.mark.root
def test_budget_cli_permission_denied_is_exit_4(tmp_path: Path) -> None:
    """A pid owned by another uid, for a peer that is not an admin (this server is told that
    root is not one, since these tests run as root), is 1003: exit 4."""
    with BudgetServer(tmp_path / "b.sock", {"memory": 4 * GIB}, admin_uids=()) as srv:
        other = subprocess.Popen(["sleep", "30"], user="nobody")
        try:
            out = edged(
                "budget",
                "request",
                "--socket",
                str(srv.path),
                "--memory",
                "1G",
                "--pid",
                str(other.pid),
            )
        finally:
            other.kill()
            other.wait()
        assert out.returncode == 4, out.stderr
        assert "belongs to uid" in out.stderr
        assert srv.leases == {}
