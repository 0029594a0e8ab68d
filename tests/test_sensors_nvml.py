"""The NVML backend against a fake pynvml that raises the real library's error classes.

The last test runs the real backend on a real GPU (marker ``nvidia``; skipped elsewhere).
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator
from pathlib import Path

import pynvml as real_pynvml
import pytest

from edged.metrics import METRICS
from edged.sampler import Sampler
from edged.sensors import discover_all
from edged.sensors.base import Absent, Roots, Sensor, SensorError
from edged.sensors.nvml import CLOCK_EVENT_REASONS, NvmlGpu, discover
from edged.snapshot import Reading
from tests.fakes.pynvml import MIB, FakeGpu, FakeHandle, FakeNvml

UUID_A = "GPU-aaaaaaaa-0000-0000-0000-000000000000"
UUID_B = "GPU-bbbbbbbb-0000-0000-0000-000000000000"


def install(monkeypatch: pytest.MonkeyPatch, fake: FakeNvml) -> FakeNvml:
    monkeypatch.setitem(sys.modules, "pynvml", fake.module())
    return fake


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    """One busy H100-like GPU, installed as ``pynvml``."""
    gpu = FakeGpu(
        uuid=UUID_A,
        name="NVIDIA H100 80GB HBM3",
        utilization_percent=87,
        memory_controller_percent=40,
        encoder_percent=10,
        decoder_percent=20,
        memory_total_bytes=80 * 1024 * MIB,
        memory_reserved_bytes=512 * MIB,
        memory_used_bytes=20 * 1024 * MIB,
        power_mw=312_500,
        power_limit_mw=500_000,
        energy_mj=123_456_789,
        temperature_c=61,
        clock_event_reasons=(
            real_pynvml.nvmlClocksEventReasonSwPowerCap
            | real_pynvml.nvmlClocksEventReasonHwThermalSlowdown
        ),
        compute_processes=[(4242, 8 * 1024 * MIB), (777, None)],
        graphics_processes=[(4242, 8 * 1024 * MIB), (1313, 256 * MIB)],
    )
    return install(monkeypatch, FakeNvml([gpu]))


def gpus_of(found: list[Sensor | Absent]) -> list[NvmlGpu]:
    gpus = [s for s in found if isinstance(s, NvmlGpu)]
    assert len(gpus) == len(found), found
    return gpus


@pytest.fixture
def gpu(fake: FakeNvml) -> Iterator[NvmlGpu]:
    (sensor,) = gpus_of(discover(Roots()))
    yield sensor
    sensor.close()


def by_key(readings: list[Reading], metric: str, key: str) -> dict[object, float]:
    return {r.attributes[key]: r.value for r in readings if r.metric == metric}


def single(readings: list[Reading], metric: str) -> Reading:
    (reading,) = (r for r in readings if r.metric == metric)
    return reading


# -- the constants we rely on ----------------------------------------------------------------


def test_reason_bits_are_the_nvml_constants() -> None:
    names = {
        "gpu_idle": "GpuIdle",
        "applications_clocks_setting": "ApplicationsClocksSetting",
        "sw_power_cap": "SwPowerCap",
        "hw_slowdown": "HwSlowdown",
        "sync_boost": "SyncBoost",
        "sw_thermal_slowdown": "SwThermalSlowdown",
        "hw_thermal_slowdown": "HwThermalSlowdown",
        "hw_power_brake_slowdown": "HwPowerBrakeSlowdown",
        "display_clocks_setting": "DisplayClockSetting",
    }
    for bit, reason in CLOCK_EVENT_REASONS:
        assert bit == getattr(real_pynvml, f"nvmlClocksEventReason{names[reason]}")
        assert bit == getattr(real_pynvml, f"nvmlClocksThrottleReason{names[reason]}")


def test_fake_raises_the_real_error_classes(fake: FakeNvml) -> None:
    mod = sys.modules["pynvml"]
    assert mod.NVMLError is real_pynvml.NVMLError
    assert mod.NVMLError_GpuIsLost is real_pynvml.NVMLError_GpuIsLost
    with pytest.raises(real_pynvml.NVMLError_Uninitialized):
        mod.nvmlDeviceGetCount()
    mod.nvmlInit()
    fake.gpus[0].lost = True
    with pytest.raises(real_pynvml.NVMLError_GpuIsLost):
        mod.nvmlDeviceGetUtilizationRates(FakeHandle(0))
    fake.gpus[0].lost = False
    memory = mod.nvmlDeviceGetMemoryInfo(FakeHandle(0))
    assert isinstance(memory, real_pynvml.c_nvmlMemory_t)
    assert memory.used + memory.free == memory.total
    mod.nvmlShutdown()
    with pytest.raises(real_pynvml.NVMLError_Uninitialized):
        mod.nvmlShutdown()


# -- discovery -------------------------------------------------------------------------------


def test_without_nvidia_ml_py_the_source_is_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    assert discover(Roots()) == [
        Absent("nvml", "nvidia-ml-py not installed (pip install edged[nvidia])")
    ]


def test_the_real_library_without_a_driver_is_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        pass
    else:
        pytest.skip("an NVIDIA driver library is installed here")
    monkeypatch.setitem(sys.modules, "pynvml", real_pynvml)
    assert discover(Roots()) == [Absent("nvml", "no NVIDIA driver (NVML Shared Library Not Found)")]


@pytest.mark.parametrize(
    "code", [real_pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, real_pynvml.NVML_ERROR_DRIVER_NOT_LOADED]
)
def test_no_driver_is_absent_not_an_error(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    fake = install(monkeypatch, FakeNvml())
    fake.init_error = code
    (absent,) = discover(Roots())
    assert isinstance(absent, Absent)
    assert absent.name == "nvml"
    assert absent.detail.startswith("no NVIDIA driver")
    assert fake.refcount == 0


@pytest.mark.parametrize(
    "code",
    [real_pynvml.NVML_ERROR_NO_PERMISSION, real_pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH],
)
def test_a_driver_that_refuses_us_is_an_error(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    fake = install(monkeypatch, FakeNvml())
    fake.init_error = code
    with pytest.raises(SensorError, match="nvmlInit failed"):
        discover(Roots())
    sensors, statuses = discover_all(Roots(), backends=("edged.sensors.nvml",))
    assert sensors == []
    assert [(s.name, s.status) for s in statuses] == [("nvml", "error")]


def test_a_driver_without_gpus_is_absent_and_shut_down(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install(monkeypatch, FakeNvml([]))
    assert discover(Roots()) == [Absent("nvml", "NVIDIA driver loaded but no GPU found")]
    assert (fake.init_calls, fake.shutdown_calls, fake.refcount) == (1, 1, 0)


def test_one_sensor_per_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install(monkeypatch, FakeNvml([FakeGpu(uuid=UUID_A), FakeGpu(uuid=UUID_B)]))
    gpus = gpus_of(discover(Roots()))
    assert [(g.name, g.uuid) for g in gpus] == [("nvml:0", UUID_A), ("nvml:1", UUID_B)]
    for g in gpus:
        g.close()
    assert (fake.init_calls, fake.shutdown_calls, fake.refcount) == (1, 1, 0)


def test_close_shuts_nvml_down_once(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install(monkeypatch, FakeNvml([FakeGpu(uuid=UUID_A), FakeGpu(uuid=UUID_B)]))
    first, second = gpus_of(discover(Roots()))
    first.close()
    first.close()
    assert fake.shutdown_calls == 0  # the other GPU still needs NVML
    assert second.read()
    second.close()
    second.close()
    assert (fake.shutdown_calls, fake.refcount) == (1, 0)
    with pytest.raises(SensorError, match="closed"):
        first.read()


# -- readings --------------------------------------------------------------------------------


def test_reads_every_metric_with_units_and_attributes(gpu: NvmlGpu) -> None:
    readings = gpu.read()
    assert {r.metric for r in readings} <= set(METRICS)
    assert gpu.name == "nvml:0"
    assert gpu.device_name == "NVIDIA H100 80GB HBM3"

    util = by_key(readings, "hw.gpu.utilization", "hw.gpu.task")
    assert util == pytest.approx({"general": 0.87, "encoder": 0.10, "decoder": 0.20})
    general = next(r for r in readings if r.attributes.get("hw.gpu.task") == "general")
    assert general.attributes == {
        "hw.id": UUID_A,
        "hw.name": "NVIDIA H100 80GB HBM3",
        "hw.vendor": "nvidia",
        "hw.gpu.task": "general",
    }

    # memory info v2: used excludes the driver-reserved 512 MiB
    assert single(readings, "hw.gpu.memory.usage").value == 20 * 1024 * MIB
    assert single(readings, "hw.gpu.memory.limit").value == 80 * 1024 * MIB
    assert single(readings, "hw.gpu.memory.utilization").value == pytest.approx(0.25)
    assert single(readings, "hw.gpu.memory.usage").attributes == {"hw.id": UUID_A}

    power = single(readings, "hw.power")
    assert power.value == pytest.approx(312.5)  # W from 312500 mW
    assert power.attributes == {"hw.id": UUID_A, "hw.name": "NVIDIA H100 80GB HBM3",
                                "hw.type": "gpu"}  # fmt: skip
    assert single(readings, "hw.gpu.power.limit").value == pytest.approx(500.0)
    assert single(readings, "hw.energy").value == pytest.approx(123_456.789)  # J from mJ
    assert single(readings, "hw.temperature").value == 61.0
    assert single(readings, "hw.temperature").attributes["hw.type"] == "gpu"

    clocks = by_key(readings, "hw.gpu.clock", "edged.clock.domain")
    assert clocks == {"sm": 1980e6, "memory": 2619e6}  # Hz from MHz

    events = by_key(readings, "hw.gpu.clock_event", "edged.reason")
    assert set(events) == {reason for _, reason in CLOCK_EVENT_REASONS}
    assert {r for r, v in events.items() if v == 1.0} == {"sw_power_cap", "hw_thermal_slowdown"}
    assert {v for r, v in events.items() if r not in ("sw_power_cap", "hw_thermal_slowdown")} == {
        0.0
    }

    # pid 4242 is in both lists once; pid 777 has no attributable memory and is left out
    procs = by_key(readings, "hw.gpu.process.memory.usage", "process.pid")
    assert procs == {1313: 256 * MIB, 4242: 8 * 1024 * MIB}
    assert all(
        r.attributes["hw.id"] == UUID_A
        for r in readings
        if r.metric == "hw.gpu.process.memory.usage"
    )


def test_values_follow_the_device(fake: FakeNvml, gpu: NvmlGpu) -> None:
    gpu.read()
    fake.gpus[0].utilization_percent = 3
    fake.gpus[0].energy_mj += 5_000
    fake.gpus[0].clock_event_reasons = real_pynvml.nvmlClocksEventReasonGpuIdle
    readings = gpu.read()
    assert by_key(readings, "hw.gpu.utilization", "hw.gpu.task")["general"] == pytest.approx(0.03)
    assert single(readings, "hw.energy").value == pytest.approx(123_461.789)
    events = by_key(readings, "hw.gpu.clock_event", "edged.reason")
    assert {r for r, v in events.items() if v} == {"gpu_idle"}


def test_only_supported_clock_event_reasons_are_reported(
    fake: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.gpus[0].supported_clock_event_reasons = 0x1 | 0x4 | 0x40
    (sensor,) = gpus_of(discover(Roots()))
    events = by_key(sensor.read(), "hw.gpu.clock_event", "edged.reason")
    assert events == {"gpu_idle": 0.0, "sw_power_cap": 1.0, "hw_thermal_slowdown": 1.0}
    sensor.read()
    assert fake.calls["nvmlDeviceGetSupportedClocksEventReasons"] == 1  # asked once
    sensor.close()


# -- faults ----------------------------------------------------------------------------------


def test_not_supported_is_omitted_and_not_asked_again(fake: FakeNvml) -> None:
    fake.gpus[0].faults["nvmlDeviceGetPowerUsage"] = real_pynvml.NVML_ERROR_NOT_SUPPORTED
    fake.gpus[0].faults["nvmlDeviceGetEncoderUtilization"] = real_pynvml.NVML_ERROR_NOT_SUPPORTED
    (sensor,) = gpus_of(discover(Roots()))
    first = sensor.read()
    second = sensor.read()
    for readings in (first, second):
        assert not [r for r in readings if r.metric == "hw.power"]
        assert set(by_key(readings, "hw.gpu.utilization", "hw.gpu.task")) == {"general", "decoder"}
        assert single(readings, "hw.gpu.power.limit").value == pytest.approx(500.0)
    assert fake.calls["nvmlDeviceGetPowerUsage"] == 1
    assert fake.calls["nvmlDeviceGetEncoderUtilization"] == 1
    assert set(sensor.unsupported) == {"power", "encoder_utilization"}
    assert fake.calls["nvmlDeviceGetUtilizationRates"] == 2
    sensor.close()


def test_no_data_is_omitted_for_that_tick_only(fake: FakeNvml, gpu: NvmlGpu) -> None:
    fake.gpus[0].faults["nvmlDeviceGetTotalEnergyConsumption"] = real_pynvml.NVML_ERROR_NO_DATA
    assert not [r for r in gpu.read() if r.metric == "hw.energy"]
    del fake.gpus[0].faults["nvmlDeviceGetTotalEnergyConsumption"]
    assert single(gpu.read(), "hw.energy").value == pytest.approx(123_456.789)


def test_a_lost_gpu_is_an_error_for_the_tick_and_is_reopened(fake: FakeNvml, gpu: NvmlGpu) -> None:
    assert gpu.read()
    fake.gpus[0].lost = True
    with pytest.raises(SensorError, match="GpuIsLost") as info:
        gpu.read()
    assert info.value.source == "nvml:0"
    with pytest.raises(SensorError):  # re-opening fails while the GPU is still lost
        gpu.read()
    fake.gpus[0].lost = False
    readings = gpu.read()
    assert single(readings, "hw.gpu.memory.limit").value == 80 * 1024 * MIB
    assert fake.calls["nvmlDeviceGetHandleByUUID"] == 2  # re-opened by UUID, not by index


def test_unknown_error_fails_one_gpu_while_the_other_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install(monkeypatch, FakeNvml([FakeGpu(uuid=UUID_A), FakeGpu(uuid=UUID_B)]))
    fake.gpus[0].faults["nvmlDeviceGetUtilizationRates"] = real_pynvml.NVML_ERROR_UNKNOWN
    gpus = gpus_of(discover(Roots()))
    sampler = Sampler(gpus)
    snapshot = sampler.tick()
    assert [(s.name, s.status) for s in snapshot.sources] == [("nvml:0", "error"),
                                                              ("nvml:1", "ok")]  # fmt: skip
    assert "NVMLError_Unknown" in snapshot.sources[0].detail
    assert {r.attributes["hw.id"] for r in snapshot.readings} == {UUID_B}
    del fake.gpus[0].faults["nvmlDeviceGetUtilizationRates"]
    snapshot = sampler.tick()
    assert [s.status for s in snapshot.sources] == ["ok", "ok"]
    assert snapshot.value("hw.gpu.utilization", {"hw.id": UUID_A}) == 0.0
    sampler.close()
    assert fake.refcount == 0


def test_a_gpu_that_cannot_be_opened_at_discovery_reports_errors_until_it_can(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = install(monkeypatch, FakeNvml([FakeGpu(uuid=UUID_A)]))
    fake.gpus[0].faults["nvmlDeviceGetHandleByIndex"] = real_pynvml.NVML_ERROR_NO_PERMISSION
    (sensor,) = gpus_of(discover(Roots()))
    assert sensor.uuid is None
    with pytest.raises(SensorError, match="cannot open GPU 0"):
        sensor.read()
    del fake.gpus[0].faults["nvmlDeviceGetHandleByIndex"]
    assert sensor.read()
    assert sensor.uuid == UUID_A
    sensor.close()


def test_an_older_driver_is_read_through_the_older_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml([FakeGpu(uuid=UUID_A, temperature_c=55, memory_used_bytes=1024 * MIB,
                             memory_reserved_bytes=256 * MIB, compute_processes=[(10, MIB)],
                             clock_event_reasons=0x8)])  # fmt: skip
    fake.missing_symbols = {
        "nvmlDeviceGetTemperatureV",
        "nvmlDeviceGetMemoryInfo_v2",
        "nvmlDeviceGetCurrentClocksEventReasons",
        "nvmlDeviceGetSupportedClocksEventReasons",
        "nvmlDeviceGetComputeRunningProcesses_v3",
        "nvmlDeviceGetGraphicsRunningProcesses_v3",
    }
    install(monkeypatch, fake)
    (sensor,) = gpus_of(discover(Roots()))
    for _ in range(2):
        readings = sensor.read()
        assert single(readings, "hw.temperature").value == 55.0
        # memory info v1 counts the reserved memory as used
        assert single(readings, "hw.gpu.memory.usage").value == 1280 * MIB
        events = by_key(readings, "hw.gpu.clock_event", "edged.reason")
        assert {r for r, v in events.items() if v} == {"hw_slowdown"}
        assert by_key(readings, "hw.gpu.process.memory.usage", "process.pid") == {10: MIB}
    assert fake.calls["nvmlDeviceGetTemperatureV"] == 1  # the newer call is not retried
    assert fake.calls["nvmlDeviceGetTemperature"] == 2
    assert fake.calls["nvmlDeviceGetCurrentClocksThrottleReasons"] == 2
    assert fake.calls["nvmlDeviceGetComputeRunningProcesses_v2"] == 2
    assert sensor.unsupported == {}
    sensor.close()


def test_an_older_nvidia_ml_py_without_the_newer_functions(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml([FakeGpu(uuid=UUID_A, temperature_c=44)])
    fake.python_missing = {
        "nvmlDeviceGetTemperatureV",
        "nvmlDeviceGetCurrentClocksEventReasons",
        "nvmlDeviceGetSupportedClocksEventReasons",
    }
    install(monkeypatch, fake)
    (sensor,) = gpus_of(discover(Roots()))
    readings = sensor.read()
    assert single(readings, "hw.temperature").value == 44.0
    assert by_key(readings, "hw.gpu.clock_event", "edged.reason")
    assert fake.calls["nvmlDeviceGetSupportedClocksThrottleReasons"] == 1
    sensor.close()


# -- the fake's power-limit control (used by the enforcement backend) ------------------------


def test_fake_power_limit_control(fake: FakeNvml, gpu: NvmlGpu) -> None:
    mod = sys.modules["pynvml"]
    handle = mod.nvmlDeviceGetHandleByUUID(UUID_A)
    assert mod.nvmlDeviceGetPowerManagementLimitConstraints(handle) == [200_000, 700_000]
    mod.nvmlDeviceSetPowerManagementLimit(handle, 350_000)
    assert mod.nvmlDeviceGetPowerManagementLimit(handle) == 350_000
    assert fake.limit_log == [(UUID_A, 350_000)]
    assert single(gpu.read(), "hw.gpu.power.limit").value == pytest.approx(350.0)
    with pytest.raises(real_pynvml.NVMLError_InvalidArgument):
        mod.nvmlDeviceSetPowerManagementLimit(handle, 50_000)
    fake.privileged = False
    with pytest.raises(real_pynvml.NVMLError_NoPermission):
        mod.nvmlDeviceSetPowerManagementLimit(handle, 300_000)
    assert fake.limit_log == [(UUID_A, 350_000)]
    assert mod.nvmlDeviceGetPowerManagementDefaultLimit(handle) == 700_000


# -- a real GPU ------------------------------------------------------------------------------


@pytest.mark.nvidia
def test_real_gpu() -> None:
    found = discover(Roots())
    gpus = gpus_of(found)
    assert gpus, found
    try:
        for sensor in gpus:
            readings = sensor.read()
            metrics = {r.metric for r in readings}
            assert metrics <= set(METRICS)
            assert {"hw.gpu.memory.usage", "hw.gpu.memory.limit"} <= metrics
            assert sensor.uuid is not None
            assert sensor.uuid.startswith(("GPU-", "MIG-"))
            for r in readings:
                if r.metric in ("hw.gpu.utilization", "hw.gpu.memory.utilization"):
                    assert 0.0 <= r.value <= 1.0, r
                if r.metric == "hw.gpu.clock_event":
                    assert r.value in (0.0, 1.0)
                if r.metric == "hw.temperature":
                    assert 0.0 < r.value < 120.0
            limit = single(readings, "hw.gpu.memory.limit").value
            assert 0 <= single(readings, "hw.gpu.memory.usage").value <= limit
            assert sensor.read()  # a second tick works too (cached NotSupported etc.)
    finally:
        for sensor in gpus:
            sensor.close()


def test_no_driver_means_absent_without_importing_nvidia_ml_py(tmp_path: Path) -> None:
    """Most machines have no NVIDIA driver: they must not pay 4 MiB of RSS for pynvml."""
    import subprocess
    import sys

    if nvml_driver_here():
        pytest.skip("this machine has an NVIDIA driver node under /dev")
    (tmp_path / "proc").mkdir()
    code = (
        "import sys; from edged.sensors.base import Roots; from edged.sensors import nvml; "
        f"print(nvml.discover(Roots.under({str(tmp_path)!r}))); "
        "print('pynvml' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.splitlines()
    assert "no NVIDIA driver" in out[0]
    assert out[1] == "False"


def nvml_driver_here() -> bool:
    import os

    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/dxg")
