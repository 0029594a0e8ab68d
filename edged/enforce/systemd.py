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
NEVER_ACTED_ON = frozenset({"init.scope", "-.slice"})


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

    def __init__(self, address: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
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

    def set_cpu_quota(self, unit: str, usec_per_s: int) -> None:
        """``CPUQuotaPerSecUSec`` = ``usec_per_s`` (UINT64_MAX lifts it), at runtime."""
        self.set_properties(unit, [("CPUQuotaPerSecUSec", ("t", usec_per_s))])

    def set_properties(self, unit: str, properties: list[tuple[str, tuple[str, Any]]]) -> None:
        """``SetUnitProperties(unit, runtime=true, properties)``, signature ``sba(sv)``."""
        self._manager("SetUnitProperties", "sba(sv)", (unit, True, properties), unit=unit)

    def freeze(self, unit: str) -> None:
        """``FreezeUnit(unit)``: every process of the unit stops (cgroup freezer)."""
        self._manager("FreezeUnit", "s", (unit,), unit=unit)

    def thaw(self, unit: str) -> None:
        """``ThawUnit(unit)``: undo :meth:`freeze`."""
        self._manager("ThawUnit", "s", (unit,), unit=unit)

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
            detail = exc.data[0] if exc.data and isinstance(exc.data[0], str) else ""
            raise UnitError(
                unit, method, detail or str(exc.name), pid=pid, error_name=str(exc.name)
            ) from exc
        return result
