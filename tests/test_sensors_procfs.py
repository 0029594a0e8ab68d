"""Memory, CPU and PSI readers against fixture trees, fault-injected copies and the real /proc."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from edged.sensors import Roots, discover_all
from edged.sensors.cpu import USER_HZ, CpuFrequencySensor, CpuTimeSensor
from edged.sensors.cpu import discover as cpu_discover
from edged.sensors.memory import MemorySensor
from edged.sensors.pressure import PressureSensor
from edged.sensors.pressure import discover as psi_discover
from edged.snapshot import Reading
from tests.conftest import FIXTURES, FixtureTree

PROCFS_ONLY = ("edged.sensors.memory", "edged.sensors.cpu", "edged.sensors.pressure")


def by_attr(readings: list[Reading], metric: str, key: str) -> dict[object, float]:
    return {r.attributes[key]: r.value for r in readings if r.metric == metric}


def test_memory_of_the_orin_fixture(fixture_tree: FixtureTree) -> None:
    root = fixture_tree("jetson/orin-nano-jp6")
    expected = json.loads((FIXTURES / "jetson/expected/orin-nano-jp6.json").read_text())
    readings = MemorySensor(Roots.under(root)).read()
    total = next(r.value for r in readings if r.metric == "system.memory.limit")
    available = next(r.value for r in readings if r.metric == "system.memory.linux.available")
    assert total == 7802996 * 1024
    assert available == 5411580 * 1024
    assert total - available == 2391416 * 1024  # "used" as the policy judges it (README)
    usage = by_attr(readings, "system.memory.usage", "system.memory.state")
    assert sum(usage.values()) == total  # semconv: the states add up to the limit
    util = by_attr(readings, "system.memory.utilization", "system.memory.state")
    assert sum(util.values()) == pytest.approx(1.0)
    swap = by_attr(readings, "system.paging.usage", "system.paging.state")
    assert swap["used"] + swap["free"] == 3901496 * 1024
    assert expected  # the expected file exists and parses


def test_memory_on_this_machine_agrees_with_psutil() -> None:
    import psutil

    readings = MemorySensor(Roots()).read()
    total = next(r.value for r in readings if r.metric == "system.memory.limit")
    assert total == psutil.virtual_memory().total
    available = next(r.value for r in readings if r.metric == "system.memory.linux.available")
    assert abs(available - psutil.virtual_memory().available) < 256 * 2**20


def test_cpu_time_matches_proc_stat_and_utilization_needs_two_reads(
    fixture_tree: FixtureTree,
) -> None:
    root = fixture_tree("jetson/orin-nano-jp6")
    sensor = CpuTimeSensor(Roots.under(root))
    first = sensor.read()
    times = [r for r in first if r.metric == "system.cpu.time"]
    assert {r.attributes["cpu.logical_number"] for r in times} == set(range(6))
    cpu0 = {
        r.attributes["cpu.mode"]: r.value for r in times if r.attributes["cpu.logical_number"] == 0
    }
    # cpu0 95212 327 36919 597196 652 0 894 0 0 0
    assert cpu0["user"] == 95212 / USER_HZ
    assert cpu0["interrupt"] == (0 + 894) / USER_HZ
    assert cpu0["idle"] == 597196 / USER_HZ
    assert not [r for r in first if r.metric == "system.cpu.utilization"]
    # advance cpu0 by 30 user + 70 idle ticks and read again
    stat = root / "proc/stat"
    text = stat.read_text().replace("cpu0 95212 327 36919 597196", "cpu0 95242 327 36919 597266")
    stat.write_text(text)
    second = sensor.read()
    util = {
        r.attributes["cpu.mode"]: r.value
        for r in second
        if r.metric == "system.cpu.utilization" and r.attributes["cpu.logical_number"] == 0
    }
    assert util["user"] == pytest.approx(0.3)
    assert util["idle"] == pytest.approx(0.7)
    assert sum(util.values()) == pytest.approx(1.0)


def test_cpu_frequency_is_read_once_per_policy_and_reported_per_cpu(
    fixture_tree: FixtureTree,
) -> None:
    root = fixture_tree("jetson/orin-nano-jp6")
    found = cpu_discover(Roots.under(root))
    freq = next(s for s in found if isinstance(s, CpuFrequencySensor))
    hz = {r.attributes["cpu.logical_number"]: r.value for r in freq.read()}
    # policy0 (cpu0-3) at 1420800 kHz, policy4 (cpu4-5) at 729600 kHz (fixture README)
    assert hz == {0: 1420800e3, 1: 1420800e3, 2: 1420800e3, 3: 1420800e3, 4: 729600e3, 5: 729600e3}
    policy0 = root / "sys/devices/system/cpu/cpufreq/policy0/scaling_cur_freq"
    policy0.write_text("729600\n")
    hz = {r.attributes["cpu.logical_number"]: r.value for r in freq.read()}
    assert hz[3] == 729600e3  # one write to the shared policy moves the whole cluster


def test_cpu_on_this_machine_covers_every_cpu() -> None:
    sensor = CpuTimeSensor(Roots())
    sensor.read()
    busy_until = time.monotonic() + 0.3
    while time.monotonic() < busy_until:
        pass
    util = [r for r in sensor.read() if r.metric == "system.cpu.utilization"]
    cpus = {r.attributes["cpu.logical_number"] for r in util}
    assert cpus == set(range(os.cpu_count() or 1))
    for cpu in cpus:
        assert sum(
            r.value for r in util if r.attributes["cpu.logical_number"] == cpu
        ) == pytest.approx(1.0)
    # we just spun for 0.3 s: some CPU saw user time
    assert max(r.value for r in util if r.attributes["cpu.mode"] == "user") > 0.2


def write_psi(root: Path, resource: str, avg10: float, avg60: float, total: int) -> None:
    (root / "proc/pressure").mkdir(parents=True, exist_ok=True)
    (root / "proc/pressure" / resource).write_text(
        f"some avg10={avg10:.2f} avg60={avg60:.2f} avg300=0.00 total={total}\n"
        "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    )


def test_pressure_as_a_share_and_fault_isolation(tmp_path: Path) -> None:
    write_psi(tmp_path, "memory", 12.5, 3.0, 123456)
    write_psi(tmp_path, "cpu", 50.0, 40.0, 999)
    found = psi_discover(Roots.under(tmp_path))
    assert len(found) == 1
    sensor = found[0]
    assert isinstance(sensor, PressureSensor)
    values = {
        (r.attributes["edged.resource"], r.attributes["edged.window"]): r.value
        for r in sensor.read()
    }
    assert values == {
        ("memory", "10s"): 0.125,
        ("memory", "60s"): 0.03,
        ("cpu", "10s"): 0.5,
        ("cpu", "60s"): 0.4,
    }
    assert sensor.total_us == {"memory": 123456, "cpu": 999}
    (tmp_path / "proc/pressure/cpu").write_text("garbage\n")
    with pytest.raises(Exception, match="no 'some' line"):
        sensor.read()
    write_psi(tmp_path, "cpu", 1.0, 1.0, 1)
    assert len(sensor.read()) == 4  # recovers on the next tick


def test_pressure_absent_without_psi(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    found = psi_discover(Roots.under(tmp_path))
    assert found[0].name == "pressure"
    assert "CONFIG_PSI" in found[0].detail  # type: ignore[union-attr]


def test_real_proc_pressure() -> None:
    if not Path("/proc/pressure/memory").exists():
        pytest.skip("this kernel has no PSI")
    sensor = psi_discover(Roots())[0]
    assert isinstance(sensor, PressureSensor)
    values = sensor.read()
    assert {r.attributes["edged.resource"] for r in values} >= {"memory", "cpu"}
    assert all(0.0 <= r.value <= 1.0 for r in values)


def test_discovery_on_a_bare_root_reports_absent_not_error(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "sys").mkdir()
    sensors, statuses = discover_all(Roots.under(tmp_path), backends=PROCFS_ONLY)
    assert sensors == []
    assert {s.name: s.status for s in statuses} == {
        "memory": "absent",
        "cpu": "absent",
        "cpufreq": "absent",
        "pressure": "absent",
    }


def test_vanished_and_garbage_meminfo_raise_then_recover(fixture_tree: FixtureTree) -> None:
    root = fixture_tree("jetson/orin-nano-jp6")
    sensor = MemorySensor(Roots.under(root))
    good = (root / "proc/meminfo").read_bytes()
    assert sensor.read()
    sensor.close()
    (root / "proc/meminfo").write_text("MemTotal: lots kB\n")
    with pytest.raises(ValueError, match="lots"):
        sensor.read()
    (root / "proc/meminfo").write_bytes(good)  # rewritten in place, as the kernel does
    assert len(sensor.read()) >= 10
    # a file that cannot be opened (a sensor read from a tree that lost it) raises OSError
    (root / "proc/meminfo").unlink()
    with pytest.raises(FileNotFoundError):
        MemorySensor(Roots.under(root)).read()


def test_the_thor_tree_has_fourteen_cpus_and_no_nvmap(fixture_tree: FixtureTree) -> None:
    root = fixture_tree("jetson/agx-thor-jp7")
    times = [r for r in CpuTimeSensor(Roots.under(root)).read() if r.metric == "system.cpu.time"]
    assert {r.attributes["cpu.logical_number"] for r in times} == set(range(14))
    mem = MemorySensor(Roots.under(root)).read()
    assert next(r.value for r in mem if r.metric == "system.memory.limit") == 128792064 * 1024


def test_copy_of_real_proc_files(tmp_path: Path) -> None:
    """The parsers take this kernel's own formats (a copy, so the values are fixed)."""
    (tmp_path / "proc").mkdir()
    for name in ("meminfo", "stat"):
        shutil.copyfile(f"/proc/{name}", tmp_path / "proc" / name)
    sensors, _statuses = discover_all(Roots.under(tmp_path), backends=PROCFS_ONLY[:2])
    assert {s.name for s in sensors} == {"memory", "cpu"}
    assert all(s.read() for s in sensors)
