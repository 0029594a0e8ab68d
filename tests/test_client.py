"""edged.client against a real ``edged run`` (tests/daemon_util.py): the read-only methods,
typed errors, reconnecting after the daemon restarts, DaemonUnavailable; and ``edged history``
and ``edged top`` as subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edged.client import (
    AsyncClient,
    Client,
    DaemonUnavailable,
    InsufficientResources,
    InvalidParams,
    MethodNotFound,
    socket_path,
)
from tests.daemon_util import RunningDaemon, start_daemon


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[RunningDaemon]:
    running = start_daemon(tmp_path, "--interval", "0.1")
    try:
        yield running
    finally:
        assert running.stop() == 0


def test_read_only_methods(daemon: RunningDaemon) -> None:
    with Client(daemon.socket_path) as client:
        hello = client.hello("pytest")
        assert hello["server"].startswith("edged ")
        assert hello["protocol"] == 1
        assert "history" in hello["capabilities"]
        assert hello["peer"]["uid"] >= 0
        status = client.status()
        assert status["health"] == "ok"
        assert status["clients"] >= 1
        snap = client.snapshot()
        assert snap is not None
        assert {r["metric"] for r in snap["readings"]} >= {"system.memory.limit"}
        time.sleep(0.5)
        history = client.history(window_s=0.45, resources=["system.memory.limit"])
        assert 2 <= len(history["time"]) <= 6  # 0.45 s of 0.1 s ticks
        assert [s["metric"] for s in history["series"]] == ["system.memory.limit"]
        assert client.events(since=0) == {"events": [], "last": 0}


def test_errors_are_typed_and_the_connection_survives_them(daemon: RunningDaemon) -> None:
    with Client(daemon.socket_path) as client:
        with pytest.raises(MethodNotFound) as info:
            client.call("budget.borrow", {"resources": {"memory": 1}})
        assert info.value.code == -32601
        assert "budget.borrow" in info.value.message
        with pytest.raises(InsufficientResources) as short:
            client.call("budget.request", {"resources": {"memory": 2**50}})
        assert short.value.available["memory"] > 0
        with pytest.raises(InvalidParams):
            client.events(since=-1)
        with pytest.raises(InvalidParams, match="unsupported protocol"):
            client.call("hello", {"client": "x", "protocol": 99})
        assert client.status()["ticks"] > 0
        assert client.reconnects == 0


def test_reconnects_after_the_daemon_restarts(tmp_path: Path) -> None:
    first = start_daemon(tmp_path, "--interval", "0.1")
    client = Client(first.socket_path, reconnect_timeout_s=20)
    try:
        client.hello("survivor")
        before = client.status()["uptime_s"]
        assert first.stop() == 0
        second = start_daemon(tmp_path, "--interval", "0.1")
        try:
            status = client.status()  # the old connection is dead; this one is new
            assert client.reconnects == 1
            assert status["uptime_s"] < before + 30
            assert second.proc.pid != first.proc.pid
            assert client.hello("survivor")["peer"]["pid"] > 0
        finally:
            assert second.stop() == 0
    finally:
        client.close()


def test_reconnect_waits_with_backoff_for_a_daemon_that_comes_back(tmp_path: Path) -> None:
    first = start_daemon(tmp_path, "--interval", "0.1")
    client = Client(first.socket_path, reconnect_timeout_s=20)
    try:
        assert first.stop() == 0
        restarted: list[RunningDaemon] = []

        def restart_later() -> None:
            time.sleep(0.5)
            restarted.append(start_daemon(tmp_path, "--interval", "0.1"))

        thread = threading.Thread(target=restart_later)
        thread.start()
        try:
            started = time.monotonic()
            assert client.status()["ticks"] >= 1  # blocks while the daemon is down
            assert time.monotonic() - started >= 0.5
            assert client.reconnects == 1
        finally:
            thread.join()
            for d in restarted:
                assert d.stop() == 0
    finally:
        client.close()


def test_daemon_unavailable(tmp_path: Path) -> None:
    missing = tmp_path / "nobody-here.sock"
    with pytest.raises(DaemonUnavailable, match="not running") as info:
        Client(missing)
    assert info.value.path == str(missing)
    assert info.value.code is None
    # a daemon that goes away and stays away: bounded backoff, then DaemonUnavailable
    daemon = start_daemon(tmp_path)
    client = Client(daemon.socket_path, reconnect_timeout_s=0.5)
    assert daemon.stop() == 0
    started = time.monotonic()
    with pytest.raises(DaemonUnavailable):
        client.status()
    assert 0.4 <= time.monotonic() - started < 5
    client.close()


def test_socket_path_from_environment(
    daemon: RunningDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGED_SOCKET", str(daemon.socket_path))
    assert socket_path() == str(daemon.socket_path)
    with Client() as client:
        assert client.status()["health"] == "ok"
    monkeypatch.delenv("EDGED_SOCKET")
    monkeypatch.setenv("EDGED_SERVER_SOCKET", "/srv/edged.sock")  # what `edged run` serves
    assert socket_path() == "/srv/edged.sock"
    monkeypatch.delenv("EDGED_SERVER_SOCKET")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/4242")
    expected = "/run/edged/edged.sock" if os.geteuid() == 0 else "/run/user/4242/edged.sock"
    assert socket_path() == expected


def test_async_client_against_the_daemon_and_its_restart(tmp_path: Path) -> None:
    first = start_daemon(tmp_path, "--interval", "0.1")
    second: list[RunningDaemon] = []

    async def scenario() -> None:
        async with AsyncClient(first.socket_path, reconnect_timeout_s=20) as client:
            hello = await client.hello("async")
            assert hello["protocol"] == 1
            results = await asyncio.gather(client.status(), client.snapshot(), client.events())
            assert results[0]["health"] == "ok"
            assert results[1] is not None
            assert results[2]["last"] == 0
            assert len((await client.history(window_s=60))["time"]) >= 1
            with pytest.raises(MethodNotFound):
                await client.call("no.such.method", {})
            assert first.stop() == 0
            second.append(start_daemon(tmp_path, "--interval", "0.1"))
            assert (await client.status())["ticks"] >= 1
            assert client.reconnects == 1
        with pytest.raises(DaemonUnavailable):
            await AsyncClient(tmp_path / "absent.sock").connect()

    try:
        asyncio.run(scenario())
    finally:
        if first.proc.poll() is None:
            first.stop()
        for d in second:
            assert d.stop() == 0


# ---- edged history / edged top ----------------------------------------------------------


def edged(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edged", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_history_cli_json_and_table(daemon: RunningDaemon, tmp_path: Path) -> None:
    time.sleep(0.5)
    out = edged("history", "--socket", str(daemon.socket_path), "--window", "0.45", "--json")
    assert out.returncode == 0, out.stderr
    saved = tmp_path / "history.json"
    saved.write_text(out.stdout)
    history = json.loads(saved.read_text())
    assert 2 <= len(history["time"]) <= 6  # 0.45 s of 0.1 s ticks
    limit = next(s for s in history["series"] if s["metric"] == "system.memory.limit")
    assert len(limit["values"]) == len(history["time"])
    table = edged("history", "--socket", str(daemon.socket_path), "--window", "0.45")
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["time", "mem", "used"]
    assert 3 <= len(lines) <= 7  # a header and one line per sample
    used_gib = float(lines[1].split()[1])
    assert 0 < used_gib < limit["values"][0] / 2**30
    assert edged("history", "--socket", str(daemon.socket_path), "--window", "0").returncode == 2


def test_top_cli_once(daemon: RunningDaemon) -> None:
    out = edged("top", "--socket", str(daemon.socket_path), "--once")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("edged ")
    assert "health ok" in out.stdout
    assert "GiB used of" in out.stdout
    assert "\x1b[" not in out.stdout  # one frame, no screen clearing
    frame = edged("top", "--socket", str(daemon.socket_path), "--once", "--json")
    assert frame.returncode == 0
    data = json.loads(frame.stdout)
    assert data["status"]["health"] == "ok"
    assert data["snapshot"]["seq"] >= 1


def run_on_a_terminal(*args: str) -> tuple[int, str]:
    """``edged ARGS`` with stdout on a pseudo-terminal (so rich renders); (exit code, output)."""
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "120", "LINES": "40", "TERM": "xterm", "LANG": "C.UTF-8"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edged", *args], stdout=slave, stderr=slave, env=env
    )
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
        code = proc.wait(timeout=30)
    return code, b"".join(chunks).decode(errors="replace")


def test_top_lists_processes_as_a_table_and_uses_rich_on_a_terminal(tmp_path: Path) -> None:
    pytest.importorskip("rich")
    config = tmp_path / "edged.toml"
    config.write_text('[sampling]\ninterval = 0.2\nprocesses = "all"\n')
    daemon = start_daemon(tmp_path, "--config", str(config))
    try:
        time.sleep(0.5)  # a second tick: CPU utilization needs two reads
        plain = edged("top", "--socket", str(daemon.socket_path), "--once")
        assert plain.returncode == 0, plain.stderr
        header = next(line for line in plain.stdout.splitlines() if "RSS MiB" in line)
        assert header.split() == ["PID", "RSS", "MiB", "CPU", "%", "CLASS", "NAME"]
        rows = plain.stdout.split(header, 1)[1].strip().splitlines()
        assert 1 <= len(rows) <= 15
        assert str(daemon.proc.pid) in {row.split()[0] for row in rows} or len(rows) == 15
        code, screen = run_on_a_terminal("top", "--socket", str(daemon.socket_path), "--once")
        assert code == 0, screen
        assert "health ok" in screen
        assert "└───" in screen  # a rich table's border, not the plain columns
        assert "PID" in screen
        code, screen = run_on_a_terminal(
            "top", "--socket", str(daemon.socket_path), "--once", "--plain"
        )
        assert code == 0
        assert "└" not in screen
        assert "RSS MiB" in screen
    finally:
        assert daemon.stop() == 0


def test_top_and_history_without_a_daemon_exit_3(tmp_path: Path) -> None:
    for command in ("top", "history"):
        out = edged(command, "--socket", str(tmp_path / "absent.sock"), "--json")
        assert out.returncode == 3
        assert "not running" in out.stderr


def test_budget_cli_against_the_daemon(daemon: RunningDaemon) -> None:
    """``edged budget`` on the real daemon's ledger: a request runs its command under the lease,
    which is gone once the command exits; a refusal says what is available (exit 1)."""
    sock = str(daemon.socket_path)
    held = edged(
        "budget", "request", "--socket", sock, "--cpu", "0.1", "--json", "--",
        sys.executable, "-c", "print('working')",
    )  # fmt: skip
    assert held.returncode == 0, held.stderr
    assert held.stdout.strip() == "working"
    assert json.loads(held.stderr.splitlines()[0])["granted"] == {"cpu": 0.1}
    listed = edged("budget", "list", "--socket", sock, "--json")
    assert listed.returncode == 0
    assert json.loads(listed.stdout)["leases"] == []  # released with the connection
    refused = edged("budget", "request", "--socket", sock, "--memory", "1000000GiB")
    assert refused.returncode == 1
    assert "available now" in refused.stderr


def test_client_variables_do_not_break_the_daemon_s_configuration(daemon: RunningDaemon) -> None:
    """EDGED_SOCKET (and EDGED_LOG_LEVEL) exported in a shell are for the clients, not config
    keys: `edged check-config` accepts them, and `edged status` follows EDGED_SOCKET."""
    env = {
        **os.environ,
        "EDGED_SOCKET": str(daemon.socket_path),
        "EDGED_LOG_LEVEL": "debug",
    }
    check = subprocess.run(
        [sys.executable, "-m", "edged", "check-config", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=env,
    )
    assert check.returncode == 0, check.stderr
    status = subprocess.run(
        [sys.executable, "-m", "edged", "status", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=env,
    )
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["health"] == "ok"


def test_live_top_rides_out_a_daemon_restart(tmp_path: Path) -> None:
    first = start_daemon(tmp_path, "--interval", "0.1")
    top = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edged",
            "top",
            "--socket",
            str(first.socket_path),
            "--json",
            "--interval",
            "0.2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    second: RunningDaemon | None = None
    try:
        assert top.stdout is not None
        uptimes = [json.loads(top.stdout.readline())["status"]["uptime_s"] for _ in range(2)]
        assert first.stop() == 0
        second = start_daemon(tmp_path, "--interval", "0.1")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            uptime = json.loads(top.stdout.readline())["status"]["uptime_s"]
            if uptime < uptimes[-1]:
                break  # a frame from the new daemon
            uptimes.append(uptime)
        else:
            raise AssertionError("edged top showed no frame from the restarted daemon")
        assert top.poll() is None  # still running
    finally:
        top.kill()
        top.communicate()  # reaps it and closes its pipes
        if second is not None:
            assert second.stop() == 0
        if first.proc.poll() is None:
            first.stop()
