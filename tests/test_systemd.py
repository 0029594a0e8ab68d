"""sd_notify, the watchdog variables and socket activation, against real sockets.

The notify tests bind an AF_UNIX datagram socket (a path, and an abstract name) and assert the
exact datagrams. The socket-activation tests run a child that is set up the way systemd sets up
a service: the sockets moved to fd 3, 4, ..., ``LISTEN_PID`` its own pid (set after fork, right
before exec), then exec of the code under test.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edged import systemd
from edged.systemd import Notifier, listen_fds, notify, notify_address, watchdog_interval_s

REPO = Path(__file__).resolve().parent.parent
DEADLINE_S = 20.0


@dataclass
class NotifyServer:
    """A bound datagram socket standing in for systemd's notify socket."""

    sock: socket.socket
    env_value: str

    @property
    def environ(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.env_value}

    def recv(self, timeout_s: float = 2.0) -> bytes:
        self.sock.settimeout(timeout_s)
        return self.sock.recv(65536)

    def pending(self) -> list[bytes]:
        """Every datagram already queued, without waiting."""
        out: list[bytes] = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(65536))
        except BlockingIOError:
            return out
        finally:
            self.sock.setblocking(True)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: sun_path holds 107 bytes, pytest's tmp_path can be long."""
    with tempfile.TemporaryDirectory(prefix="edged-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
def path_server(short_dir: Path) -> Iterator[NotifyServer]:
    path = short_dir / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        yield NotifyServer(sock, str(path))


@pytest.fixture
def abstract_server() -> Iterator[NotifyServer]:
    name = f"edged-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        yield NotifyServer(sock, "@" + name)


@pytest.fixture(params=["path", "abstract"])
def server(request: pytest.FixtureRequest, short_dir: Path) -> Iterator[NotifyServer]:
    if request.param == "path":
        yield request.getfixturevalue("path_server")
    else:
        yield request.getfixturevalue("abstract_server")


@pytest.fixture(autouse=True)
def _forget_reported() -> None:
    """The module logs each failure kind once per process; tests must not see each other's."""
    systemd._reported.clear()


# ---- notify() -----------------------------------------------------------------------------


def test_notify_without_socket_is_false() -> None:
    assert notify("READY=1", environ={}) is False
    assert notify("READY=1", environ={"NOTIFY_SOCKET": ""}) is False


def test_notify_sends_exact_datagram(server: NotifyServer) -> None:
    assert notify("READY=1\nSTATUS=up", environ=server.environ) is True
    assert server.recv() == b"READY=1\nSTATUS=up"


def test_notify_encodes_utf8(server: NotifyServer) -> None:
    assert notify("STATUS=température 42 °C", environ=server.environ) is True
    assert server.recv() == "STATUS=température 42 °C".encode()


def test_notify_address_forms() -> None:
    assert notify_address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == "/run/systemd/notify"
    assert notify_address({"NOTIFY_SOCKET": "@abc"}) == "\0abc"
    assert notify_address({}) is None


@pytest.mark.parametrize("value", ["relative/path", "@", "vsock:2:1234"])
def test_notify_rejects_unusable_address(value: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="edged.systemd"):
        assert notify("READY=1", environ={"NOTIFY_SOCKET": value}) is False
    assert any(r.levelno == logging.WARNING for r in caplog.records)


def test_notify_missing_path_is_logged_once(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = {"NOTIFY_SOCKET": str(short_dir / "gone")}
    with caplog.at_level(logging.DEBUG, logger="edged.systemd"):
        assert notify("WATCHDOG=1", environ=env) is False
        assert notify("WATCHDOG=1", environ=env) is False
        assert notify("WATCHDOG=1", environ=env) is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    debugs = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(warnings) == 1
    assert "No such file" in warnings[0].getMessage()
    assert len(debugs) == 2


def test_notify_refused_when_nobody_listens(short_dir: Path) -> None:
    path = short_dir / "closed"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
    # The path still exists but nothing is bound to it any more: ECONNREFUSED, not raised.
    assert path.exists()
    assert notify("READY=1", environ={"NOTIFY_SOCKET": str(path)}) is False
    assert (str(path), errno.ECONNREFUSED) in systemd._reported


def test_notify_abstract_without_listener() -> None:
    env = {"NOTIFY_SOCKET": f"@edged-nobody-{uuid.uuid4().hex}"}
    assert notify("READY=1", environ=env) is False


# ---- watchdog_interval_s() ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "1500"}, 0.0015),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": ""}, 1.0),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval_s(environ) == expected


def test_watchdog_interval_for_our_pid() -> None:
    env = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval_s(env) == 2.0


# ---- Notifier ------------------------------------------------------------------------------


def test_notifier_messages(server: NotifyServer) -> None:
    with Notifier(server.environ) as n:
        assert n.enabled
        assert n.ready("up, 5 sources") is True
        assert n.status("sampling") is True
        assert n.stopping() is True
        assert n.stopping("restoring 2 throttles") is True
        assert n.extend_timeout(12.5) is True
        assert n.send("ERRNO=5") is True
    assert [server.recv() for _ in range(6)] == [
        b"READY=1\nSTATUS=up, 5 sources",
        b"STATUS=sampling",
        b"STOPPING=1",
        b"STOPPING=1\nSTATUS=restoring 2 throttles",
        b"EXTEND_TIMEOUT_USEC=12500000",
        b"ERRNO=5",
    ]


def test_notifier_ready_without_status(path_server: NotifyServer) -> None:
    with Notifier(path_server.environ) as n:
        assert n.ready() is True
    assert path_server.recv() == b"READY=1"


def test_notifier_status_cannot_inject_assignments(path_server: NotifyServer) -> None:
    with Notifier(path_server.environ) as n:
        assert n.status("a\nREADY=1\r\nb") is True
    assert path_server.recv() == b"STATUS=a READY=1 b"


def test_notifier_reloading_carries_monotonic_usec(path_server: NotifyServer) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    with Notifier(path_server.environ) as n:
        assert n.reloading("reloading configuration") is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = path_server.recv().decode().split("\n")
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert lines[2] == "STATUS=reloading configuration"


def test_notifier_watchdog_rate_limited(path_server: NotifyServer) -> None:
    now = [100.0]
    env = {**path_server.environ, "WATCHDOG_USEC": "1000000"}
    with Notifier(env, clock=lambda: now[0]) as n:
        assert n.watchdog_interval_s == 1.0
        sent = []
        for _ in range(30):  # 3 s of ticks at 0.1 s
            sent.append(n.watchdog())
            now[0] += 0.1
    # At most one per half interval: at t = 0, 0.5, 1.0, ... 2.5 (float steps may shift one).
    assert sent[0] is True
    assert 5 <= sent.count(True) <= 6
    datagrams = path_server.pending()
    assert datagrams == [b"WATCHDOG=1"] * sent.count(True)


def test_notifier_watchdog_off_without_watchdog_usec(path_server: NotifyServer) -> None:
    with Notifier(path_server.environ) as n:
        assert n.watchdog_interval_s is None
        assert n.watchdog() is False
    assert path_server.pending() == []


def test_notifier_watchdog_not_ours(path_server: NotifyServer) -> None:
    env = {**path_server.environ, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    with Notifier(env) as n:
        assert n.watchdog() is False


def test_notifier_disabled_is_noop() -> None:
    n = Notifier({"WATCHDOG_USEC": "1000000"})
    assert not n.enabled
    assert n.watchdog_interval_s is None
    assert n.ready("x") is False
    assert n.status("x") is False
    assert n.watchdog() is False
    assert n.stopping() is False
    assert n.reloading() is False
    assert n._sock is None  # never opened a socket
    n.close()


def test_notifier_survives_socket_going_away(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = short_dir / "notify"
    env = {"NOTIFY_SOCKET": str(path)}
    first = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    first.bind(str(path))
    with Notifier(env) as n, caplog.at_level(logging.DEBUG, logger="edged.systemd"):
        assert n.status("one") is True
        assert first.recv(100) == b"STATUS=one"
        first.close()
        path.unlink()
        assert n.status("two") is False
        assert n.status("three") is False
        # systemd comes back (re-exec): the same Notifier finds the new socket.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as second:
            second.bind(str(path))
            assert n.status("four") is True
            second.settimeout(2.0)
            assert second.recv(100) == b"STATUS=four"
    levels = [r.levelno for r in caplog.records]
    assert levels.count(logging.WARNING) == 1
    assert any("works again" in r.getMessage() for r in caplog.records)


# ---- listen_fds() in-process (no fd is touched unless LISTEN_PID is ours) --------------------


def test_listen_fds_unset() -> None:
    env: dict[str, str] = {}
    assert listen_fds(environ=env) == []


def test_listen_fds_other_pid_is_empty_and_unsets() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b", "OTHER": "x"}
    assert listen_fds(environ=env) == []
    assert env == {"OTHER": "x"}


def test_listen_fds_keeps_environment_when_asked() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    assert listen_fds(unset_environment=False, environ=env) == []
    assert env == {"LISTEN_PID": "1", "LISTEN_FDS": "1"}


@pytest.mark.parametrize(
    "env",
    [
        {"LISTEN_PID": "me", "LISTEN_FDS": "1"},
        {"LISTEN_PID": "{pid}", "LISTEN_FDS": "one"},
        {"LISTEN_PID": "{pid}", "LISTEN_FDS": "0"},
        {"LISTEN_PID": "{pid}"},
    ],
)
def test_listen_fds_malformed(env: dict[str, str]) -> None:
    filled = {k: v.format(pid=os.getpid()) for k, v in env.items()}
    assert listen_fds(environ=filled) == []
    assert filled == {}


def test_listen_fds_read_only_mapping_is_not_modified() -> None:
    from types import MappingProxyType

    env = MappingProxyType({"LISTEN_PID": "1", "LISTEN_FDS": "1"})
    assert listen_fds(environ=env) == []
    assert dict(env) == {"LISTEN_PID": "1", "LISTEN_FDS": "1"}


# ---- listen_fds() in a child set up like systemd sets up a service ---------------------------

# Runs in the child after fork: move the passed fds to 3, 4, ... and exec the probe with
# LISTEN_PID = this pid (exec keeps the pid, exactly like systemd's exec of a service).
_ACTIVATE = r"""
import json, os, sys
spec = json.loads(sys.argv[1])
fds = spec["fds"]
for i, fd in enumerate(fds):
    os.dup2(fd, 3 + i)      # dup2 clears FD_CLOEXEC, as systemd leaves it clear
for fd in fds:
    if fd >= 3 + len(fds):
        os.close(fd)
env = dict(os.environ)
env.update(spec["env"])
env["LISTEN_FDS"] = str(len(fds))
env["LISTEN_PID"] = str(os.getpid() + spec["pid_offset"])
os.execve(sys.executable, [sys.executable, "-c", spec["probe"]], env)
"""

# What the service does: call listen_fds_with_names, report fds, names, flags and environment,
# then serve one connection on each fd that is a listening socket.
_PROBE = r"""
import ctypes, fcntl, json, os, socket, sys
from edged.systemd import listen_fds_with_names
unset = os.environ.get("PROBE_UNSET", "1") == "1"
pairs = listen_fds_with_names(unset_environment=unset)
libc = ctypes.CDLL(None)
libc.getenv.restype = ctypes.c_char_p
report = {
    "pid": os.getpid(),
    "pairs": pairs,
    "cloexec": {fd: bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC) for fd, _ in pairs},
    "environ": {k: os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")},
    "c_environ": {k: (libc.getenv(k.encode()) or b"").decode() or None
                  for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")},
}
print(json.dumps(report), flush=True)
for fd, name in pairs:
    sock = socket.socket(fileno=fd)
    if sock.type == socket.SOCK_STREAM and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        conn, _ = sock.accept()
        with conn:
            conn.sendall(("hello from " + name + "\n").encode())
    sock.detach()
"""


def _activate(
    socks: list[socket.socket],
    env: dict[str, str] | None = None,
    pid_offset: int = 0,
) -> tuple[dict[str, object], subprocess.Popen[str]]:
    """Start the probe with ``socks`` at fd 3.. and return its report and the process."""
    # Duplicate high, so the dup2 onto 3, 4, ... in the child never clobbers a source fd.
    high = [os.dup(s.fileno()) for s in socks]
    moved = []
    try:
        for fd in high:
            moved.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 64))
    finally:
        for fd in high:
            os.close(fd)
    spec = {"fds": moved, "env": env or {}, "pid_offset": pid_offset, "probe": _PROBE}
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "PROBE_"))}
    child_env["PYTHONPATH"] = str(REPO)
    child_env.update({k: v for k, v in (env or {}).items() if k.startswith("PROBE_")})
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", _ACTIVATE, json.dumps(spec)],
            pass_fds=moved,
            env=child_env,
            stdout=subprocess.PIPE,
            text=True,
        )
    finally:
        for fd in moved:
            os.close(fd)
    assert proc.stdout is not None
    try:
        line = _readline_with_deadline(proc, DEADLINE_S)
    except BaseException:
        proc.kill()
        proc.wait(timeout=DEADLINE_S)
        raise
    return json.loads(line), proc


