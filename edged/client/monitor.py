"""``@monitored``: a call's duration and resource delta as OpenTelemetry histograms.

Recorded in the *client* process through the OTel API (``get_meter("edged.client")``), so they
go wherever that process's meter provider sends them (OTLP, Prometheus, nothing when no SDK is
configured: the API's no-op meter then costs next to nothing). Per call:

- ``edged.client.call.duration`` (s): wall-clock time, ``time.perf_counter``;
- ``edged.client.call.cpu.time`` (s): CPU time of the whole process over the call
  (``time.process_time``: every thread, so work the call hands to a thread pool counts, and so
  does other threads' work that overlaps it);
- ``edged.client.call.memory.delta`` (By): resident set size at the end minus at the start
  (``/proc/self/statm``). OTel histograms take non-negative values only, so a call that ends
  with less RSS than it started with records 0: the figure is what the call added and kept.

Attributes: ``code.function`` (qualified name), ``code.namespace`` (module), and
``error.type`` (the exception's class name) when the call raised.
"""

from __future__ import annotations

import functools
import inspect
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, overload

from opentelemetry import metrics

P = ParamSpec("P")
R = TypeVar("R")

METER_NAME = "edged.client"
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """This process's resident set size, from ``/proc/self/statm`` (one small read; psutil
    would cost more per call for the same number)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE_BYTES


@dataclass(frozen=True)
class _Instruments:
    duration: metrics.Histogram
    cpu_time: metrics.Histogram
    memory_delta: metrics.Histogram

    @classmethod
    def create(cls, provider: metrics.MeterProvider | None) -> _Instruments:
        meter = (
            provider.get_meter(METER_NAME)
            if provider is not None
            else metrics.get_meter(METER_NAME)
        )
        return cls(
            duration=meter.create_histogram(
                "edged.client.call.duration", unit="s", description="Wall-clock time of a call"
            ),
            cpu_time=meter.create_histogram(
                "edged.client.call.cpu.time",
                unit="s",
                description="CPU time the process used during a call",
            ),
            memory_delta=meter.create_histogram(
                "edged.client.call.memory.delta",
                unit="By",
                description="Resident memory a call added and kept (0 when it shrank)",
            ),
        )


class _Measurement:
    """Readings at the start of a call; ``record`` takes the end ones and records."""

    __slots__ = ("cpu_s", "rss", "start_s")

    def __init__(self) -> None:
        self.rss = rss_bytes()
        self.cpu_s = time.process_time()
        self.start_s = time.perf_counter()

    def record(
        self, instruments: _Instruments, attributes: dict[str, str], error: BaseException | None
    ) -> None:
        duration_s = time.perf_counter() - self.start_s
        cpu_s = time.process_time() - self.cpu_s
        grown = max(0, rss_bytes() - self.rss)
        if error is not None:
            attributes = {**attributes, "error.type": type(error).__name__}
        instruments.duration.record(duration_s, attributes)
        instruments.cpu_time.record(max(0.0, cpu_s), attributes)
        instruments.memory_delta.record(grown, attributes)


@overload
def monitored(
    func: Callable[P, R], *, meter_provider: metrics.MeterProvider | None = None
) -> Callable[P, R]: ...


@overload
def monitored(
    func: None = None, *, meter_provider: metrics.MeterProvider | None = None
) -> Callable[[Callable[P, R]], Callable[P, R]]: ...


def monitored(
    func: Callable[P, R] | None = None, *, meter_provider: metrics.MeterProvider | None = None
) -> Callable[P, R] | Callable[[Callable[P, R]], Callable[P, R]]:
    """Record every call of the decorated function (sync or ``async def``): ``@monitored``,
    or ``@monitored(meter_provider=provider)`` for a provider other than the global one. The
    result and any exception pass through unchanged."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        instruments = _Instruments.create(meter_provider)
        attributes = {"code.function": fn.__qualname__, "code.namespace": fn.__module__}
        if inspect.iscoroutinefunction(fn):
            coroutine_fn: Callable[P, Coroutine[Any, Any, Any]] = fn  # type: ignore[assignment]

            @functools.wraps(fn)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                measurement = _Measurement()
                try:
                    result = await coroutine_fn(*args, **kwargs)
                except BaseException as exc:
                    measurement.record(instruments, attributes, exc)
                    raise
                measurement.record(instruments, attributes, None)
                return result

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            measurement = _Measurement()
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                measurement.record(instruments, attributes, exc)
                raise
            measurement.record(instruments, attributes, None)
            return result

        return wrapper

    if func is not None:
        return decorate(func)
    return decorate
