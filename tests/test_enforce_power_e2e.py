"""`edged run` over power and temperature limits: a real CPU spinner held to a quota, and
GPU power limits lowered and restored through a fake NVIDIA driver.

The daemon reads a *copy* of the node_exporter fixture's sysfs (one RAPL package, one thermal
zone) through ``--root``; ``proc`` and ``sys/fs`` in that root are links to the real ones, so
it sees the real spinner and acts through real cgroup v1 groups. The test drives the fixture:
a thread advances RAPL ``energy_uj`` at the package power it wants the daemon to measure, and
the thermal zone's ``temp`` is rewritten in place, as the kernel regenerates it.

The GPU test runs the daemon under :mod:`tests.fakes.nvml_daemon`, which installs the fake
``pynvml`` with its GPU limits kept in a file, as a real driver keeps them when the daemon
dies: so a SIGKILL and the restore at the next start can be checked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_util import RunningDaemon, start_daemon

pytestmark = [pytest.mark.root, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "thermal_power" / "node_exporter"
CFS_PERIOD_US = 100_000  # edged's v1 quota period (and the kernel's default)
SPINNER = """
import sys
print("ready", flush=True)
while True:
    pass
"""


def machine_root(tmp_path: Path) -> Path:
    """A copy of the fixture's sysfs with only RAPL and thermal (hwmon and batteries would
    add power and temperature readings the test does not drive), plus the real /proc and
    /sys/fs (so the real cgroup hierarchy)."""
    root = tmp_path / "root"
    shutil.copytree(DATA / "sys", root / "sys", symlinks=True)
    for name in ("hwmon", "power_supply"):
        shutil.rmtree(root / "sys" / "class" / name)
    (root / "sys" / "fs").symlink_to("/sys/fs")
    (root / "proc").symlink_to("/proc")
    return root


def write_fixed(path: Path, value: int, width: int) -> None:
    """Rewrite a sysfs-like integer file in place, zero-padded to one width, so a reader
    holding it open (pread at offset 0) never sees a short or empty file."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, f"{value:0{width}d}\n".encode(), 0)
    finally:
        os.close(fd)


class EnergyDriver(threading.Thread):
    """Advances RAPL ``energy_uj`` every 2 ms at ``power_w``, as the package would."""

    def __init__(self, energy_file: Path, power_w: float) -> None:
        super().__init__(daemon=True)
        self.path = energy_file
        self.power_w = power_w
        self.energy_uj = 1_000_000.0
        self.stop = threading.Event()
        with self.path.open("w") as f:  # the one truncating write, before anyone reads
            f.write(f"{int(self.energy_uj):015d}\n")

    def run(self) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        try:
            last_s = time.monotonic()
            while not self.stop.wait(0.002):
                now_s = time.monotonic()
                self.energy_uj += self.power_w * (now_s - last_s) * 1e6
                last_s = now_s
                os.pwrite(fd, f"{int(self.energy_uj):015d}\n".encode(), 0)
        finally:
            os.close(fd)


