"""Real receivers for the telemetry tests: an in-process OTLP/HTTP receiver, rotel, Prometheus.

Nothing here is a mock: the receiver is an HTTP server decoding the protobuf the exporter sent,
rotel is the collector from PyPI, Prometheus is Debian's binary. Every wait has a deadline.
"""

from __future__ import annotations

import gzip
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any, TypeVar

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(check: Callable[[], T | None], timeout_s: float, what: str) -> T:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.05)


# --- in-test OTLP/HTTP receiver ------------------------------------------------------------


@dataclass
class Received:
    """One POST the receiver accepted."""

    path: str
    headers: dict[str, str]
    request: ExportMetricsServiceRequest


@dataclass
class OtlpReceiver:
    """A minimal OTLP/HTTP metrics receiver on 127.0.0.1 (``POST /v1/metrics``)."""

    port: int = 0
    received: list[Received] = field(default_factory=list)
    _server: http.server.ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        """The base endpoint, as ``[telemetry] otlp`` takes it."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpReceiver:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                encoding = self.headers.get("Content-Encoding", "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if self.path != "/v1/metrics":
                    self.send_error(404)
                    return
                request = ExportMetricsServiceRequest()
                request.ParseFromString(body)
                with receiver._lock:
                    receiver.received.append(
                        Received(
                            self.path, {k.lower(): v for k, v in self.headers.items()}, request
                        )
                    )
                reply = ExportMetricsServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: pytest shows stderr of failing tests."""

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="otlp-receiver", daemon=True
        ).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def requests(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def latest_metric(self, name: str) -> Metric | None:
        """The newest data of metric ``name`` across everything received."""
        for got in reversed(self.requests()):
            for rm in got.request.resource_metrics:
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        if metric.name == name:
                            found: Metric = metric
                            return found
        return None

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def any_value(value: AnyValue) -> Any:
    """A protobuf AnyValue as a Python value."""
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def points(metric: Metric) -> dict[frozenset[tuple[str, Any]], float]:
    """The data points of a gauge or sum, keyed by their attributes."""
    kind = metric.WhichOneof("data")
    assert kind in ("gauge", "sum"), f"{metric.name} is a {kind}"
    out: dict[frozenset[tuple[str, Any]], float] = {}
    for point in getattr(metric, kind).data_points:
        attrs = frozenset((kv.key, any_value(kv.value)) for kv in point.attributes)
        value = point.as_double if point.WhichOneof("value") == "as_double" else point.as_int
        out[attrs] = value
    return out


def attrs(**kv: Any) -> frozenset[tuple[str, Any]]:
    """``attrs(**{"cpu.mode": "user"})`` as the key :func:`points` uses."""
    return frozenset(kv.items())


# --- rotel ---------------------------------------------------------------------------------


def rotel_agent() -> Path:
    """The rotel collector binary shipped in the ``rotel`` wheel (a dev dependency)."""
    spec = find_spec("rotel")
    agent = Path(spec.origin).parent / "rotel-agent" if spec and spec.origin else None
    if agent is None or not os.access(agent, os.X_OK):
        if os.environ.get("CI"):
            pytest.fail("rotel (PyPI) not installed; it is in the dev extra")
        pytest.skip("rotel (PyPI) not installed")
    return agent


@dataclass
class Rotel:
    """A running rotel: OTLP on ``http_port`` / ``grpc_port``, debug output in ``log``."""

    process: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int
    log: Path

    def output(self) -> str:
        return re.sub(r"\x1b\[[0-9;]*m", "", self.log.read_text(errors="replace"))


@contextmanager
def run_rotel(tmp_path: Path) -> Iterator[Rotel]:
    """Start rotel in the foreground, printing every metric it receives (blackhole exporter)."""
    agent = rotel_agent()
    http_port, grpc_port = free_port(), free_port()
    log = tmp_path / "rotel.out"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(agent), "start",
                "--otlp-http-endpoint", f"127.0.0.1:{http_port}",
                "--otlp-grpc-endpoint", f"127.0.0.1:{grpc_port}",
                "--exporter", "blackhole",
                "--debug-log", "metrics",
                "--debug-log-verbosity", "detailed",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )  # fmt: skip
    rotel = Rotel(process, http_port, grpc_port, log)
    try:
        wait_until(lambda: _accepts(http_port) or process.poll() is not None, 20, "rotel")
        if process.poll() is not None:
            pytest.fail(f"rotel exited with {process.returncode}: {rotel.output()}")
        yield rotel
    finally:
        stop_process(process)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def stop_process(process: subprocess.Popen[Any], timeout_s: float = 10.0) -> int:
    """SIGTERM by pid, wait, SIGKILL if it is still there; the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout_s)
    return process.returncode


@dataclass(frozen=True)
class RotelMetric:
    """One metric descriptor as rotel's detailed debug log prints it."""

    name: str
    unit: str
    data_type: str
    monotonic: bool | None
    temporality: str | None


def rotel_metrics(output: str) -> dict[str, RotelMetric]:
    """Metric descriptors from rotel's debug output, by name (the last one printed wins)."""
    found: dict[str, RotelMetric] = {}
    for block in output.split("Descriptor:")[1:]:
        fields = dict(re.findall(r"^\s+-> (\w+): (.*)$", block.split("DataPoints")[0], re.M))
        monotonic = fields.get("IsMonotonic")
        found[fields["Name"]] = RotelMetric(
            name=fields["Name"],
            unit=fields.get("Unit", ""),
            data_type=fields.get("DataType", ""),
            monotonic=None if monotonic is None else monotonic == "true",
            temporality=fields.get("AggregationTemporality"),
        )
    return found


def rotel_resource_attributes(output: str) -> dict[str, str]:
    """The resource attributes of the last ResourceMetrics rotel printed, as ``Str(...)`` text."""
    blocks = output.split("Resource attributes:")
    if len(blocks) < 2:
        return {}
    section = blocks[-1].split("ScopeMetrics")[0]
    return dict(re.findall(r"^\s+-> ([\w.]+): (.*)$", section, re.M))


# --- Prometheus ----------------------------------------------------------------------------


@dataclass
class Prometheus:
    """A running Prometheus server scraping one target."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant-vector result of ``promql`` (empty when there is none yet)."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql}
        )
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = json.load(response)
        except (urllib.error.URLError, ConnectionError):
            return []
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


@contextmanager
def run_prometheus(binary: str, tmp_path: Path, target: tuple[str, int]) -> Iterator[Prometheus]:
    """Start Prometheus with a 1 s scrape of ``target`` and storage under ``tmp_path``."""
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: edged\n"
        "    scrape_interval: 1s\n"
        "    scrape_timeout: 1s\n"
        "    static_configs:\n"
        f"      - targets: ['{target[0]}:{target[1]}']\n"
    )
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    prometheus = Prometheus(process, port, log)
    try:
        wait_until(lambda: _ready(port) or process.poll() is not None, 30, "Prometheus to be ready")
        if process.poll() is not None:
            pytest.fail(f"prometheus exited with {process.returncode}: {log.read_text()}")
        yield prometheus
    finally:
        stop_process(process, timeout_s=15)


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, ConnectionError):
        return False