def _readline_with_deadline(proc: subprocess.Popen[str], timeout_s: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout_s):
            raise AssertionError(f"child printed nothing within {timeout_s}s")
    return proc.stdout.readline()


def _finish(proc: subprocess.Popen[str]) -> int:
    try:
        return proc.wait(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=DEADLINE_S)
        if proc.stdout is not None:
            proc.stdout.close()


def test_listen_fds_in_activated_child(short_dir: Path) -> None:
    path = short_dir / "s.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    # Connect before the child exists: the connection waits in the backlog, as with systemd.
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(path))
    try:
        report, proc = _activate([listener], env={"LISTEN_FDNAMES": "edged.socket"})
        listener.close()
        assert report["pairs"] == [[3, "edged.socket"]]
        assert report["cloexec"] == {"3": True}
        unset = {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None}
        assert report["environ"] == unset
        assert report["c_environ"] == unset  # unsetenv too, not only os.environ
        client.settimeout(DEADLINE_S)
        assert client.makefile("rb").readline() == b"hello from edged.socket\n"
        assert _finish(proc) == 0
    finally:
        client.close()
        listener.close()


def test_listen_fds_two_sockets_with_names(short_dir: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(short_dir / "a.sock"))
    listener.listen(1)
    pair_a, pair_b = socket.socketpair()
    try:
        report, proc = _activate([listener, pair_a], env={"LISTEN_FDNAMES": "budget:extra"})
        assert report["pairs"] == [[3, "budget"], [4, "extra"]]
        assert report["cloexec"] == {"3": True, "4": True}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(str(short_dir / "a.sock"))
            c.settimeout(DEADLINE_S)
            assert c.makefile("rb").readline() == b"hello from budget\n"
        assert _finish(proc) == 0
    finally:
        listener.close()
        pair_a.close()
        pair_b.close()


