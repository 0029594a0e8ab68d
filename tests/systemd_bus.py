"""A real private D-Bus and a fake systemd manager on it, for tests of the systemd backend.

PID 1 on the machines these tests run on is not systemd, and systemd must never be started
for a test, so **systemd itself is faked**: :class:`FakeManager` owns the name
``org.freedesktop.systemd1`` and answers the methods edged calls, with the signatures and the
error names systemd uses (``org.freedesktop.systemd1(5)``; errors from systemd's
``bus-common-errors.h``). **The bus is real**: :func:`start_bus` runs Debian's ``dbus-daemon``
on a temporary socket, so every message is marshalled, routed and authenticated as it would be
on the system bus, and the fake checks the signature of every call it receives.

Transient scopes (``StartTransientUnit``, ``AbandonScope``) are checked as systemd checks them
(``src/core/dbus-manager.c`` ``transient_unit_from_message``, ``dbus-unit.c``
``bus_unit_set_properties``, ``unit.c`` ``unit_pid_attachable``): a name that is not a valid
unit name or type is ``InvalidArgs``; a name already loaded is ``UnitExists``; an unknown
property is ``PropertyReadOnly`` ("Cannot set property %s, or unknown property."); a pid that
does not exist is ``UnixProcessIdUnknown``, pid 1 ``InvalidArgs``. The reply is a job path,
and the job's end is announced as systemd does, by the manager's ``JobRemoved`` signal. A
value of the wrong D-Bus type is ``InvalidArgs`` here (systemd's reader fails with an errno of
its own; the name differs, the refusal does not).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jeepney import DBusAddress, HeaderFields, MessageType, new_error, new_method_return, new_signal
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
    "StartTransientUnit": "ssa(sv)a(sa(sv))",
    "AbandonScope": "s",
    "Ping": "",
}
# the properties a transient scope accepts here, with their D-Bus types (systemd accepts many
# more; edged sends only these)
SCOPE_PROPERTIES = {
    "PIDs": "au",
    "Description": "s",
    "Slice": "s",
    "CollectMode": "s",
    "MemoryMax": "t",
    "MemoryHigh": "t",
    "CPUQuotaPerSecUSec": "t",
}
CGROUP_PROPERTIES = ("MemoryMax", "MemoryHigh", "CPUQuotaPerSecUSec")
JOB_MODES = ("replace", "fail", "isolate", "ignore-dependencies", "ignore-requirements", "flush")
# unit_name_is_valid(): a prefix of [a-zA-Z0-9:_.\\-] (and @ for instances), a known type suffix
UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\-]*)?\.([a-z]+)$")
UNIT_TYPES = frozenset(
    ("service", "socket", "target", "device", "mount", "automount", "swap", "timer", "path")
) | {"slice", "scope"}
TYPE_INTERFACES = {
    "service": "org.freedesktop.systemd1.Service",
    "scope": "org.freedesktop.systemd1.Scope",
}


@dataclass
class Scope:
    """A transient scope the fake started: what it was asked for, and its state (``running``
    or ``abandoned``)."""

    pids: list[int]
    description: str = ""
    slice: str = ""
    collect_mode: str = "inactive"
    state: str = "running"


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
    """One method call the fake received: member, signature and body as sent, and when it
    arrived (``time.monotonic()``)."""

    member: str
    signature: str
    body: tuple[Any, ...]
    interface: str = ""
    path: str = ""
    at_s: float = field(default_factory=time.monotonic)


@dataclass
class FakeManager:
    """``org.freedesktop.systemd1`` on ``address``, served from a thread.

    ``pids`` maps a pid to its unit; ``units`` maps a unit to its properties (``MemoryHigh``,
    ``CPUQuotaPerSecUSec``, raw ``t`` values); ``frozen`` holds frozen units; methods named in
    ``deny`` answer ``org.freedesktop.DBus.Error.AccessDenied`` (as polkit does for an
    unprivileged caller); ``freeze_supported`` False answers FreezeUnit/ThawUnit with
    ``UnknownMethod`` (systemd < 246). Every call is appended to ``calls``.

    ``scopes`` holds the transient scopes started (their pids are moved to them in ``pids``,
    as systemd moves them); ``slices`` maps a unit to its ``Slice``; ``job_result`` is the
    result the next start jobs end with (``done``; ``failed`` as when the process exits
    before the job runs).
    """

    address: str
    pids: dict[int, str] = field(default_factory=dict)
    units: dict[str, dict[str, int]] = field(default_factory=dict)
    frozen: set[str] = field(default_factory=set)
    deny: set[str] = field(default_factory=set)
    freeze_supported: bool = True
    calls: list[Call] = field(default_factory=list)
    scopes: dict[str, Scope] = field(default_factory=dict)
    slices: dict[str, str] = field(default_factory=dict)
    job_result: str = "done"
    _jobs: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def add_unit(
        self,
        name: str,
        *pids: int,
        memory_high: int = UINT64_MAX,
        cpu_quota: int = UINT64_MAX,
        slice: str = "system.slice",
    ) -> None:
        """A loaded unit holding ``pids``, with its current limits and slice."""
        self.units[name] = {"MemoryHigh": memory_high, "CPUQuotaPerSecUSec": cpu_quota}
        self.slices[name] = slice
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
                reply = self._answer(msg)
                conn.send(reply)
                if reply.header.message_type == MessageType.method_return and (
                    self.calls[-1].member == "StartTransientUnit"
                ):
                    # the job runs after the reply, as in systemd: JobRemoved(u, o, s, s)
                    (job,) = reply.body
                    conn.send(
                        new_signal(
                            DBusAddress(
                                "/org/freedesktop/systemd1",
                                interface="org.freedesktop.systemd1.Manager",
                            ),
                            "JobRemoved",
                            "uoss",
                            (self._jobs, job, self.calls[-1].body[0], self.job_result),
                        )
                    )
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
        if call.member == "Ping":
            return new_method_return(msg)
        if call.member == "Get":
            return self._get(msg, call)
        if call.member == "StartTransientUnit":
            return self._start_transient(msg, call)
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
        if call.member == "AbandonScope":
            scope = self.scopes.get(name)
            if scope is None:
                return _invalid(msg, f"Unit {name} is not a scope unit.")
            if scope.state != "running":
                return new_error(
                    msg,
                    "org.freedesktop.systemd1.ScopeNotRunning",
                    "s",
                    (f"Scope {name} is not running, cannot abandon.",),
                )
            scope.state = "abandoned"
            return new_method_return(msg)
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

    def _start_transient(self, msg: Any, call: Call) -> Any:
        """StartTransientUnit(s name, s mode, a(sv) properties, a(sa(sv)) aux) -> o job, for
        scopes, refused as systemd refuses (see the module docstring)."""
        name, mode, properties, aux = call.body
        match = UNIT_NAME.match(name)
        if match is None or match.group(2) not in UNIT_TYPES or len(name) > 255:
            return _invalid(msg, f"Invalid unit name or type: {name}")
        if match.group(2) != "scope":
            return new_error(
                msg, "org.freedesktop.DBus.Error.NotSupported", "s", ("fake: scopes only",)
            )
        if mode not in JOB_MODES:
            return _invalid(msg, f"Job mode {mode} invalid.")
        if name in self.units:
            return new_error(
                msg, "org.freedesktop.systemd1.UnitExists", "s", (f"Unit {name} already exists.",)
            )
        if aux:
            return _invalid(msg, "fake: no auxiliary units")
        scope = Scope(pids=[])
        limits = {prop: UINT64_MAX for prop in CGROUP_PROPERTIES}
        for prop, (signature, value) in properties:
            expected = SCOPE_PROPERTIES.get(prop)
            if expected is None:
                return new_error(
                    msg,
                    "org.freedesktop.DBus.Error.PropertyReadOnly",
                    "s",
                    (f"Cannot set property {prop}, or unknown property.",),
                )
            if signature != expected:
                return _invalid(msg, f"{prop} wants {expected}, got {signature}")
            if prop == "PIDs":
                if not value:
                    return _invalid(msg, "PIDs: none given")
                for pid in value:
                    if pid in (0, 1):
                        return _invalid(msg, f"Process {pid} is a manager process, refusing.")
                    if not os.path.exists(f"/proc/{pid}"):
                        return new_error(
                            msg,
                            "org.freedesktop.DBus.Error.UnixProcessIdUnknown",
                            "s",
                            (f"Process with ID {pid} does not exist.",),
                        )
                scope.pids.extend(value)
            elif prop == "Description":
                scope.description = value
            elif prop == "Slice":
                if not value.endswith(".slice"):
                    return _invalid(msg, f"Unit name '{value}' is not a slice.")
                scope.slice = value
            elif prop == "CollectMode":
                if value not in ("inactive", "inactive-or-failed"):
                    return _invalid(msg, f"Invalid collect mode: {value}")
                scope.collect_mode = value
            else:
                limits[prop] = value
        if not scope.pids:
            return _invalid(msg, f"Scope {name} has no PIDs. Refusing.")
        self._jobs += 1
        if self.job_result == "done":
            self.units[name] = limits
            self.scopes[name] = scope
            self.slices[name] = scope.slice or "system.slice"
            for pid in scope.pids:
                self.pids[pid] = name
        return new_method_return(msg, "o", (f"/org/freedesktop/systemd1/job/{self._jobs}",))

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
        if interface == TYPE_INTERFACES.get(unit.rpartition(".")[2]) and prop == "Slice":
            return new_method_return(msg, "v", (("s", self.slices.get(unit, "")),))
        return new_error(
            msg, "org.freedesktop.DBus.Error.UnknownProperty", "s", (f"{interface}.{prop}",)
        )


def _invalid(msg: Any, text: str) -> Any:
    return new_error(msg, "org.freedesktop.DBus.Error.InvalidArgs", "s", (text,))
