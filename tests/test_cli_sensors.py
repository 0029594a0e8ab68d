"""`edged sensors --root BOARD --json`: every backend together, against what the fixture READMEs
say a correct reader derives from each Jetson tree (tests/data/jetson/expected/*.json)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edged.metrics import METRICS

BOARDS = Path(__file__).parent / "data" / "jetson"


def sensors_json(root: Path) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "edged", "sensors", "--root", str(root), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # failures are reported in the output, not as log noise
    out: dict[str, Any] = json.loads(result.stdout)
    return out


def readings(out: dict[str, Any], metric: str) -> list[dict[str, Any]]:
    return [r for r in out["readings"] if r["metric"] == metric]


@pytest.mark.parametrize("board", ["orin-nano-jp6", "agx-thor-jp7"])
def test_every_reading_of_a_board(board: str) -> None:
    expected = json.loads((BOARDS / "expected" / f"{board}.json").read_text())
    out = sensors_json(BOARDS / board)
    sources = {s["name"]: s for s in out["sources"]}

    # the contract: every reading is a known metric with its UCUM unit
    for r in out["readings"]:
        assert r["unit"] == METRICS[r["metric"]].unit, r

    # board identity
    assert sources["jetson:gpu"]["status"] == "ok"
    assert expected["board"]["model"] in sources["jetson:gpu"]["detail"]
    assert expected["board"]["l4t"] in sources["jetson:gpu"]["detail"]

    # memory: used as the policy judges it is MemTotal - MemAvailable
    mem = expected["memory"]
    limit = readings(out, "system.memory.limit")[0]["value"]
    available = readings(out, "system.memory.linux.available")[0]["value"]
    assert limit == mem["MemTotal_kB"] * 1024
    assert limit - available == mem["used_kB_total_minus_available"] * 1024

    # CPU frequency per logical CPU, in Hz (cpufreq says kHz)
    freq = {
        r["attributes"]["cpu.logical_number"]: r["value"]
        for r in readings(out, "system.cpu.frequency")
    }
    assert freq == {
        int(cpu[3:]): khz * 1000 for cpu, khz in expected["cpu"]["cur_freq_khz"].items()
    }

    # thermal zones by type, their critical trip, the unavailable ones as errors
    temps = {r["attributes"]["hw.name"]: r["value"] for r in readings(out, "hw.temperature")}
    for zone, celsius in expected["thermal_c"].items():
        assert temps[zone] == pytest.approx(celsius)
    critical = {
        r["value"]
        for r in readings(out, "hw.temperature.limit")
        if r["attributes"]["hw.limit_type"] == "critical"
    }
    assert expected["thermal_critical_c"] in critical
    failing = {s["name"] for s in out["sources"] if s["status"] == "error"}
    assert len(failing) == len(expected.get("thermal_unavailable", []))

    # fan
    rpm = [r["value"] for r in readings(out, "hw.fan.speed")]
    assert rpm == [expected["fan"]["rpm"]]

    # GPU: clock always, utilization where the board has a load file
    gpu = expected["gpu"]
    clocks = [r["value"] for r in readings(out, "hw.gpu.clock")]
    assert clocks == [gpu["cur_freq_hz"]]
    util = [r["value"] for r in readings(out, "hw.gpu.utilization")]
    assert util == ([gpu["utilization_ratio"]] if gpu.get("load_permille") is not None else [])

    # power: the input rail is the board total; branch rails name it as their parent
    power = expected["power"]
    rails = {r["attributes"]["hw.id"]: r for r in readings(out, "hw.power")}
    total_rail = power["total_rail"].split()[0]  # "VIN (ina238 power1_input)" names VIN
    total = rails[total_rail]
    assert total["value"] == pytest.approx(power["total_w"])
    assert "hw.parent" not in total["attributes"]
    for name, rail in power["rails"].items():
        if name != total_rail:
            assert rails[name]["value"] == pytest.approx(rail["power_w_v_times_i"])
            assert rails[name]["attributes"]["hw.parent"] == total_rail
    assert set(rails) == set(power["rails"]) | {total_rail}


def test_a_bare_root_reports_every_source_absent(tmp_path: Path) -> None:
    for sub in ("proc", "sys", "etc"):
        (tmp_path / sub).mkdir()
    out = sensors_json(tmp_path)
    assert out["readings"] == []
    statuses = {s["name"]: s["status"] for s in out["sources"]}
    assert set(statuses.values()) == {"absent"}
    assert {"memory", "cpu", "thermal", "nvml", "jetson"} <= set(statuses)


def test_this_machine() -> None:
    out = sensors_json(Path("/"))
    metrics = {r["metric"] for r in out["readings"]}
    assert {"system.memory.limit", "system.cpu.time", "system.cpu.utilization"} <= metrics
