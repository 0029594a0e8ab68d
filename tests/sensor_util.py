"""Helpers shared by the sysfs sensor tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from edged.sensors.base import Absent, Sensor
from edged.snapshot import Reading


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def sensors_of(found: Sequence[Sensor | Absent]) -> dict[str, Sensor]:
    return {item.name: item for item in found if isinstance(item, Sensor)}


def absents_of(found: Sequence[Sensor | Absent]) -> dict[str, str]:
    return {item.name: item.detail for item in found if isinstance(item, Absent)}


def values(readings: Sequence[Reading], metric: str, key: str = "hw.id") -> dict[str, float]:
    """{attribute value: reading value} of one metric; fails on a repeated attribute value."""
    out: dict[str, float] = {}
    for reading in readings:
        if reading.metric == metric:
            name = str(reading.attributes[key])
            assert name not in out, f"{metric} {key}={name} reported twice"
            out[name] = reading.value
    return out
