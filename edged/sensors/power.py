"""Power sensors: RAPL energy counters, hwmon power and energy inputs, system batteries.

Sources and what each reports (one Sensor per source device):

``/sys/class/powercap/intel-rapl:*`` -> Sensor ``rapl:<zone name>`` (``rapl:package-0``,
    ``rapl:package-0/core``): ``hw.energy`` (J), a counter kept monotonic across the wrap of
    ``energy_uj`` at ``max_energy_range_uj``, and ``hw.power`` (W), the energy used between two
    reads over the monotonic time between them (none on the first read). Attributes: ``hw.id`` =
    the zone (``intel-rapl:0:0``), ``hw.name`` = the zone name under its parent's
    (``package-0/core``), ``hw.type`` from the domain (package/core ``cpu``, uncore ``gpu``,
    dram ``memory``, psys ``enclosure``), and for a subzone ``hw.parent`` = the parent zone: a
    subzone's power is part of its parent's, never add them. AMD Zen CPUs use the same
    ``intel-rapl`` zones. ``intel-rapl-mmio:*`` is the same package domain through another
    interface and is not read, so it is not counted twice. Since Linux 5.10 (CVE-2020-8694,
    "PLATYPUS") ``energy_uj`` is readable by root only: a zone we may not read is Absent, not an
    error.

``/sys/class/hwmon/hwmon*`` -> Sensor ``hwmon-power:<chip id>`` (chip ids as in
    :mod:`edged.sensors.thermal`): ``hw.power`` (W) from ``power<N>_input`` (µW), or
    ``power<N>_average`` where a chip has no instantaneous value (amdgpu), and ``hw.energy`` (J)
    from ``energy<N>_input`` (µJ). TI INA power monitors (ina219/226/238/3221 ...) are left to
    :mod:`edged.sensors.jetson`, which knows which rail is the board's total input and which
    are branches of it (summing them would count power twice).

``/sys/class/power_supply/*`` of type ``Battery`` and scope other than ``Device`` (a wireless
    mouse's battery is not the machine's) -> Sensor ``battery:<name>``: ``hw.power`` (W) from
    ``power_now`` (µW) or ``current_now`` (µA) times ``voltage_now`` (µV), as a magnitude (drivers
    disagree on the sign; ``status`` says whether it charges), and ``hw.battery.charge`` (0..1)
    from ``capacity`` (%), or ``energy_now``/``energy_full``, or ``charge_now``/``charge_full``.
    Attributes ``hw.id`` = ``hw.name`` = the supply name (``BAT0``), ``hw.type`` = ``battery``.
    A battery whose ``present`` is 0 gives no readings. ``energy_now`` is energy stored, not a
    count of energy used, so it is no ``hw.energy`` counter; it serves only for the charge.

hwmon chips are enumerated by :func:`edged.sensors.thermal.hwmon_chips`, shared with the thermal
backend so both name a chip the same way.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from edged.sensors.base import Absent, KeptFile, Roots, Sensor, SensorError
from edged.sensors.thermal import (
    HwmonChip,
    hwmon_chips,
    listdir_or_empty,
    read_kept_int,
    static_int,
    static_text,
)
from edged.snapshot import AttrValue, Reading

log = logging.getLogger(__name__)

MICRO_PER_UNIT = 1_000_000  # µJ per J, µW per W, µA per A, µV per V
PERCENT = 100.0

_VALUE_FILE_BYTES = 64

# RAPL domain name (before any "-<index>") -> semconv hw.type. "uncore" (PP1) is the integrated
# graphics on client CPUs; "psys" is the whole SoC platform.
_RAPL_TYPES: Mapping[str, str] = {
    "package": "cpu",
    "core": "cpu",
    "uncore": "gpu",
    "dram": "memory",
    "psys": "enclosure",
}

# hwmon chip name -> semconv hw.type of what its power/energy channels measure.
_HWMON_POWER_TYPES: Mapping[str, str] = {
    "amdgpu": "gpu",
    "radeon": "gpu",
    "nouveau": "gpu",
    "i915": "gpu",
    "xe": "gpu",
    "fam15h_power": "cpu",
    "amd_energy": "cpu",
    "zenpower": "cpu",
}
_HWMON_POWER_DEFAULT_TYPE = "power_supply"  # a meter on a supply rail (acpi_power_meter, PMBus)

# TI INA current/power monitors: owned by edged.sensors.jetson (see the module docstring).
_JETSON_OWNED_CHIP = re.compile(r"ina\d")

Clock = Callable[[], float]


class WrappingCounter:
    """A raw energy counter made monotonic across wrap-arounds and resets.

    ``total`` starts at the first raw value (so it equals the kernel's counter until the first
    wrap) and then grows by the increase between reads. A raw value lower than the last one is
    a wrap when the counter's range is known (the increase is the way up to ``wrap_at`` plus the
    way from 0; RAPL wraps at ``max_energy_range_uj``, counted here within one counter unit), and
    a reset (module reload, resume) when it is not, counted from 0. More than one wrap between
    two reads cannot be seen: RAPL's range is hours at a package's power, and a tick is seconds.
    """

    def __init__(self, wrap_at: int | None) -> None:
        self.wrap_at = wrap_at
        self.total: int = 0
        self._last: int | None = None

    def update(self, raw: int) -> int | None:
        """Account a new raw value; the increase since the last one, None on the first."""
        if raw < 0:
            raise ValueError(f"negative counter value {raw}")
        last, self._last = self._last, raw
        if last is None:
            self.total = raw
            return None
        if raw >= last:
            increase = raw - last
        elif self.wrap_at is not None and last <= self.wrap_at:
            increase = self.wrap_at - last + raw
        else:
            increase = raw
        self.total += increase
        return increase


# --- RAPL -----------------------------------------------------------------------------------


class RaplSensor(Sensor):
    """One RAPL zone: cumulative energy and the mean power since the previous read."""

    def __init__(
        self,
        zone_dir: Path,
        attributes: Mapping[str, AttrValue],
        max_energy_range_uj: int | None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.name = f"rapl:{attributes['hw.name']}"
        self._energy = KeptFile(zone_dir / "energy_uj", _VALUE_FILE_BYTES)
        self._counter = WrappingCounter(max_energy_range_uj)
        self._clock = clock
        self._last_read_s: float | None = None
        self._attributes = dict(attributes)

    def read(self) -> list[Reading]:
        raw_uj = read_kept_int(self._energy, self.name)
        now_s = self._clock()
        try:
            increase_uj = self._counter.update(raw_uj)
        except ValueError as exc:
            raise SensorError(self.name, f"energy_uj: {exc}") from exc
        last_read_s, self._last_read_s = self._last_read_s, now_s
        readings = [Reading("hw.energy", self._counter.total / MICRO_PER_UNIT, self._attributes)]
        if increase_uj is not None and last_read_s is not None and now_s > last_read_s:
            power_w = increase_uj / MICRO_PER_UNIT / (now_s - last_read_s)
            readings.append(Reading("hw.power", power_w, self._attributes))
        return readings

    def close(self) -> None:
        self._energy.close()


def _rapl_type(zone_name: str) -> str:
    return _RAPL_TYPES.get(zone_name.split("-", 1)[0], "cpu")


def discover_rapl(roots: Roots, clock: Clock = time.monotonic) -> list[Sensor | Absent]:
    """One sensor per readable RAPL zone (subzones included); Absent for the others."""
    base = roots.sys / "class" / "powercap"
    zone_ids = sorted(name for name in listdir_or_empty(base) if name.startswith("intel-rapl:"))
    found: list[Sensor | Absent] = []
    used_names: set[str] = set()
    for zone_id in zone_ids:
        zone_dir = base / zone_id
        zone_name = static_text(zone_dir / "name") or zone_id
        parent_id = zone_id.rsplit(":", 1)[0] if zone_id.count(":") >= 2 else None
        hw_name = zone_name
        if parent_id is not None:
            hw_name = f"{static_text(base / parent_id / 'name') or parent_id}/{zone_name}"
        if hw_name in used_names:
            hw_name = zone_id
        used_names.add(hw_name)
        absent_name = f"rapl:{hw_name}"
        try:
            os.close(os.open(zone_dir / "energy_uj", os.O_RDONLY | os.O_CLOEXEC))
        except PermissionError:
            found.append(
                Absent(
                    absent_name, "energy_uj is readable by root only (Linux 5.10+, CVE-2020-8694)"
                )
            )
            continue
        except (FileNotFoundError, NotADirectoryError):
            found.append(Absent(absent_name, "no energy_uj"))
            continue
        except OSError as exc:  # exists but failing now: read() will report it every tick
            log.info("rapl %s: energy_uj: %s", zone_id, exc)
        attributes: dict[str, AttrValue] = {
            "hw.id": zone_id,
            "hw.name": hw_name,
            "hw.type": _rapl_type(zone_name),
        }
        if parent_id is not None:
            attributes["hw.parent"] = parent_id
        max_uj = static_int(zone_dir / "max_energy_range_uj")
        max_uj = max_uj if max_uj is not None and max_uj > 0 else None
        found.append(RaplSensor(zone_dir, attributes, max_uj, clock))
    if not zone_ids:
        found.append(Absent("rapl", f"no intel-rapl:* zones under {base}"))
    return found


# --- hwmon power and energy -----------------------------------------------------------------


@dataclass(frozen=True)
class _PowerChannel:
    kept: KeptFile
    attributes: Mapping[str, AttrValue]


@dataclass(frozen=True)
class _EnergyChannel:
    kept: KeptFile
    attributes: Mapping[str, AttrValue]
    counter: WrappingCounter


class HwmonPowerSensor(Sensor):
    """The power and energy inputs of one hwmon chip."""

    def __init__(
        self,
        chip: HwmonChip,
        power: Sequence[_PowerChannel],
        energy: Sequence[_EnergyChannel],
    ) -> None:
        self.name = f"hwmon-power:{chip.chip_id}"
        self.chip = chip
        self._power = tuple(power)
        self._energy = tuple(energy)

    def read(self) -> list[Reading]:
        readings: list[Reading] = []
        for power in self._power:
            power_w = read_kept_int(power.kept, self.name) / MICRO_PER_UNIT
            readings.append(Reading("hw.power", power_w, power.attributes))
        for energy in self._energy:
            raw_uj = read_kept_int(energy.kept, self.name)
            try:
                energy.counter.update(raw_uj)
            except ValueError as exc:
                raise SensorError(
                    self.name, f"{os.path.basename(energy.kept.path)}: {exc}"
                ) from exc
            energy_j = energy.counter.total / MICRO_PER_UNIT
            readings.append(Reading("hw.energy", energy_j, energy.attributes))
        return readings

    def close(self) -> None:
        for power in self._power:
            power.kept.close()
        for energy in self._energy:
            energy.kept.close()


def _channel_attributes(chip: HwmonChip, kind: str, n: int) -> dict[str, AttrValue]:
    label = chip.text(f"{kind}{n}_label")
    return {
        "hw.id": f"hwmon:{chip.chip_id}:{kind}{n}",
        "hw.name": f"{chip.name} {label or f'{kind}{n}'}",
        "hw.type": _HWMON_POWER_TYPES.get(chip.name, _HWMON_POWER_DEFAULT_TYPE),
    }


def hwmon_power_sensor(chip: HwmonChip) -> HwmonPowerSensor | None:
    """The sensor for a chip's power and energy inputs, or None when it has neither."""
    power: list[_PowerChannel] = []
    for n in sorted({*chip.numbered("power", "input"), *chip.numbered("power", "average")}):
        attribute = f"power{n}_input" if f"power{n}_input" in chip.files else f"power{n}_average"
        if chip.usable(attribute):
            kept = KeptFile(chip.attr_dir / attribute, _VALUE_FILE_BYTES)
            power.append(_PowerChannel(kept, _channel_attributes(chip, "power", n)))
    energy: list[_EnergyChannel] = []
    for n in chip.numbered("energy", "input"):
        if chip.usable(f"energy{n}_input"):
            kept = KeptFile(chip.attr_dir / f"energy{n}_input", _VALUE_FILE_BYTES)
            attributes = _channel_attributes(chip, "energy", n)
            energy.append(_EnergyChannel(kept, attributes, WrappingCounter(None)))
    if not power and not energy:
        return None
    return HwmonPowerSensor(chip, power, energy)


