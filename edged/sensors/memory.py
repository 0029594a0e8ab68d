"""Memory and swap from ``/proc/meminfo``.

States follow the OpenTelemetry convention that ``system.memory.usage`` summed over its states
equals ``system.memory.limit``: ``cached`` includes reclaimable slab and ``used`` is the rest,
as psutil and the collector's hostmetrics receiver compute it. Policy decisions do not use
``used``: they use MemTotal - MemAvailable (``system.memory.linux.available``), the kernel's own
estimate of what can be allocated without swapping.
"""

from __future__ import annotations

from edged.sensors.base import Absent, KeptFile, Roots, Sensor, SensorError
from edged.snapshot import Reading

_WANTED = {
    b"MemTotal",
    b"MemFree",
    b"MemAvailable",
    b"Buffers",
    b"Cached",
    b"SReclaimable",
    b"SwapTotal",
    b"SwapFree",
}


def parse_meminfo(raw: bytes) -> dict[str, int]:
    """``/proc/meminfo`` as bytes per field (values are in kB, i.e. KiB, in the file)."""
    fields: dict[str, int] = {}
    for line in raw.splitlines():
        name, _, rest = line.partition(b":")
        if name not in _WANTED:
            continue
        parts = rest.split()
        if not parts:
            raise ValueError(f"meminfo: no value for {name.decode()}")
        value = int(parts[0])
        if len(parts) > 1 and parts[1] == b"kB":
            value *= 1024
        fields[name.decode()] = value
    return fields


_STATE_ATTRS = {k: {"system.memory.state": k} for k in ("used", "free", "buffers", "cached")}
_SWAP_USED = {"system.paging.state": "used"}
_SWAP_FREE = {"system.paging.state": "free"}


class MemorySensor(Sensor):
    """System memory, availability and swap, read through one kept-open descriptor."""

    name = "memory"

    def __init__(self, roots: Roots) -> None:
        self._file = KeptFile(roots.proc / "meminfo")

    def read(self) -> list[Reading]:
        info = parse_meminfo(self._file.read_bytes())
        try:
            total = info["MemTotal"]
            free = info["MemFree"]
        except KeyError as exc:
            raise SensorError(self.name, f"/proc/meminfo has no {exc.args[0]}") from exc
        if total <= 0:
            raise SensorError(self.name, "MemTotal is zero")
        buffers = info.get("Buffers", 0)
        cached = info.get("Cached", 0) + info.get("SReclaimable", 0)
        used = total - free - buffers - cached
        if used < 0:  # containers and odd kernels: fall back to the simplest true statement
            used, buffers, cached = total - free, 0, 0
        # Kernels before 3.14 have no MemAvailable; free+buffers+cached is the old estimate.
        available = info.get("MemAvailable", free + buffers + cached)
        states = {"used": used, "free": free, "buffers": buffers, "cached": cached}
        out = [Reading("system.memory.usage", float(v), _STATE_ATTRS[k]) for k, v in states.items()]
        out += [
            Reading("system.memory.utilization", v / total, _STATE_ATTRS[k])
            for k, v in states.items()
        ]
        out.append(Reading("system.memory.limit", float(total)))
        out.append(Reading("system.memory.linux.available", float(available)))
        swap_total = info.get("SwapTotal", 0)
        if swap_total > 0:
            swap_free = info.get("SwapFree", 0)
            out.append(Reading("system.paging.usage", float(swap_total - swap_free), _SWAP_USED))
            out.append(Reading("system.paging.usage", float(swap_free), _SWAP_FREE))
        return out

    def close(self) -> None:
        self._file.close()


def discover(roots: Roots) -> list[Sensor | Absent]:
    if not (roots.proc / "meminfo").exists():
        return [Absent("memory", f"no {roots.proc / 'meminfo'}")]
    return [MemorySensor(roots)]
