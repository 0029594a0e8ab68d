"""``[scope] cgroup``: the scope sensor on v1- and v2-shaped trees, its members, the policy's
view of a scoped tick, and the CLI/daemon on a missing group.

The trees are built in tmp_path the way the kernel lays them out (a hybrid v1 host with
separate ``cpu`` and ``cpuacct`` mounts as on this machine, a ``cpu,cpuacct`` host, a unified
v2 host), with the values the test then expects back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edged.config import ConfigError, Level, Limits, Rule
from edged.enforce.cgroupfs import CgroupV1
from edged.metrics import METRICS
from edged.policy.base import Resource
from edged.policy.inputs import build_state
from edged.sensors.base import Roots, SensorError
from edged.sensors.processes import ProcessSensor
from edged.sensors.scope import ScopeMembers, ScopeSensor, open_scope, resolve
from edged.snapshot import Reading, Snapshot
from tests.sensor_util import write

GiB = 2**30
MiB = 2**20
MEM_TOTAL_KB = 8 * 1024 * 1024  # 8 GiB
V1_UNLIMITED = "9223372036854771712\n"


def machine(base: Path, cpus: int = 4) -> Roots:
    """/proc/meminfo (8 GiB) and /proc/stat (``cpus`` CPUs) under ``base``."""
    write(base / "proc" / "meminfo", f"MemTotal: {MEM_TOTAL_KB} kB\nMemFree: 1000 kB\n")
    lines = "".join(f"cpu{i} 1 2 3 4 5 6 7 8\n" for i in range(cpus))
    write(base / "proc" / "stat", f"cpu 1 2 3 4 5 6 7 8\n{lines}intr 0\n")
    return Roots.under(base)


def v1_tree(
    base: Path,
    *,
    usage: int = 700 * MiB,
    inactive_file: int = 200 * MiB,
    limit: str = V1_UNLIMITED,
    hierarchical: int = 9223372036854771712,
    cpu_mounts: tuple[str, ...] = ("cpu", "cpuacct"),
    quota_us: int = -1,
    parent_quota_us: int = -1,
) -> Path:
    """A hybrid v1 host with group /box/bench; returns the cgroup root."""
    cg = base / "sys" / "fs" / "cgroup"
    write(cg / "memory" / "cgroup.procs", "1\n")
    mem = cg / "memory" / "box" / "bench"
    write(mem / "memory.usage_in_bytes", f"{usage}\n")
    write(mem / "memory.limit_in_bytes", limit)
    write(
        mem / "memory.stat",
        f"cache 1\nrss 2\ninactive_file 5\ntotal_cache 9\n"
        f"total_inactive_file {inactive_file}\nhierarchical_memory_limit {hierarchical}\n",
    )
    write(mem / "cgroup.procs", "")
    for mount in cpu_mounts:
        write(cg / mount / "cgroup.procs", "1\n")
        d = cg / mount / "box" / "bench"
        if "cpuacct" in mount.split(","):
            write(d / "cpuacct.usage", "1500000000\n")  # 1.5 s
        if "cpu" in mount.split(","):
            write(d / "cpu.cfs_quota_us", f"{quota_us}\n")
            write(d / "cpu.cfs_period_us", "100000\n")
            write(d.parent / "cpu.cfs_quota_us", f"{parent_quota_us}\n")
            write(d.parent / "cpu.cfs_period_us", "100000\n")
    return cg


def v2_tree(base: Path, *, own_max: str = "max\n", parent_max: str = "max\n") -> Path:
    """A unified v2 host with group /box/bench; returns the cgroup root."""
    cg = base / "sys" / "fs" / "cgroup"
    write(cg / "cgroup.controllers", "cpuset cpu io memory pids\n")
    write(cg / "cgroup.procs", "1\n")
    box = cg / "box"
    write(box / "memory.max", parent_max)
    write(box / "cpu.max", "max 100000\n")
    d = box / "bench"
    write(d / "memory.current", f"{900 * MiB}\n")
    write(d / "memory.stat", f"anon 1\nfile 2\nactive_file 3\ninactive_file {100 * MiB}\n")
    write(d / "memory.max", own_max)
    write(d / "cpu.stat", "usage_usec 2000000\nuser_usec 1500000\nsystem_usec 500000\n")
    write(d / "cpu.max", "150000 100000\n")
    write(
        d / "memory.pressure",
        "some avg10=12.50 avg60=3.00 avg300=1.00 total=100\n"
        "full avg10=1.00 avg60=0.50 avg300=0.10 total=50\n",
    )
    write(d / "cgroup.procs", "")
    return cg


def by_metric(readings: list[Reading]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in readings:
        if r.metric != "edged.scope.pressure":
            assert r.metric not in out, r.metric
            out[r.metric] = r.value
            assert r.attributes == {"edged.scope": "/box/bench"}
    return out


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


# ---- resolution ---------------------------------------------------------------------------


def test_missing_group_is_a_config_error_naming_what_was_looked_for(tmp_path: Path) -> None:
    v1_tree(tmp_path)
    with pytest.raises(ConfigError) as err:
        resolve(tmp_path / "sys", "/box/nope")
    assert err.value.key == "scope.cgroup"
    assert "memory/box/nope" in str(err.value)
    v2 = tmp_path / "v2"
    v2_tree(v2)
    with pytest.raises(ConfigError, match="no cgroup /elsewhere"):
        resolve(v2 / "sys", "/elsewhere")


def test_v2_group_without_the_memory_controller_is_refused(tmp_path: Path) -> None:
    cg = v2_tree(tmp_path)
    write(cg / "plain" / "cgroup.procs", "")
    with pytest.raises(ConfigError, match="subtree_control"):
        resolve(tmp_path / "sys", "/plain")


@pytest.mark.parametrize(
    ("mounts", "has_quota"),
    [(("cpu", "cpuacct"), True), (("cpu,cpuacct",), True), (("cpuacct",), False), ((), False)],
)
def test_v1_cpu_trees_are_found_under_each_mount_layout(
    tmp_path: Path, mounts: tuple[str, ...], has_quota: bool
) -> None:
    v1_tree(tmp_path, cpu_mounts=mounts)
    group = resolve(tmp_path / "sys", "/box/bench/")
    assert group.version == 1
    assert group.path == "/box/bench"
    assert (group.cpuacct_dir is not None) == bool(mounts)
    assert (group.cpu_dir is not None) == has_quota


# ---- the v1 sensor ------------------------------------------------------------------------


def test_v1_working_set_limit_and_cpu(tmp_path: Path) -> None:
    cg = v1_tree(tmp_path, quota_us=250000)
    clock = Clock()
    sensor = ScopeSensor(resolve(tmp_path / "sys", "/box/bench"), machine(tmp_path), clock)
    first = by_metric(sensor.read())
    assert first["edged.scope.memory.usage"] == 500 * MiB  # usage - total_inactive_file
    assert first["edged.scope.memory.limit"] == MEM_TOTAL_KB * 1024  # unlimited: MemTotal
    assert first["edged.scope.cpu.time"] == 1.5
    assert "edged.scope.cpu.usage" not in first  # needs two reads
    assert first["edged.scope.cpu.limit"] == 2.5  # 250 ms per 100 ms period
    write(cg / "cpuacct" / "box" / "bench" / "cpuacct.usage", "2500000000\n")  # +1 s of CPU
    write(cg / "memory" / "box" / "bench" / "memory.limit_in_bytes", f"{3 * GiB}\n")
    clock.now_s += 0.5
    second = by_metric(sensor.read())
    assert second["edged.scope.cpu.usage"] == pytest.approx(2.0)  # 1 s in 0.5 s: two cores
    assert second["edged.scope.memory.limit"] == 3 * GiB  # files are re-read every tick
    assert {r.metric for r in sensor.read()} <= set(METRICS)
    sensor.close()


def test_v1_limits_of_ancestors_count(tmp_path: Path) -> None:
    v1_tree(tmp_path, hierarchical=2 * GiB, parent_quota_us=50000, quota_us=-1)
    sensor = ScopeSensor(resolve(tmp_path / "sys", "/box/bench"), machine(tmp_path))
    got = by_metric(sensor.read())
    assert got["edged.scope.memory.limit"] == 2 * GiB  # a parent's limit binds the group
    assert got["edged.scope.cpu.limit"] == 0.5  # so does a parent's quota


def test_v1_without_quota_the_cpu_limit_is_the_cpu_count(tmp_path: Path) -> None:
    v1_tree(tmp_path, cpu_mounts=("cpu,cpuacct",))
    sensor = ScopeSensor(resolve(tmp_path / "sys", "/box/bench"), machine(tmp_path, cpus=6))
    assert by_metric(sensor.read())["edged.scope.cpu.limit"] == 6.0


def test_v1_inactive_file_larger_than_usage_reads_zero(tmp_path: Path) -> None:
    v1_tree(tmp_path, usage=100 * MiB, inactive_file=300 * MiB)
    sensor = ScopeSensor(resolve(tmp_path / "sys", "/box/bench"), machine(tmp_path))
    assert by_metric(sensor.read())["edged.scope.memory.usage"] == 0.0


def test_a_vanished_group_is_a_sensor_error(tmp_path: Path) -> None:
    cg = v1_tree(tmp_path)
    sensor = ScopeSensor(resolve(tmp_path / "sys", "/box/bench"), machine(tmp_path))
    sensor.read()
    sensor.close()  # the kept descriptors would keep reading the unlinked files
    (cg / "memory" / "box" / "bench" / "memory.usage_in_bytes").unlink()
    with pytest.raises(SensorError, match="is gone"):
        sensor.read()


# ---- the v2 sensor ------------------------------------------------------------------------


def test_v2_working_set_limit_cpu_and_pressure(tmp_path: Path) -> None:
    cg = v2_tree(tmp_path, parent_max=f"{4 * GiB}\n")
    clock = Clock()
    group = resolve(tmp_path / "sys", "/box/bench")
    assert group.version == 2
    assert "pressure" in group.describe()
    sensor = ScopeSensor(group, machine(tmp_path), clock)
    readings = sensor.read()
    got = by_metric(readings)
    assert got["edged.scope.memory.usage"] == 800 * MiB  # memory.current - inactive_file
    assert got["edged.scope.memory.limit"] == 4 * GiB  # own max, parent 4 GiB
    assert got["edged.scope.cpu.time"] == 2.0
    assert got["edged.scope.cpu.limit"] == 1.5  # cpu.max 150000 100000
    pressure = {
        (r.attributes["edged.resource"], r.attributes["edged.window"]): r.value
        for r in readings
        if r.metric == "edged.scope.pressure"
    }
    assert pressure == {("memory", "10s"): 0.125, ("memory", "60s"): 0.03}
    write(cg / "box" / "bench" / "cpu.stat", "usage_usec 2250000\n")
    write(cg / "box" / "bench" / "memory.max", f"{1 * GiB}\n")
    clock.now_s += 1.0
    got = by_metric(sensor.read())
    assert got["edged.scope.cpu.usage"] == pytest.approx(0.25)
    assert got["edged.scope.memory.limit"] == 1 * GiB


def test_v2_unlimited_is_memtotal(tmp_path: Path) -> None:
    v2_tree(tmp_path)
    sensor = ScopeSensor(resolve(tmp_path / "sys", "/box/bench"), machine(tmp_path))
    assert by_metric(sensor.read())["edged.scope.memory.limit"] == MEM_TOTAL_KB * 1024


# ---- members ------------------------------------------------------------------------------


@pytest.mark.parametrize("keep_open", [True, False])
def test_members_are_the_group_and_every_group_below_it(tmp_path: Path, keep_open: bool) -> None:
    top = tmp_path / "bench"
    write(top / "cgroup.procs", "10\n11\n")
    write(top / "a" / "cgroup.procs", "12\n")
    write(tmp_path / "cgroup.procs", "99\n")  # the parent's processes are not members
    members = ScopeMembers(top, keep_open=keep_open)
    assert members.pids() == {10, 11, 12}
    write(top / "a" / "cgroup.procs", "12\n13\n")
    assert members.pids() == {10, 11, 12, 13}  # read again each call
    write(top / "edged" / "pid-14" / "cgroup.procs", "14\n")  # a group made since: seen at once
    assert members.pids() == {10, 11, 12, 13, 14}
    for f in (top / "edged" / "pid-14").iterdir():
        f.unlink()
    (top / "edged" / "pid-14").rmdir()
    assert members.pids() == {10, 11, 12, 13}
    members.close()


def test_members_of_a_vanished_group_raise(tmp_path: Path) -> None:
    top = tmp_path / "bench"
    write(top / "cgroup.procs", "10\n")
    members = ScopeMembers(top)
    (top / "cgroup.procs").unlink()
    top.rmdir()
    with pytest.raises(SensorError, match="gone"):
        members.pids()


IDLE = "import time\nprint('ready', flush=True)\ntime.sleep(60)\n"


@pytest.fixture
def idlers() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait(timeout=10)
        if p.stdout is not None:
            p.stdout.close()


def idler(procs: list[subprocess.Popen[str]], tag: str) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", IDLE, tag], stdout=subprocess.PIPE, text=True)
    procs.append(p)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    return p


def test_with_a_scope_only_members_are_sampled(
    tmp_path: Path, idlers: list[subprocess.Popen[str]]
) -> None:
    """Real processes, a membership tree on disk: members are sampled whatever the rules say
    (a rule still sets the class), an outsider is not even with processes = "all"."""
    tag = f"edged-scope-{os.getpid()}"
    inside, rated, outside = (idler(idlers, f"{tag}-{n}") for n in ("in", "rated", "out"))
    top = tmp_path / "bench"
    write(top / "cgroup.procs", f"{inside.pid}\n")
    write(top / "sub" / "cgroup.procs", f"{rated.pid}\n")
    rules = [Rule(cmdline=f"{tag}-rated", klass="besteffort")]
    sensor = ProcessSensor(Roots(), rules, mode="all", members=ScopeMembers(top))
    readings = sensor.read()
    sampled = {
        int(r.attributes["process.pid"]): r.attributes["edged.class"]
        for r in readings
        if r.metric == "process.memory.usage"
    }
    assert sampled == {inside.pid: "normal", rated.pid: "besteffort"}
    assert outside.pid not in sensor.watched
    assert sensor.in_scope == frozenset({inside.pid, rated.pid})
    write(top / "sub" / "cgroup.procs", "")  # it left the group: dropped on the next tick
    sensor.read()
    assert set(sensor.watched) == {inside.pid}
    sensor.close()


def test_processes_none_samples_nobody_even_in_scope(
    tmp_path: Path, idlers: list[subprocess.Popen[str]]
) -> None:
    p = idler(idlers, "edged-scope-none")
    top = tmp_path / "bench"
    write(top / "cgroup.procs", f"{p.pid}\n")
    sensor = ProcessSensor(Roots(), [], mode="none", members=ScopeMembers(top))
    assert sensor.read() == []
    assert sensor.in_scope == frozenset({p.pid})
    sensor.close()


# ---- the policy's view --------------------------------------------------------------------


def snapshot(readings: list[Reading]) -> Snapshot:
    machine_readings = [
        Reading("system.memory.limit", 8.0 * GiB),
        Reading("system.memory.linux.available", 1.0 * GiB),  # the machine uses 7 GiB
        Reading("system.cpu.time", 1.0, {"cpu.logical_number": 0, "cpu.mode": "user"}),
        Reading("system.cpu.time", 1.0, {"cpu.logical_number": 1, "cpu.mode": "user"}),
        Reading("system.cpu.utilization", 0.9, {"cpu.logical_number": 0, "cpu.mode": "user"}),
        Reading("edged.pressure", 0.4, {"edged.resource": "memory", "edged.window": "10s"}),
        Reading("edged.pressure", 0.3, {"edged.resource": "cpu", "edged.window": "10s"}),
        Reading("hw.temperature", 70.0, {"hw.id": "cpu"}),
    ]
    return Snapshot(1, 0, 10.0, tuple(machine_readings + readings))


SCOPE = {"edged.scope": "/bench"}


def test_a_scoped_state_judges_the_group_against_its_own_limit() -> None:
    snap = snapshot(
        [
            Reading("edged.scope.memory.usage", 900.0 * MiB, SCOPE),
            Reading("edged.scope.memory.limit", 1.0 * GiB, SCOPE),
            Reading("edged.scope.cpu.usage", 0.5, SCOPE),
            Reading("edged.scope.cpu.limit", 1.0, SCOPE),
            Reading(
                "edged.scope.pressure",
                0.05,
                {**SCOPE, "edged.resource": "memory", "edged.window": "10s"},
            ),
        ]
    )
    limits = Limits(
        memory=Level(soft="80%", hard="95%"),
        cpu=Level(soft="50%"),
        temperature=Level(soft=80),
    )
    machine_state = build_state(snap, limits, 1.0, {})
    assert machine_state.usage[Resource.MEMORY] == 7 * GiB
    assert machine_state.limits[Resource.MEMORY].soft == pytest.approx(0.8 * 8 * GiB)
    state = build_state(snap, limits, 1.0, {}, scoped=True)
    assert state.usage[Resource.MEMORY] == 900 * MiB
    assert state.capacity[Resource.MEMORY] == 1 * GiB
    assert state.limits[Resource.MEMORY].soft == pytest.approx(0.8 * GiB)  # 80 % of the group
    assert state.usage[Resource.CPU] == 0.5
    assert state.limits[Resource.CPU].soft == 0.5  # 50 % of its one-core quota
    assert state.pressure[Resource.MEMORY] == 0.05  # the group's PSI ...
    assert state.pressure[Resource.CPU] == 0.3  # ... and the machine's where it has none
    assert state.usage[Resource.TEMPERATURE] == 70.0  # no per-group figure: the machine's


def test_a_scoped_state_never_falls_back_to_the_machine_usage() -> None:
    snap = snapshot([])  # the scope sensor failed this tick
    limits = Limits(memory=Level(soft=100 * MiB, hard=200 * MiB))
    state = build_state(snap, limits, 1.0, {}, scoped=True)
    assert Resource.MEMORY not in state.usage  # not 7 GiB of the machine against 100 MiB
    assert Resource.CPU not in state.usage


# ---- the enforcer's groups inside a scope -------------------------------------------------


def test_v1_backend_in_a_scope_uses_the_trees_the_group_exists_in(tmp_path: Path) -> None:
    cg = tmp_path / "cgroup"
    for c in ("memory", "cpu", "freezer"):
        write(cg / c / "cgroup.procs", "")
    for c in ("memory", "cpu"):
        write(cg / c / "bench" / "cgroup.procs", "")
    scoped = CgroupV1(cg, subtree="bench/edged", proc=tmp_path)
    assert scoped.controllers == ("memory", "cpu")
    assert not scoped.can_freeze  # freezes fall back to SIGSTOP, no freezer/bench is made
    assert CgroupV1(cg, subtree="edged", proc=tmp_path).controllers == ("memory", "cpu", "freezer")


# ---- the command line ---------------------------------------------------------------------


def run_edged(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGED_", "OTEL_"))}
    return subprocess.run(
        [sys.executable, "-m", "edged", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        env=env,
    )


def test_sensors_reads_a_scope_from_a_fixture_tree(tmp_path: Path) -> None:
    v1_tree(tmp_path, quota_us=100000)
    machine(tmp_path)
    result = run_edged("sensors", "--root", str(tmp_path), "--scope", "/box/bench", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    scope = [s for s in out["sources"] if s["name"] == "scope"]
    assert scope == [{"name": "scope", "status": "ok", "detail": scope[0]["detail"]}]
    assert "cgroup v1 /box/bench" in scope[0]["detail"]
    got = {r["metric"]: r for r in out["readings"] if r["metric"].startswith("edged.scope.")}
    assert got["edged.scope.memory.usage"]["value"] == 500 * MiB
    assert got["edged.scope.memory.usage"]["unit"] == "By"
    assert got["edged.scope.memory.usage"]["attributes"] == {"edged.scope": "/box/bench"}
    assert got["edged.scope.cpu.limit"]["value"] == 1.0
    assert "edged.scope.cpu.usage" in got  # two reads 0.2 s apart
    missing = run_edged("sensors", "--root", str(tmp_path), "--scope", "/box/nope")
    assert missing.returncode == 2
    assert "no cgroup /box/nope" in missing.stderr


@pytest.mark.parametrize("shape", ["v1", "v2"])
def test_sensors_takes_the_sysfs_form_of_the_path(tmp_path: Path, shape: str) -> None:
    """The path as a shell under /sys/fs/cgroup shows it reads the same group as the
    /proc/PID/cgroup form (v1: the hierarchy's mount is not part of the group's path)."""
    (v1_tree if shape == "v1" else v2_tree)(tmp_path)
    machine(tmp_path)
    sysfs = "/sys/fs/cgroup/memory/box/bench" if shape == "v1" else "/sys/fs/cgroup/box/bench"
    result = run_edged("sensors", "--root", str(tmp_path), "--scope", sysfs, "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    usage = next(r for r in out["readings"] if r["metric"] == "edged.scope.memory.usage")
    assert usage["attributes"] == {"edged.scope": "/box/bench"}
    outside = run_edged("sensors", "--root", str(tmp_path), "--scope", "/sys/class/thermal")
    assert outside.returncode == 2
    assert "outside /sys/fs/cgroup" in outside.stderr


@pytest.mark.parametrize("shape", ["v1", "v2"])
def test_run_with_the_sysfs_form_governs_the_group(tmp_path: Path, shape: str) -> None:
    """`[scope] cgroup = "/sys/fs/cgroup/..."` (what a user pastes) runs on that group: it
    used to exit 6 looking for /sys/fs/cgroup/memory/sys/fs/cgroup/..."""
    from tests.daemon_util import start_daemon

    (v1_tree if shape == "v1" else v2_tree)(tmp_path)
    machine(tmp_path)
    sysfs = "/sys/fs/cgroup/memory/box/bench" if shape == "v1" else "/sys/fs/cgroup/box/bench"
    config = tmp_path / "edged.toml"
    config.write_text(f'[scope]\ncgroup = "{sysfs}"\n[enforce]\nbackend = "none"\n')
    daemon = start_daemon(
        tmp_path,
        "--root",
        str(tmp_path),
        "--config",
        str(config),
        env={"STATE_DIRECTORY": str(tmp_path / "state")},
    )
    try:
        scope = daemon.call("status")["scope"]
        assert scope["cgroup"] == "/box/bench"
        assert scope["memory_used_bytes"] > 0
    finally:
        assert daemon.stop() == 0
    assert "on cgroup /box/bench" in daemon.log()


def test_run_with_a_missing_scope_exits_6_before_serving(tmp_path: Path) -> None:
    v1_tree(tmp_path)
    machine(tmp_path)
    config = tmp_path / "edged.toml"
    config.write_text('[scope]\ncgroup = "/box/nope"\n[enforce]\nbackend = "none"\n')
    result = run_edged(
        "run",
        "--root",
        str(tmp_path),
        "--config",
        str(config),
        "--socket",
        str(tmp_path / "edged.sock"),
        "--prometheus",
        "off",
    )
    assert result.returncode == 6, result.stderr
    assert "scope.cgroup: no cgroup /box/nope in the memory hierarchy" in result.stderr
    assert not (tmp_path / "edged.sock").exists()


def test_open_scope_gives_members_of_the_memory_group(tmp_path: Path) -> None:
    cg = v1_tree(tmp_path)
    write(cg / "memory" / "box" / "bench" / "cgroup.procs", "42\n")
    write(cg / "cpu" / "box" / "bench" / "cgroup.procs", "43\n")  # membership is memory's
    sensor, members = open_scope(machine(tmp_path), "/box/bench")
    assert members.pids() == {42}
    sensor.close()
    members.close()


def test_the_daemon_rereads_and_reports_the_scope(tmp_path: Path) -> None:
    """The enforcer's re-check before acting reads the group, not the machine, and status
    shows the group's figures."""
    import asyncio

    from edged import config as cfg
    from edged.daemon import Daemon
    from edged.server.server import Peer

    cg = v1_tree(tmp_path, quota_us=50000)
    write(cg / "memory" / "box" / "bench" / "cgroup.procs", "")
    machine(tmp_path)
    config = cfg.Config(root=str(tmp_path), scope=cfg.Scope(cgroup="/box/bench"))
    daemon = Daemon(config, environ={})
    sampler = daemon._build_sampler()
    try:
        assert daemon._reread(Resource.MEMORY) == 500 * MiB  # the machine would say 8 GiB
        write(cg / "memory" / "box" / "bench" / "memory.usage_in_bytes", f"{600 * MiB}\n")
        assert daemon._reread(Resource.MEMORY) == 400 * MiB  # read afresh
        daemon.latest = sampler.tick()
        status = asyncio.run(daemon._status(Peer(1, 0, 0), {}))
        assert status["scope"] == {
            "cgroup": "/box/bench",
            "memory_used_bytes": 400 * MiB,
            "memory_limit_bytes": MEM_TOTAL_KB * 1024,
            "cpu_limit_cores": 0.5,
            "processes": 0,
        }
        assert "scope" in {s.name for s in daemon.discovery}
    finally:
        sampler.close()


def test_restore_skips_groups_of_another_scope(tmp_path: Path) -> None:
    """A crash under one [scope] and a start under another: the old run's groups lie outside
    the new subtree. Restore reports them and goes on instead of failing the start."""
    from edged.enforce.restore import GroupRecord, StateStore, restore_all
    from edged.enforce.signals import Signaller

    cg = tmp_path / "cgroup"
    for c in ("memory", "cpu"):
        write(cg / c / "cgroup.procs", "")
        write(cg / c / "new" / "cgroup.procs", "")
    store = StateStore(tmp_path / "state")
    store.data.groups["old/edged/pid-5"] = GroupRecord(memory_high_bytes=1)
    store.save()
    backend = CgroupV1(cg, subtree="new/edged", proc=tmp_path)
    assert restore_all(StateStore(tmp_path / "state"), backend, Signaller()) == 0
    assert StateStore(tmp_path / "state").data.empty()
