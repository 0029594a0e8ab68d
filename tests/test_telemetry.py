"""edged.telemetry against real receivers: an in-test OTLP/HTTP server, rotel, Prometheus.

The Telemetry class is fed synthetic snapshots, so every value, unit and attribute that arrives
can be asserted exactly. The end-to-end tests with the real daemon are in test_telemetry_e2e.py.
"""

from __future__ import annotations

import itertools
import logging
import os
import platform
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
from prometheus_client.parser import text_string_to_metric_families

from edged import __version__
from edged.config import ConfigError
from edged.config import Telemetry as TelemetrySettings
from edged.metrics import METRICS, Kind
from edged.snapshot import Reading, Snapshot
from edged.telemetry import (
    EXPORTER_LOGGERS,
    TICK_BUCKETS_S,
    Telemetry,
    TelemetryError,
    _ExportLogLimiter,
    build_resource,
    host_arch,
    machine_instance_id,
    resolve_push,
)
from tests.conftest import require
from tests.telemetry_helpers import (
    OtlpReceiver,
    any_value,
    attrs,
    free_port,
    points,
    rotel_metrics,
    rotel_resource_attributes,
    run_prometheus,
    run_rotel,
    wait_until,
)

CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE

READINGS = (
    Reading("system.memory.usage", 6_000_000_000.0, {"system.memory.state": "used"}),
    Reading("system.memory.usage", 1_500_000_000.0, {"system.memory.state": "free"}),
    Reading("system.memory.limit", 8_000_000_000.0),
    Reading("system.cpu.time", 1234.5, {"cpu.mode": "user", "cpu.logical_number": 0}),
    Reading("system.cpu.time", 321.25, {"cpu.mode": "system", "cpu.logical_number": 0}),
    Reading("system.cpu.utilization", 0.25, {"cpu.mode": "user", "cpu.logical_number": 0}),
    Reading(
        "hw.temperature",
        47.5,
        {"hw.id": "thermal_zone0", "hw.name": "cpu-thermal", "hw.type": "temperature"},
    ),
    Reading("hw.energy", 5000.0, {"hw.id": "rapl0", "hw.name": "package-0", "hw.type": "cpu"}),
    Reading("edged.pressure", 0.125, {"edged.resource": "memory", "edged.window": "10s"}),
    Reading("not.in.the.contract", 1.0),  # never exported: no instrument has this name
)
SAMPLED = {r.metric for r in READINGS if r.metric in METRICS}


def make_snapshot(seq: int = 1, readings: tuple[Reading, ...] = READINGS) -> Snapshot:
    return Snapshot(
        seq=seq, time_unix_ns=time.time_ns(), monotonic_s=time.monotonic(), readings=readings
    )


def settings(**kw: Any) -> TelemetrySettings:
    """Telemetry settings for a test: no Prometheus endpoint unless asked for."""
    kw.setdefault("prometheus", "off")
    return TelemetrySettings(**kw)


@pytest.fixture(autouse=True)
def _no_ambient_otel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exporters also read os.environ; keep the developer's OTEL_* out of the tests."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


