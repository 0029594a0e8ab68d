"""RAPL, hwmon power/energy and batteries, read from fixture trees and broken copies of them.

RAPL power needs two reads: the sensors take an injectable monotonic clock, and the tests write
``energy_uj`` values (across ``max_energy_range_uj`` to wrap the counter) between reads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edged.metrics import METRICS
from edged.sensors import discover_all
from edged.sensors.base import Roots, SensorError
from edged.sensors.power import WrappingCounter, discover, discover_rapl
from tests.sensor_util import absents_of, sensors_of, values, write

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "thermal_power"

Tree = Callable[[str], Path]


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    """Copy a tree of tests/data/thermal_power into tmp_path (symlinks kept) and return it."""

    def copy(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(DATA / name, dst, symlinks=True)
        return dst

    return copy


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now_s: float = 1000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def make_rapl_zone(
    sys: Path, zone_id: str, name: str, energy_uj: int, max_uj: int | None = None
) -> Path:
    zone = sys / "class" / "powercap" / zone_id
    write(zone / "name", f"{name}\n")
    write(zone / "energy_uj", f"{energy_uj}\n")
    if max_uj is not None:
        write(zone / "max_energy_range_uj", f"{max_uj}\n")
    return zone


# --- RAPL -------------------------------------------------------------------------------------


def test_rapl_first_read_is_the_kernel_counter_without_power(tree: Tree) -> None:
    """node_exporter's oracle: joules = energy_uj / 1e6. One read cannot give a power."""
    found = discover(Roots(sys=tree("node_exporter") / "sys"))
    package = sensors_of(found)["rapl:package-0"].read()
    core = sensors_of(found)["rapl:package-0/core"].read()
    assert values(package, "hw.energy") == {"intel-rapl:0": 240422.366267}
    assert values(core, "hw.energy") == {"intel-rapl:0:0": 118821.284256}
    assert values([*package, *core], "hw.power") == {}
    assert dict(core[0].attributes) == {
        "hw.id": "intel-rapl:0:0",
        "hw.name": "package-0/core",
        "hw.type": "cpu",
        "hw.parent": "intel-rapl:0",  # part of the package: never add it to it
    }
    assert METRICS["hw.energy"].unit == "J"


def test_rapl_hex_indexed_zone(tree: Tree) -> None:
    found = discover(Roots(sys=tree("procfs") / "sys"))
    readings = sensors_of(found)["rapl:package-10"].read()
    assert values(readings, "hw.energy") == {"intel-rapl:a": 240422.366267}


def test_rapl_power_is_energy_over_monotonic_time(tmp_path: Path) -> None:
    sys = tmp_path / "sys"
    zone = make_rapl_zone(sys, "intel-rapl:0", "package-0", 1_000_000, max_uj=262143328850)
    clock = FakeClock(50.0)
    sensor = sensors_of(discover_rapl(Roots(sys=sys), clock=clock))["rapl:package-0"]
    sensor.read()

    clock.now_s = 52.0
    write(zone / "energy_uj", "31000000\n")  # +30 J in 2 s
    readings = sensor.read()
    assert values(readings, "hw.power") == {"intel-rapl:0": pytest.approx(15.0)}
    assert values(readings, "hw.energy") == {"intel-rapl:0": pytest.approx(31.0)}

    readings = sensor.read()  # no time passed: no power rather than a division by zero
    assert values(readings, "hw.power") == {}


def test_rapl_energy_keeps_growing_across_wraps(tmp_path: Path) -> None:
    sys = tmp_path / "sys"
    zone = make_rapl_zone(sys, "intel-rapl:0", "package-0", 8_000_000, max_uj=10_000_000)
    clock = FakeClock(0.0)
    sensor = sensors_of(discover_rapl(Roots(sys=sys), clock=clock))["rapl:package-0"]

    # (time s, energy_uj written, expected hw.energy J, expected hw.power W)
    steps = [
        (0.0, 8_000_000, 8.0, None),
        (1.0, 9_500_000, 9.5, 1.5),
        (2.0, 1_000_000, 11.0, 1.5),  # wrapped: 0.5 J up to the max, 1 J from zero
        (3.0, 9_000_000, 19.0, 8.0),
        (5.0, 500_000, 20.5, 0.75),  # wrapped again: 1.5 J over 2 s
        (6.0, 500_000, 20.5, 0.0),  # idle: no change is not a wrap
    ]
    for now_s, energy_uj, energy_j, power_w in steps:
        clock.now_s = now_s
        write(zone / "energy_uj", f"{energy_uj}\n")
        readings = sensor.read()
        assert values(readings, "hw.energy") == {"intel-rapl:0": pytest.approx(energy_j)}
        want_power = {} if power_w is None else {"intel-rapl:0": pytest.approx(power_w)}
        assert values(readings, "hw.power") == want_power


