"""Thermal sensors: kernel thermal zones, hwmon temperatures and hwmon fans.

Sources and what each reports (one Sensor per source device, so that one bad file makes only
that device unavailable for the tick):

``/sys/class/thermal/thermal_zone*`` -> Sensor ``thermal:thermal_zoneN``
    ``hw.temperature`` (Cel, from ``temp`` in m°C) with ``hw.id`` = ``thermal_zoneN``,
    ``hw.name`` = ``hw.sensor_location`` = the zone ``type`` (``cpu-thermal``, ``acpitz``),
    ``hw.type`` = ``temperature``; and one ``hw.temperature.limit`` per kind of trip point (see
    :data:`TRIP_LIMIT_TYPES`). A zone whose ``mode`` is ``disabled`` is reported Absent.

``/sys/class/hwmon/hwmon*`` -> Sensor ``hwmon:<chip id>``
    ``hw.temperature`` from ``temp<N>_input`` (m°C) with limits from ``temp<N>_{max,crit,...}``
    (see :data:`HWMON_LIMIT_TYPES`), and ``hw.fan.speed`` (rpm) from ``fan<N>_input`` and from the
    bare ``rpm`` file of NVIDIA's generic PWM tachometer (Jetson ``pwm_tach``).

Identifiers. A thermal zone's ``hw.id`` is its directory name, as the kernel numbers zones in
registration order, which is fixed by the device tree or ACPI tables of a machine. hwmon numbers
(``hwmonN``) are not stable across boots (they follow driver probe order), so a chip is named
``<name>:<device>``: the chip's ``name`` attribute and the kernel name of its parent device
(basename of ``hwmonN/device``, e.g. ``coretemp:coretemp.0``, ``nvme:nvme0``,
``tmp451:2-004c``). A chip with no parent device uses ``hwmonN`` in its place (``nct6779:hwmon3``),
and a chip whose id would repeat another's gets ``:hwmonN`` appended. A channel's ``hw.id`` is
``hwmon:<chip id>:<channel>`` (``hwmon:coretemp:coretemp.0:temp2``).

Values read every tick go through kept-open descriptors (:class:`KeptFile`); names, labels, trip
points and hwmon limits are read once at discovery (they change only when someone reconfigures
the machine, and re-reading them would double the syscalls of every tick).
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from edged.sensors.base import Absent, KeptFile, Roots, Sensor, SensorError, read_text
from edged.snapshot import AttrValue, Reading

log = logging.getLogger(__name__)

MILLIDEGREES_PER_DEGREE = 1000.0

# A reading at or below absolute zero is a driver's "no value" marker, not a temperature:
# THERMAL_TEMP_INVALID is -274000 m°C, and some Tegra sensors report -256000 when unpowered.
_ABSOLUTE_ZERO_MILLI_C = -273150

# Thermal-zone trip point types (Documentation/driver-api/thermal/sysfs-api.rst) mapped onto the
# semantic-convention values of ``hw.limit_type``, ordered by what the kernel does when the zone
# crosses them.
TRIP_LIMIT_TYPES: Mapping[str, str] = {
    "active": "high.degraded",  # active cooling starts (a fan spins up)
    "passive": "throttled",  # passive cooling: the kernel throttles CPUs/devices from here
    "hot": "high.critical",  # the platform is notified; the last stop before "critical"
    "critical": "critical",  # the kernel shuts the machine down
}

# hwmon temperature limits (Documentation/hwmon/sysfs-interface.rst) mapped the same way: ``crit``
# is "typically greater than max" and ``emergency`` is "equal or greater than crit", so they take
# the same rungs as the trip points above.
HWMON_LIMIT_TYPES: Mapping[str, str] = {
    "max": "high.degraded",
    "crit": "high.critical",
    "emergency": "critical",
    "min": "low.degraded",
    "lcrit": "low.critical",
}

# errnos with which a sensor says "no value right now" (powered down, bus busy, i2c hiccup).
# A channel failing at discovery with one of these is kept: it may come back.
_TRANSIENT_ERRNOS = frozenset(
    {errno.EAGAIN, errno.EBUSY, errno.EIO, errno.ETIMEDOUT, errno.ENODATA, errno.EINTR}
)

_ZONE_DIR = re.compile(r"thermal_zone(\d+)")
_TRIP_TYPE = re.compile(r"trip_point_(\d+)_type")
_HWMON_DIR = re.compile(r"hwmon(\d+)")
_VALUE_FILE_BYTES = 64


def _errno_text(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    reason = exc.strerror or str(exc)
    return f"{name} ({reason})" if name else reason


def read_kept_int(kept: KeptFile, source: str) -> int:
    """An integer value file read through its kept descriptor; SensorError when it cannot be.

    The descriptor is dropped on any failure (KeptFile already does so on OSError), so the next
    tick reopens the path and picks up a node that was replaced under us.
    """
    filename = os.path.basename(kept.path)
    try:
        raw = kept.read_bytes().strip()
    except OSError as exc:
        raise SensorError(source, f"{filename}: {_errno_text(exc)}") from exc
    if not raw:
        kept.close()
        raise SensorError(source, f"{filename}: no data (empty)")
    try:
        return int(raw)
    except ValueError as exc:
        kept.close()
        raise SensorError(source, f"{filename}: not an integer: {raw[:32]!r}") from exc


def probe_value_file(path: Path) -> str | None:
    """Why a value file cannot serve as a channel, or None when it can (now or later).

    A channel that fails at discovery with anything but a transient error (or an empty file:
    no data yet) is an input the chip does not really have: unsupported or unconnected
    (EINVAL, EOPNOTSUPP, ENXIO, not a file, garbage text). It is left out, because kept in it
    would make its whole chip unavailable on every tick.
    """
    kept = KeptFile(path, _VALUE_FILE_BYTES)
    try:
        raw = kept.read_bytes().strip()
    except OSError as exc:
        return None if exc.errno in _TRANSIENT_ERRNOS else _errno_text(exc)
    finally:
        kept.close()
    if not raw:
        return None
    try:
        int(raw)
    except ValueError:
        return f"not an integer: {raw[:32]!r}"
    return None


def static_text(path: Path) -> str | None:
    """A name, label, type or limit read once at discovery; None when it cannot be read."""
    try:
        return read_text(path)
    except OSError as exc:  # an errno read_text does not expect, e.g. EISDIR
        log.debug("cannot read %s: %s", path, exc)
        return None


def static_int(path: Path) -> int | None:
    """An integer attribute read once at discovery; None when missing or not an integer."""
    text = static_text(path)
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        log.debug("%s is not an integer: %r", path, text[:32])
        return None


def _index(name: str, pattern: re.Pattern[str]) -> int | None:
    match = pattern.fullmatch(name)
    return int(match[1]) if match else None


def listdir_or_empty(path: Path) -> list[str]:
    """Entry names of a directory, or [] when it does not exist (no such class on this kernel)."""
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


# --- thermal zones --------------------------------------------------------------------------


class ThermalZoneSensor(Sensor):
    """One thermal zone: its temperature every tick, its trip points as limits."""

    def __init__(
        self, zone_dir: Path, zone_id: str, zone_type: str, limits_c: Mapping[str, float]
    ) -> None:
        self.name = f"thermal:{zone_id}"
        self.zone_id = zone_id
        self.zone_type = zone_type
        self._temp = KeptFile(zone_dir / "temp", _VALUE_FILE_BYTES)
        self._attributes: dict[str, AttrValue] = {
            "hw.id": zone_id,
            "hw.name": zone_type,
            "hw.type": "temperature",
            "hw.sensor_location": zone_type,
        }
        self._limits = tuple(
            Reading(
                "hw.temperature.limit",
                limit_c,
                {"hw.id": zone_id, "hw.name": zone_type, "hw.limit_type": limit_type},
            )
            for limit_type, limit_c in sorted(limits_c.items(), key=lambda item: item[1])
        )

    def read(self) -> list[Reading]:
        temp_c = read_celsius(self._temp, self.name)
        return [Reading("hw.temperature", temp_c, self._attributes), *self._limits]

    def close(self) -> None:
        self._temp.close()


def read_celsius(kept: KeptFile, source: str) -> float:
    """A m°C value file in °C; SensorError for no data, garbage or a "no value" marker."""
    milli_c = read_kept_int(kept, source)
    if milli_c <= _ABSOLUTE_ZERO_MILLI_C:
        raise SensorError(
            source, f"{os.path.basename(kept.path)}: {milli_c} m°C is a no-value marker"
        )
    return milli_c / MILLIDEGREES_PER_DEGREE


def _trip_limits_c(zone_dir: Path, names: Sequence[str]) -> dict[str, float]:
    """Trip points of a zone as {hw.limit_type: °C}.

    Several trips of one type (ACPI zones have active[0..9]) collapse to the lowest, the point
    where that kind of action first starts. Invalid or unreadable trips are skipped.
    """
    limits_c: dict[str, float] = {}
    for name in names:
        trip = _index(name, _TRIP_TYPE)
        if trip is None:
            continue
        limit_type = TRIP_LIMIT_TYPES.get(static_text(zone_dir / name) or "")
        milli_c = static_int(zone_dir / f"trip_point_{trip}_temp")
        if limit_type is None or milli_c is None or milli_c <= _ABSOLUTE_ZERO_MILLI_C:
            continue
        limit_c = milli_c / MILLIDEGREES_PER_DEGREE
        limits_c[limit_type] = min(limit_c, limits_c.get(limit_type, limit_c))
    return limits_c


def discover_zones(roots: Roots) -> list[Sensor | Absent]:
    """One sensor per thermal zone; Absent for disabled zones, or when there is none."""
    base = roots.sys / "class" / "thermal"
    zones = sorted(
        (index, name)
        for name in listdir_or_empty(base)
        if (index := _index(name, _ZONE_DIR)) is not None
    )
    found: list[Sensor | Absent] = []
    for _, zone_id in zones:
        zone_dir = base / zone_id
        try:
            names = sorted(os.listdir(zone_dir))
        except OSError as exc:
            found.append(Absent(f"thermal:{zone_id}", f"cannot list {zone_dir}: {exc}"))
            continue
        if "temp" not in names:
            found.append(Absent(f"thermal:{zone_id}", "no temp file"))
            continue
        if "mode" in names and static_text(zone_dir / "mode") == "disabled":
            found.append(Absent(f"thermal:{zone_id}", "zone mode is disabled"))
            continue
        zone_type = static_text(zone_dir / "type") or zone_id
        found.append(
            ThermalZoneSensor(zone_dir, zone_id, zone_type, _trip_limits_c(zone_dir, names))
        )
    if not zones:
        found.append(Absent("thermal", f"no thermal_zone* under {base}"))
    return found


# --- hwmon ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HwmonChip:
    """One hwmon device as discovery found it (shared with :mod:`edged.sensors.power`)."""

    hwmon: str  # "hwmon3": the class device; its number is not stable across boots
    chip_id: str  # "<name>:<device>", stable across boots and unique on this host
    name: str  # the chip's ``name`` attribute ("coretemp", "nvme", "ina238")
    device: str | None  # kernel name of the parent device ("coretemp.0", "2-0044")
    attr_dir: Path  # where the chip's attributes are
    files: frozenset[str]  # attribute names present at discovery
    thermal_zone: bool  # the parent is a thermal zone: a mirror of a zone read elsewhere

    def numbered(self, kind: str, suffix: str = "input") -> list[int]:
        """Channel numbers N, ascending, for which ``<kind>N_<suffix>`` exists."""
        pattern = re.compile(rf"{re.escape(kind)}(\d+)_{re.escape(suffix)}")
        return sorted(int(m[1]) for f in self.files if (m := pattern.fullmatch(f)))

    def text(self, attribute: str) -> str | None:
        """A static attribute (label, limit) of the chip, or None when absent or unreadable."""
        return static_text(self.attr_dir / attribute) if attribute in self.files else None

    def integer(self, attribute: str) -> int | None:
        """A static integer attribute, or None when absent, unreadable or not an integer."""
        return static_int(self.attr_dir / attribute) if attribute in self.files else None

    def usable(self, attribute: str) -> bool:
        """Whether a value attribute can be a channel (see :func:`probe_value_file`)."""
        reason = probe_value_file(self.attr_dir / attribute)
        if reason is not None:
            log.info("hwmon %s: leaving out %s: %s", self.chip_id, attribute, reason)
        return reason is None


def hwmon_chips(roots: Roots) -> list[HwmonChip]:
    """Every hwmon chip under ``roots.sys``, in hwmonN order, with unique ``chip_id``."""
    base = roots.sys / "class" / "hwmon"
    entries = sorted(
        (index, name)
        for name in listdir_or_empty(base)
        if (index := _index(name, _HWMON_DIR)) is not None
    )
    chips: list[HwmonChip] = []
    used_ids: set[str] = set()
    for _, hwmon in entries:
        hwmon_dir = base / hwmon
        device_link = hwmon_dir / "device"
        attr_dir = hwmon_dir
        # Drivers not converted to hwmon_device_register_with_info (applesmc, old kernels) keep
        # name and inputs on the parent device; libsensors looks there when hwmonN/name is
        # missing, and so do we.
        if not (hwmon_dir / "name").is_file() and (device_link / "name").is_file():
            attr_dir = device_link
        try:
            files = frozenset(os.listdir(attr_dir))
        except OSError as exc:
            log.warning("cannot list hwmon chip %s: %s", attr_dir, exc)
            continue
        device_path = Path(os.path.realpath(device_link)) if device_link.exists() else None
        name = static_text(attr_dir / "name") or hwmon
        device = device_path.name if device_path is not None else None
        # A chip with neither name nor parent (seen in node_exporter's fixtures) is just hwmonN.
        chip_id = hwmon if name == hwmon and device is None else f"{name}:{device or hwmon}"
        if chip_id in used_ids:
            chip_id = f"{chip_id}:{hwmon}"
        used_ids.add(chip_id)
        chips.append(
            HwmonChip(
                hwmon=hwmon,
                chip_id=chip_id,
                name=name,
                device=device,
                attr_dir=attr_dir,
                files=files,
                thermal_zone=device is not None and device.startswith("thermal_zone"),
            )
        )
    return chips


@dataclass(frozen=True)
class _Channel:
    """One value file of a chip and the reading it becomes."""

    kept: KeptFile
    metric: str
    attributes: Mapping[str, AttrValue]
    is_temperature: bool


class HwmonThermalSensor(Sensor):
    """The temperatures and fans of one hwmon chip."""

    def __init__(
        self, chip: HwmonChip, channels: Sequence[_Channel], limits: Sequence[Reading]
    ) -> None:
        self.name = f"hwmon:{chip.chip_id}"
        self.chip = chip
        self._channels = tuple(channels)
        self._limits = tuple(limits)

    def read(self) -> list[Reading]:
        readings: list[Reading] = []
        for channel in self._channels:
            if channel.is_temperature:
                value = read_celsius(channel.kept, self.name)
            else:
                value = float(read_kept_int(channel.kept, self.name))
            readings.append(Reading(channel.metric, value, channel.attributes))
        readings.extend(self._limits)
        return readings

    def close(self) -> None:
        for channel in self._channels:
            channel.kept.close()


def hwmon_thermal_sensor(chip: HwmonChip) -> HwmonThermalSensor | None:
    """The sensor for a chip's temperatures and fans, or None when it has neither."""
    channels: list[_Channel] = []
    limits: list[Reading] = []
    for n in chip.numbered("temp"):
        if not chip.usable(f"temp{n}_input"):
            continue
        label = chip.text(f"temp{n}_label")
        hw_id = f"hwmon:{chip.chip_id}:temp{n}"
        hw_name = f"{chip.name} {label or f'temp{n}'}"
        attributes: dict[str, AttrValue] = {
            "hw.id": hw_id,
            "hw.name": hw_name,
            "hw.type": "temperature",
            "hw.sensor_location": label or chip.name,
        }
        kept = KeptFile(chip.attr_dir / f"temp{n}_input", _VALUE_FILE_BYTES)
        channels.append(_Channel(kept, "hw.temperature", attributes, is_temperature=True))
        for suffix, limit_type in HWMON_LIMIT_TYPES.items():
            milli_c = chip.integer(f"temp{n}_{suffix}")
            if milli_c is not None and milli_c > _ABSOLUTE_ZERO_MILLI_C:
                limit_attributes = {"hw.id": hw_id, "hw.name": hw_name, "hw.limit_type": limit_type}
                limits.append(
                    Reading(
                        "hw.temperature.limit", milli_c / MILLIDEGREES_PER_DEGREE, limit_attributes
                    )
                )
    fans = [(f"fan{n}", f"fan{n}_input", chip.text(f"fan{n}_label")) for n in chip.numbered("fan")]
    # NVIDIA's generic-pwm-tachometer (Jetson JetPack 5+, hwmon name "pwm_tach") has a bare
    # "rpm" attribute instead of fan1_input; the pwm-fan chip beside it has no speed at all.
    if "rpm" in chip.files:
        fans.append(("rpm", "rpm", "fan"))
    for channel, attribute, label in fans:
        if not chip.usable(attribute):
            continue
        fan_attributes: dict[str, AttrValue] = {
            "hw.id": f"hwmon:{chip.chip_id}:{channel}",
            "hw.name": f"{chip.name} {label}" if label else f"{chip.name} {channel}",
            "hw.type": "fan",
        }
        kept = KeptFile(chip.attr_dir / attribute, _VALUE_FILE_BYTES)
        channels.append(_Channel(kept, "hw.fan.speed", fan_attributes, is_temperature=False))
    if not channels:
        return None
    return HwmonThermalSensor(chip, channels, limits)