def test_listen_fds_without_names_and_mismatched_names() -> None:
    a, b = socket.socketpair()
    try:
        report, proc = _activate([a])
        assert report["pairs"] == [[3, "unknown"]]
        assert _finish(proc) == 0
        report, proc = _activate([a, b], env={"LISTEN_FDNAMES": "only-one"})
        assert report["pairs"] == [[3, "unknown"], [4, "unknown"]]
        assert _finish(proc) == 0
    finally:
        a.close()
        b.close()


def test_listen_fds_pid_mismatch_in_child() -> None:
    a, b = socket.socketpair()
    try:
        report, proc = _activate([a], env={"LISTEN_FDNAMES": "x"}, pid_offset=1)
        assert report["pairs"] == []
        assert report["cloexec"] == {}
        # Unset regardless of the outcome, as sd_listen_fds(unset_environment=1) does.
        assert report["environ"] == {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None}
        assert _finish(proc) == 0
    finally:
        a.close()
        b.close()


def test_listen_fds_keep_environment_in_child() -> None:
    a, b = socket.socketpair()
    try:
        report, proc = _activate([a], env={"PROBE_UNSET": "0"})
        assert report["pairs"] == [[3, "unknown"]]
        environ = report["environ"]
        assert isinstance(environ, dict)
        assert environ["LISTEN_FDS"] == "1"
        assert environ["LISTEN_PID"] == str(report["pid"])
        assert _finish(proc) == 0
    finally:
        a.close()
        b.close()