def discover_hwmon_power(roots: Roots) -> list[Sensor | Absent]:
    """One sensor per hwmon chip with power or energy inputs; INA monitors on a Jetson
    excepted (the jetson backend reads those as labelled rails). On any other board an INA
    chip with ``power*_input`` (ina219/226/238) is an ordinary hwmon power meter."""
    from edged.sensors.jetson import read_board

    on_jetson = read_board(roots).is_jetson
    found: list[Sensor | Absent] = []
    left_to_jetson: list[str] = []
    for chip in hwmon_chips(roots):
        if on_jetson and _JETSON_OWNED_CHIP.match(chip.name):
            left_to_jetson.append(chip.name)
            continue
        sensor = hwmon_power_sensor(chip)
        if sensor is not None:
            found.append(sensor)
    if not found:
        detail = f"no hwmon power*/energy* inputs under {roots.sys / 'class' / 'hwmon'}"
        if left_to_jetson:
            detail += f" (INA monitors {', '.join(left_to_jetson)} are the jetson backend's)"
        found.append(Absent("hwmon-power", detail))
    return found


# --- batteries ------------------------------------------------------------------------------


class BatterySensor(Sensor):
    """One system battery: its power draw (or charge power) and its charge."""

    def __init__(
        self,
        supply_dir: Path,
        supply_name: str,
        power_files: Sequence[str],
        charge_files: Sequence[str],
    ) -> None:
        """``power_files``: [power_now] or [current_now, voltage_now] or [];
        ``charge_files``: [capacity] or [energy_now, energy_full] or [charge_now, charge_full]
        or []."""
        self.name = f"battery:{supply_name}"
        present = supply_dir / "present"
        self._present = KeptFile(present, _VALUE_FILE_BYTES) if present.exists() else None
        self._power = tuple(KeptFile(supply_dir / f, _VALUE_FILE_BYTES) for f in power_files)
        self._charge = tuple(KeptFile(supply_dir / f, _VALUE_FILE_BYTES) for f in charge_files)
        self._attributes: dict[str, AttrValue] = {
            "hw.id": supply_name,
            "hw.name": supply_name,
            "hw.type": "battery",
        }

    def read(self) -> list[Reading]:
        if self._present is not None and read_kept_int(self._present, self.name) == 0:
            return []  # an empty battery bay: nothing to measure, nothing wrong
        readings: list[Reading] = []
        values = [read_kept_int(kept, self.name) for kept in self._power]
        if len(values) == 1:
            power_w = abs(values[0]) / MICRO_PER_UNIT
            readings.append(Reading("hw.power", power_w, self._attributes))
        elif len(values) == 2:
            current_ua, voltage_uv = values
            power_w = abs(current_ua * voltage_uv) / (MICRO_PER_UNIT * MICRO_PER_UNIT)
            readings.append(Reading("hw.power", power_w, self._attributes))
        values = [read_kept_int(kept, self.name) for kept in self._charge]
        if len(values) == 1:
            charge = values[0] / PERCENT
        elif len(values) == 2:
            now, full = values
            if full <= 0:
                full_file = os.path.basename(self._charge[1].path)
                raise SensorError(self.name, f"{full_file} is {full}")
            charge = now / full
        else:
            return readings
        # Firmware reports 101 % or a negative capacity now and then; a share of full is 0..1.
        charge = min(max(charge, 0.0), 1.0)
        readings.append(Reading("hw.battery.charge", charge, self._attributes))
        return readings

    def close(self) -> None:
        for kept in (*self._power, *self._charge):
            kept.close()
        if self._present is not None:
            self._present.close()