def discover_hwmon(roots: Roots, zone_types: Sequence[str] = ()) -> list[Sensor | Absent]:
    """One sensor per hwmon chip with temperatures or fans; Absent when there is none.

    Chips that mirror a thermal zone are left out, since the zone is already reported: the
    kernel's thermal_hwmon registers one chip per zone type, named after the type with '-'
    turned into '_', whose parent is the zone (or, on old kernels, which has no parent).
    """
    mirrored = {zone_type.replace("-", "_") for zone_type in zone_types}
    found: list[Sensor | Absent] = []
    for chip in hwmon_chips(roots):
        if chip.thermal_zone or (chip.device is None and chip.name in mirrored):
            log.debug("hwmon %s mirrors a thermal zone; not reported twice", chip.chip_id)
            continue
        sensor = hwmon_thermal_sensor(chip)
        if sensor is not None:
            found.append(sensor)
    if not found:
        where = roots.sys / "class" / "hwmon"
        found.append(Absent("hwmon", f"no hwmon temp*_input or fan*_input under {where}"))
    return found


def discover(roots: Roots) -> list[Sensor | Absent]:
    """Thermal zones, then hwmon chips with temperatures or fans."""
    zones = discover_zones(roots)
    zone_types = [item.zone_type for item in zones if isinstance(item, ThermalZoneSensor)]
    return [*zones, *discover_hwmon(roots, zone_types)]
