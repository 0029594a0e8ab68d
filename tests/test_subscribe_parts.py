"""The parts behind ``subscribe`` and ``strategy.set``: the server's bound on what waits for a
client that does not read (a real socket), per-resource levels, and the controller's
strategy switch (a real child process, the real enforcer in dry run)."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from edged.alerts import AlertTracker
from edged.config import Level, Limits
from edged.control import SWITCH_REASON, Controller, health, resource_levels
from edged.enforce.enforcer import Enforcer
from edged.enforce.restore import StateStore
from edged.enforce.signals import Signaller, read_start_ticks
from edged.policy.base import ActionKind, Imposed, Limit, Resource, State
from edged.policy.registry import make_strategy
from edged.server import protocol
from edged.server.server import Peer, Server, bind_unix_socket
from edged.snapshot import Reading, Snapshot
from tests.conftest import sleeping_process

GIB = 2**30

# ---- the server: a client that does not read ---------------------------------------------


async def _who(peer: Peer, params: Any) -> int:
    return peer.connection


async def _open(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    """A real connection, and the number the server gave it."""
    reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 22)
    writer.write(b'{"jsonrpc":"2.0","id":1,"method":"who"}\n')
    reply = json.loads(await reader.readline())
    return reader, writer, int(reply["result"])


def test_notifications_a_client_does_not_read_close_its_connection(tmp_path: Path) -> None:
    line = protocol.encode_notification("event", {"pad": "x" * 16_000})
    closed: list[int] = []

    async def scenario() -> None:
        server = Server(
            {"who": _who},
            on_close=closed.append,
            max_pending_bytes=64 * 1024,
            slow_close_grace_s=0.5,
        )
        path = tmp_path / "s.sock"
        await server.start(bind_unix_socket(path))
        slow_reader, slow_writer, slow = await _open(path)
        _, dead_writer, dead = await _open(path)
        sent = {slow: 0, dead: 0}
        # neither reads: the kernel's buffers fill, then 64 KiB may wait here, then no more
        while server.closed_slow < 2:
            for number in (slow, dead):
                if server.send(number, line):
                    sent[number] += 1
            await asyncio.sleep(0)
        assert all(count > 4 for count in sent.values())
        assert not server.send(slow, line)  # closing: nothing more is taken
        assert server.pending_bytes() <= 2 * (64 * 1024 + len(line) + 200)
        # the slow one reads now: everything it was sent, then why, then EOF
        received = 0
        last: dict[str, Any] = {}
        while raw := await slow_reader.readline():
            last = json.loads(raw)
            received += last.get("method") == "event"
        assert received == sent[slow]
        assert last["id"] is None
        assert last["error"]["code"] == protocol.TOO_MANY
        assert "notifications not read" in last["error"]["message"]
        # the one that never reads is cut off after the grace, and nothing waits for it
        while dead not in closed:
            await asyncio.sleep(0.05)
        assert server.pending_bytes() == 0
        assert slow in closed
        slow_writer.close()
        dead_writer.close()
        await server.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_droppable_notifications_are_skipped_while_a_client_is_behind(tmp_path: Path) -> None:
    line = protocol.encode_notification("snapshot", {"pad": "x" * 16_000})

    async def scenario() -> None:
        server = Server({"who": _who}, max_pending_bytes=64 * 1024)
        path = tmp_path / "s.sock"
        await server.start(bind_unix_socket(path))
        reader, writer, number = await _open(path)
        sent = 0
        while server.skipped < 100:
            sent += server.broadcast([number], line, droppable=True)
            await asyncio.sleep(0)
        # at most one waits beyond the kernel's buffer, and the client is never cut off
        assert server.pending_bytes() <= len(line)
        assert server.closed_slow == 0
        received = 0
        while received < sent:
            raw = await reader.readline()
            assert json.loads(raw)["method"] == "snapshot"
            received += 1
        writer.close()
        await server.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


# ---- levels per resource -------------------------------------------------------------------


def state(usage: dict[Resource, float], limits: dict[Resource, Limit]) -> State:
    return State(now_s=0.0, interval_s=1.0, usage=usage, capacity={}, limits=limits)


def test_each_resource_has_its_level_and_health_is_the_worst() -> None:
    limits = {
        Resource.MEMORY: Limit(Resource.MEMORY, 4.0, 6.0),
        Resource.CPU: Limit(Resource.CPU, 1.0, None),
        Resource.POWER: Limit(Resource.POWER, 10.0, 20.0),
    }
    now = state({Resource.MEMORY: 5.0, Resource.CPU: 0.5}, limits)
    assert resource_levels(now) == {
        Resource.MEMORY: "moderate",
        Resource.CPU: "ok",
        Resource.POWER: "ok",  # no reading: judged on alerts and forecasts only
    }
    assert resource_levels(now, {Resource.CPU: 30.0}, {Resource.POWER}) == {
        Resource.MEMORY: "moderate",
        Resource.CPU: "warning",  # reaches a limit within a minute
        Resource.POWER: "warning",  # an alert on it fires
    }
    assert health(now, {Resource.CPU: 30.0}) == "warning"
    hard = state({Resource.MEMORY: 6.0}, limits)
    assert resource_levels(hard)[Resource.MEMORY] == "critical"
    assert health(hard, {}, {Resource.CPU}) == "critical"
    assert health(None) == "ok"
    assert health(state({}, {})) == "ok"


# ---- the controller's switch ----------------------------------------------------------------


child = pytest.fixture(sleeping_process, name="child")


def controller(tmp_path: Path, name: str) -> Controller:
    enforcer = Enforcer(
        None, Signaller(), StateStore(tmp_path / "state"), dry_run=True, recheck=lambda a: True
    )
    limits = Limits(memory=Level(soft=4 * GIB, hard=6 * GIB))
    return Controller(make_strategy(name), enforcer, limits, alerts=AlertTracker())


def tick(seq: int, now_s: float, pid: int) -> Snapshot:
    """1 GiB of 8 used (under soft), and ``pid`` sampled as a besteffort process."""
    attributes: dict[str, str | int] = {
        "process.pid": pid,
        "process.executable.name": "sleep",
        "edged.class": "besteffort",
    }
    readings = (
        Reading("system.memory.limit", 8.0 * GIB),
        Reading("system.memory.linux.available", 7.0 * GIB),
        Reading("process.memory.usage", 1e6, attributes),
    )
    return Snapshot(seq, seq, now_s, readings)


def impose(control: Controller, pid: int) -> None:
    """What the old strategy left in force: a memory throttle and a CPU freeze on ``pid``
    (as the controller records an action the enforcer carried out)."""
    for kind, resource in (
        (ActionKind.THROTTLE, Resource.MEMORY),
        (ActionKind.FREEZE, Resource.CPU),
    ):
        control.imposed[(pid, kind, resource, None)] = Imposed(kind, pid, resource, 0.0, 1e9)


def test_a_switch_to_adaptive_lifts_what_the_old_strategy_imposed(
    tmp_path: Path, child: subprocess.Popen[bytes]
) -> None:
    control = controller(tmp_path, "dynamic")
    start_ticks = read_start_ticks(child.pid)
    assert start_ticks is not None
    control.step(tick(1, 1.0, child.pid), 1.0, {child.pid: start_ticks})
    impose(control, child.pid)
    switched = control.switch(make_strategy("adaptive"), "set", "uid 0")
    assert control.strategy.name == "adaptive"
    assert (switched.action, switched.reason, switched.strategy) == ("strategy", "set", "adaptive")
    assert switched.detail == (
        "dynamic -> adaptive (uid 0); 2 throttles/freezes lifted at the next tick"
    )
    assert len(control.imposed) == 2  # nothing happens before the next tick
    events = control.step(tick(2, 2.0, child.pid), 1.0, {child.pid: start_ticks})
    lifted = [(e.action, e.resource, e.reason, e.strategy, e.status) for e in events]
    assert lifted == [  # the freeze first
        ("thaw", "cpu", SWITCH_REASON, "dynamic", "dry_run"),
        ("unthrottle", "memory", SWITCH_REASON, "dynamic", "dry_run"),
    ]
    assert control.imposed == {}
    assert control.step(tick(3, 3.0, child.pid), 1.0, {child.pid: start_ticks}) == []  # once only
    assert [e.action for e in control.events] == ["strategy", "thaw", "unthrottle"]


def test_a_switch_to_predictive_hands_the_throttles_over(
    tmp_path: Path, child: subprocess.Popen[bytes]
) -> None:
    control = controller(tmp_path, "adaptive")
    start_ticks = read_start_ticks(child.pid)
    assert start_ticks is not None
    control.step(tick(1, 1.0, child.pid), 1.0, {child.pid: start_ticks})
    impose(control, child.pid)
    switched = control.switch(make_strategy("predictive"), "reload")
    assert switched.detail == "adaptive -> predictive; 2 throttles/freezes handed over"
    # predictive lifts them itself, with its hysteresis: not on the next tick, but once the
    # freeze has lasted freeze_max_s and memory has stayed low for recover_hold_s
    assert control.step(tick(2, 2.0, child.pid), 1.0, {child.pid: start_ticks}) == []
    assert len(control.imposed) == 2
    later = [
        (e.action, e.reason, e.strategy)
        for t in range(3, 25)
        for e in control.step(tick(t, float(t), child.pid), 1.0, {child.pid: start_ticks})
    ]
    assert later == [
        ("thaw", "freeze-limit", "predictive"),
        ("unthrottle", "recovered", "predictive"),
    ]
    assert control.imposed == {}
