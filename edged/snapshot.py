"""Readings and snapshots: the immutable output of one sampling tick."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Literal

import msgspec

AttrValue = str | int
SourceState = Literal["ok", "absent", "error"]


class Reading(msgspec.Struct, frozen=True):
    """One value of one metric of :mod:`edged.metrics`, with its attributes.

    ``attributes`` uses the semantic-convention keys (``cpu.mode``, ``hw.id`` ...). Treat it as
    read-only: readings are shared between the snapshot, the history and the exporters.
    """

    metric: str
    value: float
    attributes: Mapping[str, AttrValue] = msgspec.field(default_factory=dict)


class SourceStatus(msgspec.Struct, frozen=True):
    """What became of one sensor source on a tick (or at discovery)."""

    name: str
    status: SourceState
    detail: str = ""


class Snapshot(msgspec.Struct, frozen=True):
    """Everything one tick saw. Built once, never changed."""

    seq: int
    time_unix_ns: int
    monotonic_s: float
    readings: tuple[Reading, ...]
    sources: tuple[SourceStatus, ...] = ()

    def find(
        self, metric: str, attributes: Mapping[str, AttrValue] | None = None
    ) -> Iterator[Reading]:
        """Readings of ``metric`` whose attributes include all of ``attributes``."""
        wanted = attributes or {}
        for reading in self.readings:
            if reading.metric != metric:
                continue
            if all(reading.attributes.get(k) == v for k, v in wanted.items()):
                yield reading

    def value(self, metric: str, attributes: Mapping[str, AttrValue] | None = None) -> float | None:
        """The value of the first matching reading, or None when the sensor gave none."""
        for reading in self.find(metric, attributes):
            return reading.value
        return None
