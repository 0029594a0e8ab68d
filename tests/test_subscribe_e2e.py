"""``subscribe`` and ``strategy.set`` on a real ``edged run``, with real client processes.

Pressure and events come from the Orin Nano fixture tree (2.28 GiB used of 7.44 GiB), whose
meminfo the test rewrites in place as tests/test_alerts_e2e.py does: with soft at 3 GiB and
hard at 4 GiB the daemon starts at ``ok`` and the test walks memory through every level.
Dry run and no ``[[rules]]``: nothing is sampled as a process, nothing is acted on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from edged.client import AsyncClient, Client, InvalidParams
from tests.budget_util import ClientProcess, InTest, as_user
from tests.conftest import FixtureTree
from tests.daemon_util import RunningDaemon, start_daemon
from tests.telemetry_helpers import wait_until
from tests.test_alerts_e2e import set_used

TEST_USER = "edged-test-user"


def notifications(conn: ClientProcess, method: str, count: int) -> list[dict[str, Any]]:
    """The params of the next ``count`` notifications ``method`` (others are dropped)."""
    found: list[dict[str, Any]] = []
    while len(found) < count:
        _, message = conn.next(timeout_s=15)
        if message.get("method") == method:
            found.append(message["params"])
    return found


@pytest.mark.slow
def test_pressure_and_event_notifications_follow_the_levels(
    tmp_path: Path, fixture_tree: FixtureTree
) -> None:
    root = fixture_tree("jetson/orin-nano-jp6")
    meminfo = root / "proc/meminfo"
    config = tmp_path / "edged.toml"
    config.write_text(
        '[sampling]\ninterval = "100ms"\n'
        '[limits.memory]\nsoft = "3GiB"\nhard = "4GiB"\n'
        '[alerts]\nfor = "1s"\n'
    )
    daemon = start_daemon(
        tmp_path,
        "--config", str(config),
        "--root", str(root),
        "--dry-run",
        env={"STATE_DIRECTORY": str(tmp_path / "state")},
    )  # fmt: skip
    try:
        with ClientProcess(daemon.socket_path) as sub:
            assert sub.call("subscribe", {"topics": ["pressure", "events"]}) == {
                "topics": ["events", "pressure"]
            }
            pressure: list[dict[str, Any]] = []
            events: list[dict[str, Any]] = []

            def collect_until(level: str) -> None:
                """Read notifications until memory's pressure level is ``level``."""
                while not pressure or pressure[-1]["level"] != level:
                    _, message = sub.next(timeout_s=15)
                    if message.get("method") == "pressure":
                        assert message["params"]["resource"] == "memory", message
                        pressure.append(message["params"])
                    elif message.get("method") == "event":
                        events.append(message["params"])

            collect_until("ok")  # the starting point, right after the reply
            set_used(meminfo, 3.5)
            collect_until("moderate")  # at or above soft
            collect_until("warning")  # the warning alert fired after its second
            set_used(meminfo, 4.5)
            collect_until("critical")
            set_used(meminfo, 1.0)
            collect_until("ok")

            # one notification per transition, each with where it came from
            assert [(p["previous"], p["level"]) for p in pressure] == [
                (None, "ok"),
                ("ok", "moderate"),
                ("moderate", "warning"),
                ("warning", "critical"),
                ("critical", "ok"),
            ]
            # the alert events as they happened, in the shape `events` returns
            ring = daemon.call("events", {"since": 0})["events"]
            while len(events) < len(ring):
                events.extend(notifications(sub, "event", len(ring) - len(events)))
            assert events == ring
            assert [(e["reason"], e["status"]) for e in events] == [
                ("warning", "pending"),
                ("warning", "firing"),
                ("critical", "firing"),
                ("warning", "resolved"),
                ("critical", "resolved"),
            ]
            # a second subscriber is told the current level at once, and replaces its topics
            with ClientProcess(daemon.socket_path) as late:
                late.call("subscribe", {"topics": ["pressure"]})
                (first,) = notifications(late, "pressure", 1)
                assert first == {"resource": "memory", "level": "ok", "previous": None}
                assert late.call("subscribe", {"topics": []}) == {"topics": []}
                assert daemon.call("status")["subscriptions"]["pressure"] == 1
                bad = late.error("subscribe", {"topics": ["pressure", "gossip"]})
                assert bad["code"] == -32602
                assert "gossip" in bad["message"]
                assert bad["data"] == {"topics": ["pressure", "events", "snapshot"]}
                assert late.error("subscribe", {"topics": "events"})["code"] == -32602
        # subscriptions die with the connection
        wait_until(lambda: daemon.call("status")["subscriptions"]["pressure"] == 0, 5, "gone")
    finally:
        assert daemon.stop() == 0