def test_rapl_counter_without_known_range_treats_a_drop_as_a_reset(tmp_path: Path) -> None:
    sys = tmp_path / "sys"
    zone = make_rapl_zone(sys, "intel-rapl:0", "package-0", 5_000_000)
    clock = FakeClock(0.0)
    sensor = sensors_of(discover_rapl(Roots(sys=sys), clock=clock))["rapl:package-0"]
    sensor.read()
    clock.now_s = 1.0
    write(zone / "energy_uj", "2000000\n")
    readings = sensor.read()
    assert values(readings, "hw.energy") == {"intel-rapl:0": pytest.approx(7.0)}
    assert values(readings, "hw.power") == {"intel-rapl:0": pytest.approx(2.0)}


@given(
    start=st.integers(min_value=0, max_value=999_999),
    increases=st.lists(st.integers(min_value=0, max_value=999_999), max_size=50),
)
def test_wrapping_counter_total_is_the_true_sum(start: int, increases: list[int]) -> None:
    """Whatever the wraps, total = first value + every increase (each under one range)."""
    counter = WrappingCounter(wrap_at=1_000_000)
    true_total = start
    assert counter.update(start) is None
    for increase in increases:
        true_total += increase
        assert counter.update(true_total % 1_000_000) == increase
    assert counter.total == true_total


def test_rapl_bad_file_makes_only_its_zone_unavailable_then_recovers(tree: Tree) -> None:
    sys = tree("node_exporter") / "sys"
    clock = FakeClock(100.0)
    found = discover(Roots(sys=sys), clock=clock)
    package = sensors_of(found)["rapl:package-0"]
    core = sensors_of(found)["rapl:package-0/core"]
    package.read()
    energy = sys / "class/powercap/intel-rapl:0/energy_uj"

    for bad in ("", "garbage\n", "-5\n"):
        clock.now_s += 1.0
        energy.write_text(bad)
        with pytest.raises(SensorError) as caught:
            package.read()
        assert caught.value.source == "rapl:package-0"
        assert "hw.energy" in {r.metric for r in core.read()}

    clock.now_s += 1.0  # 4 s after the last good read
    energy.write_text("240462366267\n")  # +40 J
    readings = package.read()
    assert values(readings, "hw.power") == {"intel-rapl:0": pytest.approx(10.0)}
    assert values(readings, "hw.energy") == {"intel-rapl:0": pytest.approx(240462.366267)}


def test_rapl_energy_file_vanished_after_discovery(tree: Tree) -> None:
    sys = tree("node_exporter") / "sys"
    found = discover(Roots(sys=sys))
    energy = sys / "class/powercap/intel-rapl:0:0/energy_uj"
    energy.unlink()
    with pytest.raises(SensorError, match="ENOENT"):
        sensors_of(found)["rapl:package-0/core"].read()
    energy.write_text("1\n")
    assert values(sensors_of(found)["rapl:package-0/core"].read(), "hw.energy") == {
        "intel-rapl:0:0": 1e-6
    }


def _rapl_absent_without_file_permission(sys_root: Path) -> dict[str, str]:
    """discover_rapl's Absent entries as seen by a process that may not read energy_uj."""
    if os.geteuid() != 0:
        return absents_of(discover_rapl(Roots(sys=sys_root)))
    # Root reads any file: run discovery in a child without CAP_DAC_OVERRIDE/READ_SEARCH, to
    # which a mode-000 file is as unreadable as a root-only one is to a user.
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv to drop CAP_DAC_OVERRIDE")
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from edged.sensors.base import Absent, Roots\n"
        "from edged.sensors.power import discover_rapl\n"
        "found = discover_rapl(Roots(sys=Path(sys.argv[1])))\n"
        "print(json.dumps({a.name: a.detail for a in found if isinstance(a, Absent)}))\n"
    )
    result = subprocess.run(
        [
            setpriv,
            "--bounding-set=-dac_override,-dac_read_search",
            sys.executable,
            "-c",
            code,
            str(sys_root),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
    )
    absent: dict[str, str] = json.loads(result.stdout)
    return absent


def test_rapl_root_only_energy_is_absent_not_an_error(tree: Tree) -> None:
    """energy_uj is 0400 root since Linux 5.10: unprivileged, the zone is Absent, with why."""
    sys_root = tree("node_exporter") / "sys"
    (sys_root / "class/powercap/intel-rapl:0/energy_uj").chmod(0)
    absent = _rapl_absent_without_file_permission(sys_root)
    assert set(absent) == {"rapl:package-0"}
    assert "root only" in absent["rapl:package-0"]


def test_no_rapl_zones_is_absent(tmp_path: Path) -> None:
    found = discover(Roots(sys=tmp_path / "sys"))
    assert sensors_of(found) == {}
    assert set(absents_of(found)) == {"rapl", "hwmon-power", "battery"}


# --- hwmon power and energy -------------------------------------------------------------------


def make_chip(sys: Path, hwmon: str, name: str, device: str, **files: str) -> Path:
    parent = sys / "devices" / device
    chip = parent / "hwmon" / hwmon
    write(chip / "name", f"{name}\n")
    (chip / "device").symlink_to(os.path.relpath(parent, chip))
    for attribute, text in files.items():
        write(chip / attribute, text)
    link = sys / "class" / "hwmon" / hwmon
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(chip, link.parent))
    return chip


