"""A bounded ring of past samples, compact enough for 0.1 s ticks over minutes.

Storing snapshots would cost a Python object per reading per tick (about 30 MB for 300 s at
0.1 s). Instead each series (metric + attributes) is a fixed ``array('d')`` ring of floats,
NaN where a tick had no value, beside one ring of timestamps: 8 bytes per value.

Per-process series are not kept: a machine running a thousand processes would need a thousand
rings for data the strategies keep in their own O(1) state. The latest snapshot still has them.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Mapping

from edged.snapshot import AttrValue, Snapshot

SeriesKey = tuple[str, tuple[tuple[str, AttrValue], ...]]
_NAN = float("nan")


def series_key(metric: str, attributes: Mapping[str, AttrValue]) -> SeriesKey:
    return metric, tuple(sorted(attributes.items()))


class History:
    """The last ``capacity`` ticks of every machine-level series."""

    def __init__(self, capacity: int, max_series: int = 4096) -> None:
        if capacity < 1:
            raise ValueError("history capacity must be at least 1")
        self.capacity = capacity
        self.max_series = max_series
        self._times = array("d", [_NAN]) * capacity  # unix seconds of each slot
        self._series: dict[SeriesKey, array[float]] = {}
        # id(attributes) -> (the dict itself, metric, key). Holding the dict keeps its id from
        # being reused while cached; sensors reuse attribute dicts, so hits are the rule.
        self._key_cache: dict[int, tuple[Mapping[str, AttrValue], str, SeriesKey]] = {}
        self._count = 0  # ticks appended in total; slot = count % capacity

    def __len__(self) -> int:
        return min(self._count, self.capacity)

    def append(self, snapshot: Snapshot) -> None:
        """Record one tick. O(readings); allocates only for series never seen before."""
        slot = self._count % self.capacity
        self._times[slot] = snapshot.time_unix_ns / 1e9
        written: set[SeriesKey] = set()
        for reading in snapshot.readings:
            if reading.metric.startswith("process."):
                continue
            hit = self._key_cache.get(id(reading.attributes))
            if hit is not None and hit[0] is reading.attributes and hit[1] == reading.metric:
                cached = hit[2]
            else:
                cached = series_key(reading.metric, reading.attributes)
                if len(self._key_cache) >= 1024:  # bounds what a sensor's fresh dicts can pin
                    self._key_cache.clear()
                self._key_cache[id(reading.attributes)] = (
                    reading.attributes,
                    reading.metric,
                    cached,
                )
            ring = self._series.get(cached)
            if ring is None:
                if len(self._series) >= self.max_series:
                    continue
                ring = self._series[cached] = array("d", [_NAN]) * self.capacity
            ring[slot] = reading.value
            written.add(cached)
        if len(written) != len(self._series):
            for key, ring in self._series.items():
                if key not in written:
                    ring[slot] = _NAN
        self._count += 1

    def _slots(self, window_s: float | None) -> list[int]:
        n = len(self)
        order = [(self._count - n + i) % self.capacity for i in range(n)]
        if window_s is None or not order:
            return order
        newest = self._times[order[-1]]
        return [s for s in order if newest - self._times[s] <= window_s]

    def query(
        self, window_s: float | None = None, metrics: Iterable[str] | None = None
    ) -> dict[str, object]:
        """Samples of the last ``window_s`` seconds, oldest first, as plain data:
        ``{"time": [...], "series": [{"metric", "attributes", "values": [...]}]}``, with
        None where a tick had no value. This is what ``history`` returns to clients."""
        wanted = set(metrics) if metrics is not None else None
        slots = self._slots(window_s)
        series = []
        for (metric, attrs), ring in self._series.items():
            if wanted is not None and metric not in wanted:
                continue
            values = [None if math.isnan(ring[s]) else ring[s] for s in slots]
            if all(v is None for v in values):
                continue
            series.append({"metric": metric, "attributes": dict(attrs), "values": values})
        return {"time": [self._times[s] for s in slots], "series": series}

    def values(
        self, metric: str, attributes: Mapping[str, AttrValue], window_s: float | None = None
    ) -> list[tuple[float, float]]:
        """(unix time, value) pairs of one series, oldest first, ticks without a value left out."""
        ring = self._series.get(series_key(metric, attributes))
        if ring is None:
            return []
        return [(self._times[s], ring[s]) for s in self._slots(window_s) if not math.isnan(ring[s])]
