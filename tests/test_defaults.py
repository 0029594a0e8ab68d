"""The defaults that protect a machine (issue 10): memory levels sized to the machine, the
built-in classes, and tiered process reads, on real processes where a process is needed."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edged import config as cfg
from edged.config import ConfigError, Limits
from edged.policy.base import Resource
from edged.policy.inputs import auto_memory_levels, resolve_limits
from edged.rules import ProcessInfo, builtin_class
from edged.sensors.base import Roots
from edged.sensors.processes import COLD_S, ProcessSensor

GiB = 2**30
MiB = 2**20


@pytest.mark.parametrize(
    ("total_gib", "soft_available_mib", "hard_available_mib"),
    [
        (1, 2 * 102.4, 102.4),  # a small scope: 10 %, not 256 MiB
        (2, 2 * 204.8, 204.8),  # 10 %: 256 MiB would be 12.5 % of it
        (4, 512, 256),
        (24, 2 * 1228.8, 1228.8),  # 5 %
        (64, 4096, 2048),  # capped at 2 GiB
    ],
)
def test_auto_levels_leave_a_reserve_that_suits_the_machine(
    total_gib: int, soft_available_mib: float, hard_available_mib: float
) -> None:
    total = total_gib * GiB
    soft, hard = auto_memory_levels(total)
    assert total - hard == pytest.approx(hard_available_mib * MiB)
    assert total - soft == pytest.approx(soft_available_mib * MiB)


@given(st.floats(min_value=64 * MiB, max_value=4096 * GiB))
def test_auto_levels_are_ordered_and_inside_the_machine(total: float) -> None:
    soft, hard = auto_memory_levels(total)
    assert 0 < soft < hard < total
    assert total - hard <= 2 * GiB


def test_the_default_config_resolves_auto_levels() -> None:
    limits = resolve_limits(cfg.Config().limits, {Resource.MEMORY: 4.0 * GiB})
    assert limits[Resource.MEMORY].hard == pytest.approx(4 * GiB - 256 * MiB)
    assert limits[Resource.MEMORY].soft == pytest.approx(4 * GiB - 512 * MiB)
    assert cfg.Config().sampling.processes == "all"


def test_auto_with_a_written_hard_level_keeps_soft_below_it() -> None:
    limits = resolve_limits(
        Limits(memory=cfg.Level(soft="auto", hard=3 * GiB)), {Resource.MEMORY: 24.0 * GiB}
    )
    assert limits[Resource.MEMORY].hard == 3 * GiB
    assert limits[Resource.MEMORY].soft == 3 * GiB  # never above the hard level written


def test_auto_is_for_memory_only(tmp_path: Path) -> None:
    path = tmp_path / "edged.toml"
    path.write_text('[limits.cpu]\nsoft = "auto"\n')
    with pytest.raises(ConfigError, match="memory only"):
        cfg.load(path, environ={})


def info(name: str = "worker", cgroup: str = "/", oom_score_adj: int = 0) -> ProcessInfo:
    return ProcessInfo(
        pid=4242, name=name, exe="", cmdline=name, uid=0, cgroup=cgroup, start_ticks=1,
        oom_score_adj=oom_score_adj,
    )  # fmt: skip


@pytest.mark.parametrize(
    "process",
    [
        info(name="systemd"),
        info(name="systemd-journal"),
        info(name="sshd"),
        info(name="dbus-daemon"),
        info(name="agetty"),
        info(cgroup="/init.scope"),
        info(name="python3", cgroup="/system.slice/systemd-networkd.service"),
        info(name="x", cgroup="/system.slice/ssh.service"),
        info(name="x", cgroup="/system.slice/system-getty.slice/getty@tty1.service"),
        info(oom_score_adj=-1000),
    ],
)
def test_the_machines_own_services_are_critical(process: ProcessInfo) -> None:
    assert builtin_class(process) == "critical"


@pytest.mark.parametrize(
    "process",
    [
        info(),
        info(name="bash", cgroup="/user.slice/user-0.slice/session-3.scope"),
        info(name="postgres", cgroup="/system.slice/postgresql.service"),
        info(name="systemd-fake1234", cgroup="/"),  # a name is matched whole
        info(oom_score_adj=-999),
    ],
)
def test_everything_else_has_no_built_in_class(process: ProcessInfo) -> None:
    assert builtin_class(process) is None


SLEEPER = "import sys, time\nprint('ready', flush=True)\ntime.sleep(60)\n"
HOLDER = (
    "import sys, time\nb = bytearray(100 * 2**20)\nfor i in range(0, len(b), 4096): b[i] = 1\n"
    "print('ready', flush=True)\ntime.sleep(60)\n"
)


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait(timeout=10)
        if p.stdout is not None:
            p.stdout.close()


def spawn(procs: list[subprocess.Popen[str]], code: str) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    procs.append(p)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    return p


def test_small_idle_processes_are_read_less_often_but_always_reported(
    children: list[subprocess.Popen[str]],
) -> None:
    sleeper = spawn(children, SLEEPER)
    holder = spawn(children, HOLDER)
    now = [1000.0]
    sensor = ProcessSensor(Roots(), [], mode="all", clock=lambda: now[0])
    try:
        sensor.read()  # first read of everything
        now[0] += 1.0
        sensor.read()  # second: CPU figures; the sleeper turns out small and idle
        now[0] += 1.0
        readings = sensor.read()
        pids = {r.attributes["process.pid"] for r in readings if r.metric == "process.memory.usage"}
        assert {sleeper.pid, holder.pid} <= pids  # both reported
        assert sensor.watched[sleeper.pid].read_at_s == 1001.0  # cold: not read this time
        assert sensor.watched[holder.pid].read_at_s == 1002.0  # large: read every tick
        assert sensor.last_skipped > 0

        sensor.urgent = True  # memory near a limit: everything, every tick
        now[0] += 0.1
        sensor.read()
        assert sensor.last_skipped == 0
        assert sensor.watched[sleeper.pid].read_at_s == now[0]

        sensor.urgent = False
        now[0] += 1.5 * COLD_S  # the longest cold period
        sensor.read()
        assert sensor.watched[sleeper.pid].read_at_s == now[0]  # its cold period is up
    finally:
        sensor.close()
