"""Thermal zones, hwmon temperatures and fans, read from fixture trees and broken copies of them.

The trees under ``tests/data/thermal_power`` are the thermal/power parts of the shared fixtures
(node_exporter, procfs, two Jetson boards); see the README there. Each test copies the tree it
needs so it can break files in it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from edged.metrics import METRICS
from edged.sensors import discover_all
from edged.sensors.base import Absent, Roots, Sensor, SensorError
from edged.sensors.thermal import HwmonChip, ThermalZoneSensor, discover, hwmon_chips
from edged.snapshot import Reading
from tests.sensor_util import absents_of, sensors_of, values, write

DATA = Path(__file__).resolve().parent / "data" / "thermal_power"
JETSON_TREES = ["orin-nano-jp6", "agx-thor-jp7"]

Tree = Callable[[str], Path]


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    """Copy a tree of tests/data/thermal_power into tmp_path (symlinks kept) and return it."""

    def copy(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(DATA / name, dst, symlinks=True)
        return dst

    return copy


def limits(readings: Sequence[Reading], hw_id: str) -> dict[str, float]:
    return {
        str(r.attributes["hw.limit_type"]): r.value
        for r in readings
        if r.metric == "hw.temperature.limit" and r.attributes["hw.id"] == hw_id
    }


def read_ok(found: Sequence[Sensor | Absent]) -> list[Reading]:
    """Readings of every sensor that reads; the failing ones are left out, as the sampler does."""
    readings: list[Reading] = []
    for sensor in sensors_of(found).values():
        try:
            readings.extend(sensor.read())
        except SensorError:
            continue
    return readings


def expected(name: str) -> dict[str, Any]:
    with (DATA / name / "expected.json").open() as f:
        data: dict[str, Any] = json.load(f)
    return data


# --- the fixture trees ------------------------------------------------------------------------


@pytest.mark.parametrize("name", JETSON_TREES)
def test_jetson_zone_temperatures_match_expected_readings(tree: Tree, name: str) -> None:
    want = expected(name)
    found = discover(Roots(sys=tree(name) / "sys"))
    readings = read_ok(found)

    zone_readings = [r for r in readings if str(r.attributes["hw.id"]).startswith("thermal_zone")]
    by_type = values(zone_readings, "hw.temperature", key="hw.sensor_location")
    assert by_type == pytest.approx(want["thermal_c"])
    zone_ids = values(zone_readings, "hw.temperature").keys()
    criticals_c = {zone: limits(zone_readings, zone).get("critical") for zone in zone_ids}
    assert criticals_c == dict.fromkeys(zone_ids, want["thermal_critical_c"])


def test_orin_unpowered_zones_are_unavailable_never_zero(tree: Tree) -> None:
    """The cv* zones have no data (EAGAIN on hardware, empty files here): unavailable each tick."""
    found = discover(Roots(sys=tree("orin-nano-jp6") / "sys"))
    zones = {s.zone_type: s for s in found if isinstance(s, ThermalZoneSensor)}
    for zone_type in expected("orin-nano-jp6")["thermal_unavailable"]:
        with pytest.raises(SensorError, match="no data"):
            zones[zone_type].read()
    readings = read_ok(found)
    by_type = values(readings, "hw.temperature", key="hw.sensor_location")
    assert not {"cv0-thermal", "cv1-thermal", "cv2-thermal"} & by_type.keys()


def test_orin_trip_points_become_limits(tree: Tree) -> None:
    readings = read_ok(discover(Roots(sys=tree("orin-nano-jp6") / "sys")))
    assert limits(readings, "thermal_zone8") == {"critical": 104.5, "high.critical": 99.0}
    units = {METRICS[r.metric].unit for r in readings if r.metric.startswith("hw.temperature")}
    assert units == {"Cel"}


@pytest.mark.parametrize("name", JETSON_TREES)
def test_jetson_board_sensors_and_fan(tree: Tree, name: str) -> None:
    """NVMe, tmp451 and INA238 die temperatures; the fan speed from the separate pwm_tach chip."""
    want = expected(name)
    found = discover(Roots(sys=tree(name) / "sys"))
    readings = read_ok(found)

    by_name = values(readings, "hw.temperature", key="hw.name")
    for label, temp_c in want["other_hwmon_temps_c"].items():
        assert by_name[label.removesuffix(" (die)")] == pytest.approx(temp_c)
    assert list(values(readings, "hw.fan.speed").values()) == [want["fan"]["rpm"]]
    fan = next(r for r in readings if r.metric == "hw.fan.speed")
    assert fan.attributes["hw.id"] == "hwmon:pwm_tach:generic_pwm_tachometer:rpm"
    # pwmfan (duty only), ina3221 (rails: the jetson backend's) and soctherm_oc give nothing here.
    chips = {name.split(":")[1] for name in sensors_of(found) if name.startswith("hwmon:")}
    assert not chips & {"pwmfan", "ina3221", "soctherm_oc"}


def test_orin_nvme_limits(tree: Tree) -> None:
    readings = read_ok(discover(Roots(sys=tree("orin-nano-jp6") / "sys")))
    assert limits(readings, "hwmon:nvme:nvme0:temp1") == {
        "high.degraded": 81.85,
        "high.critical": 84.85,
    }


def test_node_exporter_hwmon_matches_its_oracle(tree: Tree) -> None:
    """node_exporter's tree: °C = file / 1000; two coretemp chips kept apart; applesmc's
    attributes found on its parent device; inputs that are neither temp nor fan ignored."""
    found = discover(Roots(sys=tree("node_exporter") / "sys"))
    readings = [r for sensor in sensors_of(found).values() for r in sensor.read()]
    temps = values(readings, "hw.temperature")
    assert temps["thermal_zone0"] == pytest.approx(12.376)
    for package in ("coretemp.0", "coretemp.1"):
        assert temps[f"hwmon:coretemp:{package}:temp1"] == 55.0
        assert temps[f"hwmon:coretemp:{package}:temp5"] == 50.0
        assert limits(readings, f"hwmon:coretemp:{package}:temp2") == {
            "high.degraded": 84.0,
            "high.critical": 100.0,
        }
    assert temps["hwmon:hwmon4:temp1"] == 55.0
    assert temps["hwmon:mt7996_phy0_2:phy0:temp1"] == 57.0
    assert len(temps) == 1 + 2 * 5 + 2 + 3
    fans = values(readings, "hw.fan.speed", key="hw.name")
    assert fans == {
        "applesmc Left side": 0.0,
        "applesmc Right side": 1998.0,
        "nct6779 fan2": 1098.0,
    }
    assert limits(readings, "thermal_zone0") == {}
    assert all(r.metric in METRICS for r in readings)


def test_procfs_zones_below_zero_and_no_hwmon(tree: Tree) -> None:
    found = discover(Roots(sys=tree("procfs") / "sys"))
    temps = values(read_ok(found), "hw.temperature", key="hw.name")
    assert temps == {"bcm2835_thermal": 49.925, "acpitz": -44.0}
    assert "hwmon" in absents_of(found)


def test_nothing_to_read_is_absent(tmp_path: Path) -> None:
    found = discover(Roots(sys=tmp_path / "sys"))
    assert sensors_of(found) == {}
    assert set(absents_of(found)) == {"thermal", "hwmon"}


def test_discover_all_reports_each_source(tree: Tree) -> None:
    sensors, statuses = discover_all(
        Roots(sys=tree("orin-nano-jp6") / "sys"), backends=("edged.sensors.thermal",)
    )
    by_name = {s.name: s.status for s in statuses}
    assert by_name["thermal:thermal_zone2"] == "ok"  # present; unavailable tick by tick
    assert by_name["hwmon:nvme:nvme0"] == "ok"
    assert len(sensors) == 9 + 2


# --- trip points, disabled zones, mirrors ---------------------------------------------------


def make_zone(sys: Path, index: int, zone_type: str, temp: str, **files: str) -> Path:
    zone = sys / "class" / "thermal" / f"thermal_zone{index}"
    write(zone / "type", f"{zone_type}\n")
    write(zone / "temp", temp)
    for name, text in files.items():
        write(zone / name, text)
    return zone


def test_trip_point_types_map_to_limit_types(tmp_path: Path) -> None:
    sys = tmp_path / "sys"
    make_zone(
        sys,
        0,
        "acpitz",
        "40000\n",
        trip_point_0_type="critical\n",
        trip_point_0_temp="105000\n",
        trip_point_1_type="hot\n",
        trip_point_1_temp="100000\n",
        trip_point_2_type="passive\n",
        trip_point_2_temp="95000\n",
        trip_point_3_type="active\n",
        trip_point_3_temp="70000\n",
        trip_point_4_type="active\n",
        trip_point_4_temp="60000\n",
        trip_point_5_type="passive\n",
        trip_point_5_temp="-274000\n",  # THERMAL_TEMP_INVALID: a trip that is not set
        trip_point_6_type="bogus\n",
        trip_point_6_temp="1000\n",
    )
    readings = read_ok(discover(Roots(sys=sys)))
    assert limits(readings, "thermal_zone0") == {
        "critical": 105.0,
        "high.critical": 100.0,
        "throttled": 95.0,
        "high.degraded": 60.0,  # the lowest active trip: where the fan first starts
    }


def test_disabled_zone_is_absent(tmp_path: Path) -> None:
    sys = tmp_path / "sys"
    make_zone(sys, 0, "x86_pkg_temp", "50000\n", mode="disabled\n")
    make_zone(sys, 1, "acpitz", "30000\n", mode="enabled\n")
    found = discover(Roots(sys=sys))
    assert absents_of(found)["thermal:thermal_zone0"] == "zone mode is disabled"
    assert set(sensors_of(found)) == {"thermal:thermal_zone1"}


def make_chip(sys: Path, hwmon: str, name: str | None, device: str | None, **files: str) -> Path:
    """A hwmon chip at devices/<device>/hwmon/<hwmon> (or devices/virtual/hwmon/<hwmon>)."""
    parent = sys / "devices" / (device or "virtual")
    chip = parent / "hwmon" / hwmon
    chip.mkdir(parents=True)
    if name is not None:
        write(chip / "name", f"{name}\n")
    if device is not None:
        (chip / "device").symlink_to(os.path.relpath(parent, chip))
    for attribute, text in files.items():
        write(chip / attribute, text)
    link = sys / "class" / "hwmon" / hwmon
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(chip, link.parent))
    return chip


def test_hwmon_mirrors_of_thermal_zones_are_not_reported_twice(tmp_path: Path) -> None:
    sys = tmp_path / "sys"
    make_zone(sys, 0, "cpu-thermal", "45000\n")
    # Modern kernels: the thermal_hwmon chip's parent is the zone itself.
    make_chip(sys, "hwmon0", "cpu_thermal", "virtual/thermal/thermal_zone0", temp1_input="45000\n")
    # Old kernels: no parent, named after the zone type.
    make_chip(sys, "hwmon1", "cpu_thermal", None, temp1_input="45000\n")
    make_chip(sys, "hwmon2", "k10temp", "pci0000:00/0000:00:18.3", temp1_input="47250\n")
    found = discover(Roots(sys=sys))
    assert set(sensors_of(found)) == {"thermal:thermal_zone0", "hwmon:k10temp:0000:00:18.3"}
    assert values(read_ok(found), "hw.temperature") == {
        "thermal_zone0": 45.0,
        "hwmon:k10temp:0000:00:18.3:temp1": 47.25,
    }


def test_chip_ids_stay_unique_when_name_and_device_repeat(tmp_path: Path) -> None:
    sys = tmp_path / "sys"
    make_chip(sys, "hwmon3", "acme", "platform/acme.0", temp1_input="1000\n")
    shutil.copytree(
        sys / "devices/platform/acme.0/hwmon/hwmon3", sys / "devices/x/hwmon/hwmon7", symlinks=True
    )
    (sys / "devices/x/hwmon/hwmon7/device").unlink()
    (sys / "devices/x/hwmon/hwmon7/device").symlink_to("../../../platform/acme.0")
    (sys / "class/hwmon/hwmon7").symlink_to("../../devices/x/hwmon/hwmon7")
    chips: list[HwmonChip] = hwmon_chips(Roots(sys=sys))
    assert [c.chip_id for c in chips] == ["acme:acme.0", "acme:acme.0:hwmon7"]


# --- faults -----------------------------------------------------------------------------------


def zone_sensor(found: Sequence[Sensor | Absent], zone: str) -> Sensor:
    return sensors_of(found)[f"thermal:{zone}"]


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("garbage", "not an integer"),
        ("empty", "no data"),
        ("no-value marker", "no-value marker"),
    ],
)
def test_zone_with_bad_value_is_unavailable_then_recovers(
    tree: Tree, fault: str, message: str
) -> None:
    sys = tree("orin-nano-jp6") / "sys"
    found = discover(Roots(sys=sys))
    temp = sys / "class/thermal/thermal_zone0/temp"
    cpu, gpu = zone_sensor(found, "thermal_zone0"), zone_sensor(found, "thermal_zone1")
    assert values(cpu.read(), "hw.temperature") == {"thermal_zone0": 49.062}

    temp.write_text(
        {"garbage": "49\x00garbage\n", "empty": "", "no-value marker": "-274000\n"}[fault]
    )
    with pytest.raises(SensorError, match=message) as caught:
        cpu.read()
    assert caught.value.source == "thermal:thermal_zone0"
    assert values(gpu.read(), "hw.temperature") == {"thermal_zone1": 50.218}

    temp.write_text("51500\n")
    assert values(cpu.read(), "hw.temperature") == {"thermal_zone0": 51.5}


@pytest.mark.parametrize("fault", ["vanished", "directory"])
def test_zone_whose_file_vanishes_is_unavailable_then_recovers(tree: Tree, fault: str) -> None:
    sys = tree("agx-thor-jp7") / "sys"
    found = discover(Roots(sys=sys))
    temp = sys / "class/thermal/thermal_zone1/temp"
    temp.unlink()
    if fault == "directory":
        temp.mkdir()
    gpu = zone_sensor(found, "thermal_zone1")
    with pytest.raises(SensorError) as caught:
        gpu.read()
    assert isinstance(caught.value.__cause__, OSError)
    assert values(zone_sensor(found, "thermal_zone0").read(), "hw.temperature") == {
        "thermal_zone0": 52.343
    }

    if fault == "directory":
        temp.rmdir()
    temp.write_text("60125\n")
    assert values(gpu.read(), "hw.temperature") == {"thermal_zone1": 60.125}


def test_replaced_file_is_picked_up_after_a_failed_read(tree: Tree) -> None:
    """A failed read drops the kept descriptor, so a node replaced under us is reopened."""
    sys = tree("agx-thor-jp7") / "sys"
    cpu = zone_sensor(discover(Roots(sys=sys)), "thermal_zone0")
    cpu.read()
    temp = sys / "class/thermal/thermal_zone0/temp"
    temp.write_text("junk\n")
    with pytest.raises(SensorError):
        cpu.read()
    temp.unlink()
    temp.write_text("70000\n")  # a new inode
    assert values(cpu.read(), "hw.temperature") == {"thermal_zone0": 70.0}


def test_bad_hwmon_file_makes_only_its_chip_unavailable(tree: Tree) -> None:
    sys = tree("orin-nano-jp6") / "sys"
    found = discover(Roots(sys=sys))
    nvme_input = sys / "class/hwmon/hwmon4/temp1_input"
    nvme_input.write_text("?\n")
    with pytest.raises(SensorError, match="temp1_input") as caught:
        sensors_of(found)["hwmon:nvme:nvme0"].read()
    assert caught.value.source == "hwmon:nvme:nvme0"
    readings = read_ok(found)
    assert values(readings, "hw.fan.speed") == {"hwmon:pwm_tach:generic_pwm_tachometer:rpm": 2043}
    assert len(values(readings, "hw.temperature")) == 6  # the readable zones

    nvme_input.write_text("41000\n")
    assert values(sensors_of(found)["hwmon:nvme:nvme0"].read(), "hw.temperature") == {
        "hwmon:nvme:nvme0:temp1": 41.0
    }


def test_channel_unusable_at_discovery_is_left_out(tmp_path: Path) -> None:
    """An input the chip does not really have must not make the whole chip unavailable."""
    sys = tmp_path / "sys"
    chip = make_chip(
        sys,
        "hwmon0",
        "nct6798",
        "platform/nct6775.656",
        temp1_input="33000\n",
        temp3_input="N/A\n",
        fan1_input="812\n",
    )
    (chip / "temp2_input").mkdir()  # reads fail with EISDIR
    found = discover(Roots(sys=sys))
    readings = sensors_of(found)["hwmon:nct6798:nct6775.656"].read()
    assert values(readings, "hw.temperature") == {"hwmon:nct6798:nct6775.656:temp1": 33.0}
    assert values(readings, "hw.fan.speed") == {"hwmon:nct6798:nct6775.656:fan1": 812.0}


def test_channel_without_data_at_discovery_is_kept(tmp_path: Path) -> None:
    """No data yet (EAGAIN, empty) is transient: the chip is unavailable until data comes."""
    sys = tmp_path / "sys"
    chip = make_chip(sys, "hwmon0", "drivetemp", "target0:0:0/0:0:0:0", temp1_input="")
    sensor = sensors_of(discover(Roots(sys=sys)))["hwmon:drivetemp:0:0:0:0"]
    with pytest.raises(SensorError, match="no data"):
        sensor.read()
    (chip / "temp1_input").write_text("36000\n")
    assert values(sensor.read(), "hw.temperature") == {"hwmon:drivetemp:0:0:0:0:temp1": 36.0}
