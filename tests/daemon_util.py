"""Start a real ``edged run`` for a test and talk to it over its real socket."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class RunningDaemon:
    """A live daemon process; stop() sends SIGTERM and returns the exit code."""

    def __init__(self, proc: subprocess.Popen[bytes], socket_path: Path, log_path: Path) -> None:
        self.proc = proc
        self.socket_path = socket_path
        self.log_path = log_path

    def call(
        self, method: str, params: dict[str, Any] | None = None, timeout_s: float = 5.0
    ) -> Any:
        reply = self.request(
            {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}, timeout_s
        )
        assert "result" in reply, reply
        return reply["result"]

    def request(self, message: dict[str, Any], timeout_s: float = 5.0) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(str(self.socket_path))
            sock.sendall(json.dumps(message).encode() + b"\n")
            with sock.makefile("rb") as reader:
                reply: dict[str, Any] = json.loads(reader.readline())
        return reply

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout_s: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def start_daemon(
    tmp_path: Path,
    *args: str,
    env: dict[str, str] | None = None,
    ready_timeout_s: float = 20.0,
    launcher: Sequence[str] | None = None,
) -> RunningDaemon:
    """``edged run --socket tmp/edged.sock --prometheus off ARGS``, waiting until it answers.
    ``launcher`` replaces ``python -m edged`` (e.g. a wrapper that installs a fake pynvml)."""
    socket_path = tmp_path / "edged.sock"
    log_path = tmp_path / "edged.log"
    prefix = list(launcher) if launcher is not None else [sys.executable, "-m", "edged"]
    argv = [*prefix, "run", "--socket", str(socket_path)]
    if "--prometheus" not in args:
        argv += ["--prometheus", "off"]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGED_", "OTEL_"))}
    full_env.update(env or {})
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*argv, *args], stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=tmp_path
        )
    daemon = RunningDaemon(proc, socket_path, log_path)
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"edged exited {proc.returncode}:\n{daemon.log()}")
        if socket_path.exists():
            try:
                if daemon.call("status")["ticks"] >= 1:
                    return daemon
            except (ConnectionRefusedError, FileNotFoundError):
                pass
        time.sleep(0.05)
    daemon.stop()
    raise AssertionError(f"edged did not become ready:\n{daemon.log()}")
