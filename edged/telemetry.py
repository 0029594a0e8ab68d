"""OpenTelemetry export of edged's snapshots: one MeterProvider, OTLP push, Prometheus pull.

Every metric of :mod:`edged.metrics` becomes one instrument. Sampled metrics are *observable*:
their callbacks read the latest :class:`~edged.snapshot.Snapshot` when a reader collects, so a
collection never triggers sensor I/O and sampling never waits for an export. The daemon's own
cost (``edged.tick.duration``) and sensor failures (``edged.sensor.errors``) are recorded
synchronously through :meth:`Telemetry.record_tick` and :meth:`Telemetry.count_sensor_error`.

Readers:

* **OTLP push** (HTTP/protobuf by default, gRPC with the ``edged[grpc]`` extra) when
  ``[telemetry] otlp`` or ``OTEL_EXPORTER_OTLP_(METRICS_)ENDPOINT`` is set. The exporter runs in
  the SDK's periodic reader thread; a dead collector costs that thread, never the sampler. Its
  log messages are rate-limited (:class:`_ExportLogLimiter`).
* **Prometheus pull** on ``[telemetry] prometheus`` (``host:port``, port 0 picks a free one,
  ``off`` disables it), served by prometheus_client from a private registry. Names follow the
  OpenTelemetry-to-Prometheus rules of opentelemetry-exporter-prometheus: dots become
  underscores and the unit is appended (``By`` -> ``bytes``, ``s`` -> ``seconds``, ``Cel`` ->
  ``celsius``, ``W`` -> ``watts``, ``J`` -> ``joules``, ``Hz`` -> ``hertz``; ``1`` and
  ``{error}`` add nothing), counters end in ``_total``. For example ``system_memory_usage_bytes``,
  ``system_memory_limit_bytes``, ``system_cpu_utilization``, ``system_cpu_time_seconds_total``,
  ``hw_temperature_celsius``, ``hw_fan_speed_rpm``, ``edged_sensor_errors_total``,
  ``edged_tick_duration_seconds_bucket``. Attribute keys become labels the same way
  (``system.memory.state`` -> ``system_memory_state``). UpDownCounters are exposed as gauges.
  The resource is the ``target_info`` series; scope labels (``otel_scope_*``) are left out,
  as edged has a single scope and they would only repeat themselves on every series.

Configuration follows the OpenTelemetry SDK environment variables; a value set in
``edged.toml`` (or by a flag) wins over them only when it is set (DESIGN section 3). Variables
that only concern the exporter's transport (``OTEL_EXPORTER_OTLP_CERTIFICATE``, ``..._COMPRESSION``,
``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE`` ...) are read by the exporter itself from
the process environment.
"""

from __future__ import annotations

import importlib
import logging
import os
import platform
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.version import __version__ as _sdk_version
from opentelemetry.util.re import parse_env_headers

from edged import __version__
from edged.config import ConfigError, parse_duration_s, parse_listen_address
from edged.metrics import METRICS, Kind

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from edged.config import Telemetry as TelemetrySettings
    from edged.snapshot import Snapshot

_log = logging.getLogger(__name__)

SERVICE_NAME = "edged"
TICK_DURATION = "edged.tick.duration"
SENSOR_ERRORS = "edged.sensor.errors"

# edged.tick.duration: a tick costs ~0.1 ms (a few /proc reads) to ~1 s (a slow NVML or sysfs
# read); the SDK's default boundaries (0, 5, 10, ... 10000) assume milliseconds and would put
# every tick into the first two buckets.
TICK_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip

DEFAULT_EXPORT_INTERVAL_S = 60.0
# Per-export deadline, retries included. A collector on the host or the LAN answers in
# milliseconds; waiting longer only delays shutdown and stacks exports behind a dead one.
MAX_EXPORT_TIMEOUT_S = 5.0
MIN_EXPORT_TIMEOUT_S = 1.5  # room for one retry after ~1 s, so the reason gets logged

