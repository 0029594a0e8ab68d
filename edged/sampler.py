"""One tick: read every sensor, isolate failures, and freeze the result into a Snapshot."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from edged.sensors.base import Sensor, SensorError
from edged.snapshot import Reading, Snapshot, SourceStatus

log = logging.getLogger(__name__)


class Sampler:
    """Reads a fixed set of sensors; a sensor that fails is "error" for that tick only.

    ``on_error(sensor_name)`` is called once per failed read (the daemon counts it in
    ``edged.sensor.errors``). A failure is logged when a source goes from ok to error and when
    it recovers, not on every tick, so a broken sensor cannot flood the journal.
    """

    def __init__(
        self,
        sensors: Sequence[Sensor],
        on_error: Callable[[str], None] = lambda name: None,
        wall_clock_ns: Callable[[], int] = time.time_ns,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sensors = list(sensors)
        self._on_error = on_error
        self._wall_clock_ns = wall_clock_ns
        self._monotonic = monotonic
        self._failing: set[str] = set()
        self._seq = 0

    def tick(self) -> Snapshot:
        # stamped when sampling starts (as Prometheus stamps a scrape and the OTel hostmetrics
        # receiver a scrape batch): the cadence is when ticks start, whatever the reads cost
        time_unix_ns = self._wall_clock_ns()
        monotonic_s = self._monotonic()
        readings: list[Reading] = []
        statuses: list[SourceStatus] = []
        for sensor in self.sensors:
            try:
                readings.extend(sensor.read())
            except (OSError, ValueError, SensorError) as exc:
                detail = (
                    exc.detail if isinstance(exc, SensorError) else f"{type(exc).__name__}: {exc}"
                )
                self._failed(sensor.name, detail)
                statuses.append(SourceStatus(sensor.name, "error", detail))
                continue
            except Exception as exc:  # a sensor bug must not stop the loop; it is logged in full
                log.exception("sensor %s raised unexpectedly", sensor.name)
                self._failed(sensor.name, f"{type(exc).__name__}: {exc}", logged=True)
                statuses.append(SourceStatus(sensor.name, "error", f"{type(exc).__name__}: {exc}"))
                continue
            if sensor.name in self._failing:
                self._failing.discard(sensor.name)
                log.info("sensor %s recovered", sensor.name)
            statuses.append(SourceStatus(sensor.name, "ok"))
        self._seq += 1
        return Snapshot(
            seq=self._seq,
            time_unix_ns=time_unix_ns,
            monotonic_s=monotonic_s,
            readings=tuple(readings),
            sources=tuple(statuses),
        )

    def _failed(self, name: str, detail: str, logged: bool = False) -> None:
        self._on_error(name)
        if name not in self._failing:
            self._failing.add(name)
            if not logged:
                log.warning("sensor %s unavailable: %s", name, detail)

    def close(self) -> None:
        for sensor in self.sensors:
            try:
                sensor.close()
            except OSError as exc:
                log.debug("closing %s: %s", sensor.name, exc)
