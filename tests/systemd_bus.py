"""A real private D-Bus and a fake systemd manager on it, for tests of the systemd backend.

PID 1 on the machines these tests run on is not systemd, and systemd must never be started
for a test, so **systemd itself is faked**: :class:`FakeManager` owns the name
``org.freedesktop.systemd1`` and answers the methods edged calls, with the signatures and the
error names systemd uses (``org.freedesktop.systemd1(5)``; errors from systemd's
``bus-common-errors.h``). **The bus is real**: :func:`start_bus` runs Debian's ``dbus-daemon``
on a temporary socket, so every message is marshalled, routed and authenticated as it would be
on the system bus, and the fake checks the signature of every call it receives.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jeepney import HeaderFields, MessageType, new_error, new_method_return
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection

UINT64_MAX = (1 << 64) - 1
UNIT_PREFIX = "/org/freedesktop/systemd1/unit/"
# the signatures org.freedesktop.systemd1(5) documents for what the fake implements
SIGNATURES = {
    "GetUnitByPID": "u",
    "GetUnit": "s",
    "SetUnitProperties": "sba(sv)",
    "FreezeUnit": "s",
    "ThawUnit": "s",
    "Get": "ss",
}
TYPE_INTERFACES = {
    "service": "org.freedesktop.systemd1.Service",
    "scope": "org.freedesktop.systemd1.Scope",
}


def dbus_daemon() -> str | None:
    """The dbus-daemon binary, if installed (Debian package ``dbus``)."""
    return shutil.which("dbus-daemon")


def start_bus(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A private bus on ``directory/bus``: the process (stop it by its pid) and its address."""
    binary = dbus_daemon()
    assert binary is not None
    socket_path = directory / "bus"
    proc = subprocess.Popen(
        [
            binary,
            "--session",
            "--nofork",
            "--nopidfile",
            "--print-address",
            f"--address=unix:path={socket_path}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    address = proc.stdout.readline().decode().strip()
    if not address:
        stop_bus(proc)
        raise RuntimeError("dbus-daemon printed no address")
    return proc, address


def stop_bus(proc: subprocess.Popen[bytes]) -> None:
    """Stop the dbus-daemon :func:`start_bus` started (by its pid, nothing else)."""
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def escape(unit: str) -> str:
    """systemd's object-path label escaping (``bus_label_escape``): ``a.service`` ->
    ``a_2eservice``."""
    return "".join(
        c if c.isascii() and (c.isalnum() and not (i == 0 and c.isdigit())) else f"_{ord(c):02x}"
        for i, c in enumerate(unit)
    )


@dataclass
class Call:
    """One method call the fake received: member, signature and body as sent."""

    member: str
    signature: str
    body: tuple[Any, ...]
    interface: str = ""
    path: str = ""


@dataclass
class FakeManager:
    """``org.freedesktop.systemd1`` on ``address``, served from a thread.

    ``pids`` maps a pid to its unit; ``units`` maps a unit to its properties (``MemoryHigh``,
    ``CPUQuotaPerSecUSec``, raw ``t`` values); ``frozen`` holds frozen units; methods named in
    ``deny`` answer ``org.freedesktop.DBus.Error.AccessDenied`` (as polkit does for an
    unprivileged caller); ``freeze_supported`` False answers FreezeUnit/ThawUnit with
    ``UnknownMethod`` (systemd < 246). Every call is appended to ``calls``.
    """

    address: str
    pids: dict[int, str] = field(default_factory=dict)
    units: dict[str, dict[str, int]] = field(default_factory=dict)
    frozen: set[str] = field(default_factory=set)
    deny: set[str] = field(default_factory=set)
    freeze_supported: bool = True
    calls: list[Call] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def add_unit(
        self, name: str, *pids: int, memory_high: int = UINT64_MAX, cpu_quota: int = UINT64_MAX
    ) -> None:
        """A loaded unit holding ``pids``, with its current limits."""
        self.units[name] = {"MemoryHigh": memory_high, "CPUQuotaPerSecUSec": cpu_quota}
        for pid in pids:
            self.pids[pid] = name

    def start(self) -> None:
        conn = open_dbus_connection(bus=self.address)
        reply = conn.send_and_get_reply(message_bus.RequestName("org.freedesktop.systemd1"))
        assert reply.body == (1,), reply.body  # DBUS_REQUEST_NAME_REPLY_PRIMARY_OWNER
        self._thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def members(self) -> list[str]:
        """The members called so far, in order."""
        return [c.member for c in self.calls]

    def _serve(self, conn: Any) -> None:
        try:
            while not self._stop.is_set():
                try:
                    msg = conn.receive(timeout=0.05)
                except TimeoutError:
                    continue
                if msg.header.message_type != MessageType.method_call:
                    continue
                conn.send(self._answer(msg))
        finally:
            conn.close()

    def _answer(self, msg: Any) -> Any:
        fields = msg.header.fields
        call = Call(
            member=fields.get(HeaderFields.member, ""),
            signature=fields.get(HeaderFields.signature, ""),
            body=tuple(msg.body),
            interface=fields.get(HeaderFields.interface, ""),
            path=fields.get(HeaderFields.path, ""),
        )
        self.calls.append(call)
        expected = SIGNATURES.get(call.member)
        if expected is None:
            return new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod", "s", (call.member,))
        if call.signature != expected:
            return new_error(
                msg,
                "org.freedesktop.DBus.Error.InvalidArgs",
                "s",
                (f"{call.member} wants {expected}, got {call.signature}",),
            )
        if call.member in self.deny:
            return new_error(
                msg, "org.freedesktop.DBus.Error.AccessDenied", "s", ("Access denied",)
            )
        if call.member == "Get":
            return self._get(msg, call)
        if call.member == "GetUnitByPID":
            (pid,) = call.body
            unit = self.pids.get(pid)
            if unit is None:
                return new_error(
                    msg,
                    "org.freedesktop.systemd1.NoUnitForPID",
                    "s",
                    (f"PID {pid} does not belong to any loaded unit.",),
                )
            return new_method_return(msg, "o", (UNIT_PREFIX + escape(unit),))
        name = call.body[0]
        if name not in self.units:
            return new_error(
                msg, "org.freedesktop.systemd1.NoSuchUnit", "s", (f"Unit {name} not loaded.",)
            )
        if call.member == "GetUnit":
            return new_method_return(msg, "o", (UNIT_PREFIX + escape(name),))
        if call.member in ("FreezeUnit", "ThawUnit"):
            if not self.freeze_supported:
                return new_error(
                    msg, "org.freedesktop.DBus.Error.UnknownMethod", "s", (call.member,)
                )
            (self.frozen.add if call.member == "FreezeUnit" else self.frozen.discard)(name)
            return new_method_return(msg)
        # SetUnitProperties(s name, b runtime, a(sv) properties)
        for prop, (signature, value) in call.body[2]:
            if prop not in self.units[name] or signature != "t":
                return new_error(msg, "org.freedesktop.DBus.Error.PropertyReadOnly", "s", (prop,))
            self.units[name][prop] = value
        return new_method_return(msg)

    def _get(self, msg: Any, call: Call) -> Any:
        interface, prop = call.body
        path = call.path
        unit = next((u for u in self.units if UNIT_PREFIX + escape(u) == path), None)
        if unit is None:
            return new_error(msg, "org.freedesktop.DBus.Error.UnknownObject", "s", (path,))
        if interface == "org.freedesktop.systemd1.Unit" and prop == "Id":
            return new_method_return(msg, "v", (("s", unit),))
        if interface == TYPE_INTERFACES.get(unit.rpartition(".")[2]) and prop in self.units[unit]:
            return new_method_return(msg, "v", (("t", self.units[unit][prop]),))
        return new_error(
            msg, "org.freedesktop.DBus.Error.UnknownProperty", "s", (f"{interface}.{prop}",)
        )
