"""Budget clients for tests: real client processes (``socat`` relaying a pipe to the socket),
and an in-test connection for timing."""

from __future__ import annotations

import contextlib
import json
import pwd
import queue
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest


class Connection:
    """One JSON-lines connection; every line received is kept with its arrival time."""

    def __init__(self) -> None:
        self.lines: queue.Queue[tuple[float, dict[str, Any]]] = queue.Queue()
        self._next_id = 0

    def send(self, method: str, params: dict[str, Any] | None = None) -> int:
        self._next_id += 1
        message = {"jsonrpc": "2.0", "id": self._next_id, "method": method}
        if params is not None:
            message["params"] = params
        self._write(json.dumps(message).encode() + b"\n")
        return self._next_id

    def _write(self, data: bytes) -> None:
        raise NotImplementedError

    def _reader(self, stream: Any) -> None:
        try:
            for raw in iter(stream.readline, b""):
                if raw.strip():
                    self.lines.put((time.monotonic(), json.loads(raw)))
        except (OSError, ValueError):  # closed under the thread at the end of a test
            pass
        with contextlib.suppress(OSError, ValueError):
            stream.close()

    def next(self, timeout_s: float = 5.0) -> tuple[float, dict[str, Any]]:
        """The next message and when it arrived (monotonic s); AssertionError on time-out."""
        try:
            return self.lines.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(f"no message within {timeout_s} s") from None

    def reply(self, rid: int, timeout_s: float = 5.0) -> dict[str, Any]:
        """The reply to request ``rid`` (notifications before it are dropped)."""
        deadline = time.monotonic() + timeout_s
        while True:
            _, message = self.next(max(0.01, deadline - time.monotonic()))
            if message.get("id") == rid:
                return message

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        reply = self.reply(self.send(method, params))
        assert "result" in reply, reply
        return reply["result"]

    def error(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        reply = self.reply(self.send(method, params))
        assert "error" in reply, reply
        error: dict[str, Any] = reply["error"]
        return error

    def quiet(self, for_s: float) -> bool:
        """True if nothing arrives for ``for_s`` seconds."""
        try:
            self.lines.get(timeout=for_s)
        except queue.Empty:
            return True
        return False


class ClientProcess(Connection):
    """A real client process (``socat - UNIX-CONNECT:socket``), optionally under another user
    (with that user's primary group and only the supplementary ``groups`` given). The daemon
    sees its pid, uid and gid (SO_PEERCRED)."""

    def __init__(
        self, socket_path: Path, user: str | None = None, groups: Sequence[str] = ()
    ) -> None:
        super().__init__()
        socat = shutil.which("socat")
        if socat is None:
            pytest.skip("socat is not installed")
        self.proc = subprocess.Popen(
            [socat, "-", f"UNIX-CONNECT:{socket_path}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            **as_user(user, groups),
        )
        assert self.proc.stdin is not None
        self._stdin = self.proc.stdin
        threading.Thread(target=self._reader, args=(self.proc.stdout,), daemon=True).start()
        self.pid = self.proc.pid

    def _write(self, data: bytes) -> None:
        self._stdin.write(data)
        self._stdin.flush()

    def close(self) -> None:
        """Close its stdin: socat shuts the connection down and exits."""
        if self.proc.poll() is None:
            self._stdin.close()
            self.proc.wait(timeout=5)

    def kill(self) -> float:
        """SIGKILL it; returns when (monotonic s) the signal was sent."""
        sent_s = time.monotonic()
        self.proc.kill()
        return sent_s

    def __enter__(self) -> ClientProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=5)
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def as_user(user: str | None, groups: Sequence[str] = ()) -> dict[str, Any]:
    """Popen arguments that run a child as ``user`` with its primary group and exactly the
    supplementary ``groups`` (not the test's root groups)."""
    if user is None:
        return {}
    return {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": list(groups)}


class InTest(Connection):
    """A connection from the test process itself (its pid and uid are the test's)."""

    def __init__(self, socket_path: Path) -> None:
        super().__init__()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(socket_path))
        self._file = self.sock.makefile("rb")
        threading.Thread(target=self._reader, args=(self._file,), daemon=True).start()

    def _write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def __enter__(self) -> InTest:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
