"""End to end: a real ``edged run`` pushing to rotel and to an in-test receiver, and serving
Prometheus, sampling this machine's real /proc. Stopped with SIGTERM; it must exit 0."""

from __future__ import annotations

import os
import re
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
from prometheus_client.parser import text_string_to_metric_families

from edged import __version__
from edged.metrics import METRICS, Kind
from edged.telemetry import host_arch, machine_instance_id
from tests.daemon_util import start_daemon
from tests.telemetry_helpers import (
    OtlpReceiver,
    any_value,
    attrs,
    free_port,
    points,
    rotel_metrics,
    rotel_resource_attributes,
    run_rotel,
    wait_until,
)

pytestmark = pytest.mark.slow

CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
# Sampled on every Linux machine, VMs included (no thermal, RAPL or GPU needed)
ALWAYS = {
    "system.memory.usage",
    "system.memory.limit",
    "system.memory.utilization",
    "system.memory.linux.available",
    "system.cpu.time",
    "system.cpu.utilization",
    "edged.tick.duration",
}
ENV = {
    "OTEL_METRIC_EXPORT_INTERVAL": "300",
    "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=e2e",
}


def mem_total_bytes() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return float(line.split()[1]) * 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


def test_daemon_pushes_to_the_receiver_and_serves_prometheus(
    tmp_path: Path, otlp: OtlpReceiver
) -> None:
    prom_port = free_port()
    daemon = start_daemon(
        tmp_path,
        "--interval", "0.2",
        "--otlp", otlp.url,
        "--prometheus", f"127.0.0.1:{prom_port}",
        env=ENV,
    )  # fmt: skip
    try:
        wait_until(
            lambda: all(otlp.latest_metric(name) for name in ALWAYS), 20, "the daemon's metrics"
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/metrics", timeout=5) as r:
            exposition = r.read().decode()
    finally:
        rc = daemon.stop()
    assert rc == 0, daemon.log()
    assert "Traceback" not in daemon.log()

    last = otlp.requests()[-1]
    (rm,) = last.request.resource_metrics
    resource = {kv.key: any_value(kv.value) for kv in rm.resource.attributes}
    assert resource["service.name"] == "edged"
    assert resource["service.version"] == __version__
    assert resource["service.instance.id"] == machine_instance_id()
    assert resource["host.name"] == socket.gethostname()
    assert resource["host.arch"] == host_arch()
    assert resource["os.type"] == "linux"
    assert resource["deployment.environment.name"] == "e2e"

    for name in ALWAYS:
        metric = otlp.latest_metric(name)
        assert metric is not None
        spec = METRICS[name]
        assert metric.unit == spec.unit, name
        kind = metric.WhichOneof("data")
        expected = {Kind.GAUGE: "gauge", Kind.HISTOGRAM: "histogram"}.get(spec.kind, "sum")
        assert kind == expected, name
        if kind == "sum":
            assert metric.sum.is_monotonic == (spec.kind is Kind.COUNTER), name
            assert metric.sum.aggregation_temporality == CUMULATIVE, name

    limit = otlp.latest_metric("system.memory.limit")
    assert limit is not None
    assert points(limit) == {attrs(): mem_total_bytes()}
    usage = otlp.latest_metric("system.memory.usage")
    assert usage is not None
    states = {dict(k)["system.memory.state"] for k in points(usage)}
    assert {"used", "free"} <= states
    cpu_time = otlp.latest_metric("system.cpu.time")
    assert cpu_time is not None
    cpus = {dict(k)["cpu.logical_number"] for k in points(cpu_time)}
    assert cpus == set(range(len(os.sched_getaffinity(0)))) or len(cpus) == os.cpu_count()
    assert all(v >= 0 for v in points(cpu_time).values())
    # the final export at SIGTERM carries every tick the daemon made
    tick = otlp.latest_metric("edged.tick.duration")
    assert tick is not None
    stopped = re.search(r"stopped after (\d+) ticks", daemon.log())
    assert stopped is not None
    assert tick.histogram.data_points[0].count == int(stopped.group(1)) >= 2

    families = {f.name: f for f in text_string_to_metric_families(exposition)}
    (sample,) = families["system_memory_limit_bytes"].samples
    assert sample.value == mem_total_bytes()
    assert families["system_cpu_time_seconds"].type == "counter"
    assert families["edged_tick_duration_seconds"].type == "histogram"
    (info,) = families["target_info"].samples
    assert info.labels["service_name"] == "edged"
    assert info.labels["host_arch"] == host_arch()


def test_daemon_pushes_to_rotel(tmp_path: Path) -> None:
    with run_rotel(tmp_path) as rotel:
        daemon = start_daemon(
            tmp_path,
            "--interval", "0.2",
            "--otlp", f"http://127.0.0.1:{rotel.http_port}",
            env=ENV,
        )  # fmt: skip
        try:
            wait_until(
                lambda: set(rotel_metrics(rotel.output())) >= ALWAYS, 20, "rotel to print metrics"
            )
        finally:
            rc = daemon.stop()
        output = rotel.output()
    assert rc == 0, daemon.log()

    got = rotel_metrics(output)
    data_type = {Kind.GAUGE: "Gauge", Kind.COUNTER: "Sum", Kind.UPDOWN: "Sum"}
    for name in ALWAYS:
        spec = METRICS[name]
        assert got[name].unit == spec.unit, name
        assert got[name].data_type == data_type.get(spec.kind, "Histogram"), name
    assert got["system.cpu.time"].monotonic is True
    assert got["system.memory.usage"].monotonic is False
    assert got["system.memory.usage"].temporality == "AGGREGATION_TEMPORALITY_CUMULATIVE"
    resource = rotel_resource_attributes(output)
    assert resource["service.name"] == "Str(edged)"
    assert resource["host.arch"] == f"Str({host_arch()})"
    assert resource["os.type"] == "Str(linux)"
    assert resource["service.instance.id"] == f"Str({machine_instance_id()})"
    assert resource["deployment.environment.name"] == "Str(e2e)"
    assert "system.memory.state: Str(used)" in output
    assert "cpu.mode: Str(user)" in output


def test_daemon_with_a_dead_collector_keeps_sampling_and_stops_cleanly(tmp_path: Path) -> None:
    dead = free_port()
    daemon = start_daemon(
        tmp_path, "--interval", "0.1", "--otlp", f"http://127.0.0.1:{dead}", env=ENV
    )
    try:
        ticks = daemon.call("status")["ticks"]
        time.sleep(3)  # several failed exports, ~1 s of retries each
        assert daemon.call("status")["ticks"] >= ticks + 20  # sampling did not wait on them
    finally:
        start = time.monotonic()
        rc = daemon.stop()
        stop_s = time.monotonic() - start
    log = daemon.log()
    assert rc == 0, log
    assert stop_s < 3  # no final export to a collector known to be gone
    assert log.count("export to http://127.0.0.1") == 1, log  # reported once, not per export
    assert log.count("Failed to export metrics batch") <= 1, log