# A failing export is reported once, then at most once per quiet period, which doubles from
# QUIET_FIRST_S up to QUIET_MAX_S (never shorter than the export interval).
QUIET_FIRST_S = 60.0
QUIET_MAX_S = 600.0

# Loggers the OTLP exporters (1.45) write their failures to. The HTTP exporter hands its module
# logger to the shared HTTP client ("Transient error ... retrying in 1.02s.", "Failed to export
# metrics batch due to timeout, max retries or shutdown."); the client's own logger is the
# fallback. The gRPC exporter logs through its mixin module.
EXPORTER_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.common.http",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.grpc.metric_exporter",
)

# uname -m -> semantic-convention host.arch (amd64, arm32, arm64, ia64, ppc32, ppc64, s390x, x86)
_HOST_ARCH = {
    "x86_64": "amd64", "amd64": "amd64",
    "aarch64": "arm64", "aarch64_be": "arm64", "arm64": "arm64",
    # armv8l: a 32-bit userland on a 64-bit ARM kernel
    "armv6l": "arm32", "armv7l": "arm32", "armv7": "arm32", "armv8l": "arm32", "arm": "arm32",
    "i386": "x86", "i486": "x86", "i586": "x86", "i686": "x86", "x86": "x86",
    "ia64": "ia64",
    "ppc": "ppc32", "powerpc": "ppc32",
    "ppc64": "ppc64", "ppc64le": "ppc64",
    "s390x": "s390x",
}  # fmt: skip

# Semantic conventions: a stable service.instance.id is a UUIDv5 of an inherent id in this
# namespace (https://opentelemetry.io/docs/specs/semconv/attributes-registry/service/).
_INSTANCE_ID_NAMESPACE = uuid.UUID("4d63009a-8d0f-11ee-aad7-4c796ed8e320")
_MACHINE_ID_PATHS = ("/etc/machine-id", "/var/lib/dbus/machine-id")


class TelemetryError(ConfigError):
    """A telemetry setting this machine cannot honour: an OTEL_* value that does not parse, the
    gRPC exporter without its extra, a Prometheus address that cannot be bound. ``key`` names
    the setting (``telemetry.protocol``) or the variable (``OTEL_EXPORTER_OTLP_ENDPOINT``)."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(f"{key}: {message}", source="telemetry", key=key)


def host_arch(machine: str | None = None) -> str:
    """``host.arch`` for ``uname -m`` (default: this machine); unknown names pass unchanged."""
    name = (machine if machine is not None else platform.machine()).strip().lower()
    return _HOST_ARCH.get(name, name)


def machine_instance_id() -> str:
    """A ``service.instance.id`` stable across restarts: UUIDv5 of the machine id (hashed, as
    machine-id(5) asks, so the id itself is not exposed), else a random UUIDv4."""
    for path in _MACHINE_ID_PATHS:
        try:
            with open(path, encoding="ascii") as f:
                machine_id = f.read().strip()
        except (OSError, UnicodeDecodeError):
            continue
        if machine_id:
            return str(uuid.uuid5(_INSTANCE_ID_NAMESPACE, machine_id))
    return str(uuid.uuid4())


def build_resource(environ: Mapping[str, str], instance_id: str | None = None) -> Resource:
    """The resource every metric carries.

    edged's own attributes play the part of the SDK's resource detectors, which run before the
    environment detector: ``OTEL_RESOURCE_ATTRIBUTES`` is merged over them (so an operator can
    add ``deployment.environment.name`` or rename ``host.name``) and ``OTEL_SERVICE_NAME`` wins
    over both for ``service.name``, exactly as the SDK's ``OTELResourceDetector`` parses them.
    """
    attributes: dict[str, str] = {
        "telemetry.sdk.language": "python",
        "telemetry.sdk.name": "opentelemetry",
        "telemetry.sdk.version": _sdk_version,
        "service.name": SERVICE_NAME,
        "service.version": __version__,
        "service.instance.id": instance_id or machine_instance_id(),
        "host.name": socket.gethostname(),
        "host.arch": host_arch(),
        "os.type": platform.system().lower(),
    }
    for item in environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            _log.warning("OTEL_RESOURCE_ATTRIBUTES: ignoring %r (expected key=value)", item)
            continue
        attributes[key.strip()] = unquote(value.strip())
    if service_name := environ.get("OTEL_SERVICE_NAME", "").strip():
        attributes["service.name"] = service_name
    return Resource(attributes)


@dataclass(frozen=True)
class PushSettings:
    """Where and how OTLP metrics are pushed, resolved from the config and OTEL_* variables."""

    protocol: str  # "http/protobuf" or "grpc"
    endpoint: str  # full URL; for HTTP it includes the signal path (/v1/metrics)
    headers: Mapping[str, str] = field(default_factory=dict)
    interval_s: float = DEFAULT_EXPORT_INTERVAL_S
    timeout_s: float = MAX_EXPORT_TIMEOUT_S


def _url(value: str, key: str) -> str:
    """An endpoint as an http(s) URL; a bare ``host:port`` means ``http://host:port``."""
    url = value.strip()
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    try:
        valid = (
            parts.scheme in ("http", "https")
            and bool(parts.hostname)
            and (parts.port is None or parts.port > 0)
        )
    except ValueError:  # a port that is not a number, or out of range
        valid = False
    if not valid:
        raise TelemetryError(
            f"expected an http:// or https:// URL such as http://127.0.0.1:4318; got {value!r}", key
        )
    return url


