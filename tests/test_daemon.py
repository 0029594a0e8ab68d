"""`edged run` as a real process: cadence, reload, sensor faults, protocol errors, shutdown."""

from __future__ import annotations

import itertools
import signal
import socket
import statistics
import time
from pathlib import Path

import pytest

from tests.conftest import FixtureTree
from tests.daemon_util import start_daemon


def wait_for(predicate: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_fast_cadence_holds_its_phase_and_history_has_it(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, "--interval", "0.1")
    try:
        time.sleep(3.0)
        history = daemon.call("history", {"window": 60})
        times = history["time"]
        assert len(times) >= 20
        intervals = [b - a for a, b in itertools.pairwise(times)]
        assert statistics.median(intervals) == pytest.approx(0.1, abs=0.01)
        # no drift: tick n sits at start + n * interval (deadlines are absolute), give or take
        # one scheduling delay; skipped deadlines (overload) only ever add whole intervals
        phase_errors = [((t - times[0]) / 0.1) % 1.0 for t in times]
        assert all(e < 0.3 or e > 0.7 for e in phase_errors)
        names = {s["metric"] for s in history["series"]}
        assert {"system.memory.limit", "system.cpu.time"} <= names
        assert daemon.call("snapshot")["seq"] >= len(times) - 1
    finally:
        assert daemon.stop() == 0
    assert not daemon.socket_path.exists()  # its own socket file is removed on exit


def test_sighup_keeps_the_old_config_when_the_new_one_is_bad(tmp_path: Path) -> None:
    config = tmp_path / "edged.toml"
    config.write_text("[sampling]\ninterval = 0.2\n")
    daemon = start_daemon(tmp_path, "--config", str(config))
    try:
        config.write_text("[sampling]\ninterval = 0.2\nbogus = 1\n")
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in daemon.log())
        assert "sampling.bogus" in daemon.log()
        assert daemon.call("status")["interval_s"] == 0.2
        config.write_text("[sampling]\ninterval = 0.1\n")
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: daemon.call("status")["interval_s"] == 0.1)
        ticks = daemon.call("status")["ticks"]
        time.sleep(1.0)
        assert daemon.call("status")["ticks"] - ticks >= 7  # the new cadence is in force
    finally:
        assert daemon.stop() == 0


def test_a_sensor_that_breaks_and_recovers_at_runtime(
    tmp_path: Path, fixture_tree: FixtureTree
) -> None:
    root = fixture_tree("jetson/orin-nano-jp6")
    meminfo = root / "proc/meminfo"
    good = meminfo.read_bytes()
    daemon = start_daemon(tmp_path, "--root", str(root), "--interval", "0.1")

    def memory_status() -> str:
        sources = {s["name"]: s["status"] for s in daemon.call("status")["sources"]}
        return str(sources["memory"])

    try:
        assert memory_status() == "ok"
        meminfo.write_bytes(b"MemTotal: garbage kB\n")
        wait_for(lambda: memory_status() == "error")
        ticks = daemon.call("status")["ticks"]
        time.sleep(0.5)
        assert daemon.call("status")["ticks"] > ticks  # the loop keeps its schedule
        meminfo.write_bytes(good)
        wait_for(lambda: memory_status() == "ok")
        assert "sensor memory unavailable" in daemon.log()
        assert "sensor memory recovered" in daemon.log()
    finally:
        assert daemon.stop() == 0


def test_bad_lines_do_not_disturb_other_clients(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path)
    try:
        with socket.socket(socket.AF_UNIX) as bystander, socket.socket(socket.AF_UNIX) as rude:
            bystander.connect(str(daemon.socket_path))
            rude.connect(str(daemon.socket_path))
            rude.sendall(b"\x00\xff not json\n")
            reply = rude.makefile("rb").readline()
            assert b'"id":null' in reply
            assert b"-32700" in reply
            rude.sendall(b'{"jsonrpc":"2.0","id":7,"method":"status","params":[1]}\n')
            assert b"-32602" in rude.makefile("rb").readline()
            rude.sendall(b"x" * (70 * 1024) + b"\n")  # over the 64 KiB line limit
            rest = rude.makefile("rb").read()  # an error reply, then the server closes
            assert b"longer than" in rest
            bystander.sendall(
                b'{"jsonrpc":"2.0","id":1,"method":"hello","params":{"client":"b","protocol":1}}\n'
            )
            assert b'"protocol":1' in bystander.makefile("rb").readline()
        assert daemon.call("status")["ticks"] > 0
    finally:
        assert daemon.stop() == 0


def test_stale_socket_is_replaced_and_a_live_one_is_not_stolen(tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "edged.sock"))  # bound, never listening: a crashed daemon's
    stale.close()
    daemon = start_daemon(tmp_path)
    try:
        second = tmp_path / "second"
        second.mkdir()
        import subprocess
        import sys

        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "edged",
                "run",
                "--prometheus",
                "off",
                "--socket",
                str(daemon.socket_path),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 1
        assert "another daemon is listening" in result.stderr
        assert daemon.call("status")["ticks"] > 0  # the first one is untouched
    finally:
        assert daemon.stop() == 0


def test_status_cli_against_the_daemon_and_without_it(tmp_path: Path) -> None:
    import subprocess
    import sys

    daemon = start_daemon(tmp_path)
    try:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "edged",
                "status",
                "--socket",
                str(daemon.socket_path),
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert '"health": "ok"' in out
    finally:
        assert daemon.stop() == 0
    result = subprocess.run(
        [sys.executable, "-m", "edged", "status", "--socket", str(daemon.socket_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 3
    assert "not running" in result.stderr


def test_a_busy_prometheus_port_is_a_bad_config_exit_6(tmp_path: Path) -> None:
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "edged",
                "run",
                "--socket",
                str(tmp_path / "s.sock"),
                "--prometheus",
                f"127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 6, result.stderr
    assert "bad configuration" in result.stderr
    assert not (tmp_path / "s.sock").exists()


def test_a_second_daemon_on_the_same_state_only_observes(tmp_path: Path) -> None:
    """Two enforcing daemons would undo each other's work at every start and exit."""
    env = {"STATE_DIRECTORY": str(tmp_path / "state")}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = start_daemon(tmp_path / "a", env=env)
    try:
        second = start_daemon(tmp_path / "b", env=env)
        try:
            assert "only observes" in second.log()
            assert "only observes" not in first.log()
        finally:
            assert second.stop() == 0
    finally:
        assert first.stop() == 0
