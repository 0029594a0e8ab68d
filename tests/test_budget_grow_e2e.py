"""Elastic growth and lending over the real socket of a real ``edged run``.

Real client processes (socat) hold leases. An elastic lease grows when another is released and
is told with ``budget.grow``; a queued request is served before an elastic lease grows; an idle
lease lends half its grant to an elastic one, and when the lender needs it back (a usage report,
or the measured memory of its process) the borrower gets ``budget.shrink`` with reason
``reclaim`` and its grant goes back down at the deadline. With root and cgroup v1 the same runs
on leases enforced in real groups: the limit is raised before ``budget.grow`` is sent, and
lowered again when a loan is reclaimed.

Amounts come from what the daemon says is available, so the tests hold on any machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from edged.client import Client
from tests.budget_util import ClientProcess, Connection, InTest
from tests.daemon_util import RunningDaemon, start_daemon
from tests.test_cooperative_e2e import hold_memory, tell

MiB = 1 << 20

holder = pytest.fixture(hold_memory, name="holder")
CGROUP = Path("/sys/fs/cgroup")
NOTICE_S = 1.0


def budget_daemon(tmp_path: Path, *args: str, lend: bool = True) -> RunningDaemon:
    """A daemon that lends after 0.3 s of idleness and gives borrowers 1 s to give back."""
    cfg = tmp_path / "edged.toml"
    cfg.write_text(
        f"[budget]\nlend = {'true' if lend else 'false'}\n"
        f'lend_idle_after = "300ms"\nreclaim_notice = {NOTICE_S}\n'
    )
    return start_daemon(
        tmp_path,
        "--config",
        str(cfg),
        "--interval",
        "0.1",
        *args,
        env={"STATE_DIRECTORY": str(tmp_path / "state")},
    )


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[RunningDaemon]:
    """No lending: growth only from capacity that frees (a holder would lend otherwise)."""
    running = budget_daemon(tmp_path, "--dry-run", lend=False)
    try:
        yield running
    finally:
        assert running.stop() == 0


@pytest.fixture
def lending(tmp_path: Path) -> Iterator[RunningDaemon]:
    running = budget_daemon(tmp_path, "--dry-run")
    try:
        yield running
    finally:
        assert running.stop() == 0


def free_memory(conn: Connection) -> int:
    memory: int = conn.call("budget.list")["available"]["memory"]
    assert memory > 0
    return memory


def notification(conn: Connection, method: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """The params of the next ``method`` notification (other messages are skipped)."""
    deadline = time.monotonic() + timeout_s
    while True:
        _, message = conn.next(max(0.01, deadline - time.monotonic()))
        if message.get("method") == method:
            params: dict[str, Any] = message["params"]
            return params


def lease_entry(conn: Connection, lease: int) -> dict[str, Any]:
    (entry,) = [x for x in conn.call("budget.list")["leases"] if x["lease"] == lease]
    assert isinstance(entry, dict)
    return entry


def wait_until(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_an_elastic_lease_grows_after_a_queued_request_is_served(daemon: RunningDaemon) -> None:
    with (
        ClientProcess(daemon.socket_path) as a,
        ClientProcess(daemon.socket_path) as b,
        ClientProcess(daemon.socket_path) as c,
    ):
        memory = free_memory(a)
        unit = memory // 10
        held = a.call("budget.request", {"resources": {"memory": 7 * unit}})
        elastic = b.call(
            "budget.request", {"resources": {"memory": 6 * unit}, "min": {"memory": unit}}
        )
        has = memory - 7 * unit
        assert elastic["granted"] == {"memory": has}
        waiting = c.send("budget.request", {"resources": {"memory": 5 * unit}, "wait": 30})
        assert b.quiet(0.5)  # nothing frees: no growth
        assert a.call("budget.release", {"lease": held["lease"]}) == {}
        # the queued request gets its 5 units first; the elastic lease grows by what is left
        granted = notification(c, "budget.granted")
        assert granted["granted"] == {"memory": 5 * unit}
        assert c.reply(waiting)["result"]["lease"] == granted["lease"]
        grown = notification(b, "budget.grow")
        assert grown == {"lease": elastic["lease"], "granted": {"memory": memory - 5 * unit}}
        assert lease_entry(b, elastic["lease"])["granted"] == {"memory": memory - 5 * unit}
        assert b.call("budget.list")["available"]["memory"] == 0
        assert b.quiet(0.5)  # told once


def test_idle_budget_is_lent_and_taken_back_when_the_lender_reports_use(
    lending: RunningDaemon,
) -> None:
    with ClientProcess(lending.socket_path) as a, ClientProcess(lending.socket_path) as b:
        memory = free_memory(a)
        unit = memory // 10
        # the lender's process (socat) uses a few MiB of its 6 units: idle after 0.3 s
        lender = a.call("budget.request", {"resources": {"memory": 6 * unit}})["lease"]
        own = memory - 6 * unit
        borrower = b.call(
            "budget.request", {"resources": {"memory": 8 * unit}, "min": {"memory": unit}}
        )["lease"]
        # half the lender's grant is lent to the elastic lease
        grown = notification(b, "budget.grow")
        assert grown == {"lease": borrower, "granted": {"memory": own + 3 * unit}}
        entry = lease_entry(b, borrower)
        assert entry["borrowed"] == {"memory": 3 * unit}
        assert lease_entry(a, lender)["lent"] == {"memory": 3 * unit}
        assert lease_entry(a, lender)["granted"] == {"memory": 6 * unit}  # kept whole
        assert a.call("budget.list")["available"]["memory"] == 0  # loans are not free capacity
        # the lender reports it uses most of its grant: the loan is recalled with notice
        a.call("budget.update", {"lease": lender, "usage": {"memory": 5 * unit}})
        shrink = notification(b, "budget.shrink")
        assert shrink == {
            "lease": borrower,
            "target": {"memory": own},
            "deadline": NOTICE_S,
            "reason": "reclaim",
        }
        assert lease_entry(b, borrower)["recalled"] == {"memory": 3 * unit}
        # the borrower ignores it: at the deadline its grant goes back to what it owns
        wait_until(lambda: lease_entry(b, borrower)["granted"] == {"memory": own})
        entry = lease_entry(b, borrower)
        assert "borrowed" not in entry
        assert "lent" not in lease_entry(a, lender)
        assert lease_entry(a, lender)["granted"] == {"memory": 6 * unit}


def test_a_lender_whose_process_grows_takes_its_loan_back_and_a_compliant_borrower_keeps_min(
    lending: RunningDaemon, holder: subprocess.Popen[str]
) -> None:
    """Nothing reported: the lender's need is seen in the measured memory of its process."""
    with InTest(lending.socket_path) as a, ClientProcess(lending.socket_path) as b:
        lender = a.call("budget.request", {"resources": {"memory": 128 * MiB}, "pid": holder.pid})[
            "lease"
        ]
        own = free_memory(b)
        borrower = b.call(
            "budget.request",
            {"resources": {"memory": own + 128 * MiB}, "min": {"memory": own // 2}},
        )["lease"]
        # the holder (a Python process, well under 64 MiB) is idle: half its grant is lent
        assert notification(b, "budget.grow")["granted"] == {"memory": own + 64 * MiB}
        assert lease_entry(a, lender)["measured"]["memory"] < 64 * MiB
        tell(holder, 80)  # its process now holds 80 MiB more: over half its grant
        shrink = notification(b, "budget.shrink")
        assert (shrink["lease"], shrink["reason"]) == (borrower, "reclaim")
        assert shrink["target"] == {"memory": own}
        # the borrower gives it back before the deadline: settled, nothing is reclaimed later
        answer = b.call("budget.update", {"lease": borrower, "resources": shrink["target"]})
        assert answer["granted"] == {"memory": own}
        entry = lease_entry(b, borrower)
        assert "borrowed" not in entry
        assert "recalled" not in entry
        assert b.quiet(NOTICE_S + 0.5)  # no second notice, no growth: the lender is busy
        assert lease_entry(b, borrower)["granted"] == {"memory": own}


def test_the_client_librarys_lease_follows_growth_and_on_grow_fires(
    daemon: RunningDaemon,
) -> None:
    """edged.client against the real daemon: on_grow gets the notification's params and the
    Lease object's ``granted`` follows it."""
    with ClientProcess(daemon.socket_path) as a, Client(daemon.socket_path) as client:
        memory = free_memory(a)
        unit = memory // 10
        held = a.call("budget.request", {"resources": {"memory": 7 * unit}})
        seen: list[Mapping[str, Any]] = []
        with client.budget(memory=6 * unit, min={"memory": unit}, on_grow=seen.append) as lease:
            assert lease.granted == {"memory": memory - 7 * unit}
            a.call("budget.release", {"lease": held["lease"]})
            deadline = time.monotonic() + 10
            while not seen:
                assert time.monotonic() < deadline, "no budget.grow"
                client.poll(0.5)
            assert seen == [{"lease": lease.id, "granted": {"memory": 6 * unit}}]
            assert lease.granted == {"memory": 6 * unit}


# ---- enforced in real cgroup v1 groups ----------------------------------------------------


def memory_limit(group: str) -> int:
    return int((CGROUP / "memory" / group / "memory.limit_in_bytes").read_text())


@pytest.fixture
def spinner() -> Iterator[subprocess.Popen[str]]:
    """A sleeping Python process (a few MiB) for the enforced lease."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nprint('ready', flush=True)\ntime.sleep(600)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    yield proc
    proc.kill()
    proc.wait()
    proc.stdout.close()


@pytest.fixture
def enforcing(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RunningDaemon]:
    running = budget_daemon(tmp_path, lend=request.param)
    try:
        yield running
    finally:
        assert running.stop() == 0
    left = sorted(p.name for p in (CGROUP / "memory" / "edged").glob("budget-*"))
    assert left == [], f"groups left behind: {left}"
    state = tmp_path / "state" / "imposed.json"
    if state.exists():
        assert not json.loads(state.read_text()).get("groups")


@pytest.mark.root
@pytest.mark.cgroup_v1
@pytest.mark.parametrize("enforcing", [False], indirect=True, ids=["no-lending"])
def test_an_enforced_lease_has_its_limit_raised_before_it_is_told_it_grew(
    enforcing: RunningDaemon, spinner: subprocess.Popen[str]
) -> None:
    with ClientProcess(enforcing.socket_path) as a, ClientProcess(enforcing.socket_path) as b:
        memory = free_memory(a)
        held = a.call("budget.request", {"resources": {"memory": memory - 128 * MiB}})
        got = b.call(
            "budget.request",
            {"resources": {"memory": 256 * MiB}, "min": {"memory": 64 * MiB}, "pid": spinner.pid},
        )
        group = got["enforced"]["group"]
        assert got["granted"] == {"memory": 128 * MiB}
        assert memory_limit(group) == 128 * MiB
        a.call("budget.release", {"lease": held["lease"]})
        grown = notification(b, "budget.grow")
        # read right after the notice arrived: already raised
        assert memory_limit(group) == 256 * MiB
        assert grown == {"lease": got["lease"], "granted": {"memory": 256 * MiB}}
        assert lease_entry(b, got["lease"])["enforced"]["memory_max_bytes"] == 256 * MiB


@pytest.mark.root
@pytest.mark.cgroup_v1
@pytest.mark.parametrize("enforcing", [True], indirect=True, ids=["lending"])
def test_an_enforced_borrower_has_its_limit_lowered_when_the_loan_is_reclaimed(
    enforcing: RunningDaemon, spinner: subprocess.Popen[str]
) -> None:
    with ClientProcess(enforcing.socket_path) as a, ClientProcess(enforcing.socket_path) as b:
        memory = free_memory(a)
        # the lender: 256 MiB for a sleeping process (enforced too), idle from the start
        lender_proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        try:
            lender = a.call(
                "budget.request",
                {"resources": {"memory": 256 * MiB}, "pid": lender_proc.pid},
            )["lease"]
            filler = a.call("budget.request", {"resources": {"memory": memory - 384 * MiB}})
            # it says it uses it all: not idle, so the only lender is the sleeping one
            usage = {"lease": filler["lease"], "usage": filler["granted"]}
            assert a.call("budget.update", usage)["granted"] == filler["granted"]
            got = b.call(
                "budget.request",
                {
                    "resources": {"memory": 512 * MiB},
                    "min": {"memory": 64 * MiB},
                    "pid": spinner.pid,
                },
            )
            group = got["enforced"]["group"]
            assert got["granted"] == {"memory": 128 * MiB}
            # half the idle lender's 256 MiB is lent: the borrower's limit is raised first
            assert notification(b, "budget.grow")["granted"] == {"memory": 256 * MiB}
            assert memory_limit(group) == 256 * MiB
            a.call("budget.update", {"lease": lender, "usage": {"memory": 200 * MiB}})
            shrink = notification(b, "budget.shrink")
            assert shrink["reason"] == "reclaim"
            assert shrink["target"] == {"memory": 128 * MiB}
            # ignored: at the deadline the grant and the group's limit go back down
            wait_until(lambda: memory_limit(group) == 128 * MiB)
            assert lease_entry(b, got["lease"])["granted"] == {"memory": 128 * MiB}
            assert lease_entry(b, got["lease"])["enforced"]["memory_max_bytes"] == 128 * MiB
        finally:
            lender_proc.kill()
            lender_proc.wait()