@pytest.fixture
def spinner() -> Iterator[subprocess.Popen[str]]:
    tag = f"edged-power-{uuid.uuid4().hex[:8]}-spin"
    proc = subprocess.Popen([sys.executable, "-c", SPINNER, tag], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    yield proc
    group = cpu_group(proc.pid)
    proc.kill()
    proc.wait(timeout=10)
    proc.stdout.close()
    if "/edged/" in group:  # a failed test may leave it; the daemon removes it otherwise
        with_path = Path(f"/sys/fs/cgroup/cpu{group}")
        if with_path.exists():
            with_path.rmdir()


def tag_of(proc: subprocess.Popen[str]) -> str:
    args = proc.args
    assert isinstance(args, list)
    return str(args[-1])


def cpu_group(pid: int) -> str:
    """The cgroup v1 cpu-controller path of ``pid`` ("/" for the root group)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            return path
    raise AssertionError(f"pid {pid} has no cpu cgroup")


def quota_cores(pid: int) -> float | None:
    """The CFS quota of ``pid``'s cpu group in cores; None when unlimited."""
    group = Path(f"/sys/fs/cgroup/cpu{cpu_group(pid)}")
    quota_us = int((group / "cpu.cfs_quota_us").read_text())
    if quota_us < 0:
        return None
    return quota_us / int((group / "cpu.cfs_period_us").read_text())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_rate(pid: int, window_s: float = 1.0) -> float:
    """Cores the process used over ``window_s``."""
    start = cpu_seconds(pid)
    time.sleep(window_s)
    return (cpu_seconds(pid) - start) / window_s


def wait_for(predicate: Any, timeout_s: float, what: str, daemon: RunningDaemon) -> float:
    """Poll every 10 ms; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}:\n{daemon.log()[-6000:]}")


def events(daemon: RunningDaemon) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = daemon.call("events", {"since": 0})["events"]
    return result


@pytest.mark.cgroup_v1
def test_power_over_its_limit_holds_the_spinner_to_a_quota_then_lifts_it(
    tmp_path: Path, spinner: subprocess.Popen[str]
) -> None:
    root = machine_root(tmp_path)
    energy = root / "sys" / "class" / "powercap" / "intel-rapl:0" / "energy_uj"
    driver = EnergyDriver(energy, power_w=20.0)
    driver.start()
    cfg = tmp_path / "edged.toml"
    cfg.write_text(
        f'[sampling]\ninterval = "100ms"\nrescan = "200ms"\n'
        f"[limits.power]\nsoft = 100\nhard = 1000\n"
        f'[strategy]\nname = "dynamic"\n[strategy.dynamic]\n'
        f"thermal_hold_s = 0.5\nrecover_hold_s = 1.5\nfreeze_after_s = 60\n"
        f'[[rules]]\ncmdline = "{tag_of(spinner)}"\nclass = "besteffort"\n'
    )
    origin = cpu_group(spinner.pid)
    env = {"STATE_DIRECTORY": str(tmp_path / "state")}
    daemon = start_daemon(tmp_path, "--config", str(cfg), "--root", str(root), env=env)
    try:
        sources = {s["name"]: s["status"] for s in daemon.call("status")["sources"]}
        assert sources.get("rapl:package-0") == "ok", sources
        time.sleep(1.0)  # 20 W, under soft: nothing happens
        assert quota_cores(spinner.pid) is None
        assert cpu_group(spinner.pid) == origin

        driver.power_w = 150.0  # over soft (100 W)
        took_s = wait_for(lambda: quota_cores(spinner.pid) is not None, 15.0, "a CPU quota", daemon)
        print(f"power crossing -> CPU quota applied: {took_s:.3f} s (hold 0.5 s)")
        assert "/edged/" in cpu_group(spinner.pid)
        quota = quota_cores(spinner.pid)
        assert quota is not None
        # half of the spinner's measured use: a single-threaded spinner uses at most one core,
        # so the quota holds it below that. (Not "<= 0.55": the measured use of a 100 ms tick
        # read 1.42 cores once on a busy CI run, a quota of 0.71; see issue 17.)
        assert quota < 1.0
        time.sleep(1.5)  # power stays over: the quota tightens toward min_cores (0.1)
        held = quota_cores(spinner.pid)
        assert held is not None
        assert held < quota
        assert cpu_rate(spinner.pid) <= held + 0.1  # the kernel holds it to the quota

        driver.power_w = 20.0  # back under: lifted after recover_hold_s
        lift_s = wait_for(
            lambda: cpu_group(spinner.pid) == origin, 15.0, "the quota to be lifted", daemon
        )
        print(f"power back under -> quota lifted: {lift_s:.3f} s (recover hold 1.5 s)")
        assert lift_s >= 1.5 - 0.1
        assert quota_cores(spinner.pid) is None
        assert cpu_rate(spinner.pid) > 0.3  # it runs freely again
        seen = [e for e in events(daemon) if e["pid"] == spinner.pid and e["status"] == "done"]
        assert {e["resource"] for e in seen} == {"power"}
        assert seen[0]["action"] == "throttle"
        assert seen[-1]["action"] == "unthrottle"
        assert seen[-1]["reason"] == "recovered"
        assert not Path(f"/sys/fs/cgroup/cpu/edged/pid-{spinner.pid}").exists()
    finally:
        driver.stop.set()
        driver.join()
        assert daemon.stop() == 0


@pytest.mark.cgroup_v1
def test_adaptive_loop_cuts_the_quota_when_hot_and_gives_it_back_when_cool(
    tmp_path: Path, spinner: subprocess.Popen[str]
) -> None:
    root = machine_root(tmp_path)
    temp = root / "sys" / "class" / "thermal" / "thermal_zone0" / "temp"
    write_fixed(temp, 40_000, 6)
    cfg = tmp_path / "edged.toml"
    cfg.write_text(
        f'[sampling]\ninterval = "100ms"\nrescan = "200ms"\n'
        f"[limits.temperature]\nsoft = 60\nhard = 95\n"
        f"[strategy.adaptive]\ntemperature_tau_s = 0.3\nrelease_hold_s = 1.5\n"
        f"min_cores = 0.2\n"
        f'[[rules]]\ncmdline = "{tag_of(spinner)}"\nclass = "besteffort"\n'
    )
    origin = cpu_group(spinner.pid)
    env = {"STATE_DIRECTORY": str(tmp_path / "state")}
    daemon = start_daemon(
        tmp_path, "--config", str(cfg), "--root", str(root), "--strategy", "adaptive", env=env
    )
    try:
        sources = {s["name"]: s["status"] for s in daemon.call("status")["sources"]}
        assert sources.get("thermal:thermal_zone0") == "ok", sources
        time.sleep(1.0)  # 40 °C: the loop is saturated at full capacity, nothing held
        assert quota_cores(spinner.pid) is None

        write_fixed(temp, 85_000, 6)  # over soft (60 °C)
        took_s = wait_for(lambda: quota_cores(spinner.pid) is not None, 15.0, "a CPU quota", daemon)
        print(f"temperature crossing -> CPU quota applied: {took_s:.3f} s")
        first = quota_cores(spinner.pid)
        assert first is not None
        assert first < 1.0  # below what it used
        # the loop keeps cutting while the filtered temperature stays over the setpoint, down
        # to its floor (min_cores 0.2)
        floor_s = wait_for(
            lambda: (quota_cores(spinner.pid) or 99.0) <= 0.25, 15.0, "the floor", daemon
        )
        print(f"temperature crossing -> quota at the floor: {took_s + floor_s:.3f} s")
        cut = quota_cores(spinner.pid)
        assert cut is not None
        assert cpu_rate(spinner.pid) <= cut + 0.1

        write_fixed(temp, 30_000, 6)  # cool
        wait_for(
            lambda: (quota_cores(spinner.pid) or 99.0) > cut + 0.1,
            15.0,
            "the quota to be raised",
            daemon,
        )
        wait_for(lambda: cpu_group(spinner.pid) == origin, 15.0, "the release", daemon)
        assert quota_cores(spinner.pid) is None
        seen = [e for e in events(daemon) if e["pid"] == spinner.pid and e["status"] == "done"]
        assert all(e["strategy"] == "adaptive" and e["reason"] == "temperature" for e in seen)
        assert seen[-1]["action"] == "unthrottle"
        targets = [e for e in seen if e["action"] == "throttle"]
        assert len(targets) >= 1
    finally:
        assert daemon.stop() == 0


GPU = "GPU-0e0e0e0e-1111-2222-3333-444444444444"
ORIGINAL_MW = 300_000


def gpu_limit_mw(driver_file: Path) -> int:
    return int(json.loads(driver_file.read_text())["gpus"][0]["power_limit_mw"])


def test_gpu_power_limit_is_lowered_and_put_back_after_sigkill_and_on_sigterm(
    tmp_path: Path,
) -> None:
    """RAPL 40 W plus a GPU wanting 250 W (limit 300 W, 100..350 W allowed); soft 200 W."""
    root = machine_root(tmp_path)
    driver = EnergyDriver(root / "sys/class/powercap/intel-rapl:0/energy_uj", power_w=40.0)
    driver.start()
    driver_file, demand_file = tmp_path / "driver.json", tmp_path / "demand.json"
    gpu = {
        "uuid": GPU,
        "power_limit_mw": ORIGINAL_MW,
        "power_limit_min_mw": 100_000,
        "power_limit_max_mw": 350_000,
    }
    driver_file.write_text(json.dumps({"gpus": [gpu]}))
    demand_file.write_text(json.dumps({GPU: 250_000}))
    cfg = tmp_path / "edged.toml"
    cfg.write_text(
        '[sampling]\ninterval = "100ms"\n[limits.power]\nsoft = 200\nhard = 1000\n'
        '[strategy]\nname = "dynamic"\n[strategy.dynamic]\n'
        "thermal_hold_s = 0.3\nrecover_hold_s = 1.0\n"
    )
    launcher = [sys.executable, "-m", "tests.fakes.nvml_daemon", str(driver_file), str(demand_file)]
    env = {"STATE_DIRECTORY": str(tmp_path / "state"), "PYTHONPATH": str(REPO)}
    args = ("--config", str(cfg), "--root", str(root))
    daemon = start_daemon(tmp_path, *args, env=env, launcher=launcher)
    try:
        took_s = wait_for(
            lambda: gpu_limit_mw(driver_file) < ORIGINAL_MW, 15.0, "a lower GPU limit", daemon
        )
        print(f"daemon ready (already over soft) -> GPU limit lowered: {took_s:.3f} s (hold 0.3 s)")
        # about 290 W, 94 W over soft less its cushion; the GPU draws 250 of 290 W, so it
        # gives 81 W of it (RAPL as measured wobbles by a watt or two)
        first = json.loads(driver_file.read_text())["limit_log"][0]
        assert first[0] == GPU
        assert first[1] == pytest.approx(250_000 - 94_000 * 250 / 290, abs=5_000)
        wait_for(
            lambda: len(json.loads(driver_file.read_text())["limit_log"]) >= 2,
            10.0,
            "a second, smaller step",
            daemon,
        )
        time.sleep(0.5)
        held_mw = gpu_limit_mw(driver_file)
        assert 100_000 <= held_mw <= 165_000  # 40 W + the GPU: under soft (200 W) now
        done = [e for e in daemon.call("events", {"since": 0})["events"] if e["gpu"] == GPU]
        assert done
        assert all(e["action"] == "throttle" and e["pid"] == 0 for e in done)
        assert {e["status"] for e in done} == {"done"}
        cli = subprocess.run(
            [sys.executable, "-m", "edged", "events", "--socket", str(daemon.socket_path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert f"throttle   gpu {GPU} power/soft" in cli.stdout, cli.stdout
        snapshot = daemon.call("snapshot")
        limits_w = [r["value"] for r in snapshot["readings"] if r["metric"] == "hw.gpu.power.limit"]
        now_mw = gpu_limit_mw(driver_file)
        assert limits_w == [pytest.approx(now_mw / 1000.0, abs=12)]  # the sensor reads it back
        held_mw = now_mw
        state = json.loads((tmp_path / "state" / "imposed.json").read_text())
        assert state["gpus"][GPU]["original_limit_mw"] == ORIGINAL_MW

        daemon.proc.kill()  # a crash: nothing is restored on the way out
        daemon.proc.wait(timeout=10)
        assert gpu_limit_mw(driver_file) == held_mw

        demand_file.write_text(json.dumps({GPU: 50_000}))
        daemon = start_daemon(tmp_path, *args, env=env, launcher=launcher)
        assert gpu_limit_mw(driver_file) == ORIGINAL_MW  # put back before the first tick
        assert "previous run left in force" in daemon.log()
        state = json.loads((tmp_path / "state" / "imposed.json").read_text())
        assert not state.get("gpus")

        demand_file.write_text(json.dumps({GPU: 250_000}))
        wait_for(lambda: gpu_limit_mw(driver_file) < ORIGINAL_MW, 15.0, "lowered again", daemon)
        assert daemon.stop() == 0  # SIGTERM: put back on the way out
        assert gpu_limit_mw(driver_file) == ORIGINAL_MW
        assert json.loads(driver_file.read_text())["limit_log"][-1] == [GPU, ORIGINAL_MW]
    finally:
        driver.stop.set()
        driver.join()
        if daemon.proc.poll() is None:
            daemon.stop()
