"""systemd's D-Bus API as an enforcement backend (DESIGN section 5, ``systemd``).

Where PID 1 is systemd, every process of a service or scope lives in a cgroup that systemd
owns: writing ``memory.high`` there behind systemd's back is undone at its next reload, and
moving the process out of it breaks ``systemctl stop`` and the unit's accounting. So for a
target that belongs to a unit, edged asks systemd to change the *unit*, at runtime, through
the manager object ``/org/freedesktop/systemd1`` (interface ``org.freedesktop.systemd1.Manager``)
on the system bus. The calls, with the signatures documented in ``org.freedesktop.systemd1(5)``
(and implemented in systemd's ``src/core/dbus-manager.c``):

==============================================  ===================================================
``GetUnitByPID(in u pid, out o unit)``          which unit a pid belongs to; errors
                                                ``org.freedesktop.systemd1.NoUnitForPID``
``org.freedesktop.DBus.Properties.Get``         ``(in s interface, in s property, out v value)``:
                                                the unit's ``Id`` (``s``, interface
                                                ``org.freedesktop.systemd1.Unit``), and its
                                                ``MemoryHigh`` / ``CPUQuotaPerSecUSec`` (``t``, on
                                                the unit type's interface: ``...systemd1.Service``,
                                                ``...Scope``, ``...Slice``, ...)
``SetUnitProperties(in s name, in b runtime,``  ``runtime`` = true: the change lives under /run
``in a(sv) properties)``                        and is gone at reboot. ``MemoryHigh`` (``t``,
                                                bytes) and ``CPUQuotaPerSecUSec`` (``t``, µs of
                                                CPU time per second: 1 core = 1 000 000)
``FreezeUnit(in s name)`` / ``ThawUnit(...)``   cgroup freezer of the whole unit (systemd >= 246)
``StartTransientUnit(in s name, in s mode,``    a new unit made of the properties given; for a
``in a(sv) properties, in a(sa(sv)) aux,``      budget lease, a scope holding the client's process
``out o job)``                                  (:meth:`SystemdUnits.start_scope`); the start is a
                                                job, finished when the manager's ``JobRemoved(u id,
                                                o job, s unit, s result)`` signal names it
``AbandonScope(in s name)``                     the scope's creator "lost interest in the scope
                                                ... without wanting to shut down the scope
                                                entirely" (org.freedesktop.systemd1(5)); its
                                                processes live on, and it is collected once they
                                                have all exited
==============================================  ===================================================

"No limit" is ``UINT64_MAX`` for both properties (systemd's ``CGROUP_LIMIT_MAX`` and
``USEC_INFINITY``; ``systemctl set-property X MemoryHigh=infinity`` sends exactly that).

The unit is the granularity: a throttle or freeze decided for one process holds for every
process of its unit (that is what a unit is). Before edged first changes a property of a unit it
reads the property's current value, and the enforcer records it in the state store (see
:mod:`edged.enforce.restore`), so that lifting the throttle, SIGTERM and the start after a crash
put that value back rather than "infinity".

D-Bus errors become :class:`~edged.enforce.signals.UnitError` (with the D-Bus error name) and
a missing or refusing bus becomes :class:`~edged.enforce.signals.EnforceError`; nothing here
raises anything else for a failed call.

Only blocking I/O (``jeepney.io.blocking``): each call is one round trip on a Unix socket to
the local bus, well under a millisecond, made from the enforcer's thread with a timeout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from edged.enforce.signals import EnforceError, UnitError

log = logging.getLogger(__name__)

SYSTEMD_BUS_NAME = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER_INTERFACE = "org.freedesktop.systemd1.Manager"
UNIT_INTERFACE = "org.freedesktop.systemd1.Unit"
PROPERTIES_INTERFACE = "org.freedesktop.DBus.Properties"
DEFAULT_SYSTEM_BUS_ADDRESS = "unix:path=/run/dbus/system_bus_socket"
UINT64_MAX = (1 << 64) - 1  # "infinity" for MemoryHigh and CPUQuotaPerSecUSec
USEC_PER_S = 1_000_000
DEFAULT_TIMEOUT_S = 5.0  # systemd answers in microseconds; a stuck PID 1 must not stall a tick

# D-Bus error names systemd returns (src/libsystemd/sd-bus/bus-common-errors.h, and the
# standard org.freedesktop.DBus.Error.* names sd-bus uses)
NO_SUCH_UNIT = "org.freedesktop.systemd1.NoSuchUnit"
NO_UNIT_FOR_PID = "org.freedesktop.systemd1.NoUnitForPID"
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
AUTH_REQUIRED = "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"
NOT_SUPPORTED = "org.freedesktop.DBus.Error.NotSupported"
UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"
UNIT_INACTIVE = "org.freedesktop.systemd1.UnitInactive"  # ThawUnit of a stopped unit
UNIT_EXISTS = "org.freedesktop.systemd1.UnitExists"  # StartTransientUnit of a loaded name
SCOPE_NOT_RUNNING = "org.freedesktop.systemd1.ScopeNotRunning"  # AbandonScope of a dead scope
PROPERTY_READ_ONLY = "org.freedesktop.DBus.Error.PropertyReadOnly"  # also: unknown property
INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
# unit_pid_attachable(): "Process with ID %d does not exist."
PROCESS_UNKNOWN = "org.freedesktop.DBus.Error.UnixProcessIdUnknown"
PEER_INTERFACE = "org.freedesktop.DBus.Peer"

# Properties.Get needs the interface a property lives on: the cgroup settings are on the
# type-specific interface of the unit (org.freedesktop.systemd1(5), "SERVICE UNIT OBJECTS" etc.)
_TYPE_INTERFACES = {
    "service": "org.freedesktop.systemd1.Service",
    "scope": "org.freedesktop.systemd1.Scope",
    "slice": "org.freedesktop.systemd1.Slice",
    "socket": "org.freedesktop.systemd1.Socket",
    "mount": "org.freedesktop.systemd1.Mount",
    "swap": "org.freedesktop.systemd1.Swap",
}
# Units edged acts on: the leaves that hold processes. A pid in the root cgroup reports
# "-.slice" and pid 1 "init.scope"; throttling those would throttle the whole machine.
ACTABLE_SUFFIXES = (".service", ".scope")
ROOT_SLICE = "-.slice"
NEVER_ACTED_ON = frozenset({"init.scope", ROOT_SLICE})


def systemd_booted(root: Path = Path("/")) -> bool:
    """Whether PID 1 is systemd, as ``sd_booted()`` checks it: ``/run/systemd/system`` is a
    directory (systemd creates it early at boot; nothing else does). ``root`` is the
    configured root (tests point it at a tree)."""
    return (root / "run" / "systemd" / "system").is_dir()


def choose_units(
    setting: str, root: Path = Path("/"), address: str | None = None
) -> SystemdUnits | None:
    """The systemd backend for ``[enforce] backend`` = ``setting``, or None: only where the
    setting is ``auto`` or ``systemd`` and PID 1 is systemd under ``root``. The caller warns
    when ``systemd`` was asked for and this is None."""
    if setting not in ("auto", "systemd") or not systemd_booted(root):
        return None
    return SystemdUnits(address)


def system_bus_address() -> str:
    """``$DBUS_SYSTEM_BUS_ADDRESS``, else the well-known socket."""
    return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or DEFAULT_SYSTEM_BUS_ADDRESS


def actable(unit: str) -> bool:
    """Whether edged may change ``unit`` (a service or scope, not PID 1's own scope)."""
    return unit.endswith(ACTABLE_SUFFIXES) and unit not in NEVER_ACTED_ON


def cores_to_usec_per_s(cores: float | None) -> int:
    """CPU quota in cores as ``CPUQuotaPerSecUSec`` (None: infinity). systemd refuses 0, and
    the kernel a quota under 1 ms per 100 ms period: at least 10 000 µs/s."""
    if cores is None:
        return UINT64_MAX
    return max(10_000, round(cores * USEC_PER_S))


class SystemdUnits:
    """Changes units through systemd's manager over D-Bus (see the module docstring).

    ``address`` is a D-Bus address (``unix:path=...``); None means the system bus. The
    connection is opened on first use and reopened once if it breaks (dbus-daemon restarts).
    """

    def __init__(
        self,
        address: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        cgroup_root: Path = Path("/sys/fs/cgroup"),
    ) -> None:
        self.cgroup_root = cgroup_root
        self.address = system_bus_address() if address is None else address
        self.timeout_s = timeout_s
        self._conn: Any = None
        self._lock = threading.Lock()  # one round trip at a time on the one connection

    # --- operations ------------------------------------------------------------------------

    def unit_of(self, pid: int) -> str:
        """The name of the unit ``pid`` belongs to (``GetUnitByPID``, then the object's
        ``Id``). Raises UnitError (``NoUnitForPID``) when it belongs to none."""
        (path,) = self._manager("GetUnitByPID", "u", (pid,), unit="", pid=pid)
        unit = self._get(str(path), UNIT_INTERFACE, "Id", "", pid=pid)
        if not isinstance(unit, str):
            raise UnitError("", "GetUnitByPID", f"Id is not a string: {unit!r}", pid=pid)
        return unit

    def memory_high_bytes(self, unit: str) -> int:
        """The unit's ``MemoryHigh`` now (UINT64_MAX: none)."""
        return self._get_unit_int(unit, "MemoryHigh")

    def cpu_quota_usec_per_s(self, unit: str) -> int:
        """The unit's ``CPUQuotaPerSecUSec`` now (UINT64_MAX: none)."""
        return self._get_unit_int(unit, "CPUQuotaPerSecUSec")

    def set_memory_high(self, unit: str, value: int) -> None:
        """``MemoryHigh`` = ``value`` bytes (UINT64_MAX lifts it), at runtime."""
        self.set_properties(unit, [("MemoryHigh", ("t", value))])
        if value == UINT64_MAX:
            self._lifted_in_cgroup(unit, "memory.high")

    def set_cpu_quota(self, unit: str, usec_per_s: int) -> None:
        """``CPUQuotaPerSecUSec`` = ``usec_per_s`` (UINT64_MAX lifts it), at runtime."""
        self.set_properties(unit, [("CPUQuotaPerSecUSec", ("t", usec_per_s))])
        if usec_per_s == UINT64_MAX:
            self._lifted_in_cgroup(unit, "cpu.max")

    def _lifted_in_cgroup(self, unit: str, name: str) -> None:
        """Make the unit's cgroup file say "max" after its property was set to infinity.

        Seen under systemd 252 on cgroup v2: once a unit has no CPU setting left, systemd no
        longer counts the cpu controller as needed *for that unit* and stops writing its
        cpu.* files, but the controller stays enabled while a sibling needs it (edged.service's
        own CPUQuota= is enough), so ``cpu.max`` kept edged's quota after
        ``CPUQuotaPerSecUSec=infinity`` (tests/vm/test_enforce_units.py). The property already
        says infinity, so writing "max" only makes the kernel agree with systemd."""
        try:
            group = self.control_group(unit)
        except EnforceError as exc:  # UnitError included: a fake or old manager
            log.debug("%s: no ControlGroup to check %s: %s", unit, name, exc)
            return
        if not group:
            return
        path = self.cgroup_root / group.lstrip("/") / name
        try:
            if not path.read_text().startswith("max"):
                path.write_text("max")
                log.info("%s: %s set to max (systemd left it behind)", unit, path)
        except OSError as exc:  # no such controller for it (nothing to lift), or gone
            log.debug("%s: %s: %s", unit, path, exc)

    def control_group(self, unit: str) -> str:
        """The unit's ``ControlGroup`` ("" when it has none: not running)."""
        interface = _TYPE_INTERFACES.get(unit.rpartition(".")[2])
        if interface is None:
            raise UnitError(unit, "Get", "ControlGroup: unit type has no cgroup")
        (path,) = self._manager("GetUnit", "s", (unit,), unit=unit)
        value = self._get(str(path), interface, "ControlGroup", unit)
        return value if isinstance(value, str) else ""

    def set_properties(self, unit: str, properties: list[tuple[str, tuple[str, Any]]]) -> None:
        """``SetUnitProperties(unit, runtime=true, properties)``, signature ``sba(sv)``."""
        self._manager("SetUnitProperties", "sba(sv)", (unit, True, properties), unit=unit)

    def freeze(self, unit: str) -> None:
        """``FreezeUnit(unit)``: every process of the unit stops (cgroup freezer)."""
        self._manager("FreezeUnit", "s", (unit,), unit=unit)

    def thaw(self, unit: str) -> None:
        """``ThawUnit(unit)``: undo :meth:`freeze`. A unit that is no longer running (its
        processes died while frozen: a fatal signal ends a task in a frozen v2 group) has
        nothing frozen: not an error. One that is gone raises ``NoSuchUnit``."""
        try:
            self._manager("ThawUnit", "s", (unit,), unit=unit)
        except UnitError as exc:
            if exc.error_name != UNIT_INACTIVE:
                raise

    def ping(self) -> None:
        """``org.freedesktop.DBus.Peer.Ping`` to the manager: whether systemd answers on this
        bus (EnforceError when the bus is not there, UnitError when nothing owns the name)."""
        self._call(MANAGER_PATH, PEER_INTERFACE, "Ping", "", (), unit="")

    def slice_of(self, unit: str) -> str:
        """The slice ``unit`` is in (its ``Slice`` property, on the unit type's interface)."""
        interface = _TYPE_INTERFACES.get(unit.rpartition(".")[2])
        if interface is None:
            raise UnitError(unit, "Get", "Slice: unit type has no slice")
        (path,) = self._manager("GetUnit", "s", (unit,), unit=unit)
        value = self._get(str(path), interface, "Slice", unit)
        if not isinstance(value, str):
            raise UnitError(unit, "Get", f"Slice is not a string: {value!r}")
        return value

    def start_scope(
        self, name: str, properties: list[tuple[str, tuple[str, Any]]], pid: int | None = None
    ) -> None:
        """``StartTransientUnit(name, "fail", properties, [])`` and wait for its job.

        The reply only says that a start job was queued; the processes are moved into the
        scope when the job runs. So the manager's ``JobRemoved`` signal is matched (AddMatch)
        *before* the call, and this returns when the signal names the job with result
        ``done``; any other result (``failed``: the process exited meanwhile, ...) raises
        UnitError, as does a refused call (``UnitExists``, ``UnixProcessIdUnknown``,
        ``PropertyReadOnly`` for an unknown property, ``AccessDenied``)."""
        from jeepney import DBusAddress, MatchRule, new_method_call
        from jeepney.bus_messages import message_bus
        from jeepney.wrappers import DBusErrorResponse, unwrap_msg

        rule = MatchRule(
            type="signal", interface=MANAGER_INTERFACE, member="JobRemoved", path=MANAGER_PATH
        )
        target = DBusAddress(MANAGER_PATH, bus_name=SYSTEMD_BUS_NAME, interface=MANAGER_INTERFACE)
        start = new_method_call(
            target, "StartTransientUnit", "ssa(sv)a(sa(sv))", (name, "fail", properties, [])
        )
        op = "StartTransientUnit"
        with self._lock:
            conn = self._connected(op, pid)
            try:
                with conn.filter(rule, bufsize=64) as signals:
                    add = message_bus.AddMatch(rule)
                    unwrap_msg(conn.send_and_get_reply(add, timeout=self.timeout_s))
                    try:
                        reply = conn.send_and_get_reply(start, timeout=self.timeout_s)
                        (job,) = unwrap_msg(reply)
                        result = self._job_result(conn, signals, str(job))
                    finally:
                        with contextlib.suppress(Exception):
                            conn.send(message_bus.RemoveMatch(rule))
            except DBusErrorResponse as exc:
                raise _unit_error(exc, name, op, pid) from exc
            except TimeoutError as exc:
                self._drop()
                raise EnforceError(
                    pid, op, f"no answer from systemd within {self.timeout_s} s"
                ) from exc
            except (OSError, ValueError) as exc:
                self._drop()
                raise EnforceError(pid, op, f"D-Bus {self.address}: {exc}") from exc
        if result != "done":
            raise UnitError(name, op, f"the start job ended with result {result!r}", pid=pid)

    def _job_result(self, conn: Any, signals: Any, job: str) -> str:
        """The result of ``job`` from the ``JobRemoved(u id, o job, s unit, s result)``
        signals queued in ``signals`` (others' jobs are skipped)."""
        deadline_s = time.monotonic() + self.timeout_s
        while True:
            if signals:
                message = signals.popleft()
            else:
                remaining_s = deadline_s - time.monotonic()
                if remaining_s <= 0:
                    raise TimeoutError(f"job {job} did not finish")
                message = conn.recv_until_filtered(signals, timeout=remaining_s)
            _id, path, _unit, result = message.body
            if path == job:
                return str(result)

    def abandon_scope(self, name: str) -> None:
        """``AbandonScope(name)``: systemd keeps the scope (and its processes) until they
        exit; edged no longer manages it."""
        self._manager("AbandonScope", "s", (name,), unit=name)

    def abandon_quietly(self, name: str) -> None:
        """``AbandonScope`` where the scope still runs; one that is not running or is gone
        needs nothing (its processes exited)."""
        try:
            self.abandon_scope(name)
        except UnitError as exc:
            if exc.error_name not in (SCOPE_NOT_RUNNING, NO_SUCH_UNIT):
                raise

    def release_scope(self, name: str, *, cpu: bool = True) -> None:
        """End edged's hold on lease scope ``name`` without ending its processes:
        ``MemoryMax`` (and ``CPUQuotaPerSecUSec`` unless ``cpu`` is False) to infinity, then
        ``AbandonScope``. Never ``StopUnit``: stopping a scope with no ``Controller`` sends its
        processes SIGTERM (org.freedesktop.systemd1(5), "Scope Unit Objects"). A scope that is
        no longer running needs no abandoning (``ScopeNotRunning`` is ignored); one that is
        gone raises UnitError ``NoSuchUnit`` (nothing left to release)."""
        lifted: list[tuple[str, tuple[str, Any]]] = [("MemoryMax", ("t", UINT64_MAX))]
        if cpu:
            lifted.append(("CPUQuotaPerSecUSec", ("t", UINT64_MAX)))
        self.set_properties(name, lifted)
        try:
            self.abandon_scope(name)
        except UnitError as exc:
            if exc.error_name != SCOPE_NOT_RUNNING:
                raise

    def close(self) -> None:
        """Close the bus connection (reopened by the next call)."""
        with self._lock:
            self._drop()

    # --- plumbing --------------------------------------------------------------------------

    def _get_unit_int(self, unit: str, name: str) -> int:
        interface = _TYPE_INTERFACES.get(unit.rpartition(".")[2])
        if interface is None:
            raise UnitError(unit, "Get", f"{name}: unit type has no cgroup settings")
        # the unit's object path: GetUnit(in s name, out o unit)
        (path,) = self._manager("GetUnit", "s", (unit,), unit=unit)
        value = self._get(str(path), interface, name, unit)
        if not isinstance(value, int):
            raise UnitError(unit, "Get", f"{name} is not an integer: {value!r}")
        return value

    def _get(self, path: str, interface: str, name: str, unit: str, pid: int | None = None) -> Any:
        """``Properties.Get(s interface, s property) -> v``: the variant's value."""
        (variant,) = self._call(
            path, PROPERTIES_INTERFACE, "Get", "ss", (interface, name), unit=unit, pid=pid
        )
        return variant[1]

    def _manager(
        self,
        method: str,
        signature: str,
        body: tuple[Any, ...],
        *,
        unit: str,
        pid: int | None = None,
    ) -> tuple[Any, ...]:
        """A method of the manager object (``/org/freedesktop/systemd1``, ``...Manager``)."""
        return self._call(
            MANAGER_PATH, MANAGER_INTERFACE, method, signature, body, unit=unit, pid=pid
        )

    def _connect(self) -> Any:
        from jeepney.io.blocking import open_dbus_connection

        if self._conn is None:
            self._conn = open_dbus_connection(bus=self.address, auth_timeout=self.timeout_s)
        return self._conn

    def _connected(self, op: str, pid: int | None) -> Any:
        """The connection (opened if needed); EnforceError when the bus cannot be reached.
        Called with the lock held."""
        try:
            return self._connect()
        except (OSError, ValueError, KeyError) as exc:
            self._drop()
            raise EnforceError(pid, op, f"D-Bus {self.address}: {exc}") from exc

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
            self._conn = None

    def _call(
        self,
        path: str,
        interface: str,
        method: str,
        signature: str,
        body: tuple[Any, ...],
        *,
        unit: str,
        pid: int | None = None,
    ) -> tuple[Any, ...]:
        """One method call and its reply body; errors translated here, once."""
        from jeepney import DBusAddress, new_method_call
        from jeepney.wrappers import DBusErrorResponse, unwrap_msg

        target = DBusAddress(path, bus_name=SYSTEMD_BUS_NAME, interface=interface)
        message = new_method_call(target, method, signature or None, body)
        with self._lock:
            for attempt in (1, 2):
                try:
                    reply = self._connect().send_and_get_reply(message, timeout=self.timeout_s)
                    break
                except (ConnectionError, BrokenPipeError) as exc:  # bus restarted: once more
                    self._drop()
                    if attempt == 2:
                        raise EnforceError(pid, method, f"D-Bus {self.address}: {exc}") from exc
                except TimeoutError as exc:
                    self._drop()  # a late reply must not be read as the next call's
                    raise EnforceError(
                        pid, method, f"no reply from systemd within {self.timeout_s} s"
                    ) from exc
                except (OSError, ValueError, KeyError) as exc:
                    # no socket, refused, bad address, failed authentication
                    self._drop()
                    raise EnforceError(pid, method, f"D-Bus {self.address}: {exc}") from exc
        try:
            result: tuple[Any, ...] = unwrap_msg(reply)
        except DBusErrorResponse as exc:
            raise _unit_error(exc, unit, method, pid) from exc
        return result


def _unit_error(exc: Any, unit: str, method: str, pid: int | None) -> UnitError:
    """A D-Bus error reply as UnitError, with the error's name and message."""
    detail = exc.data[0] if exc.data and isinstance(exc.data[0], str) else ""
    return UnitError(unit, method, detail or str(exc.name), pid=pid, error_name=str(exc.name))