def resolve_push(settings: TelemetrySettings, environ: Mapping[str, str]) -> PushSettings | None:
    """The OTLP push configuration, or None when no endpoint is configured anywhere.

    Endpoint, per the OTLP exporter specification: ``telemetry.otlp`` (a base URL gets
    ``/v1/metrics`` appended for HTTP unless it already has a path), else
    ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`` (used as is), else ``OTEL_EXPORTER_OTLP_ENDPOINT``
    (a base: ``v1/metrics`` is appended to its path for HTTP). gRPC endpoints are used as
    given. Protocol: ``telemetry.protocol``, else ``OTEL_EXPORTER_OTLP_METRICS_PROTOCOL``,
    else ``OTEL_EXPORTER_OTLP_PROTOCOL``, else http/protobuf. Interval:
    ``telemetry.export_interval``, else ``OTEL_METRIC_EXPORT_INTERVAL`` (milliseconds), else
    60 s. Headers: ``OTEL_EXPORTER_OTLP_METRICS_HEADERS`` (or ``OTEL_EXPORTER_OTLP_HEADERS``)
    with ``telemetry.headers`` merged over them, keys lower-cased.
    """
    candidates = (
        ("telemetry.otlp", settings.otlp),
        ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")),
    )
    source, raw = next(((k, v) for k, v in candidates if v and v.strip()), ("", ""))
    if not source:
        return None

    protocol_key = "telemetry.protocol"
    protocol: str = settings.protocol
    for variable in ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        if not protocol and environ.get(variable, "").strip():
            protocol_key, protocol = variable, environ[variable].strip().lower()
    protocol = protocol or "http/protobuf"
    if protocol not in ("http/protobuf", "grpc"):
        raise TelemetryError(
            f"unsupported OTLP protocol {protocol!r}; edged exports http/protobuf or grpc",
            protocol_key,
        )

    endpoint = _url(raw, source)
    if protocol == "http/protobuf":
        path = urlsplit(endpoint).path
        if source == "OTEL_EXPORTER_OTLP_ENDPOINT" or (
            source == "telemetry.otlp" and path in ("", "/")
        ):
            endpoint = endpoint.rstrip("/") + "/v1/metrics"

    if settings.export_interval is not None:
        interval_s = parse_duration_s(settings.export_interval)
        if interval_s <= 0:
            raise TelemetryError("must be longer than 0", "telemetry.export_interval")
    else:
        interval_s = DEFAULT_EXPORT_INTERVAL_S
        raw_interval = environ.get("OTEL_METRIC_EXPORT_INTERVAL", "").strip()
        if raw_interval:
            try:
                interval_s = float(raw_interval) / 1000.0
            except ValueError:
                interval_s = -1.0
            if not interval_s > 0:  # also catches NaN
                _log.warning(
                    "OTEL_METRIC_EXPORT_INTERVAL=%r is not a positive number of milliseconds; "
                    "using %g s", raw_interval, DEFAULT_EXPORT_INTERVAL_S,
                )  # fmt: skip
                interval_s = DEFAULT_EXPORT_INTERVAL_S

    env_headers = environ.get("OTEL_EXPORTER_OTLP_METRICS_HEADERS", "").strip() or environ.get(
        "OTEL_EXPORTER_OTLP_HEADERS", ""
    )
    headers = dict(parse_env_headers(env_headers, liberal=True))
    headers.update({k.strip().lower(): v for k, v in settings.headers.items()})

    timeout_s = min(MAX_EXPORT_TIMEOUT_S, max(MIN_EXPORT_TIMEOUT_S, interval_s / 2))
    return PushSettings(protocol, endpoint, headers, interval_s, timeout_s)


