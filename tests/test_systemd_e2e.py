"""The real daemon under systemd's protocols, without systemd.

- sd_notify: the test binds the datagram socket systemd would and passes it as NOTIFY_SOCKET,
  with WATCHDOG_USEC, then watches `edged run` report READY=1, WATCHDOG=1 at the promised pace,
  RELOADING=1/READY=1 around SIGHUP, and STOPPING=1 on SIGTERM.
- socket activation: `systemd-socket-activate` (from the systemd package) holds the listening
  socket, starts edged on the first connection and passes the socket as LISTEN_FDS, exactly as
  edged.socket does; the first client gets a JSON-RPC answer on that connection.

Every process is started here, stopped by its pid in a `finally`, and every wait has a deadline.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO, require
from tests.test_systemd_units import service_capabilities, setpriv_caps

STARTUP_S = 30.0  # imports + first tick on a slow CI box
STOP_S = 15.0
MEMORY_HIGH_BYTES = 128 * 1024 * 1024  # MemoryHigh= in systemd/edged.service


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Unix socket paths must fit in 107 bytes; pytest's tmp_path may not."""
    with tempfile.TemporaryDirectory(prefix="edged-", dir="/tmp") as d:
        yield Path(d)


def daemon_env(**extra: str) -> dict[str, str]:
    """A clean environment: nothing from the caller's systemd, edged or OTel settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_", "EDGED_", "OTEL_"))
    }
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def edged_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "edged", "run", "--interval", "0.2", "--prometheus", "off", *args]


@dataclass
class Datagram:
    at_s: float
    text: str

    @property
    def fields(self) -> dict[str, str]:
        return dict(line.partition("=")[::2] for line in self.text.split("\n") if line)


@dataclass
class NotifySocket:
    """The datagram socket systemd would own; records what arrives with a monotonic stamp."""

    path: Path
    sock: socket.socket
    received: list[Datagram] = field(default_factory=list)

    def wait_for(self, key: str, value: str, deadline_s: float) -> Datagram:
        """Receive until a datagram sets key=value; fails at the deadline (absolute, monotonic)."""
        while True:
            for d in self.received:
                if d.fields.get(key) == value:
                    self.received.remove(d)
                    return d
            remaining = deadline_s - time.monotonic()
            if remaining <= 0:
                seen = [d.text for d in self.received]
                raise AssertionError(f"no {key}={value} before the deadline; got {seen}")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            self.received.append(Datagram(time.monotonic(), data.decode()))

    def drain_for(self, seconds: float) -> list[Datagram]:
        """Everything that arrives within the next ``seconds`` (plus what is already here)."""
        end = time.monotonic() + seconds
        while (remaining := end - time.monotonic()) > 0:
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            self.received.append(Datagram(time.monotonic(), data.decode()))
        out, self.received = self.received, []
        return out


@pytest.fixture
def notify_socket(short_dir: Path) -> Iterator[NotifySocket]:
    path = short_dir / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        yield NotifySocket(path, sock)


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    """Signal the process by pid and wait for it; SIGKILL if it outlives STOP_S."""
    if proc.poll() is None:
        os.kill(proc.pid, sig)
    try:
        return proc.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_S)
        raise


# linux/capability.h numbers of the capabilities edged.service keeps.
CAP_NUMBERS = {
    "CAP_KILL": 5,
    "CAP_IPC_LOCK": 14,
    "CAP_SYS_PTRACE": 19,
    "CAP_SYS_NICE": 23,
    "CAP_SYS_RESOURCE": 24,
}


def cap_bounding(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("CapBnd:")[1].split()[0], 16)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.mark.slow
def test_notify_ready_watchdog_stopping(notify_socket: NotifySocket, short_dir: Path) -> None:
    sock_path = short_dir / "edged.sock"
    log_path = short_dir / "edged.log"
    env = daemon_env(NOTIFY_SOCKET=str(notify_socket.path), WATCHDOG_USEC="1000000")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            edged_cmd("--socket", str(sock_path)),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        ready = notify_socket.wait_for("READY", "1", time.monotonic() + STARTUP_S)
        assert "sampling every 0.2s" in ready.fields.get("STATUS", ""), ready.text
        assert sock_path.exists()  # READY=1 means the socket is already served
        # WATCHDOG_USEC=1s: at least one ping per half second, never faster than the rate limit.
        datagrams = notify_socket.drain_for(3.0)
        pings = [d for d in datagrams if d.text == "WATCHDOG=1"]
        assert len(pings) >= 4, [d.text for d in datagrams]
        gaps = [b.at_s - a.at_s for a, b in itertools.pairwise(pings)]
        assert min(gaps) >= 0.4, gaps  # rate-limited to interval/2, not one per 0.2 s tick
        assert max(gaps) <= 1.0, gaps  # and well inside WatchdogSec
        assert rss_bytes(proc.pid) < MEMORY_HIGH_BYTES
        assert proc.poll() is None
        assert stop(proc) == 0
        notify_socket.wait_for("STOPPING", "1", time.monotonic() + STOP_S)
        assert not sock_path.exists()  # a socket edged bound itself is removed
    finally:
        if proc.poll() is None:
            stop(proc, signal.SIGKILL)
    log_text = log_path.read_text(errors="replace")
    assert "Traceback" not in log_text, log_text
    assert "sd_notify to" not in log_text, log_text  # no notify failure was logged


@pytest.mark.slow
def test_reload_reports_reloading_then_ready(notify_socket: NotifySocket, short_dir: Path) -> None:
    env = daemon_env(NOTIFY_SOCKET=str(notify_socket.path))
    proc = subprocess.Popen(
        edged_cmd("--socket", str(short_dir / "edged.sock")),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        notify_socket.wait_for("READY", "1", time.monotonic() + STARTUP_S)
        before_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        os.kill(proc.pid, signal.SIGHUP)
        reloading = notify_socket.wait_for("RELOADING", "1", time.monotonic() + STOP_S)
        # systemd (>= 253) orders the reload by this stamp: CLOCK_MONOTONIC, microseconds.
        stamp_us = int(reloading.fields["MONOTONIC_USEC"])
        assert before_us <= stamp_us <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notify_socket.wait_for("READY", "1", time.monotonic() + STOP_S)
        assert stop(proc) == 0
    finally:
        if proc.poll() is None:
            stop(proc, signal.SIGKILL)


def _connect_with_deadline(path: Path, deadline_s: float) -> socket.socket:
    """Connect once the activator has bound ``path``."""
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline_s:
                raise
            time.sleep(0.05)


@pytest.mark.slow
def test_socket_activation_serves_first_client(
    notify_socket: NotifySocket, short_dir: Path
) -> None:
    activate = require("systemd-socket-activate")
    sock_path = short_dir / "edged.sock"
    log_path = short_dir / "edged.log"
    env = daemon_env(NOTIFY_SOCKET=str(notify_socket.path))
    # Without --accept, systemd-socket-activate waits for the first connection, then execs edged
    # with the listening socket as fd 3 (LISTEN_FDS=1, LISTEN_PID = the exec'd pid), as
    # edged.socket + edged.service do. It passes on only PATH, TERM and the `-E` variables.
    cmd = [activate, "-l", str(sock_path), "--fdname=edged.socket"]
    cmd += ["-E", "NOTIFY_SOCKET", "-E", "PYTHONPATH"]
    # Were activation ignored, edged would bind --socket instead: somewhere harmless, checked below.
    fallback = short_dir / "not-activated.sock"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*cmd, "--", *edged_cmd("--socket", str(fallback))],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline_s = time.monotonic() + STARTUP_S
        client = _connect_with_deadline(sock_path, deadline_s)
        with client:
            client.settimeout(STARTUP_S)
            hello = {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "hello",
                "params": {"client": "t", "protocol": 1},
            }
            client.sendall(json.dumps(hello).encode() + b"\n")
            line = client.makefile("rb").readline()
        reply = json.loads(line)
        assert reply["jsonrpc"] == "2.0"
        assert reply["id"] == 1
        assert "error" not in reply, reply
        assert reply["result"]["protocol"] == 1
        assert reply["result"]["peer"]["pid"] == os.getpid()
        notify_socket.wait_for("READY", "1", deadline_s)
        assert stop(proc) == 0
        notify_socket.wait_for("STOPPING", "1", time.monotonic() + STOP_S)
    finally:
        if proc.poll() is None:
            stop(proc, signal.SIGKILL)
    log_text = log_path.read_text(errors="replace")
    assert "Traceback" not in log_text, log_text
    assert not fallback.exists()
    # edged must not unlink a socket it was given: under systemd the path belongs to
    # edged.socket, and removing it would break activation until the socket unit restarts.
    assert sock_path.exists()


@pytest.mark.root
@pytest.mark.slow
def test_daemon_runs_with_the_units_capabilities(
    notify_socket: NotifySocket, short_dir: Path
) -> None:
    """edged.service leaves root only CapabilityBoundingSet= and no-new-privs; the daemon must
    start, serve and stop cleanly with exactly that (setpriv sets it up the same way)."""
    sock_path = short_dir / "edged.sock"
    log_path = short_dir / "edged.log"
    env = daemon_env(NOTIFY_SOCKET=str(notify_socket.path), WATCHDOG_USEC="1000000")
    cmd = [*setpriv_caps(service_capabilities()), *edged_cmd("--socket", str(sock_path))]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        notify_socket.wait_for("READY", "1", time.monotonic() + STARTUP_S)
        notify_socket.wait_for("WATCHDOG", "1", time.monotonic() + STOP_S)
        # Really restricted: the unit's set, less what this machine does not grant us at all.
        wanted = sum(1 << CAP_NUMBERS[c] for c in service_capabilities())
        assert cap_bounding(proc.pid) == wanted & cap_bounding(os.getpid())
        if cap_bounding(os.getpid()) >> CAP_NUMBERS["CAP_IPC_LOCK"] & 1:
            # CAP_IPC_LOCK is what lets it lock its pages (mlockall; see edged.memlock)
            vm_lck = Path(f"/proc/{proc.pid}/status").read_text().split("VmLck:")[1].split()[0]
            assert int(vm_lck) > 0
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(STOP_S)
            client.connect(str(sock_path))
            hello = {"jsonrpc": "2.0", "id": 7, "method": "hello", "params": {"protocol": 1}}
            client.sendall(json.dumps(hello).encode() + b"\n")
            reply = json.loads(client.makefile("rb").readline())
        assert reply["result"]["protocol"] == 1, reply
        assert stop(proc) == 0
        notify_socket.wait_for("STOPPING", "1", time.monotonic() + STOP_S)
    finally:
        if proc.poll() is None:
            stop(proc, signal.SIGKILL)
    log_text = log_path.read_text(errors="replace")
    assert "Traceback" not in log_text, log_text