# --- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("otlp_setting", "environ", "expected"),
    [
        ("http://127.0.0.1:4318", {}, "http://127.0.0.1:4318/v1/metrics"),
        ("http://127.0.0.1:4318/", {}, "http://127.0.0.1:4318/v1/metrics"),
        ("127.0.0.1:4318", {}, "http://127.0.0.1:4318/v1/metrics"),
        ("https://otel.example:443/custom/metrics", {}, "https://otel.example:443/custom/metrics"),
        ("", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "http://c:4318/v1/metrics"),
        ("", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/p/"}, "http://c:4318/p/v1/metrics"),
        (
            "",
            {
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://m:9999/in",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
            },
            "http://m:9999/in",
        ),
        (
            "http://toml:4318",
            {
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://m:9999/in",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
            },
            "http://toml:4318/v1/metrics",
        ),
        ("", {}, None),
        ("", {"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, None),
    ],
)
def test_endpoint_follows_the_spec_and_the_config_wins(
    otlp_setting: str, environ: dict[str, str], expected: str | None
) -> None:
    push = resolve_push(settings(otlp=otlp_setting), environ)
    assert (push.endpoint if push else None) == expected


def test_grpc_endpoints_are_used_as_given() -> None:
    push = resolve_push(settings(otlp="http://c:4317", protocol="grpc"), {})
    assert push is not None
    assert (push.protocol, push.endpoint) == ("grpc", "http://c:4317")
    env = {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}
    push = resolve_push(settings(), env)
    assert push is not None
    assert (push.protocol, push.endpoint) == ("grpc", "http://c:4317")
    # the config wins over the environment only when it is set
    push = resolve_push(settings(protocol="http/protobuf"), env)
    assert push is not None
    assert (push.protocol, push.endpoint) == ("http/protobuf", "http://c:4317/v1/metrics")
    env["OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"] = "http/protobuf"
    assert resolve_push(settings(), env) == resolve_push(settings(protocol="http/protobuf"), env)


def test_interval_headers_and_timeout_precedence(caplog: pytest.LogCaptureFixture) -> None:
    base = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}
    push = resolve_push(settings(), base)
    assert push is not None
    assert (push.interval_s, push.timeout_s, dict(push.headers)) == (60.0, 5.0, {})

    env = {**base, "OTEL_METRIC_EXPORT_INTERVAL": "2500"}
    push = resolve_push(settings(), env)
    assert push is not None
    assert push.interval_s == 2.5
    push = resolve_push(settings(export_interval="200ms"), env)
    assert push is not None
    assert (push.interval_s, push.timeout_s) == (0.2, 1.5)

    with caplog.at_level(logging.WARNING, logger="edged.telemetry"):
        push = resolve_push(settings(), {**base, "OTEL_METRIC_EXPORT_INTERVAL": "soon"})
    assert push is not None
    assert push.interval_s == 60.0
    assert "OTEL_METRIC_EXPORT_INTERVAL" in caplog.text

    env = {
        **base,
        "OTEL_EXPORTER_OTLP_HEADERS": "a=generic,b=generic",
        "OTEL_EXPORTER_OTLP_METRICS_HEADERS": "Api-Key=s%20ecret,b=metrics",
    }
    push = resolve_push(settings(headers={"B": "toml", "c": "toml"}), env)
    assert push is not None
    # the metrics-specific variable replaces the generic one; edged.toml is merged over it
    assert dict(push.headers) == {"api-key": "s ecret", "b": "toml", "c": "toml"}


@pytest.mark.parametrize(
    ("kw", "environ", "key"),
    [
        ({"otlp": "ftp://c:21"}, {}, "telemetry.otlp"),
        ({"otlp": "http://c:port"}, {}, "telemetry.otlp"),
        ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        (
            {"otlp": "http://c:4318"},
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
    ],
)
def test_unusable_settings_are_errors_naming_the_key(
    kw: dict[str, Any], environ: dict[str, str], key: str
) -> None:
    with pytest.raises(TelemetryError) as info:
        Telemetry(settings(**kw), lambda: None, environ=environ)
    assert info.value.key == key
    assert str(info.value).startswith(f"telemetry: {key}: ")
    assert isinstance(info.value, ConfigError)  # the daemon reports it as a bad config


@pytest.mark.skipif(
    find_spec("opentelemetry.exporter.otlp.proto.grpc") is not None,
    reason="the gRPC exporter is installed here",
)
def test_grpc_without_the_extra_names_the_extra() -> None:
    with pytest.raises(TelemetryError, match=r"pip install 'edged\[grpc\]'") as info:
        Telemetry(settings(otlp="http://127.0.0.1:4317", protocol="grpc"), lambda: None)
    assert info.value.key == "telemetry.protocol"


@pytest.mark.parametrize(
    ("machine", "arch"),
    [
        ("x86_64", "amd64"),
        ("aarch64", "arm64"),
        ("armv7l", "arm32"),
        ("armv8l", "arm32"),
        ("i686", "x86"),
        ("ppc64le", "ppc64"),
        ("s390x", "s390x"),
        ("riscv64", "riscv64"),
    ],
)
def test_host_arch_uses_semconv_values(machine: str, arch: str) -> None:
    assert host_arch(machine) == arch


def test_resource_merges_otel_variables_over_edged_attributes() -> None:
    env = {
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=lab, host.name=edge%2D7,bogus",
        "OTEL_SERVICE_NAME": "",
    }
    resource = build_resource(env, instance_id="id-1")
    assert dict(resource.attributes) == {
        "telemetry.sdk.language": "python",
        "telemetry.sdk.name": "opentelemetry",
        "telemetry.sdk.version": resource.attributes["telemetry.sdk.version"],
        "service.name": "edged",
        "service.version": __version__,
        "service.instance.id": "id-1",
        "host.name": "edge-7",
        "host.arch": host_arch(),
        "os.type": "linux",
        "deployment.environment.name": "lab",
    }
    env = {"OTEL_RESOURCE_ATTRIBUTES": "service.name=a", "OTEL_SERVICE_NAME": "edged-cam1"}
    assert build_resource(env, "x").attributes["service.name"] == "edged-cam1"


def test_instance_id_is_stable_per_machine() -> None:
    first = machine_instance_id()
    assert first == machine_instance_id()
    if Path("/etc/machine-id").is_file():
        assert uuid.UUID(first).version == 5
        assert Path("/etc/machine-id").read_text().strip() not in first
    assert build_resource({}).attributes["service.instance.id"] == first


def test_sdk_disabled_exports_nothing(otlp: OtlpReceiver) -> None:
    t = Telemetry(
        settings(otlp=otlp.url, export_interval=0.05, prometheus="127.0.0.1:0"),
        make_snapshot,
        environ={"OTEL_SDK_DISABLED": "true"},
    )
    t.record_tick(0.001)
    t.count_sensor_error("memory")
    assert t.prometheus_address is None
    time.sleep(0.2)
    t.shutdown()
    assert otlp.requests() == []


# --- OTLP push, exact ----------------------------------------------------------------------


def test_otlp_http_push_is_exact(otlp: OtlpReceiver) -> None:
    current = [make_snapshot(1)]
    env = {
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=lab",
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20abc,x-edged-test=env",
    }
    t = Telemetry(
        settings(otlp=otlp.url, export_interval="200ms", headers={"X-Edged-Test": "toml"}),
        lambda: current[0],
        instance_id="test-instance",
        environ=env,
    )
    try:
        for duration_s in (0.00005, 0.002, 0.3, 2.0):
            t.record_tick(duration_s)
        t.count_sensor_error("nvml", 2)
        t.count_sensor_error("hwmon")
        wait_until(lambda: otlp.latest_metric("system.memory.usage"), 10, "a first export")

        # a new snapshot is picked up by the next collection
        changed = tuple(
            Reading(r.metric, 7_000_000_000.0, r.attributes)
            if r.metric == "system.memory.usage" and r.attributes["system.memory.state"] == "used"
            else r
            for r in READINGS
        )
        current[0] = make_snapshot(2, changed)
        used = attrs(**{"system.memory.state": "used"})
        wait_until(
            lambda: (m := otlp.latest_metric("system.memory.usage")) and points(m)[used] == 7e9,
            10,
            "the second snapshot to be exported",
        )
    finally:
        t.shutdown()

    last = otlp.requests()[-1]
    assert last.path == "/v1/metrics"
    assert last.headers["content-type"] == "application/x-protobuf"
    assert last.headers["authorization"] == "Bearer abc"
    assert last.headers["x-edged-test"] == "toml"

    (rm,) = last.request.resource_metrics
    resource = {kv.key: any_value(kv.value) for kv in rm.resource.attributes}
    assert resource["service.name"] == "edged"
    assert resource["service.version"] == __version__
    assert resource["service.instance.id"] == "test-instance"
    assert resource["host.name"] == socket.gethostname()
    assert resource["host.arch"] == host_arch()
    if platform.machine() == "x86_64":  # the dev and CI machines: the semconv name, not uname's
        assert resource["host.arch"] == "amd64"
    assert resource["os.type"] == "linux"
    assert resource["deployment.environment.name"] == "lab"
    (sm,) = rm.scope_metrics
    assert (sm.scope.name, sm.scope.version) == ("edged", __version__)

    metrics = {m.name: m for m in sm.metrics}
    assert set(metrics) == SAMPLED | {"edged.tick.duration", "edged.sensor.errors"}
    for name, metric in metrics.items():
        spec = METRICS[name]
        assert (metric.unit, metric.description) == (spec.unit, spec.description), name
        kind = metric.WhichOneof("data")
        if spec.kind is Kind.GAUGE:
            assert kind == "gauge", name
        elif spec.kind is Kind.HISTOGRAM:
            assert kind == "histogram", name
            assert metric.histogram.aggregation_temporality == CUMULATIVE
        else:
            assert kind == "sum", name
            assert metric.sum.is_monotonic == (spec.kind is Kind.COUNTER), name
            assert metric.sum.aggregation_temporality == CUMULATIVE, name

    assert points(metrics["system.memory.usage"]) == {
        attrs(**{"system.memory.state": "used"}): 7e9,
        attrs(**{"system.memory.state": "free"}): 1.5e9,
    }
    assert points(metrics["system.memory.limit"]) == {attrs(): 8e9}
    assert points(metrics["system.cpu.time"]) == {
        attrs(**{"cpu.mode": "user", "cpu.logical_number": 0}): 1234.5,
        attrs(**{"cpu.mode": "system", "cpu.logical_number": 0}): 321.25,
    }
    assert points(metrics["system.cpu.utilization"]) == {
        attrs(**{"cpu.mode": "user", "cpu.logical_number": 0}): 0.25
    }
    assert points(metrics["hw.temperature"]) == {
        attrs(
            **{"hw.id": "thermal_zone0", "hw.name": "cpu-thermal", "hw.type": "temperature"}
        ): 47.5
    }
    assert points(metrics["hw.energy"]) == {
        attrs(**{"hw.id": "rapl0", "hw.name": "package-0", "hw.type": "cpu"}): 5000.0
    }
    assert points(metrics["edged.pressure"]) == {
        attrs(**{"edged.resource": "memory", "edged.window": "10s"}): 0.125
    }
    assert points(metrics["edged.sensor.errors"]) == {
        attrs(**{"edged.sensor": "nvml"}): 2,
        attrs(**{"edged.sensor": "hwmon"}): 1,
    }

    (tick,) = metrics["edged.tick.duration"].histogram.data_points
    assert list(tick.explicit_bounds) == list(TICK_BUCKETS_S)
    assert tick.count == 4
    assert tick.sum == pytest.approx(2.30205)
    assert (tick.min, tick.max) == (0.00005, 2.0)
    expected = [0] * (len(TICK_BUCKETS_S) + 1)
    for duration_s in (0.00005, 0.002, 0.3, 2.0):
        expected[next((i for i, b in enumerate(TICK_BUCKETS_S) if duration_s <= b), -1)] += 1
    assert list(tick.bucket_counts) == expected
    assert expected[0] == expected[4] == expected[11] == expected[-1] == 1


def test_no_snapshot_yet_exports_only_the_daemons_own_metrics(otlp: OtlpReceiver) -> None:
    t = Telemetry(settings(otlp=otlp.url, export_interval=3600), lambda: None, environ={})
    t.record_tick(0.001)
    t.shutdown()  # the final collection is the only one
    (got,) = otlp.requests()
    names = {m.name for m in got.request.resource_metrics[0].scope_metrics[0].metrics}
    assert names == {"edged.tick.duration"}


class CountingReadings(tuple[Reading, ...]):
    """A readings tuple that counts how often it is walked."""

    walks = 0

    def __iter__(self) -> Iterator[Reading]:
        type(self).walks += 1
        return super().__iter__()


def test_readings_are_grouped_once_per_snapshot(otlp: OtlpReceiver) -> None:
    CountingReadings.walks = 0
    current = [make_snapshot(1, CountingReadings(READINGS))]
    t = Telemetry(
        settings(otlp=otlp.url, export_interval=3600, prometheus="127.0.0.1:0"),
        lambda: current[0],
        environ={},
    )
    try:
        address = t.prometheus_address
        assert address is not None
        url = f"http://{address[0]}:{address[1]}/metrics"
        for _ in range(3):  # three collections by the Prometheus reader
            with urllib.request.urlopen(url, timeout=5) as response:
                assert b"system_memory_limit_bytes 8e+09" in response.read()
        assert CountingReadings.walks == 1  # 25 callbacks x 3 collections, one walk

        current[0] = make_snapshot(2, CountingReadings(READINGS))
        with urllib.request.urlopen(url, timeout=5) as response:
            response.read()
        assert CountingReadings.walks == 2
    finally:
        t.shutdown()  # a fourth collection, by the OTLP reader, of the same snapshot
    assert CountingReadings.walks == 2
    assert otlp.latest_metric("system.memory.limit") is not None


# --- a dead collector ----------------------------------------------------------------------


def test_log_limiter_reports_on_a_doubling_period_and_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    limiter = _ExportLogLimiter("http://c:4318/v1/metrics", 10.0, clock=lambda: now[0])
    exporter_log = logging.getLogger(EXPORTER_LOGGERS[0])
    limiter.install()
    caplog.set_level(logging.INFO)
    try:

        def export(ok: bool) -> None:
            limiter.begin()
            if not ok:
                exporter_log.error("Failed to export metrics batch")
                # a record from another thread during the export is not held back
                other = threading.Thread(target=exporter_log.warning, args=("elsewhere",))
                other.start()
                other.join()
            limiter.end(ok)

        reported: list[float] = []
        while now[0] <= 7200:
            before = sum(r.getMessage() == "Failed to export metrics batch" for r in caplog.records)
            export(ok=False)
            after = sum(r.getMessage() == "Failed to export metrics batch" for r in caplog.records)
            if after > before:
                reported.append(now[0])
            now[0] += 10
        # first failure, then after 1, 2, 4, 8 min, then every 10 min
        assert reported[:6] == [0, 60, 180, 420, 900, 1500]
        assert all(b - a == 600 for a, b in itertools.pairwise(reported[4:]))
        assert len(reported) == 15
        assert sum(r.getMessage() == "elsewhere" for r in caplog.records) == 721

        ours = [r for r in caplog.records if r.name == "edged.telemetry"]
        assert len(ours) == 15
        assert "failed" in ours[0].getMessage()
        assert "still failing" in ours[1].getMessage()
        assert "held back" in ours[1].getMessage()

        export(ok=True)
        assert "recovered after 721 failed exports" in caplog.records[-1].getMessage()
        assert caplog.records[-1].levelno == logging.INFO
        export(ok=False)  # a new outage is reported at once
        assert caplog.records[-1].name == "edged.telemetry"
        assert "failed" in caplog.records[-1].getMessage()
    finally:
        limiter.uninstall()


@pytest.mark.slow
def test_dead_collector_neither_blocks_nor_floods_the_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    port = free_port()  # nothing listens here until the receiver starts below
    snapshot = make_snapshot(1)
    latest_calls = [0]

    def latest() -> Snapshot:
        latest_calls[0] += 1
        return snapshot

    t = Telemetry(
        settings(otlp=f"http://127.0.0.1:{port}", export_interval="200ms"), latest, environ={}
    )
    try:
        # the sampler's side stays fast while exports fail (each one takes ~1 s of retries)
        slowest = 0.0
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            start = time.perf_counter()
            t.record_tick(0.001)
            t.count_sensor_error("memory")
            slowest = max(slowest, time.perf_counter() - start)
            time.sleep(0.01)
        # a blocked tick would wait out an export's retries (about 1 s); a busy 2-core box can
        # hold a tick up by a GIL switch or two (0.12 s seen), which is not blocking
        assert slowest < 0.5
        assert latest_calls[0] >= 3  # collections went on

        def failed_reports() -> list[logging.LogRecord]:
            return [
                r
                for r in caplog.records
                if r.name == "edged.telemetry" and "export to %s failed" in r.msg
            ]

        (report,) = failed_reports()
        assert "failed" in report.getMessage()
        assert f"127.0.0.1:{port}" in report.getMessage()
        exporter_records = [r for r in caplog.records if r.name in EXPORTER_LOGGERS]
        # only the first failed export's messages got through (a retry warning and the error)
        assert 1 <= len(exporter_records) <= 3
        assert all(r.created <= report.created for r in exporter_records)
        assert any("Connection refused" in r.getMessage() for r in exporter_records)

        with OtlpReceiver(port=port) as receiver:
            recovered = wait_until(
                lambda: next((r for r in caplog.records if "recovered" in r.getMessage()), None),
                10,
                "the export to recover",
            )
            assert receiver.requests()
            t.shutdown(timeout_s=2)  # while the receiver is up: no new outage to report
        failures = int(recovered.getMessage().split("after ")[1].split()[0])
        assert failures >= 2  # the export in its retry wait when the receiver came may succeed
        assert len(failed_reports()) == 1
    finally:
        t.shutdown(timeout_s=2)


def test_shutdown_is_bounded_with_a_dead_collector() -> None:
    port = free_port()
    t = Telemetry(
        settings(otlp=f"http://127.0.0.1:{port}", export_interval="100ms"),
        make_snapshot,
        environ={},
    )
    time.sleep(0.3)  # the first export is in its retry wait now
    start = time.monotonic()
    t.shutdown(timeout_s=1.0)
    assert time.monotonic() - start < 1.5
    t.shutdown()  # idempotent
    t.record_tick(0.001)  # a late tick is dropped quietly
    t.count_sensor_error("memory")


def test_shutdown_skips_the_final_export_when_the_collector_is_gone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    port = free_port()
    t = Telemetry(
        settings(otlp=f"http://127.0.0.1:{port}", export_interval="100ms"),
        make_snapshot,
        environ={},
    )
    wait_until(
        lambda: any("export to %s failed" in r.msg for r in caplog.records),
        10,
        "a failed export",
    )
    time.sleep(0.3)  # the next export is in its retry wait now
    start = time.monotonic()
    t.shutdown(timeout_s=5.0)
    assert time.monotonic() - start < 0.5
    assert "OTLP collector unreachable: no final export" in caplog.text
    assert "Exporter already shutdown" not in caplog.text
    assert "Exception" not in caplog.text


# --- Prometheus pull -----------------------------------------------------------------------


def scrape(t: Telemetry, openmetrics: bool = False) -> str:
    address = t.prometheus_address
    assert address is not None
    accept = "application/openmetrics-text;version=1.0.0" if openmetrics else "text/plain"
    request = urllib.request.Request(
        f"http://{address[0]}:{address[1]}/metrics", headers={"Accept": accept}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        body: bytes = response.read()
    return body.decode()


def test_prometheus_endpoint_names_units_and_values() -> None:
    t = Telemetry(settings(prometheus="127.0.0.1:0"), make_snapshot, instance_id="i-1", environ={})
    try:
        address = t.prometheus_address
        assert address is not None
        assert address[0] == "127.0.0.1"
        assert address[1] > 0
        t.record_tick(0.0003)
        t.count_sensor_error("nvml", 3)
        families = {f.name: f for f in text_string_to_metric_families(scrape(t))}
    finally:
        t.shutdown()

    def samples(family: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return {(s.name, frozenset(s.labels.items())): s.value for s in families[family].samples}

    assert families["system_memory_usage_bytes"].type == "gauge"  # an UpDownCounter
    assert families["system_memory_usage_bytes"].documentation == "Bytes of memory in use, by state"
    assert samples("system_memory_usage_bytes") == {
        ("system_memory_usage_bytes", frozenset({("system_memory_state", "used")})): 6e9,
        ("system_memory_usage_bytes", frozenset({("system_memory_state", "free")})): 1.5e9,
    }
    assert samples("system_memory_limit_bytes") == {("system_memory_limit_bytes", frozenset()): 8e9}
    assert families["system_cpu_time_seconds"].type == "counter"
    assert (
        samples("system_cpu_time_seconds")[
            (
                "system_cpu_time_seconds_total",
                frozenset({("cpu_mode", "user"), ("cpu_logical_number", "0")}),
            )
        ]
        == 1234.5
    )
    assert families["system_cpu_utilization"].type == "gauge"
    assert families["hw_temperature_celsius"].type == "gauge"
    assert families["hw_energy_joules"].type == "counter"
    assert families["edged_pressure"].type == "gauge"
    assert (
        samples("edged_sensor_errors")[
            ("edged_sensor_errors_total", frozenset({("edged_sensor", "nvml")}))
        ]
        == 3
    )
    tick = samples("edged_tick_duration_seconds")
    assert tick[("edged_tick_duration_seconds_bucket", frozenset({("le", "0.00025")}))] == 0
    assert tick[("edged_tick_duration_seconds_bucket", frozenset({("le", "0.0005")}))] == 1
    assert tick[("edged_tick_duration_seconds_count", frozenset())] == 1
    (info,) = families["target_info"].samples  # the text format has no info type
    assert info.labels["service_name"] == "edged"
    assert info.labels["service_instance_id"] == "i-1"
    assert info.labels["host_arch"] == host_arch()
    assert info.labels["os_type"] == "linux"
    # metrics without readings are absent, not zero; no scope labels on the series
    assert "hw_power_watts" not in families
    assert not any(
        "otel_scope" in label for f in families.values() for s in f.samples for label in s.labels
    )


def test_series_of_gone_processes_disappear() -> None:
    """A long-running daemon sees thousands of pids; the SDK must not keep them all."""

    def process_snapshot(seq: int, pid: int) -> Snapshot:
        reading = Reading("process.memory.usage", 1e6 * pid, {"process.pid": pid})
        return make_snapshot(seq, (reading,))

    current = [process_snapshot(1, 101)]
    t = Telemetry(settings(prometheus="127.0.0.1:0"), lambda: current[0], environ={})
    try:
        assert 'process_memory_usage_bytes{process_pid="101"} 1.01e+08' in scrape(t)
        current[0] = process_snapshot(2, 202)
        text = scrape(t)
    finally:
        t.shutdown()
    assert 'process_memory_usage_bytes{process_pid="202"} 2.02e+08' in text
    assert 'process_pid="101"' not in text


def test_prometheus_openmetrics_carries_units() -> None:
    t = Telemetry(settings(prometheus="127.0.0.1:0"), make_snapshot, environ={})
    try:
        text = scrape(t, openmetrics=True)
    finally:
        t.shutdown()
    assert "# UNIT system_memory_usage_bytes bytes" in text
    assert "# UNIT system_cpu_time_seconds seconds" in text
    assert "# UNIT hw_temperature_celsius celsius" in text
    assert text.rstrip().endswith("# EOF")


def test_prometheus_off_and_address_in_use() -> None:
    t = Telemetry(settings(prometheus="off"), make_snapshot, environ={})
    assert t.prometheus_address is None
    t.shutdown()

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(TelemetryError, match="cannot serve Prometheus metrics") as info:
            Telemetry(settings(prometheus=f"127.0.0.1:{port}"), make_snapshot, environ={})
    assert info.value.key == "telemetry.prometheus"


# --- real collectors -----------------------------------------------------------------------


PROTOCOLS = [
    "http/protobuf",
    pytest.param(
        "grpc",
        marks=pytest.mark.skipif(
            find_spec("opentelemetry.exporter.otlp.proto.grpc") is None,
            reason="the edged[grpc] extra is not installed",
        ),
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_rotel_receives_names_units_and_resource(tmp_path: Path, protocol: str) -> None:
    with run_rotel(tmp_path) as rotel:
        port = rotel.grpc_port if protocol == "grpc" else rotel.http_port
        t = Telemetry(
            settings(otlp=f"http://127.0.0.1:{port}", protocol=protocol, export_interval="200ms"),
            make_snapshot,
            environ={"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=rotel-test"},
        )
        try:
            t.record_tick(0.004)
            t.count_sensor_error("thermal")
            expected = SAMPLED | {"edged.tick.duration", "edged.sensor.errors"}
            wait_until(
                lambda: expected <= set(rotel_metrics(rotel.output())), 20, "rotel to print metrics"
            )
        finally:
            t.shutdown()
        output = rotel.output()

    got = rotel_metrics(output)
    data_type = {Kind.GAUGE: "Gauge", Kind.COUNTER: "Sum", Kind.UPDOWN: "Sum"}
    for name in expected:
        spec, metric = METRICS[name], got[name]
        assert metric.unit == spec.unit, name
        assert metric.data_type == data_type.get(spec.kind, "Histogram"), name
        if spec.kind is not Kind.GAUGE:
            assert metric.temporality == "AGGREGATION_TEMPORALITY_CUMULATIVE", name
        if metric.data_type == "Sum":
            assert metric.monotonic == (spec.kind is Kind.COUNTER), name
    assert "not.in.the.contract" not in got
    resource = rotel_resource_attributes(output)
    assert resource["service.name"] == "Str(edged)"
    assert resource["service.version"] == f"Str({__version__})"
    assert resource["host.arch"] == f"Str({host_arch()})"
    assert resource["os.type"] == "Str(linux)"
    assert resource["host.name"] == f"Str({socket.gethostname()})"
    assert resource["deployment.environment.name"] == "Str(rotel-test)"
    assert resource["service.instance.id"] == f"Str({machine_instance_id()})"
    assert "system.memory.state: Str(used)" in output
    assert "cpu.logical_number: Int(0)" in output


@pytest.mark.slow
def test_real_prometheus_scrapes_the_endpoint(tmp_path: Path) -> None:
    binary = require("prometheus")
    current = [make_snapshot(1)]
    t = Telemetry(settings(prometheus="127.0.0.1:0"), lambda: current[0], environ={})
    try:
        address = t.prometheus_address
        assert address is not None
        with run_prometheus(binary, tmp_path, address) as prometheus:

            def value(promql: str) -> float | None:
                result = prometheus.query(promql)
                return float(result[0]["value"][1]) if result else None

            assert (
                wait_until(
                    lambda: value("system_memory_limit_bytes"), 30, "Prometheus to scrape edged"
                )
                == 8e9
            )
            assert value('system_memory_usage_bytes{system_memory_state="used"}') == 6e9
            assert value('system_cpu_time_seconds_total{cpu_mode="user"}') == 1234.5
            assert value("hw_temperature_celsius") == 47.5
            assert value('edged_pressure{edged_resource="memory",edged_window="10s"}') == 0.125
            (info,) = prometheus.query('target_info{service_name="edged"}')
            assert info["metric"]["host_arch"] == host_arch()
            assert info["metric"]["job"] == "edged"

            current[0] = make_snapshot(2, (Reading("system.memory.limit", 4e9),))
            wait_until(
                lambda: value("system_memory_limit_bytes") == 4e9, 30, "the new value to arrive"
            )
            rc_before_stop = prometheus.process.poll()
            assert rc_before_stop is None
    finally:
        t.shutdown()