def _make_exporter(push: PushSettings) -> MetricExporter:
    """The OTLP exporter for ``push``, imported only now: the exporters pull in requests or
    grpcio and protobuf, several MiB of RSS a Prometheus-only daemon does not need."""
    if push.protocol == "grpc":
        try:
            module = importlib.import_module(
                "opentelemetry.exporter.otlp.proto.grpc.metric_exporter"
            )
        except ImportError as exc:
            raise TelemetryError(
                f"OTLP/gRPC needs an optional dependency that is not installed ({exc}); "
                "install it with: pip install 'edged[grpc]' (or use protocol = "
                '"http/protobuf", the default)',
                "telemetry.protocol",
            ) from exc
        grpc_exporter: MetricExporter = module.OTLPMetricExporter(
            endpoint=push.endpoint,
            insecure=urlsplit(push.endpoint).scheme == "http",
            headers=dict(push.headers),
            timeout=push.timeout_s,
        )
        return grpc_exporter
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    transport = _urllib3_transport()
    if transport is not None:
        try:
            return OTLPMetricExporter(
                endpoint=push.endpoint,
                headers=dict(push.headers),
                timeout=push.timeout_s,
                _transport=transport,
            )
        except TypeError:  # an exporter release without the transport parameter
            pass
    return OTLPMetricExporter(
        endpoint=push.endpoint, headers=dict(push.headers), timeout=push.timeout_s
    )


def _urllib3_transport() -> Any:
    """The exporter's urllib3 transport, configured from the same OTEL_* TLS variables as its
    default requests transport; None where this exporter release has no such transport.

    Why: the default transport imports ``requests`` (and through it charset detection and
    more), about 4.6 MiB of RSS in a daemon whose target is 40 MiB. The exporter ships this
    urllib3 transport beside it but selects it only through ``_transport``; the fallback keeps
    the public path working if that parameter goes away.
    """
    try:
        from opentelemetry.exporter.http.transport._urllib3 import Urllib3HTTPTransport
    except ImportError:
        return None
    env = os.environ
    verify: bool | str = (
        env.get("OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE")
        or env.get("OTEL_EXPORTER_OTLP_CERTIFICATE")
        or True
    )
    key = env.get("OTEL_EXPORTER_OTLP_METRICS_CLIENT_KEY") or env.get(
        "OTEL_EXPORTER_OTLP_CLIENT_KEY"
    )
    cert_file = env.get("OTEL_EXPORTER_OTLP_METRICS_CLIENT_CERTIFICATE") or env.get(
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"
    )
    cert: str | tuple[str, str] | None = (cert_file, key) if cert_file and key else cert_file
    return Urllib3HTTPTransport(verify=verify, cert=cert)


