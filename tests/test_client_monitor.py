"""``@monitored``: real calls that take time, burn CPU and keep memory, read back through the
OpenTelemetry SDK's in-memory reader."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

from edged.client.monitor import monitored, rss_bytes

MIB = 2**20


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    metric_reader = InMemoryMetricReader()
    yield metric_reader
    metric_reader.shutdown()


def points(reader: InMemoryMetricReader) -> dict[str, list[HistogramDataPoint]]:
    """Metric name -> its histogram points, from one collection."""
    data = reader.get_metrics_data()
    out: dict[str, list[HistogramDataPoint]] = {}
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            assert sm.scope.name == "edged.client"
            for metric in sm.metrics:
                out[metric.name] = [p for p in metric.data.data_points]  # type: ignore[misc]
    return out


def resident(megabytes: int) -> bytearray:
    """A block with every page touched, so it is in RSS (bytearray's zeroed pages may not)."""
    block = bytearray(megabytes * MIB)
    block[::4096] = b"x" * len(block[::4096])
    return block


def burn_cpu(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        sum(range(1000))


def test_a_call_s_duration_cpu_and_kept_memory(reader: InMemoryMetricReader) -> None:
    provider = MeterProvider(metric_readers=[reader])
    kept: list[bytearray] = []

    @monitored(meter_provider=provider)
    def work(megabytes: int) -> str:
        block = bytearray(megabytes * MIB)
        block[::4096] = b"x" * len(block[::4096])  # touch every page: resident
        kept.append(block)
        burn_cpu(0.2)
        time.sleep(0.1)
        return "done"

    assert work(64) == "done"
    assert work.__name__ == "work"
    got = points(reader)
    assert set(got) == {
        "edged.client.call.duration",
        "edged.client.call.cpu.time",
        "edged.client.call.memory.delta",
    }
    (duration,) = got["edged.client.call.duration"]
    (cpu,) = got["edged.client.call.cpu.time"]
    (memory,) = got["edged.client.call.memory.delta"]
    assert duration.count == 1
    assert 0.3 <= duration.sum < 5
    assert 0.19 <= cpu.sum < duration.sum
    assert 60 * MIB <= memory.sum < 80 * MIB
    assert duration.attributes == {
        "code.function": "test_a_call_s_duration_cpu_and_kept_memory.<locals>.work",
        "code.namespace": __name__,
    }
    provider.shutdown()


def test_freed_memory_records_zero_and_errors_are_labelled(reader: InMemoryMetricReader) -> None:
    provider = MeterProvider(metric_readers=[reader])
    ballast = [resident(32)]

    @monitored(meter_provider=provider)
    def drop() -> None:
        ballast.clear()

    @monitored(meter_provider=provider)
    def fail() -> None:
        raise KeyError("nope")

    before = rss_bytes()
    drop()
    assert rss_bytes() < before  # the 32 MiB went back to the OS
    with pytest.raises(KeyError):
        fail()
    got = points(reader)
    by_function = {
        str(dict(p.attributes or {})["code.function"]).rsplit(".", 1)[-1]: p
        for p in got["edged.client.call.memory.delta"]
    }
    assert by_function["drop"].sum == 0
    assert "error.type" not in by_function["drop"].attributes  # type: ignore[operator]
    assert by_function["fail"].attributes["error.type"] == "KeyError"  # type: ignore[index]
    assert by_function["fail"].count == 1
    provider.shutdown()


def test_async_functions_are_awaited_and_measured(reader: InMemoryMetricReader) -> None:
    provider = MeterProvider(metric_readers=[reader])

    @monitored(meter_provider=provider)
    async def fetch(delay_s: float) -> dict[str, Any]:
        await asyncio.sleep(delay_s)
        return {"delay": delay_s}

    assert asyncio.run(fetch(0.2)) == {"delay": 0.2}
    (duration,) = points(reader)["edged.client.call.duration"]
    assert duration.count == 1
    assert 0.2 <= duration.sum < 2
    (cpu,) = points(reader)["edged.client.call.cpu.time"]
    assert cpu.sum < 0.15  # sleeping is not CPU time
    provider.shutdown()


def test_bare_decorator_uses_the_global_api_and_passes_results_through() -> None:
    @monitored
    def add(a: int, b: int) -> int:
        return a + b

    assert add(2, 3) == 5  # no SDK configured: the API's no-op meter, nothing to assert on