def test_snapshots_every_tick_through_the_client_library(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, "--dry-run", "--interval", "0.1")
    try:
        with Client(daemon.socket_path) as client:
            got: list[Mapping[str, Any]] = []
            assert client.subscribe(["snapshot"], got.append) == ["snapshot"]
            while len(got) < 5:
                client.poll(5.0)
            shape = client.snapshot()
            assert shape is not None
            assert all(set(s) == set(shape) for s in got)
            assert all(s["readings"] for s in got)
            seqs = [s["seq"] for s in got[:5]]
            assert seqs == list(range(seqs[0], seqs[0] + 5))  # one per tick, none skipped
            with pytest.raises(ValueError, match="unknown topic"):
                client.subscribe(["nonsense"])
            with pytest.raises(InvalidParams):  # the daemon refuses what the library lets by
                client.call("subscribe", {"topics": ["nonsense"]})
            # the daemon restarts: the client reconnects and subscribes again
            assert daemon.stop() == 0
            daemon = start_daemon(tmp_path, "--dry-run", "--interval", "0.1")
            count = len(got)
            while len(got) < count + 3:
                client.poll(5.0)
            assert client.reconnects == 1
            assert client.subscribe([]) == []
    finally:
        assert daemon.stop() == 0


def test_a_subscriber_that_never_reads_is_bounded_and_stalls_nothing(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, "--dry-run", "--interval", "0.02")
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        silent.connect(str(daemon.socket_path))
        request = {"jsonrpc": "2.0", "id": 1, "method": "subscribe"}
        params = {"topics": ["snapshot", "events"]}
        silent.sendall(json.dumps({**request, "params": params}).encode() + b"\n")
        # and never reads: the kernel's buffer fills, then snapshots are skipped for it
        wait_until(
            lambda: daemon.call("status")["subscriptions"]["snapshots_skipped"] >= 20, 60, "skips"
        )
        before = daemon.call("status")
        wait_until(
            lambda: (
                daemon.call("status")["subscriptions"]["snapshots_skipped"]
                >= before["subscriptions"]["snapshots_skipped"] + 200
            ),
            60,
            "more skips",
        )
        after = daemon.call("status")
        # the ticks went on (each skip is a tick), and what waits for the silent reader in
        # the daemon (its connection's buffer, beyond the kernel's) stays under a snapshot
        assert after["ticks"] >= before["ticks"] + 200
        snapshot_bytes = len(json.dumps(daemon.call("snapshot")))
        assert after["subscriptions"]["pending_bytes"] <= 2 * snapshot_bytes
        assert after["subscriptions"]["snapshot"] == 1  # still subscribed, not cut off
        assert after["subscriptions"]["closed_slow"] == 0
        # and the daemon still answers a reading client at once
        with Client(daemon.socket_path) as other:
            got: list[Mapping[str, Any]] = []
            other.subscribe(["snapshot"], got.append)
            while len(got) < 3:
                other.poll(5.0)
    finally:
        silent.close()
        assert daemon.stop() == 0


