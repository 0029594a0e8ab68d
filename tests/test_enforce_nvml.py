"""The GPU power-limit lever against the fake ``pynvml`` (real error classes, recorded limits).

What a user depends on: the limit edged sets is clamped to what the GPU allows and never above
the limit the GPU had; lifting, SIGTERM (restore_all) and the next start after a crash put that
original limit back; a GPU that refuses (no permission, not supported) gives a failed outcome
and nothing changes; without a driver there is no lever at all.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pynvml as real_nvml
import pytest

from edged.config import Level, Limits
from edged.control import Controller
from edged.enforce.enforcer import Enforcer, Status
from edged.enforce.nvml import GpuPowerLever, open_lever
from edged.enforce.restore import StateStore, restore_all
from edged.enforce.signals import Signaller
from edged.policy.base import Action, ActionKind, ProcessClass, Resource
from edged.policy.dynamic import DynamicStrategy
from edged.sensors.base import Roots
from edged.sensors.nvml import NvmlGpu
from edged.sensors.nvml import discover as discover_gpus
from edged.snapshot import Reading, Snapshot
from tests.fakes.pynvml import FakeGpu, FakeNvml

UUID = "GPU-11111111-2222-3333-4444-555555555555"
OTHER = "GPU-99999999-8888-7777-6666-555555555555"


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    nvml = FakeNvml([FakeGpu(uuid=UUID, power_limit_mw=700_000)])
    monkeypatch.setitem(sys.modules, "pynvml", nvml.module())
    return nvml


@pytest.fixture
def lever(fake: FakeNvml, tmp_path: Path) -> Iterator[GpuPowerLever]:
    opened = open_lever(Roots(), StateStore(tmp_path / "state"))
    assert opened is not None
    yield opened
    opened.close()


def gpu_action(kind: ActionKind, target_w: float | None = None, uuid: str = UUID) -> Action:
    return Action(
        kind=kind,
        pid=0,
        resource=Resource.POWER,
        reason="soft",
        strategy="dynamic",
        klass=ProcessClass.NORMAL,
        target=target_w,
        gpu=uuid,
    )


def enforcer(lever: GpuPowerLever | None, store: StateStore, dry_run: bool = False) -> Enforcer:
    return Enforcer(None, Signaller(), store, dry_run, lambda _a: True, gpus=lever)


def test_lower_is_recorded_clamped_and_lift_puts_the_original_back(
    fake: FakeNvml, lever: GpuPowerLever, tmp_path: Path
) -> None:
    assert lever.constraints_w() == {UUID: (200.0, 700.0)}
    assert lever.set_limit(UUID, 450.4) == 450_400
    assert fake.limit_log == [(UUID, 450_400)]
    on_disk = StateStore(tmp_path / "state").data.gpus[UUID]  # recorded, and saved
    assert (on_disk.original_limit_mw, on_disk.limit_mw) == (700_000, 450_400)
    assert lever.set_limit(UUID, 50.0) == 200_000  # clamped to the driver's minimum
    assert fake.gpus[0].power_limit_mw == 200_000
    assert lever.lift(UUID) == 700_000
    assert fake.limit_log[-1] == (UUID, 700_000)
    assert fake.gpus[0].power_limit_mw == 700_000
    assert StateStore(tmp_path / "state").data.empty()
    assert lever.lift(UUID) is None  # nothing imposed any more: nothing written
    assert len(fake.limit_log) == 3


def test_original_is_read_once_and_a_throttle_never_raises_the_limit(
    fake: FakeNvml, lever: GpuPowerLever
) -> None:
    fake.gpus[0].power_limit_mw = 600_000  # the operator had set 600 W before edged
    assert lever.set_limit(UUID, 400.0) == 400_000
    assert lever.set_limit(UUID, 300.0) == 300_000
    assert lever.set_limit(UUID, 650.0) == 600_000  # capped at the original, not 700 W max
    assert lever.store.data.gpus[UUID].original_limit_mw == 600_000
    assert lever.lift(UUID) == 600_000
    assert fake.gpus[0].power_limit_mw == 600_000


def test_restore_after_a_crash_from_a_fresh_store(fake: FakeNvml, tmp_path: Path) -> None:
    first = open_lever(Roots(), StateStore(tmp_path / "state"))
    assert first is not None
    first.set_limit(UUID, 250.0)
    # the daemon is SIGKILLed here: no lift, no close; the GPU keeps 250 W
    assert fake.gpus[0].power_limit_mw == 250_000
    store = StateStore(tmp_path / "state")  # the next start reads the file
    second = open_lever(Roots(), store)
    assert second is not None
    assert restore_all(store, None, Signaller(), second) == 1
    assert fake.gpus[0].power_limit_mw == 700_000
    assert fake.limit_log[-1] == (UUID, 700_000)
    assert StateStore(tmp_path / "state").data.empty()
    second.close()


def test_restore_without_a_lever_keeps_the_record_for_a_later_start(
    fake: FakeNvml, lever: GpuPowerLever, tmp_path: Path
) -> None:
    lever.set_limit(UUID, 300.0)
    store = StateStore(tmp_path / "state")
    assert restore_all(store, None, Signaller(), None) == 0  # e.g. started without root
    assert StateStore(tmp_path / "state").data.gpus[UUID].original_limit_mw == 700_000
    assert fake.gpus[0].power_limit_mw == 300_000
    store = StateStore(tmp_path / "state")
    assert restore_all(store, None, Signaller(), lever) == 1
    assert fake.gpus[0].power_limit_mw == 700_000
    assert StateStore(tmp_path / "state").data.empty()


def test_no_permission_is_a_failed_outcome_and_changes_nothing(
    fake: FakeNvml, lever: GpuPowerLever, tmp_path: Path
) -> None:
    fake.privileged = False
    outcome = enforcer(lever, lever.store).apply(gpu_action(ActionKind.THROTTLE, 300.0))
    assert outcome.status is Status.FAILED
    assert "no permission" in outcome.reason
    assert UUID in outcome.reason
    assert fake.limit_log == []
    assert fake.gpus[0].power_limit_mw == 700_000
    assert StateStore(tmp_path / "state").data.empty()  # nothing to restore either


def test_a_failed_second_step_keeps_the_first_record(
    fake: FakeNvml, lever: GpuPowerLever, tmp_path: Path
) -> None:
    lever.set_limit(UUID, 400.0)
    fake.gpus[0].faults["nvmlDeviceSetPowerManagementLimit"] = real_nvml.NVML_ERROR_UNKNOWN
    outcome = enforcer(lever, lever.store).apply(gpu_action(ActionKind.THROTTLE, 300.0))
    assert outcome.status is Status.FAILED
    record = StateStore(tmp_path / "state").data.gpus[UUID]
    assert (record.original_limit_mw, record.limit_mw) == (700_000, 400_000)


def test_enforcer_throttle_lift_dry_run_and_no_lever(
    fake: FakeNvml, lever: GpuPowerLever, tmp_path: Path
) -> None:
    dry = enforcer(lever, lever.store, dry_run=True).apply(gpu_action(ActionKind.THROTTLE, 300))
    assert dry.status is Status.DRY_RUN
    assert fake.limit_log == []
    absent = enforcer(None, lever.store).apply(gpu_action(ActionKind.THROTTLE, 300.0))
    assert absent.status is Status.SKIPPED
    assert "no GPU power lever" in absent.reason
    live = enforcer(lever, lever.store)
    assert live.apply(gpu_action(ActionKind.THROTTLE, 300.0)).status is Status.DONE
    assert live.apply(gpu_action(ActionKind.UNTHROTTLE)).status is Status.DONE
    assert fake.limit_log == [(UUID, 300_000), (UUID, 700_000)]
    again = live.apply(gpu_action(ActionKind.UNTHROTTLE))
    assert (again.status, again.reason) == (Status.SKIPPED, "nothing imposed on it")
    unknown = live.apply(gpu_action(ActionKind.THROTTLE, 300.0, uuid=OTHER))
    assert unknown.status is Status.FAILED
    freeze = live.apply(gpu_action(ActionKind.FREEZE))
    assert freeze.status is Status.SKIPPED


def test_gpus_without_power_management_are_left_out(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    no_pm = FakeGpu(uuid=OTHER)
    no_pm.faults["nvmlDeviceGetPowerManagementLimitConstraints"] = (
        real_nvml.NVML_ERROR_NOT_SUPPORTED
    )
    fake = FakeNvml([FakeGpu(uuid=UUID), no_pm])
    monkeypatch.setitem(sys.modules, "pynvml", fake.module())
    lever = open_lever(Roots(), StateStore(tmp_path))
    assert lever is not None
    assert set(lever.constraints_w()) == {UUID}
    lever.close()
    only = FakeNvml([no_pm])
    monkeypatch.setitem(sys.modules, "pynvml", only.module())
    assert open_lever(Roots(), StateStore(tmp_path)) is None
    assert only.refcount == 0  # its init was released


def test_no_driver_means_no_lever(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = FakeNvml()
    fake.init_error = real_nvml.NVML_ERROR_DRIVER_NOT_LOADED
    monkeypatch.setitem(sys.modules, "pynvml", fake.module())
    assert open_lever(Roots(), StateStore(tmp_path)) is None
    monkeypatch.delitem(sys.modules, "pynvml")
    empty = tmp_path / "root"
    (empty / "proc").mkdir(parents=True)
    if Path("/dev/nvidiactl").exists() or Path("/dev/dxg").exists():
        pytest.skip("this machine has an NVIDIA driver")
    assert open_lever(Roots.under(empty), StateStore(tmp_path)) is None
    assert "pynvml" not in sys.modules  # not even imported


# --- the controller closed over the lever: power trace in, GPU limits out ----------------


def test_controller_lowers_the_gpu_limit_over_power_and_restores_it(
    fake: FakeNvml, lever: GpuPowerLever
) -> None:
    """RAPL 60 W plus a GPU that wants 300 W and draws at most its limit; soft 300 W. The
    limit comes down until the machine is under soft, then goes back once demand falls."""
    gpu_sensor = discover_gpus(Roots())[0]
    assert isinstance(gpu_sensor, NvmlGpu)
    strategy = DynamicStrategy({"thermal_hold_s": 1.0, "recover_hold_s": 3.0})
    limits = Limits(memory=Level(), power=Level(soft=300, hard=400))
    controller = Controller(strategy, enforcer(lever, lever.store), limits)
    gpu = fake.gpus[0]
    demand_mw = 300_000
    power_log: list[tuple[float, float]] = []
    for tick in range(200):
        now_s = tick * 0.1
        if now_s >= 10.0:
            demand_mw = 100_000
        gpu.power_mw = min(demand_mw, gpu.power_limit_mw)  # a GPU draws at most its limit
        readings = [
            Reading("hw.power", 60.0, {"hw.id": "intel-rapl:0", "hw.type": "cpu"}),
            *gpu_sensor.read(),
        ]
        snapshot = Snapshot(seq=tick, time_unix_ns=0, monotonic_s=now_s, readings=tuple(readings))
        controller.step(snapshot, 0.1, {})
        power_log.append((now_s, 60.0 + gpu.power_mw / 1000.0))
    lowered = [mw for uuid, mw in fake.limit_log if uuid == UUID and mw < 700_000]
    assert lowered, fake.limit_log
    # first step: from its draw (300 W), by the GPU's share (300 of 360 W) of the overshoot
    # over soft less the 2 % cushion (360 - 294 W)
    assert lowered[0] == pytest.approx(300_000 - (360 - 294) * 300 / 360 * 1000, abs=1)
    under = [p for t, p in power_log if 2.5 <= t < 10.0]
    assert max(under) < 300.0  # held under soft while demand stays high
    assert fake.limit_log[-1] == (UUID, 700_000)  # restored after the demand fell
    assert gpu.power_limit_mw == 700_000
    assert lever.store.data.empty()
    done = [e for e in controller.events if e.gpu == UUID and e.status == "done"]
    assert next(e.action for e in done) == "throttle"
    assert [e.action for e in done][-1] == "unthrottle"
    restored_at = next(e for e in done if e.action == "unthrottle")
    assert restored_at.reason == "recovered"
    gpu_sensor.close()