def test_hwmon_power_and_energy_inputs(tmp_path: Path) -> None:
    sys = tmp_path / "sys"
    make_chip(
        sys,
        "hwmon2",
        "amdgpu",
        "pci0000:00/0000:03:00.0",
        power1_average="15250000\n",  # µW; amdgpu has no power1_input on older kernels
        power1_label="PPT\n",
        energy1_input="2500000\n",  # µJ
    )
    make_chip(
        sys,
        "hwmon3",
        "acpi_power_meter",
        "ACPI000D:00",
        power1_input="118000000\n",
        power1_average="117000000\n",  # the instantaneous value wins
        temp1_input="40000\n",  # thermal.py's business
    )
    found = discover(Roots(sys=sys))
    readings = [
        *sensors_of(found)["hwmon-power:amdgpu:0000:03:00.0"].read(),
        *sensors_of(found)["hwmon-power:acpi_power_meter:ACPI000D:00"].read(),
    ]
    assert values(readings, "hw.power") == {
        "hwmon:amdgpu:0000:03:00.0:power1": 15.25,
        "hwmon:acpi_power_meter:ACPI000D:00:power1": 118.0,
    }
    assert values(readings, "hw.energy") == {"hwmon:amdgpu:0000:03:00.0:energy1": 2.5}
    assert values(readings, "hw.power", key="hw.name") == {
        "amdgpu PPT": 15.25,
        "acpi_power_meter power1": 118.0,
    }
    assert values(readings, "hw.power", key="hw.type") == {"gpu": 15.25, "power_supply": 118.0}
    assert {r.metric for r in readings} == {"hw.power", "hw.energy"}


def test_hwmon_energy_never_goes_backwards(tmp_path: Path) -> None:
    sys = tmp_path / "sys"
    chip = make_chip(
        sys, "hwmon0", "amd_energy", "platform/amd_energy.0", energy1_input="9000000\n"
    )
    sensor = sensors_of(discover(Roots(sys=sys)))["hwmon-power:amd_energy:amd_energy.0"]
    assert values(sensor.read(), "hw.energy") == {"hwmon:amd_energy:amd_energy.0:energy1": 9.0}
    (chip / "energy1_input").write_text("1000000\n")  # the driver was reloaded
    assert values(sensor.read(), "hw.energy") == {"hwmon:amd_energy:amd_energy.0:energy1": 10.0}


def test_ina_monitors_are_left_to_the_jetson_backend_on_a_jetson(tmp_path: Path) -> None:
    """Thor's INA238 VIN has a power1_input; reporting it here would double it."""
    thor = Path(__file__).parent / "data" / "jetson" / "agx-thor-jp7"
    found = discover(Roots.under(thor))
    assert sensors_of(found) == {}
    assert "ina238" in absents_of(found)["hwmon-power"]


def test_ina_monitors_elsewhere_are_plain_hwmon_power_meters(tmp_path: Path) -> None:
    """Off a Jetson nobody else reads an INA226: it is an ordinary power meter here."""
    sys = tmp_path / "sys"
    make_chip(sys, "hwmon0", "ina226", "i2c-1/1-0045", power1_input="2000000\n")
    found = sensors_of(discover(Roots(sys=sys, proc=tmp_path / "proc", etc=tmp_path / "etc")))
    assert len(found) == 1
    (sensor,) = found.values()
    assert list(values(sensor.read(), "hw.power").values()) == [2.0]


@pytest.mark.parametrize("name", ["orin-nano-jp6", "agx-thor-jp7"])
def test_jetson_trees_have_no_power_sources_for_this_module(name: str) -> None:
    board = Path(__file__).parent / "data" / "jetson" / name  # the whole board: proc, sys, etc
    sensors, statuses = discover_all(Roots.under(board), backends=("edged.sensors.power",))
    assert sensors == []
    assert {s.name: s.status for s in statuses} == {
        "rapl": "absent",
        "hwmon-power": "absent",
        "battery": "absent",
    }