def test_async_client_subscribes_and_switches_the_strategy(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, "--dry-run", "--interval", "0.1")

    async def scenario() -> None:
        async with AsyncClient(daemon.socket_path) as client:
            pushed: asyncio.Queue[Mapping[str, Any]] = asyncio.Queue()
            assert await client.subscribe(["events"], pushed.put_nowait) == ["events"]
            assert (await client.hello("async"))["strategy"] == "dynamic"
            switched = await client.set_strategy("predictive")
            assert switched == {"strategy": "predictive", "previous": "dynamic"}
            event = await asyncio.wait_for(pushed.get(), 10)
            assert event["action"] == "strategy"
            assert event["strategy"] == "predictive"
            assert event["reason"] == "set"
            assert event["detail"].startswith("dynamic -> predictive (strategy.set by uid")
            assert (await client.events())["events"] == [event]
            assert (await client.status())["strategy"] == "predictive"
            assert (await client.hello("async"))["strategy"] == "predictive"
            with pytest.raises(InvalidParams) as bad:
                await client.set_strategy("clairvoyant")
            assert bad.value.data == {"known": ["dynamic", "predictive", "adaptive", "cooperative"]}

    try:
        asyncio.run(scenario())
    finally:
        assert daemon.stop() == 0


# ---- strategy.set: authorization with a real second uid, and SIGHUP ----------------------


@pytest.fixture(scope="module")
def test_user() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("switching to a second uid needs root")
    try:
        return pwd.getpwnam(TEST_USER)
    except KeyError:
        pytest.skip(f"no user {TEST_USER} (tests/test_budget_e2e.py creates it)")


@pytest.fixture
def shared_daemon(tmp_path: Path) -> Iterator[tuple[RunningDaemon, Path]]:
    """A daemon whose socket the test user can reach (pytest's tmp dirs are 0700), with a
    config file naming ``dynamic``."""
    directory = Path(tempfile.mkdtemp(prefix="edged-strategy-"))
    directory.chmod(0o755)
    config = directory / "edged.toml"
    config.write_text('[strategy]\nname = "dynamic"\n')
    daemon = start_daemon(directory, "--config", str(config), "--dry-run", "--interval", "0.1")
    daemon.socket_path.chmod(0o666)  # it is created 0660 (group edged where it exists)
    try:
        yield daemon, config
    finally:
        assert daemon.stop() == 0
        with contextlib.suppress(OSError):
            shutil.rmtree(directory)


def user_python(user: str) -> tuple[list[str], dict[str, str]]:
    """A Python that ``user`` can run with edged importable: this interpreter where the user
    may reach it, else the system's ``python3`` of the same version given this checkout and
    the virtual environment's packages on PYTHONPATH (a venv under /root is out of reach).
    Skips when neither works."""
    import sysconfig

    env = dict(os.environ)
    candidates: list[tuple[list[str], dict[str, str]]] = [([sys.executable], env)]
    system = shutil.which("python3", path="/usr/bin:/bin")
    if system is not None:
        paths = [str(Path(__file__).resolve().parents[1]), sysconfig.get_paths()["purelib"]]
        candidates.append(([system], {**env, "PYTHONPATH": os.pathsep.join(paths)}))
    version = tuple(sys.version_info[:2])
    probe = f"import sys, edged.cli; sys.exit(sys.version_info[:2] != {version})"
    for argv, environ in candidates:
        with contextlib.suppress(OSError):
            ran = subprocess.run(
                [*argv, "-c", probe], env=environ, capture_output=True, check=False,
                timeout=30, cwd="/", **as_user(user),
            )  # fmt: skip
            if ran.returncode == 0:
                return argv, environ
    pytest.skip(f"no Python that {user} can run with edged importable")


