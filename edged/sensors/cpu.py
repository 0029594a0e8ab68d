"""Per-logical-CPU time and utilization from ``/proc/stat``; frequency from cpufreq.

``/proc/stat`` counts in USER_HZ ticks. Modes map to the semantic-convention ``cpu.mode``
values: irq and softirq are both ``interrupt``; guest time is already inside user time and is
not added again. Utilization needs two reads, so the first tick reports time only.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from edged.sensors.base import Absent, KeptFile, Roots, Sensor, SensorError, read_text
from edged.snapshot import Reading

USER_HZ = os.sysconf("SC_CLK_TCK")
# /proc/stat columns after the cpu name: user nice system idle iowait irq softirq steal ...
_MODES: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("user", (0,)),
    ("nice", (1,)),
    ("system", (2,)),
    ("idle", (3,)),
    ("iowait", (4,)),
    ("interrupt", (5, 6)),
    ("steal", (7,)),
)


def parse_stat(raw: bytes) -> dict[int, list[int]]:
    """Per logical CPU number, the mode tick counters of ``/proc/stat`` (cpuN lines only)."""
    cpus: dict[int, list[int]] = {}
    for line in raw.splitlines():
        if not line.startswith(b"cpu") or line.startswith(b"cpu "):
            if cpus and not line.startswith(b"cpu"):
                break  # the cpu lines come first; stop at intr/ctxt
            continue
        name, *values = line.split()
        number = int(name[3:])
        ticks = [int(v) for v in values]
        if len(ticks) < 4:
            raise ValueError(f"/proc/stat: short line for {name.decode()}")
        ticks += [0] * (8 - len(ticks))
        cpus[number] = [sum(ticks[i] for i in idx) for _, idx in _MODES]
    if not cpus:
        raise ValueError("/proc/stat: no cpuN lines")
    return cpus


class CpuTimeSensor(Sensor):
    """``system.cpu.time`` and ``system.cpu.utilization`` for every logical CPU."""

    name = "cpu"

    def __init__(self, roots: Roots, clock: Callable[[], float] = time.monotonic) -> None:
        # The cpuN lines come first and 64 KiB holds about a thousand of them; the rest of the
        # file (a long intr line on big machines) is not needed. A 1 MiB buffer cost an
        # mmap/munmap and a page fault every tick (bench/overhead.py, py-spy).
        self._file = KeptFile(roots.proc / "stat", size_bytes=64 * 1024)
        self._previous: dict[int, list[int]] = {}
        self._attrs: dict[tuple[int, str], dict[str, str | int]] = {}

    def _attributes(self, cpu: int, mode: str) -> dict[str, str | int]:
        key = (cpu, mode)
        attrs = self._attrs.get(key)
        if attrs is None:  # shared, read-only attribute dicts: no per-tick allocation
            attrs = self._attrs[key] = {"cpu.mode": mode, "cpu.logical_number": cpu}
        return attrs

    def read(self) -> list[Reading]:
        cpus = parse_stat(self._file.read_bytes())
        out: list[Reading] = []
        for cpu, ticks in cpus.items():
            for (mode, _), value in zip(_MODES, ticks, strict=False):
                out.append(Reading("system.cpu.time", value / USER_HZ, self._attributes(cpu, mode)))
            previous = self._previous.get(cpu)
            if previous is None:
                continue
            deltas = [max(0, a - b) for a, b in zip(ticks, previous, strict=False)]
            total = sum(deltas)
            if total == 0:
                continue  # no tick elapsed on this CPU (very short interval): nothing to say
            for (mode, _), delta in zip(_MODES, deltas, strict=False):
                out.append(
                    Reading("system.cpu.utilization", delta / total, self._attributes(cpu, mode))
                )
        self._previous = cpus
        return out

    def close(self) -> None:
        self._file.close()


class CpuFrequencySensor(Sensor):
    """``system.cpu.frequency`` from cpufreq ``scaling_cur_freq`` (kHz), one read per policy.

    CPUs of one cluster share a policy (``cpuN/cpufreq`` links to ``cpufreq/policyM``), so the
    file is read once per policy and reported for each of its CPUs.
    """

    name = "cpufreq"

    def __init__(self, policies: dict[Path, list[int]]) -> None:
        self._policies = [
            (KeptFile(path / "scaling_cur_freq"), cpus) for path, cpus in sorted(policies.items())
        ]

    def read(self) -> list[Reading]:
        out: list[Reading] = []
        for file, cpus in self._policies:
            hz = file.read_int() * 1000.0
            out.extend(Reading("system.cpu.frequency", hz, {"cpu.logical_number": c}) for c in cpus)
        return out

    def close(self) -> None:
        for file, _ in self._policies:
            file.close()


def _cpufreq_policies(roots: Roots) -> dict[Path, list[int]]:
    base = roots.sys / "devices/system/cpu"
    policies: dict[Path, list[int]] = {}
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        return policies
    for entry in entries:
        m = re.fullmatch(r"cpu(\d+)", entry)
        if not m:
            continue
        link = base / entry / "cpufreq"
        if not (link / "scaling_cur_freq").exists():
            continue
        policy = (
            Path(os.path.normpath(base / entry / os.readlink(link))) if link.is_symlink() else link
        )
        policies.setdefault(policy, []).append(int(m.group(1)))
    return policies


def discover(roots: Roots) -> list[Sensor | Absent]:
    found: list[Sensor | Absent] = []
    if (roots.proc / "stat").exists():
        found.append(CpuTimeSensor(roots))
    else:
        found.append(Absent("cpu", f"no {roots.proc / 'stat'}"))
    policies = _cpufreq_policies(roots)
    if policies:
        found.append(CpuFrequencySensor(policies))
    else:
        found.append(Absent("cpufreq", "no cpufreq scaling_cur_freq (VM or no driver)"))
    return found


__all__ = [
    "CpuFrequencySensor",
    "CpuTimeSensor",
    "SensorError",
    "discover",
    "parse_stat",
    "read_text",
]