def test_bad_hwmon_power_file_then_recovery(tmp_path: Path) -> None:
    sys = tmp_path / "sys"
    chip = make_chip(sys, "hwmon0", "acpi_power_meter", "ACPI000D:00", power1_input="1000000\n")
    sensor = sensors_of(discover(Roots(sys=sys)))["hwmon-power:acpi_power_meter:ACPI000D:00"]
    (chip / "power1_input").write_text("\n")
    with pytest.raises(SensorError, match="power1_input: no data"):
        sensor.read()
    (chip / "power1_input").write_text("2500000\n")
    assert values(sensor.read(), "hw.power") == {"hwmon:acpi_power_meter:ACPI000D:00:power1": 2.5}


# --- batteries --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "power_w", "charge"), [("node_exporter", 5.002, 0.81), ("procfs", 4.83, 0.98)]
)
def test_battery_from_fixture(tree: Tree, name: str, power_w: float, charge: float) -> None:
    found = discover(Roots(sys=tree(name) / "sys"))
    battery = sensors_of(found)["battery:BAT0"]
    readings = battery.read()
    assert values(readings, "hw.power") == {"BAT0": pytest.approx(power_w)}
    assert values(readings, "hw.battery.charge") == {"BAT0": pytest.approx(charge)}
    assert {r.attributes["hw.type"] for r in readings} == {"battery"}
    assert not [n for n in sensors_of(found) if "AC" in n]  # a Mains supply is not a battery


def make_supply(sys: Path, name: str, **files: str) -> Path:
    supply = sys / "class" / "power_supply" / name
    for attribute, text in files.items():
        write(supply / attribute, text)
    return supply


def test_battery_power_from_current_and_voltage_and_charge_from_energy(tmp_path: Path) -> None:
    sys = tmp_path / "sys"
    make_supply(
        sys,
        "battery",
        type="Battery\n",
        current_now="-1250000\n",  # µA; negative while discharging on some fuel gauges
        voltage_now="7600000\n",  # µV
        energy_now="30000000\n",
        energy_full="40000000\n",
    )
    readings = sensors_of(discover(Roots(sys=sys)))["battery:battery"].read()
    assert values(readings, "hw.power") == {"battery": pytest.approx(9.5)}
    assert values(readings, "hw.battery.charge") == {"battery": pytest.approx(0.75)}


def test_battery_charge_from_charge_counters_is_clamped(tmp_path: Path) -> None:
    sys = tmp_path / "sys"
    make_supply(sys, "BAT1", type="Battery\n", charge_now="5100000\n", charge_full="5000000\n")
    readings = sensors_of(discover(Roots(sys=sys)))["battery:BAT1"].read()
    assert values(readings, "hw.battery.charge") == {"BAT1": 1.0}
    assert values(readings, "hw.power") == {}


def test_empty_battery_bay_and_peripheral_batteries(tmp_path: Path) -> None:
    sys = tmp_path / "sys"
    bay = make_supply(sys, "BAT1", type="Battery\n", present="0\n", capacity="0\n")
    make_supply(sys, "hid-mouse-battery", type="Battery\n", scope="Device\n", capacity="40\n")
    make_supply(sys, "ADP1", type="Mains\n", online="1\n")
    found = discover(Roots(sys=sys))
    assert set(n for n in sensors_of(found) if n.startswith("battery")) == {"battery:BAT1"}
    battery = sensors_of(found)["battery:BAT1"]
    assert battery.read() == []
    (bay / "present").write_text("1\n")
    (bay / "capacity").write_text("55\n")
    assert values(battery.read(), "hw.battery.charge") == {"BAT1": 0.55}


def test_battery_with_nothing_to_read_is_absent(tmp_path: Path) -> None:
    sys = tmp_path / "sys"
    make_supply(sys, "BAT0", type="Battery\n", status="Unknown\n")
    assert "battery:BAT0" in absents_of(discover(Roots(sys=sys)))


def test_bad_battery_file_then_recovery(tree: Tree) -> None:
    sys = tree("procfs") / "sys"
    found = discover(Roots(sys=sys))
    battery = sensors_of(found)["battery:BAT0"]
    capacity = sys / "class/power_supply/BAT0/capacity"
    capacity.write_text("lots\n")
    with pytest.raises(SensorError, match="capacity: not an integer"):
        battery.read()
    assert "hw.energy" in {r.metric for r in sensors_of(found)["rapl:package-0"].read()}
    capacity.write_text("97\n")
    assert values(battery.read(), "hw.battery.charge") == {"BAT0": 0.97}


def test_every_reading_is_in_the_metric_contract(tree: Tree) -> None:
    for name in ("node_exporter", "procfs"):
        for sensor in sensors_of(discover(Roots(sys=tree(name) / "sys"))).values():
            for reading in sensor.read():
                assert reading.metric in METRICS
                assert {"hw.id", "hw.name", "hw.type"} <= set(reading.attributes)