def cli(
    daemon: RunningDaemon, *args: str, user: str | None = None
) -> subprocess.CompletedProcess[str]:
    argv, env = user_python(user) if user is not None else ([sys.executable], dict(os.environ))
    return subprocess.run(
        [*argv, "-m", "edged", *args, "--socket", str(daemon.socket_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=env,
        cwd="/",
        **as_user(user),
    )


@pytest.mark.root
def test_strategy_set_is_for_admins_and_a_reload_restores_the_file(
    test_user: pwd.struct_passwd, shared_daemon: tuple[RunningDaemon, Path]
) -> None:
    daemon, config = shared_daemon
    with (
        InTest(daemon.socket_path) as root,
        ClientProcess(daemon.socket_path, user=TEST_USER) as other,
    ):
        assert other.call("hello", {"client": "other", "protocol": 1})["peer"]["uid"] != 0
        denied = other.error("strategy.set", {"name": "adaptive"})
        assert denied["code"] == 1003
        assert root.call("status")["strategy"] == "dynamic"  # unchanged
        refused = cli(daemon, "strategy", "set", "adaptive", user=TEST_USER)
        assert refused.returncode == 4, refused
        assert "edged-admin" in refused.stderr

        assert root.error("strategy.set", {"name": "fastest"})["code"] == -32602
        assert root.call("strategy.set", {"name": "adaptive"}) == {
            "strategy": "adaptive",
            "previous": "dynamic",
        }
        assert other.call("status")["strategy"] == "adaptive"  # anyone may read it
        done = cli(daemon, "strategy", "set", "cooperative", "--json")
        assert done.returncode == 0, done
        assert json.loads(done.stdout) == {"strategy": "cooperative", "previous": "adaptive"}
        assert cli(daemon, "strategy", "set", "nonsense").returncode == 2  # usage

        # SIGHUP: the daemon matches its file again
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: root.call("status")["strategy"] == "dynamic", 10, "reloaded")
        switches = [
            (e["reason"], e["strategy"], e["detail"].split(" (")[0])
            for e in root.call("events", {"since": 0})["events"]
            if e["action"] == "strategy"
        ]
        assert switches == [
            ("set", "adaptive", "dynamic -> adaptive"),
            ("set", "cooperative", "adaptive -> cooperative"),
            ("reload", "dynamic", "cooperative -> dynamic"),
        ]
        # a reload of an unchanged file leaves the running strategy alone (no switch)
        ticks = root.call("status")["ticks"]
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: daemon.log().count("configuration reloaded") == 2, 10, "reload 2")
        wait_until(lambda: root.call("status")["ticks"] > ticks + 2, 10, "ticks")
        events = root.call("events", {"since": 0})["events"]
        assert [e["action"] for e in events].count("strategy") == 3
        # bad settings for the file's strategy: the reload is refused, nothing switches
        root.call("strategy.set", {"name": "adaptive"})
        config.write_text('[strategy]\nname = "dynamic"\n[strategy.dynamic]\nhold = 1\n')
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: "reload refused" in daemon.log(), 10, "refused")
        assert root.call("status")["strategy"] == "adaptive"


def test_events_follow_uses_subscribe_and_misses_nothing(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, "--dry-run", "--interval", "0.1")
    follower = None
    try:
        with Client(daemon.socket_path) as client:
            client.set_strategy("adaptive")  # seq 1, before following
        follower = subprocess.Popen(
            [sys.executable, "-m", "edged", "events", "--follow", "--json", "--socket",
             str(daemon.socket_path)],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert follower.stdout is not None
        first = json.loads(follower.stdout.readline())
        assert (first["seq"], first["strategy"]) == (1, "adaptive")
        wait_until(lambda: daemon.call("status")["subscriptions"]["events"] == 1, 10, "follows")
        with Client(daemon.socket_path) as client:
            client.set_strategy("dynamic")  # pushed, not polled
        second = json.loads(follower.stdout.readline())
        assert (second["seq"], second["strategy"]) == (2, "dynamic")
        assert daemon.stop() == 0
        assert follower.wait(timeout=10) == 3  # the daemon went away
    finally:
        if follower is not None and follower.poll() is None:
            follower.kill()
            follower.wait()
        if follower is not None and follower.stdout is not None:
            follower.stdout.close()
        daemon.stop()
    done = subprocess.run(
        [sys.executable, "-m", "edged", "events", "--follow", "--socket", str(daemon.socket_path)],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 3  # not running