class _ExportLogLimiter(logging.Filter):
    """Keeps a dead collector from filling the journal.

    Installed as a filter on the exporter's loggers, it passes their records only while the
    export they belong to is one that may report: the first failed export, then one per quiet
    period, which doubles from ``QUIET_FIRST_S`` to ``QUIET_MAX_S``. Each reported failure adds
    one line of edged's own (how many exports failed, how many messages were held back); the
    first success after failures logs "export ... recovered". Records logged outside an export
    (another thread, shutdown) always pass.
    """

    def __init__(
        self,
        endpoint: str,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.endpoint = endpoint
        self._interval_s = interval_s
        self._first_quiet_s = max(QUIET_FIRST_S, interval_s)
        self._max_quiet_s = max(QUIET_MAX_S, interval_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._quiet_s = self._first_quiet_s
        self._next_report = float("-inf")
        self._export_thread: int | None = None
        self._reporting = True
        self.failures = 0  # consecutive failed exports
        self._failing_since = 0.0
        self.suppressed = 0  # exporter records held back since the last report

    def filter(self, record: logging.LogRecord) -> bool:
        """Pass a record unless it comes from an export that is not to be reported."""
        if self._reporting or threading.get_ident() != self._export_thread:
            return True
        with self._lock:
            self.suppressed += 1
        return False

    def begin(self) -> None:
        """An export starts on this thread: decide whether its messages may pass."""
        with self._lock:
            self._export_thread = threading.get_ident()
            self._reporting = self._clock() >= self._next_report

    def end(self, ok: bool, error: BaseException | None = None) -> None:
        """An export ended: log a report or the recovery, and move the quiet period on."""
        with self._lock:
            now = self._clock()
            reporting, self._reporting, self._export_thread = self._reporting, True, None
            if ok:
                if self.failures:
                    _log.info(
                        "OTLP metrics export to %s recovered after %d failed exports (%.0f s)",
                        self.endpoint, self.failures, now - self._failing_since,
                    )  # fmt: skip
                self.failures = self.suppressed = 0
                self._quiet_s, self._next_report = self._first_quiet_s, float("-inf")
                return
            self.failures += 1
            if self.failures == 1:
                self._failing_since = now
            if not reporting:
                return
            reason = f" ({type(error).__name__}: {error})" if error is not None else ""
            if self.failures == 1:
                _log.warning(
                    "OTLP metrics export to %s failed%s; sampling goes on, exports are retried "
                    "every %g s, and this is reported again in %.0f s if it persists",
                    self.endpoint, reason, self._interval_s, self._quiet_s,
                )  # fmt: skip
            else:
                _log.warning(
                    "OTLP metrics export to %s still failing%s: %d failed exports in %.0f s, "
                    "%d exporter messages held back; next report in %.0f s",
                    self.endpoint, reason, self.failures, now - self._failing_since,
                    self.suppressed, self._quiet_s,
                )  # fmt: skip
            self.suppressed = 0
            self._next_report = now + self._quiet_s
            self._quiet_s = min(self._quiet_s * 2, self._max_quiet_s)

    def install(self) -> None:
        for name in EXPORTER_LOGGERS:
            logging.getLogger(name).addFilter(self)

    def uninstall(self) -> None:
        for name in EXPORTER_LOGGERS:
            logging.getLogger(name).removeFilter(self)


class _LimitedExporter(MetricExporter):
    """Delegates to the OTLP exporter and tells the limiter when each export starts and ends.

    The SDK's exporters only return FAILURE; this is where edged learns that an export failed
    or recovered. An exception from the exporter is turned into FAILURE here, so it is reported
    under the same rate limit instead of the reader's unlimited "Exception while exporting".
    """

    def __init__(self, inner: MetricExporter, limiter: _ExportLogLimiter) -> None:
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self._inner = inner
        self._limiter = limiter
        self._closed = threading.Event()

    def abort(self) -> None:
        """Give up on the collector: cut the export in progress short (the exporter's shutdown
        ends its retry wait) and fail later exports at once. Used at shutdown when the collector
        is unreachable, where a final export would only wait out its retries."""
        if not self._closed.is_set():
            self._closed.set()
            self._inner.shutdown()

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        if self._closed.is_set():
            return MetricExportResult.FAILURE
        self._limiter.begin()
        ok, error = False, None
        try:
            result = self._inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
            ok = result is MetricExportResult.SUCCESS
            return result
        except Exception as exc:  # any exporter failure is one failed export, rate-limited
            error = exc
            return MetricExportResult.FAILURE
        finally:
            self._limiter.end(ok, error)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self._inner.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._inner.shutdown(timeout_millis=timeout_millis, **kwargs)


def _env_true(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


class Telemetry:
    """edged's metrics: instruments over the latest snapshot, an OTLP push, a Prometheus pull.

    ``latest`` returns the newest snapshot (None before the first tick); it is called from the
    exporters' threads at collection time and must not block. Construction raises
    :class:`TelemetryError` for settings that cannot be honoured; it starts the Prometheus
    server and the export thread, which :meth:`shutdown` stops. With ``OTEL_SDK_DISABLED=true``
    nothing is exported and every method is a no-op.
    """

    def __init__(
        self,
        settings: TelemetrySettings,
        latest: Callable[[], Snapshot | None],
        *,
        instance_id: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        env: Mapping[str, str] = os.environ if environ is None else environ
        self._latest = latest
        self._lock = threading.Lock()
        self._cache_key: tuple[int, int] | None = None
        self._cache: dict[str, list[Observation]] = {}
        self._closed = False
        self._provider: MeterProvider | None = None
        self._server: WSGIServer | None = None
        self._server_thread: threading.Thread | None = None
        self._limiter: _ExportLogLimiter | None = None
        self._exporter: _LimitedExporter | None = None
        self.push: PushSettings | None = None
        self.resource: Resource | None = None
        if _env_true(env.get("OTEL_SDK_DISABLED")):
            _log.info("OTEL_SDK_DISABLED=true: edged exports no metrics")
            return

        self.push = resolve_push(settings, env)
        listen = None if settings.prometheus == "off" else parse_listen_address(settings.prometheus)
        self.resource = build_resource(env, instance_id)
        exporter = _make_exporter(self.push) if self.push is not None else None

        readers: list[MetricReader] = []
        try:
            if listen is not None:
                readers.append(self._serve_prometheus(*listen))
        except BaseException:
            if exporter is not None:
                exporter.shutdown()
            raise
        if exporter is not None and self.push is not None:
            self._limiter = _ExportLogLimiter(self.push.endpoint, self.push.interval_s)
            self._limiter.install()
            self._exporter = _LimitedExporter(exporter, self._limiter)
            readers.append(
                PeriodicExportingMetricReader(
                    self._exporter,
                    export_interval_millis=self.push.interval_s * 1000,
                    export_timeout_millis=self.push.timeout_s * 1000,
                )
            )
        self._provider = MeterProvider(
            metric_readers=readers,
            resource=self.resource,
            exemplar_filter=AlwaysOffExemplarFilter(),  # no traces here: exemplars only cost
            shutdown_on_exit=False,  # the daemon calls shutdown(); atexit would pin the object
            views=[
                View(
                    instrument_name=TICK_DURATION,
                    aggregation=ExplicitBucketHistogramAggregation(TICK_BUCKETS_S),
                )
            ],
        )
        meter = self._provider.get_meter(SERVICE_NAME, __version__)
        observable = {
            Kind.GAUGE: meter.create_observable_gauge,
            Kind.COUNTER: meter.create_observable_counter,
            Kind.UPDOWN: meter.create_observable_up_down_counter,
        }
        for spec in METRICS.values():
            if spec.kind is Kind.HISTOGRAM or spec.name == SENSOR_ERRORS:
                continue
            observable[spec.kind](
                spec.name,
                callbacks=[self._callback(spec.name)],
                unit=spec.unit,
                description=spec.description,
            )
        tick, errors = METRICS[TICK_DURATION], METRICS[SENSOR_ERRORS]
        self._tick = meter.create_histogram(tick.name, unit=tick.unit, description=tick.description)
        self._errors = meter.create_counter(
            errors.name, unit=errors.unit, description=errors.description
        )
        if self.push is not None:
            _log.info(
                "pushing OTLP metrics (%s) to %s every %g s",
                self.push.protocol, self.push.endpoint, self.push.interval_s,
            )  # fmt: skip

    def _serve_prometheus(self, host: str, port: int) -> MetricReader:
        """Bind the /metrics server on a private registry and return its reader."""
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry()
        reader = PrometheusMetricReader(scope_info_enabled=False, registry=registry)
        try:
            self._server, self._server_thread = start_http_server(port, host, registry=registry)
        except OSError as exc:
            raise TelemetryError(
                f"cannot serve Prometheus metrics on {host}:{port}: {exc.strerror or exc}",
                "telemetry.prometheus",
            ) from exc
        self._server_thread.name = "edged-prometheus"
        _log.debug("serving Prometheus metrics on http://%s:%d/metrics", host, self._bound_port())
        return reader

    def _bound_port(self) -> int:
        return int(self._server.server_address[1]) if self._server is not None else 0

    def _observations(self) -> dict[str, list[Observation]]:
        """The latest snapshot's readings grouped by metric, built once per snapshot.

        Every observable callback of a collection asks for its metric; grouping once keeps a
        collection O(readings) instead of O(metrics x readings). The Prometheus and OTLP
        readers share the groups (Observations are immutable).
        """
        snapshot = self._latest()
        if snapshot is None:
            return {}
        key = (snapshot.seq, snapshot.time_unix_ns)
        with self._lock:
            if key == self._cache_key:
                return self._cache
        groups: dict[str, list[Observation]] = {}
        for reading in snapshot.readings:
            groups.setdefault(reading.metric, []).append(
                Observation(reading.value, reading.attributes)
            )
        with self._lock:
            self._cache_key, self._cache = key, groups
        return groups

    def _callback(self, metric: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return self._observations().get(metric, ())

        observe.__qualname__ = f"observe[{metric}]"  # names the callback in SDK error logs
        return observe

    def record_tick(self, duration_s: float) -> None:
        """Record the cost of one sampling tick (``edged.tick.duration``)."""
        if self._provider is not None and not self._closed:
            self._tick.record(duration_s)

    def count_sensor_error(self, sensor: str, n: int = 1) -> None:
        """Count ``n`` failed reads of ``sensor`` (``edged.sensor.errors{edged.sensor}``)."""
        if self._provider is not None and not self._closed:
            self._errors.add(n, {"edged.sensor": sensor})

    @property
    def prometheus_address(self) -> tuple[str, int] | None:
        """The address /metrics is served on (the real port when 0 was asked), None if off."""
        if self._server is None:
            return None
        host, port = self._server.server_address[:2]
        return (host if isinstance(host, str) else bytes(host).decode()), int(port)

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Export one last time, stop the export thread and the HTTP server. Idempotent.

        When the last export failed, the collector is taken to be gone: the export in progress
        is cut short and there is no final export, so a daemon with a dead collector stops at
        once. Otherwise the final export gets what is left of ``timeout_s``; the export thread
        is then abandoned (a daemon thread whose retry wait the exporter's shutdown ends).
        """
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout_s
        if self._server is not None:
            self._server.shutdown()  # returns once serve_forever's poll (0.5 s) notices
            self._server.server_close()
            if self._server_thread is not None:
                self._server_thread.join(max(0.0, deadline - time.monotonic()))
        if self._exporter is not None and self._limiter is not None and self._limiter.failures:
            _log.info("OTLP collector unreachable: no final export")
            self._exporter.abort()
        if self._provider is not None:
            remaining_ms = max(1.0, (deadline - time.monotonic()) * 1000)
            try:
                self._provider.shutdown(timeout_millis=remaining_ms)
            except Exception as exc:  # the SDK raises one Exception for all failed readers
                _log.warning("telemetry shutdown incomplete: %s", exc)
        if self._limiter is not None:
            self._limiter.uninstall()
