"""History ring and sampler: bounded memory, windows, and failure isolation."""

from __future__ import annotations

import math

import pytest

from edged.history import History
from edged.sampler import Sampler
from edged.sensors.base import Sensor, SensorError
from edged.snapshot import Reading, Snapshot

CPU0: dict[str, str | int] = {"cpu.logical_number": 0, "cpu.mode": "user"}


def snap(seq: int, *readings: Reading) -> Snapshot:
    return Snapshot(
        seq=seq, time_unix_ns=(1000 + seq) * 10**9, monotonic_s=float(seq), readings=readings
    )


def test_ring_keeps_the_last_ticks_and_windows() -> None:
    history = History(capacity=5)
    for i in range(12):
        history.append(
            snap(
                i,
                Reading("system.cpu.utilization", i / 100, CPU0),
                Reading("process.memory.usage", 1.0, {"process.pid": 1}),
            )
        )
    assert len(history) == 5
    data = history.query()
    assert data["time"] == [1007.0, 1008.0, 1009.0, 1010.0, 1011.0]
    series = data["series"]
    assert isinstance(series, list)
    assert [s["metric"] for s in series] == ["system.cpu.utilization"]  # no process series
    assert series[0]["values"] == [0.07, 0.08, 0.09, 0.10, 0.11]
    assert history.query(window_s=2)["time"] == [1009.0, 1010.0, 1011.0]
    assert history.values("system.cpu.utilization", CPU0, window_s=1) == [
        (1010.0, 0.10),
        (1011.0, 0.11),
    ]


def test_a_tick_without_a_series_reads_as_a_gap() -> None:
    history = History(capacity=3)
    history.append(snap(1, Reading("hw.power", 5.0, {"hw.id": "a"})))
    history.append(snap(2))
    history.append(snap(3, Reading("hw.power", 7.0, {"hw.id": "a"})))
    series = history.query(metrics=["hw.power"])["series"]
    assert series == [
        {"metric": "hw.power", "attributes": {"hw.id": "a"}, "values": [5.0, None, 7.0]}
    ]


def test_series_count_is_capped() -> None:
    history = History(capacity=2, max_series=3)
    history.append(snap(1, *(Reading("hw.power", 1.0, {"hw.id": str(i)}) for i in range(10))))
    assert len(history.query()["series"]) == 3  # type: ignore[arg-type]


def test_fresh_attribute_dicts_never_alias_another_series() -> None:
    """Sensors may build new attribute dicts every tick; ids get reused by CPython."""
    history = History(capacity=50)
    for i in range(50):
        history.append(
            snap(
                i,
                Reading("hw.power", 1.0, {"hw.id": "a"}),
                Reading("hw.power", 2.0, {"hw.id": "b"}),
            )
        )
    series = history.query()["series"]
    assert isinstance(series, list)
    for s in series:
        expected = 1.0 if s["attributes"] == {"hw.id": "a"} else 2.0
        assert s["values"] == [expected] * 50


class Flaky(Sensor):
    def __init__(self, name: str, failures: list[BaseException | None]) -> None:
        self.name = name
        self.failures = failures

    def read(self) -> list[Reading]:
        failure = self.failures.pop(0) if self.failures else None
        if failure is not None:
            raise failure
        return [Reading("hw.power", 1.0, {"hw.id": self.name})]


def test_sampler_isolates_failures_counts_them_and_recovers() -> None:
    errors: list[str] = []
    good = Flaky("good", [])
    bad = Flaky(
        "bad", [OSError(11, "EAGAIN"), SensorError("bad", "garbage"), RuntimeError("bug"), None]
    )
    sampler = Sampler([bad, good], on_error=errors.append)
    for _ in range(3):
        snapshot = sampler.tick()
        assert [r.attributes["hw.id"] for r in snapshot.readings] == ["good"]
        assert {s.name: s.status for s in snapshot.sources} == {"bad": "error", "good": "ok"}
    assert errors == ["bad", "bad", "bad"]
    snapshot = sampler.tick()
    assert {s.name: s.status for s in snapshot.sources} == {"bad": "ok", "good": "ok"}
    assert snapshot.seq == 4


def test_snapshot_lookup() -> None:
    s = snap(1, Reading("system.memory.limit", 8.0), Reading("system.cpu.time", 3.0, CPU0))
    assert s.value("system.memory.limit") == 8.0
    assert s.value("system.cpu.time", {"cpu.mode": "user"}) == 3.0
    assert s.value("system.cpu.time", {"cpu.mode": "idle"}) is None
    assert not math.isnan(s.monotonic_s)


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        History(0)
