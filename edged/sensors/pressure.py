"""Pressure stall information (PSI) from ``/proc/pressure/{memory,cpu,io}``.

``edged.pressure`` is the ``some`` average over 10 s and 60 s, as a share of time (the file
says percent). The cumulative ``total`` (microseconds) is kept on the sensor for strategies
that need a faster signal than avg10.
"""

from __future__ import annotations

from edged.sensors.base import Absent, KeptFile, Roots, Sensor, SensorError
from edged.snapshot import Reading

RESOURCES = ("memory", "cpu", "io")


def parse_psi_some(raw: bytes) -> tuple[float, float, int]:
    """(avg10 %, avg60 %, total µs) of the ``some`` line."""
    for line in raw.splitlines():
        if line.startswith(b"some "):
            fields = dict(part.split(b"=", 1) for part in line.split()[1:])
            return float(fields[b"avg10"]), float(fields[b"avg60"]), int(fields[b"total"])
    raise ValueError("PSI file has no 'some' line")


class PressureSensor(Sensor):
    """PSI ``some`` averages for each resource the kernel reports."""

    name = "pressure"

    def __init__(self, roots: Roots, resources: list[str]) -> None:
        self._files = [(r, KeptFile(roots.proc / "pressure" / r)) for r in resources]
        self._attrs = {
            (r, w): {"edged.resource": r, "edged.window": w}
            for r in resources
            for w in ("10s", "60s")
        }
        self.total_us: dict[str, int] = {}

    def read(self) -> list[Reading]:
        out: list[Reading] = []
        for resource, file in self._files:
            try:
                avg10, avg60, total = parse_psi_some(file.read_bytes())
            except (KeyError, ValueError) as exc:
                raise SensorError(self.name, f"{file.path}: {exc}") from exc
            self.total_us[resource] = total
            out.append(Reading("edged.pressure", avg10 / 100.0, self._attrs[(resource, "10s")]))
            out.append(Reading("edged.pressure", avg60 / 100.0, self._attrs[(resource, "60s")]))
        return out

    def close(self) -> None:
        for _, file in self._files:
            file.close()


def discover(roots: Roots) -> list[Sensor | Absent]:
    present = [r for r in RESOURCES if (roots.proc / "pressure" / r).exists()]
    if not present:
        return [Absent("pressure", "no /proc/pressure (kernel without CONFIG_PSI or psi=0)")]
    # A kernel built with PSI but booted with psi=0 has the files and fails to read them.
    try:
        with open(roots.proc / "pressure" / present[0], "rb") as f:
            f.read()
    except OSError as exc:
        return [Absent("pressure", f"PSI disabled: {exc.strerror}")]
    return [PressureSensor(roots, present)]
