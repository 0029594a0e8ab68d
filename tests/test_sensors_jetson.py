"""The Jetson backend against board trees: Orin Nano JP6, AGX Thor JP7 (shared fixtures, with
their expected readings) and a hand-written Nano JP4 tree for the L4T IIO power monitor.

Trees live in ``tests/data/jetson`` (see its PROVENANCE.md); every test works on a copy.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from edged.metrics import METRICS
from edged.sampler import Sampler
from edged.sensors import discover_all
from edged.sensors.base import Absent, Roots, Sensor
from edged.sensors.jetson import (
    JetsonGpu,
    JetsonRails,
    discover,
    find_gpus,
    parse_sysfs_int,
    read_board,
)
from edged.snapshot import Reading

JETSON = Path(__file__).resolve().parent / "data" / "jetson"
TREES = ("orin-nano-jp6", "agx-thor-jp7")


def copy_tree(tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copytree(JETSON / name, dst, symlinks=True)  # sysfs-like link cycles: never follow
    return dst


def expected(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((JETSON / "expected" / f"{name}.json").read_text())
    return data


def sensors_of(found: list[Sensor | Absent]) -> tuple[JetsonGpu | None, list[JetsonRails]]:
    gpus = [s for s in found if isinstance(s, JetsonGpu)]
    assert len(gpus) <= 1, gpus
    rails = [s for s in found if isinstance(s, JetsonRails)]
    return (gpus[0] if gpus else None), rails


def power_by_rail(rails: list[JetsonRails]) -> dict[str, Reading]:
    readings = [r for sensor in rails for r in sensor.read()]
    assert {r.metric for r in readings} == {"hw.power"}
    by_id = {str(r.attributes["hw.id"]): r for r in readings}
    assert len(by_id) == len(readings)
    return by_id


def write(path: Path, text: str) -> None:
    """Rewrite a sysfs-like file in place (same inode, as the kernel regenerates content)."""
    with open(path, "r+" if path.exists() else "w") as f:
        f.truncate(0)
        f.write(text)


def fail_reads(monkeypatch: pytest.MonkeyPatch, path: Path, code: int) -> None:
    """Make ``pread`` on an open descriptor of ``path`` fail with ``code`` (a sysfs node
    removed under an open fd reads ENODEV; a sensor chip that stops answering reads EIO)."""
    target = os.path.realpath(path)
    real_pread = os.pread

    def pread(fd: int, length: int, offset: int) -> bytes:
        if os.path.realpath(f"/proc/self/fd/{fd}") == target:
            raise OSError(code, os.strerror(code))
        return real_pread(fd, length, offset)

    monkeypatch.setattr(os, "pread", pread)


# -- the two shared boards, against their expected readings ------------------------------------


@pytest.mark.parametrize("tree", TREES)
def test_board_identity(tmp_path: Path, tree: str) -> None:
    want = expected(tree)["board"]
    board = read_board(Roots.under(copy_tree(tmp_path, tree)))
    assert board.model == want["model"]
    assert board.l4t_release == want["l4t"]
    assert list(board.compatible) == want["compatible"]
    assert board.soc == want["soc"]
    assert board.is_jetson


@pytest.mark.parametrize("tree", TREES)
def test_gpu_clock_and_load(tmp_path: Path, tree: str) -> None:
    want = expected(tree)["gpu"]
    root = copy_tree(tmp_path, tree)
    found = discover(Roots.under(root))
    gpu, _ = sensors_of(found)
    assert gpu is not None
    assert gpu.name == "jetson:gpu"
    assert "/" + str(gpu.devfreq_path.relative_to(root)) == want["devfreq"]
    assert gpu.board_model == expected(tree)["board"]["model"]
    assert gpu.l4t_release == expected(tree)["board"]["l4t"]
    readings = gpu.read()
    assert {r.metric for r in readings} <= set(METRICS)
    (clock,) = (r for r in readings if r.metric == "hw.gpu.clock")
    assert clock.value == want["cur_freq_hz"]
    assert clock.attributes["edged.clock.domain"] == "sm"
    utilization = [r for r in readings if r.metric == "hw.gpu.utilization"]
    if want["load_permille"] is None:  # Thor: no load file; unknown, never 0 %
        assert utilization == []
        assert (
            Absent(
                "jetson:gpu:load",
                "no nvgpu load file: GPU utilization is not in sysfs here (NVML has it)",
            )
            in found
        )
    else:
        (util,) = utilization
        assert util.value == pytest.approx(want["utilization_ratio"])
        assert util.attributes == {
            "hw.id": "17000000.gpu",
            "hw.name": "ga10b",
            "hw.vendor": "nvidia",
            "hw.gpu.task": "general",
        }
    gpu.close()


@pytest.mark.parametrize("tree", TREES)
def test_only_the_gpu_devfreq_is_the_gpu(tmp_path: Path, tree: str) -> None:
    root = copy_tree(tmp_path, tree)
    nodes = find_gpus(Roots.under(root))
    assert [n.devfreq.name for n in nodes] == [Path(expected(tree)["gpu"]["devfreq"]).name]
    # VIC (Orin) and the NVD codec domain (Thor) sit beside the GPU but are not it
    assert {p.name for p in (root / "sys/class/devfreq").iterdir()} - {nodes[0].devfreq.name}


def test_vic_alone_is_not_taken_for_a_gpu(tmp_path: Path) -> None:
    root = copy_tree(tmp_path, "orin-nano-jp6")
    (root / "sys/class/devfreq/17000000.gpu").unlink()
    found = discover(Roots.under(root))
    assert sensors_of(found)[0] is None
    assert Absent("jetson:gpu", "no devfreq node whose device is the GPU") in found


def test_thor_codec_domain_alone_is_not_taken_for_a_gpu(tmp_path: Path) -> None:
    root = copy_tree(tmp_path, "agx-thor-jp7")
    (root / "sys/class/devfreq/gpu-gpc-0").unlink()
    assert find_gpus(Roots.under(root)) == []


@pytest.mark.parametrize("tree", TREES)
def test_rail_power_and_the_input_rail(tmp_path: Path, tree: str) -> None:
    want = expected(tree)["power"]
    found = discover(Roots.under(copy_tree(tmp_path, tree)))
    _, rails = sensors_of(found)
    power = power_by_rail(rails)
    wanted_w = {label: rail["power_w_v_times_i"] for label, rail in want["rails"].items()}
    if "vin" in want:  # Thor: the carrier INA238 measures the total input, in µW
        wanted_w["VIN"] = want["vin"]["power_w"]
    assert {label: r.value for label, r in power.items()} == pytest.approx(wanted_w)

    total = "VIN" if "vin" in want else want["total_rail"]
    assert {s.input_rail for s in rails} == {total}
    assert power[total].value == pytest.approx(want["total_w"])
    assert "hw.parent" not in power[total].attributes
    branches = [r for label, r in power.items() if label != total]
    assert all(r.attributes["hw.parent"] == total for r in branches)
    assert sum(r.value for r in branches) < power[total].value  # parts of it, never added
    for label, reading in power.items():
        assert reading.attributes["hw.name"] == label
        assert reading.attributes["hw.type"] == "voltage"
    for sensor in rails:
        assert sensor.board_model == expected(tree)["board"]["model"]
        sensor.close()


def test_thor_has_one_rail_sensor_per_monitor_chip(tmp_path: Path) -> None:
    _, rails = sensors_of(discover(Roots.under(copy_tree(tmp_path, "agx-thor-jp7"))))
    assert {(s.name, s.chip, tuple(s.rail_labels)) for s in rails} == {
        ("jetson:rails:2-0044", "ina238", ("VIN",)),
        ("jetson:rails:2-0040", "ina3221", ("VDD_GPU", "VDD_CPU_SOC_MSS", "VIN_SYS_5V0")),
    }


def test_not_connected_and_disabled_channels_are_not_rails(tmp_path: Path) -> None:
    root = copy_tree(tmp_path, "orin-nano-jp6")
    hwmon = root / "sys/class/hwmon/hwmon1"
    write(hwmon / "in3_label", "NC\n")
    write(hwmon / "in2_enable", "0\n")
    _, rails = sensors_of(discover(Roots.under(root)))
    assert set(power_by_rail(rails)) == {"VDD_IN"}


def test_board_model_from_sysfs_when_proc_device_tree_is_missing(tmp_path: Path) -> None:
    root = copy_tree(tmp_path, "orin-nano-jp6")
    (root / "proc/device-tree").unlink()
    assert read_board(Roots.under(root)).model == "NVIDIA Jetson Orin Nano Developer Kit"


def test_not_a_jetson_is_absent(tmp_path: Path) -> None:
    (tmp_path / "sys/class/devfreq").mkdir(parents=True)
    assert discover(Roots.under(tmp_path)) == [
        Absent("jetson", "not a Jetson (no nv_tegra_release, no nvidia,tegra* board)")
    ]
    sensors, statuses = discover_all(Roots.under(tmp_path), backends=("edged.sensors.jetson",))
    assert sensors == []
    assert [(s.name, s.status) for s in statuses] == [("jetson", "absent")]


# -- JetPack 4: L4T ina3221x IIO rails --------------------------------------------------------


def test_jetpack4_iio_rails_and_gpu(tmp_path: Path) -> None:
    root = copy_tree(tmp_path, "nano-jp4")
    board = read_board(Roots.under(root))
    assert (board.model, board.l4t_release, board.soc) == (
        "NVIDIA Jetson Nano Developer Kit",
        "R32.7.4",
        "tegra210",
    )
    gpu, rails = sensors_of(discover(Roots.under(root)))
    assert gpu is not None
    readings = {r.metric: r for r in gpu.read()}
    assert readings["hw.gpu.utilization"].value == pytest.approx(0.287)
    assert readings["hw.gpu.utilization"].attributes["hw.name"] == "gm20b"
    assert readings["hw.gpu.clock"].value == 921_600_000
    # the IIO device is reachable through the driver and the iio bus: one sensor, not two
    assert [(s.name, s.chip, s.input_rail) for s in rails] == [
        ("jetson:rails:6-0040", "ina3221x", "POM_5V_IN")
    ]
    power = power_by_rail(rails)
    assert {k: r.value for k, r in power.items()} == pytest.approx(
        {"POM_5V_IN": 5.936, "POM_5V_GPU": 0.605, "POM_5V_CPU": 1.612}
    )
    assert power["POM_5V_GPU"].attributes["hw.parent"] == "POM_5V_IN"


def test_jetpack4_units_in_values_and_voltage_times_current(tmp_path: Path) -> None:
    root = copy_tree(tmp_path, "nano-jp4")
    iio = root / "sys/bus/iio/devices/iio:device0"
    write(iio / "in_power0_input", "5936 mW\n")  # some L4T attributes carry a unit word
    (iio / "in_power1_input").unlink()  # no power attribute: V x I
    _, rails = sensors_of(discover(Roots.under(root)))
    power = power_by_rail(rails)
    assert power["POM_5V_IN"].value == pytest.approx(5.936)
    assert power["POM_5V_GPU"].value == pytest.approx(5048 * 120 / 1e6)


@pytest.mark.parametrize(
    ("raw", "value"), [(b"432\n", 432), (b"-8\n", -8), (b" 7 \n", 7), (b"0\n", 0)]
)
def test_parse_sysfs_int(raw: bytes, value: int) -> None:
    assert parse_sysfs_int(raw) == value
    assert parse_sysfs_int(raw, unit_allowed=True) == value


@pytest.mark.parametrize(("raw", "value"), [(b"5936 mW\n", 5936), (b"96 ma", 96), (b"8mv\n", 8)])
def test_parse_sysfs_int_with_a_unit_word(raw: bytes, value: int) -> None:
    assert parse_sysfs_int(raw, unit_allowed=True) == value
    with pytest.raises(ValueError, match="not an integer"):
        parse_sysfs_int(raw)


@pytest.mark.parametrize(
    "raw", [b"", b"\n", b"abc\n", b"12 34\n", b"4.2\n", b"0x10\n", b"4_32\n", b"mW\n"]
)
def test_parse_sysfs_int_rejects_garbage(raw: bytes) -> None:
    for unit_allowed in (False, True):
        with pytest.raises(ValueError, match=r"empty|not an integer"):
            parse_sysfs_int(raw, unit_allowed=unit_allowed)


# -- faults: one source fails for the tick, the others read, and it recovers ------------------


def orin_sampler(tmp_path: Path) -> tuple[Path, Sampler]:
    root = copy_tree(tmp_path, "orin-nano-jp6")
    sensors, _ = discover_all(Roots.under(root), backends=("edged.sensors.jetson",))
    return root, Sampler(sensors)


def statuses(sampler: Sampler) -> dict[str, tuple[str, str]]:
    snapshot = sampler.tick()
    return {s.name: (s.status, s.detail) for s in snapshot.sources}


LOAD = "sys/devices/platform/bus@0/17000000.gpu/load"


@pytest.mark.parametrize(
    ("content", "detail"),
    [("garbage\n", "not an integer"), ("", "empty"), ("1500\n", "not in 0..1000")],
)
def test_bad_load_file_fails_the_gpu_only_and_recovers(
    tmp_path: Path, content: str, detail: str
) -> None:
    root, sampler = orin_sampler(tmp_path)
    assert {v[0] for v in statuses(sampler).values()} == {"ok"}
    write(root / LOAD, content)
    now = statuses(sampler)
    assert now["jetson:gpu"][0] == "error"
    assert detail in now["jetson:gpu"][1]
    assert "load" in now["jetson:gpu"][1]
    assert now["jetson:rails:1-0040"] == ("ok", "")
    write(root / LOAD, "500\n")
    snapshot = sampler.tick()
    assert {s.status for s in snapshot.sources} == {"ok"}
    assert snapshot.value("hw.gpu.utilization") == pytest.approx(0.5)
    sampler.close()


def test_load_file_gone_before_it_is_opened(tmp_path: Path) -> None:
    root, sampler = orin_sampler(tmp_path)
    (root / LOAD).rename(root / "load.away")
    now = statuses(sampler)
    assert now["jetson:gpu"][0] == "error"
    assert "No such file" in now["jetson:gpu"][1]
    assert now["jetson:rails:1-0040"][0] == "ok"
    (root / "load.away").rename(root / LOAD)
    assert statuses(sampler)["jetson:gpu"] == ("ok", "")
    sampler.close()


def test_load_node_removed_under_an_open_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, sampler = orin_sampler(tmp_path)
    assert statuses(sampler)["jetson:gpu"] == ("ok", "")  # the descriptor is open now
    with monkeypatch.context() as patch:
        fail_reads(patch, root / LOAD, errno.ENODEV)
        now = statuses(sampler)
        assert now["jetson:gpu"][0] == "error"
        assert now["jetson:rails:1-0040"][0] == "ok"
    assert statuses(sampler)["jetson:gpu"] == ("ok", "")  # reopened after the failure
    sampler.close()


def test_unreadable_rail_fails_its_chip_only_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, sampler = orin_sampler(tmp_path)
    curr2 = root / "sys/class/hwmon/hwmon1/curr2_input"
    statuses(sampler)
    with monkeypatch.context() as patch:
        fail_reads(patch, curr2, errno.EIO)
        now = statuses(sampler)
        assert now["jetson:rails:1-0040"][0] == "error"
        assert "VDD_CPU_GPU_CV" in now["jetson:rails:1-0040"][1]
        assert "curr2_input" in now["jetson:rails:1-0040"][1]
        assert now["jetson:gpu"] == ("ok", "")
    write(curr2, "garbage\n")
    assert statuses(sampler)["jetson:rails:1-0040"][0] == "error"
    write(curr2, "600\n")
    snapshot = sampler.tick()
    assert {s.status for s in snapshot.sources} == {"ok"}
    assert snapshot.value("hw.power", {"hw.id": "VDD_CPU_GPU_CV"}) == pytest.approx(3.0144)
    sampler.close()


def test_thor_vin_failure_does_not_hide_the_module_rails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = copy_tree(tmp_path, "agx-thor-jp7")
    sensors, _ = discover_all(Roots.under(root), backends=("edged.sensors.jetson",))
    sampler = Sampler(sensors)
    sampler.tick()
    fail_reads(monkeypatch, root / "sys/class/hwmon/hwmon4/power1_input", errno.EIO)
    snapshot = sampler.tick()
    state = {s.name: s.status for s in snapshot.sources}
    assert state == {
        "jetson:gpu": "ok",
        "jetson:rails:2-0044": "error",
        "jetson:rails:2-0040": "ok",
    }
    assert snapshot.value("hw.power", {"hw.id": "VDD_GPU"}) == pytest.approx(18.27648)
    assert snapshot.value("hw.power", {"hw.id": "VIN"}) is None
    sampler.close()


def test_close_releases_descriptors_and_is_idempotent(tmp_path: Path) -> None:
    root = copy_tree(tmp_path, "orin-nano-jp6")
    found = discover(Roots.under(root))
    live = [s for s in found if isinstance(s, Sensor)]
    for sensor in live:
        sensor.read()
    before = len(os.listdir("/proc/self/fd"))
    for sensor in live:
        sensor.close()
        sensor.close()
    assert len(os.listdir("/proc/self/fd")) == before - 1 - 1 - 3 * 2  # freq, load, 3 x (V, I)


# -- a real board ------------------------------------------------------------------------------


@pytest.mark.jetson
def test_real_jetson() -> None:
    found = discover(Roots())
    gpu, rails = sensors_of(found)
    try:
        board = read_board(Roots())
        assert board.is_jetson
        assert board.model
        if gpu is not None:
            readings = gpu.read()
            assert {r.metric for r in readings} <= set(METRICS)
            for r in readings:
                if r.metric == "hw.gpu.utilization":
                    assert 0.0 <= r.value <= 1.0
                if r.metric == "hw.gpu.clock":
                    assert r.value > 0
        for rail_sensor in rails:
            for r in rail_sensor.read():
                assert r.metric == "hw.power"
                assert 0.0 <= r.value < 1000.0
    finally:
        for item in found:
            if isinstance(item, Sensor):
                item.close()