def _first_complete(files: frozenset[str], choices: Sequence[Sequence[str]]) -> list[str]:
    for choice in choices:
        if all(f in files for f in choice):
            return list(choice)
    return []


def discover_batteries(roots: Roots) -> list[Sensor | Absent]:
    """One sensor per system battery; Absent when there is none."""
    base = roots.sys / "class" / "power_supply"
    found: list[Sensor | Absent] = []
    for supply in sorted(listdir_or_empty(base)):
        supply_dir = base / supply
        if static_text(supply_dir / "type") != "Battery":
            continue
        if (static_text(supply_dir / "scope") or "").lower() == "device":
            continue
        try:
            files = frozenset(os.listdir(supply_dir))
        except OSError as exc:
            found.append(Absent(f"battery:{supply}", f"cannot list {supply_dir}: {exc}"))
            continue
        power_files = _first_complete(files, [["power_now"], ["current_now", "voltage_now"]])
        charge_files = _first_complete(
            files, [["capacity"], ["energy_now", "energy_full"], ["charge_now", "charge_full"]]
        )
        if not power_files and not charge_files:
            found.append(
                Absent(f"battery:{supply}", "no power_now, current_now/voltage_now or capacity")
            )
            continue
        found.append(BatterySensor(supply_dir, supply, power_files, charge_files))
    if not found:
        found.append(Absent("battery", f"no system battery under {base}"))
    return found


def discover(roots: Roots, clock: Clock = time.monotonic) -> list[Sensor | Absent]:
    """RAPL zones, hwmon power/energy inputs and batteries; ``clock`` times RAPL power."""
    return [*discover_rapl(roots, clock), *discover_hwmon_power(roots), *discover_batteries(roots)]
