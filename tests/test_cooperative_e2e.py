"""The cooperative strategy end to end: a real daemon, a real lease holder, budget.shrink.

A memory-holding child process gets a lease (requested for its pid by the test process, which
plays the client's control side and receives the notifications on its own connection). It
grows past the soft level; edged asks its client to shrink with ``budget.shrink``. A client
that frees memory in time is left alone; one that ignores the notice is throttled after the
deadline (reason ``ignored-shrink``), as an unmanaged process would be.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.budget_util import InTest
from tests.daemon_util import RunningDaemon, start_daemon
from tests.test_enforce_e2e import used_bytes

pytestmark = [pytest.mark.root, pytest.mark.cgroup_v1, pytest.mark.slow]

MiB = 2**20
HOLDER = """
import mmap, sys
held = []
print("ready", flush=True)
for line in sys.stdin:
    n = int(line)
    if n > 0:
        m = mmap.mmap(-1, n << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m[::4096] = b"\\x01" * ((n << 20) // 4096)
        held.append(m)
    else:
        for m in held:
            m.close()
        held.clear()
    print("ok", flush=True)
"""
DEADLINE_S = 2.0


def hold_memory() -> Iterator[subprocess.Popen[str]]:
    """A child that maps and touches N MiB per line on its stdin (0 frees it all); a test
    module takes it as a fixture: ``holder = pytest.fixture(hold_memory, name="holder")``."""
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    yield p
    p.kill()
    p.wait(timeout=10)
    for stream in (p.stdin, p.stdout):
        if stream is not None:
            stream.close()


holder = pytest.fixture(hold_memory, name="holder")


def tell(p: subprocess.Popen[str], mib: int) -> None:
    assert p.stdin is not None
    assert p.stdout is not None
    p.stdin.write(f"{mib}\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == "ok"


def cooperative_daemon(tmp_path: Path) -> RunningDaemon:
    base = used_bytes()
    cfg = tmp_path / "edged.toml"
    cfg.write_text(
        f'[sampling]\ninterval = "100ms"\nrescan = "200ms"\n'
        f"[limits.memory]\nsoft = {base + 300 * MiB}\nhard = {base + 1200 * MiB}\n"
        f'[strategy]\nname = "cooperative"\n'
        f"[strategy.cooperative]\ndeadline_s = {DEADLINE_S}\nhold_s = 0.5\n"
    )
    return start_daemon(
        tmp_path, "--config", str(cfg), env={"STATE_DIRECTORY": str(tmp_path / "state")}
    )


def on(daemon: RunningDaemon, pid: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = daemon.call("events", {"since": 0})["events"]
    return [e for e in events if e["pid"] == pid]


def shrink_notice(client: InTest, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _, message = client.next(timeout_s=max(0.1, deadline - time.monotonic()))
        if message.get("method") == "budget.shrink":
            params: dict[str, Any] = message["params"]
            return params
    raise AssertionError("no budget.shrink")


@pytest.mark.parametrize("complies", [True, False], ids=["complies", "ignores"])
def test_a_client_over_its_share_is_asked_to_shrink(
    tmp_path: Path, holder: subprocess.Popen[str], complies: bool
) -> None:
    daemon = cooperative_daemon(tmp_path)
    try:
        with InTest(daemon.socket_path) as client:
            client.call("hello", {"client": "trainer", "protocol": 1})
            lease = client.call(
                "budget.request", {"resources": {"memory": 800 * MiB}, "pid": holder.pid}
            )["lease"]
            tell(holder, 500)  # 500 MiB over a 300 MiB soft headroom: over its share
            try:
                notice = shrink_notice(client, timeout_s=10)
            except AssertionError as exc:
                raise AssertionError(daemon.log()) from exc
            asked_at = time.monotonic()
            assert notice["lease"] == lease
            assert notice["reason"] == "pressure"
            assert notice["deadline"] == DEADLINE_S
            assert 0 < notice["target"]["memory"] < 500 * MiB
            if complies:
                tell(holder, 0)  # frees what it holds, as an empty_cache would
                client.call("budget.update", {"lease": lease, "usage": {"memory": 0}})
            time.sleep(max(0.0, asked_at + DEADLINE_S + 1.5 - time.monotonic()))
            seen = on(daemon, holder.pid)
            assert [e["action"] for e in seen][:1] == ["notify"]
            assert seen[0]["status"] == "done"
            assert seen[0]["strategy"] == "cooperative"
            after = [e for e in seen if e["action"] != "notify"]
            if complies:
                assert after == [], after  # left alone: it did as asked
            else:
                assert after, daemon.log()
                assert after[0]["action"] == "throttle"
                assert after[0]["reason"] == "ignored-shrink"
                assert after[0]["status"] == "done"
            assert holder.poll() is None  # asked, then held: never killed at the soft level
    finally:
        assert daemon.stop() == 0
