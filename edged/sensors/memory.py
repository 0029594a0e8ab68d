"""Memory and swap from ``/proc/meminfo``.

States follow the OpenTelemetry convention that ``system.memory.usage`` summed over its states
equals ``system.memory.limit``: ``cached`` includes reclaimable slab and ``used`` is the rest,
as psutil and the collector's hostmetrics receiver compute it. Policy decisions do not use
``used``: they use MemTotal - MemAvailable (``system.memory.linux.available``), the kernel's own
estimate of what can be allocated without swapping, less the free pages on the per-CPU lists.

Per-CPU free pages (``edged.memory.percpu_free``): the page allocator keeps free pages on
per-CPU lists that MemFree, and so MemAvailable, do not count. Kernels since 6.7 size these lists
automatically, up to hundreds of MiB per CPU (565 MiB per CPU measured on a 24 GiB, 2-CPU VM):
a process can then allocate that much with MemAvailable not moving, and a daemon watching
MemAvailable sees the fill late (measured: a 1 GiB allocation moved it by 330 MiB). The lists'
``count:`` lines in ``/proc/zoneinfo`` (pages) say how much; reading them costs ~14 µs here.
"""

from __future__ import annotations

import os

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


PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def parse_percpu_free_pages(raw: bytes) -> int:
    """Pages on the per-CPU free lists: the sum of ``/proc/zoneinfo``'s ``count:`` lines (each
    CPU's pageset in each zone; no other line of the file starts with ``count:``)."""
    total = 0
    for line in raw.splitlines():
        stripped = line.lstrip()
        if stripped.startswith(b"count:"):
            total += int(stripped[6:])
    return total


class MemorySensor(Sensor):
    """System memory, availability and swap, read through kept-open descriptors."""

    name = "memory"

    def __init__(self, roots: Roots) -> None:
        self._file = KeptFile(roots.proc / "meminfo")
        zoneinfo = roots.proc / "zoneinfo"
        self._zoneinfo = KeptFile(zoneinfo) if zoneinfo.exists() else None

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
        if self._zoneinfo is not None:
            pages = parse_percpu_free_pages(self._zoneinfo.read_bytes())
            out.append(Reading("edged.memory.percpu_free", float(pages * PAGE_BYTES)))
        swap_total = info.get("SwapTotal", 0)
        if swap_total > 0:
            swap_free = info.get("SwapFree", 0)
            out.append(Reading("system.paging.usage", float(swap_total - swap_free), _SWAP_USED))
            out.append(Reading("system.paging.usage", float(swap_free), _SWAP_FREE))
        return out

    def close(self) -> None:
        self._file.close()
        if self._zoneinfo is not None:
            self._zoneinfo.close()


def discover(roots: Roots) -> list[Sensor | Absent]:
    if not (roots.proc / "meminfo").exists():
        return [Absent("memory", f"no {roots.proc / 'meminfo'}")]
    return [MemorySensor(roots)]
