"""From a real snapshot of a board to a strategy's State: limits resolved, usage per resource."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edged.config import Level, Limits
from edged.policy.base import ProcessClass, Resource
from edged.policy.inputs import build_state, machine_usage, resolve_limits
from edged.sampler import Sampler
from edged.sensors import Roots, discover_all
from edged.sensors.processes import ProcessSensor
from edged.snapshot import Reading, Snapshot

ORIN = Path(__file__).parent / "data" / "jetson" / "orin-nano-jp6"
EXPECTED = json.loads(
    (Path(__file__).parent / "data/jetson/expected/orin-nano-jp6.json").read_text()
)


def board_snapshot() -> Snapshot:
    sensors, _ = discover_all(Roots.under(ORIN))
    sampler = Sampler(sensors)
    snapshot = sampler.tick()
    sampler.close()
    return snapshot


def test_machine_usage_of_the_orin() -> None:
    usage, capacity, _ = machine_usage(board_snapshot())
    assert usage[Resource.MEMORY] == EXPECTED["memory"]["used_bytes_total_minus_available"]
    assert capacity[Resource.MEMORY] == EXPECTED["memory"]["MemTotal_bytes"]
    assert capacity[Resource.CPU] == 6
    assert usage[Resource.TEMPERATURE] == max(EXPECTED["thermal_c"].values())
    # the board total is the input rail alone; the branch rails are parts of it
    assert usage[Resource.POWER] == pytest.approx(EXPECTED["power"]["total_w"])


def test_named_temperature_zone() -> None:
    usage, _, _ = machine_usage(board_snapshot(), temperature_zone="cpu-thermal")
    assert usage[Resource.TEMPERATURE] == EXPECTED["thermal_c"]["cpu-thermal"]


def test_limits_resolve_percentages_sizes_and_cores() -> None:
    capacity = {Resource.MEMORY: 8 * 2**30, Resource.CPU: 4.0}
    limits = Limits(
        memory=Level(soft="75%", hard="7GiB"),
        cpu=Level(soft="50%", hard=3.5),
        temperature=Level(soft=80, hard=95),
        power=Level(hard=15),
    )
    resolved = resolve_limits(limits, capacity)
    assert resolved[Resource.MEMORY].soft == 6 * 2**30
    assert resolved[Resource.MEMORY].hard == 7 * 2**30
    assert resolved[Resource.CPU].soft == 2.0
    assert resolved[Resource.CPU].hard == 3.5
    assert resolved[Resource.TEMPERATURE].hard == 95
    assert resolved[Resource.POWER].soft is None
    assert Resource.GPU_MEMORY not in resolved


def test_gpu_memory_percent_without_a_gpu_is_unresolved() -> None:
    resolved = resolve_limits(Limits(gpu_memory=Level(soft="80%")), {})
    assert Resource.GPU_MEMORY not in resolved


def test_cpu_busy_cores_from_utilization() -> None:
    readings = []
    for cpu, (user, idle, iowait) in enumerate([(0.5, 0.5, 0.0), (0.2, 0.6, 0.2)]):
        for mode, value in (("user", user), ("idle", idle), ("iowait", iowait)):
            attrs: dict[str, str | int] = {"cpu.mode": mode, "cpu.logical_number": cpu}
            readings.append(Reading("system.cpu.utilization", value, attrs))
            readings.append(Reading("system.cpu.time", 1.0, attrs))
    usage, capacity, _ = machine_usage(Snapshot(1, 0, 0.0, tuple(readings)))
    assert usage[Resource.CPU] == pytest.approx(0.7)
    assert capacity[Resource.CPU] == 2


def test_state_has_process_views_with_start_times_and_protection() -> None:
    sensor = ProcessSensor(Roots(), [], mode="all")
    sensor.read()
    snapshot = Sampler([sensor]).tick()
    start_ticks = {pid: w.info.start_ticks for pid, w in sensor.watched.items()}
    state = build_state(snapshot, Limits(), 1.0, start_ticks)
    me = next(p for p in state.processes if p.pid == os.getpid())
    assert me.protected  # edged (here: the test process) is never a victim
    assert me.start_ticks == start_ticks[os.getpid()]
    assert me.memory_bytes > 0
    assert me.klass is ProcessClass.CRITICAL  # edged and its ancestors, whatever rules say
    parent = next(p for p in state.processes if p.pid == os.getppid())
    assert parent.klass is ProcessClass.CRITICAL
    assert all(p.pid in start_ticks for p in state.processes)
    # every other process is a candidate: normal unless built in (sshd, journald, ...)
    assert any(p.klass is ProcessClass.NORMAL for p in state.processes)
    sensor.close()


def test_process_views_carry_nvml_gpu_memory_summed_over_gpus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The per-process GPU memory NVML reports (here the fake ``pynvml``, two GPUs) reaches
    the strategy's view of a real process, summed over the GPUs it uses."""
    from tests.fakes.pynvml import MIB, FakeGpu, FakeNvml
    from tests.test_sensors_nvml import UUID_A, UUID_B, install

    me = os.getpid()
    install(
        monkeypatch,
        FakeNvml(
            [
                FakeGpu(uuid=UUID_A, compute_processes=[(me, 300 * MIB)]),
                FakeGpu(uuid=UUID_B, compute_processes=[(me, 200 * MIB), (1, 50 * MIB)]),
            ]
        ),
    )
    from edged.sensors.base import Sensor
    from edged.sensors.nvml import discover

    processes = ProcessSensor(Roots(), [], mode="all")
    gpus = [s for s in discover(Roots()) if isinstance(s, Sensor)]
    assert len(gpus) == 2
    sampler = Sampler([processes, *gpus])
    snapshot = sampler.tick()
    start_ticks = {pid: w.info.start_ticks for pid, w in processes.watched.items()}
    state = build_state(snapshot, Limits(), 1.0, start_ticks)
    view = next(p for p in state.processes if p.pid == me)
    assert view.gpu_memory_bytes == 500 * MIB
    others = [p for p in state.processes if p.pid not in (me, 1)]
    assert all(p.gpu_memory_bytes == 0 for p in others)
    sampler.close()
