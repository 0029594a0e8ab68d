"""Configuration: TOML files, ``EDGED_*`` environment and flags, decoded into frozen structs.

Precedence, lowest first: ``/etc/edged/edged.toml`` (or ``--config``), ``edged.d/*.toml`` beside
it in name order, ``EDGED_*`` variables, command-line flags. Every layer is merged as a plain
dict and the result is decoded once by msgspec, so an unknown key or a value of the wrong type
is an error that names the key path (``sampling.interval``) and the expected type.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

DEFAULT_CONFIG_PATH = Path("/etc/edged/edged.toml")
ENV_PREFIX = "EDGED_"
#: ``EDGED_*`` variables that are not config keys: the config file's name, the log level of
#: ``edged run``, and the socket the clients (``edged status``, ``edged.client``) connect to.
#: Exported in a shell, they must not make ``edged run`` refuse its configuration.
NOT_SETTINGS_ENV = frozenset({"EDGED_CONFIG", "EDGED_LOG_LEVEL", "EDGED_SOCKET"})


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the file and key path."""

    def __init__(self, message: str, source: str = "", key: str = "") -> None:
        super().__init__(f"{source}: {message}" if source else message)
        self.source = source
        self.key = key


_DURATION_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*$")
_DURATION_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGTP]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_FACTOR = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "ki": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "mi": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "gi": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
    "ti": 1024**4,
    "p": 1000**5,
    "pb": 1000**5,
    "pib": 1024**5,
    "pi": 1024**5,
}


def finite_number(value: object, what: str = "value") -> float:
    """``float(value)`` for a number or numeric string, refusing whatever is not a finite
    number edged can compute with. Only ValueError, naming ``what``: an integer past the float
    range (a 400-digit size) raises OverflowError in float(), ``inf``/``nan`` pass float() and
    break every comparison after it."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{what} must be a number, got {type(value).__name__}")
    try:
        number = float(value)
    except (OverflowError, ValueError) as exc:
        raise ValueError(f"{what}: {str(value)[:40]!r} is not a number edged can use") from exc
    if not math.isfinite(number):
        raise ValueError(f"{what} must be a finite number, got {str(value)[:40]!r}")
    return number


def _named_duration_s(name: str, value: float | int | str) -> float:
    """parse_duration_s with the key named in its error."""
    try:
        return parse_duration_s(value)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from exc


def parse_duration_s(value: float | int | str) -> float:
    """Seconds from a number (seconds) or a string such as ``"100ms"``, ``"1.5s"``, ``"5m"``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration (seconds or '100ms', '5m'), got a boolean")
    if isinstance(value, (int, float)):
        seconds = finite_number(value, "a duration")
    else:
        m = _DURATION_RE.match(value)
        if not m:
            raise ValueError(f"expected a duration such as 1.5, '100ms', '5m'; got {value!r}")
        seconds = finite_number(m.group(1), "a duration") * _DURATION_UNIT_S[m.group(2)]
        if not math.isfinite(seconds):
            raise ValueError(f"a duration must be finite; got {value[:40]!r}")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative; got {value!r}")
    return seconds


def parse_size_bytes(value: int | float | str) -> int:
    """Bytes from a number or a string such as ``"3.5GiB"``, ``"512M"`` (k/M/G are powers of
    1000, Ki/Mi/Gi powers of 1024, as in systemd's and Kubernetes' quantities)."""
    if isinstance(value, bool):
        raise ValueError("expected a size in bytes, got a boolean")
    if isinstance(value, (int, float)):
        size = finite_number(value, "a size")
    else:
        m = _SIZE_RE.match(value)
        if not m:
            raise ValueError(f"expected a size such as 1073741824, '512MiB', '3.5G'; got {value!r}")
        size = finite_number(m.group(1), "a size") * _SIZE_FACTOR[(m.group(2) or "").lower()]
        if not math.isfinite(size):
            raise ValueError(f"a size must be finite; got {value[:40]!r}")
    if size < 0:
        raise ValueError(f"a size cannot be negative; got {value!r}")
    return int(size)


class Level(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A soft and a hard level for one resource. Values are kept as written ("80%", "3.5GiB",
    2.5, 85) and resolved against the machine by the policy, which knows the totals."""

    soft: float | int | str | None = None
    hard: float | int | str | None = None
    zone: str | None = None  # temperature only: a named thermal zone instead of the hottest

    def __post_init__(self) -> None:
        measured: dict[str, tuple[str, float]] = {}
        for name in ("soft", "hard"):
            value = getattr(self, name)
            if value is None or value == AUTO:
                continue  # memory only (checked by Limits): sized to the machine
            if isinstance(value, str) and value.strip().endswith("%"):
                percent = finite_number(value.strip()[:-1], f"{name} (a percentage)")
                if not 0 < percent <= 100:
                    raise ValueError(f"{name}: a percentage must be in (0, 100]; got {value!r}")
                measured[name] = ("%", percent)
            elif isinstance(value, str):
                # raises ValueError with the expected forms
                measured[name] = ("", float(parse_size_bytes(value)))
            else:
                measured[name] = ("", finite_number(value, name))
        soft, hard = measured.get("soft"), measured.get("hard")
        # comparable when written alike (both percentages, or both amounts); a percentage
        # beside an amount is resolved against the machine by the policy
        if soft is not None and hard is not None and soft[0] == hard[0] and soft[1] > hard[1]:
            raise ValueError(f"soft ({self.soft!r}) is above hard ({self.hard!r})")


#: a memory level sized to the machine (see edged.policy.inputs.auto_memory_levels)
AUTO = "auto"


class Limits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[limits]``. Memory defaults to ``"auto"``: levels that leave a reserve suited to the
    machine's size (5 % of it, at least 256 MiB or 10 %, at most 2 GiB, for hard; twice that
    for soft), where a fixed percentage would leave 1.2 GiB on 24 GiB but 200 MiB on 4 GiB."""

    memory: Level = msgspec.field(default_factory=lambda: Level(soft=AUTO, hard=AUTO))
    cpu: Level = msgspec.field(default_factory=Level)
    gpu_memory: Level = msgspec.field(default_factory=Level)
    power: Level = msgspec.field(default_factory=Level)
    temperature: Level = msgspec.field(default_factory=Level)

    def __post_init__(self) -> None:
        for name in ("cpu", "gpu_memory", "power", "temperature"):
            level: Level = getattr(self, name)
            if AUTO in (level.soft, level.hard):
                raise ValueError(f"{name}: 'auto' is for memory only")


#: the longest history ring, in ticks: 36000 (10 h at 1 s, 1 h at 100 ms) is 288 KiB for each
#: series; a validated config must be one the daemon can allocate (history = 1e12 was not)
MAX_HISTORY_TICKS = 36_000


class Sampling(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    interval: float | int | str = 1.0
    history: float | int | str = 300.0
    # which processes are candidates: every user-space process (the default: protection
    # needs no rules), only those a [[rules]] entry matches, or none
    processes: Literal["rules", "all", "none"] = "all"
    rescan: float | int | str = 5.0  # how often /proc is listed for new processes
    # a [[rules]] entry that has classified no live process for this long is logged as a
    # WARNING (once, and again after it matched and then stopped; see edged.rulecheck)
    rule_warn_after: float | int | str = 60.0

    def __post_init__(self) -> None:
        interval_s = _named_duration_s("interval", self.interval)
        if not 0.01 <= interval_s <= 3600:
            raise ValueError(f"interval: must be between 10ms and 1h; got {self.interval!r}")
        history_s = _named_duration_s("history", self.history)
        if history_s < interval_s:
            raise ValueError("history: must be at least one interval long")
        if history_s / interval_s > MAX_HISTORY_TICKS:
            raise ValueError(
                f"history: at most {MAX_HISTORY_TICKS} intervals are kept (a ring of "
                f"{MAX_HISTORY_TICKS * 8 // 1024} KiB per series); got {self.history!r} at "
                f"interval {self.interval!r}"
            )
        _named_duration_s("rescan", self.rescan)
        _named_duration_s("rule_warn_after", self.rule_warn_after)

    @property
    def interval_s(self) -> float:
        return parse_duration_s(self.interval)

    @property
    def history_s(self) -> float:
        return parse_duration_s(self.history)

    @property
    def rescan_s(self) -> float:
        return parse_duration_s(self.rescan)

    @property
    def rule_warn_after_s(self) -> float:
        return parse_duration_s(self.rule_warn_after)


class Strategy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Literal["dynamic", "predictive", "adaptive", "cooperative"] = "dynamic"
    dynamic: dict[str, Any] = msgspec.field(default_factory=dict)
    predictive: dict[str, Any] = msgspec.field(default_factory=dict)
    adaptive: dict[str, Any] = msgspec.field(default_factory=dict)
    cooperative: dict[str, Any] = msgspec.field(default_factory=dict)


class Rule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Matches processes into a class. Every given matcher must match (AND)."""

    name: str | None = None  # process name (comm), exact
    exe: str | None = None  # executable path, exact
    cmdline: str | None = None  # regular expression searched in the command line
    uid: int | None = None
    unit: str | None = None  # systemd unit, exact
    cgroup: str | None = None  # cgroup path prefix
    # "class" is a Python keyword: the attribute is klass, the TOML key is class
    klass: Literal["critical", "normal", "besteffort"] = msgspec.field(
        default="normal", name="class"
    )

    def __post_init__(self) -> None:
        if all(
            getattr(self, k) is None for k in ("name", "exe", "cmdline", "uid", "unit", "cgroup")
        ):
            raise ValueError("a rule needs at least one of name, exe, cmdline, uid, unit, cgroup")
        if self.cmdline is not None:
            try:
                re.compile(self.cmdline)
            except re.error as exc:
                raise ValueError(f"cmdline: not a regular expression: {exc}") from exc


class Server(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    socket: str = ""  # empty: /run/edged/edged.sock as root, else $XDG_RUNTIME_DIR/edged.sock
    max_clients: int = 64
    # requests per second per connection (a token bucket holding twice this); excess: 1005
    max_requests_per_s: float = 200.0
    # a connection that holds no lease and sends no whole line for this long is closed
    idle_timeout: float | int | str = 300.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_clients <= 65536:
            raise ValueError("max_clients: must be between 1 and 65536")
        if not 0 < self.max_requests_per_s <= 1e6:
            raise ValueError("max_requests_per_s: must be in (0, 1000000]")
        if parse_duration_s(self.idle_timeout) <= 0:
            raise ValueError("idle_timeout: must be greater than zero")

    @property
    def idle_timeout_s(self) -> float:
        return parse_duration_s(self.idle_timeout)


class Telemetry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    otlp: str = ""  # OTLP endpoint; empty: OTEL_EXPORTER_OTLP_* variables, else no push
    protocol: Literal["", "http/protobuf", "grpc"] = ""  # empty: OTEL_EXPORTER_OTLP_PROTOCOL
    export_interval: float | int | str | None = None  # None: OTEL_METRIC_EXPORT_INTERVAL or 60s
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    prometheus: str = "127.0.0.1:9464"  # "host:port" or "off"

    def __post_init__(self) -> None:
        if self.export_interval is not None and parse_duration_s(self.export_interval) <= 0:
            raise ValueError("export_interval: must be greater than zero")
        if self.prometheus != "off":
            parse_listen_address(self.prometheus)


class Enforce(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How edged acts. ``lock_memory`` (default true): at ``edged run`` start, lock edged's own
    pages in memory (``mlockall`` with ``MCL_ONFAULT``, see :mod:`edged.memlock`), so that
    the reclaim it is there to stop does not page out the daemon and stall its ticks; needs
    root or CAP_IPC_LOCK, or an unlimited RLIMIT_MEMLOCK (else it is logged and skipped).
    A reload that turns it off unlocks at once; one that turns it on locks."""

    backend: Literal["auto", "cgroupfs", "systemd", "signals", "none"] = "auto"
    dry_run: bool = False
    lock_memory: bool = True


class Alerts(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How long a limit breach must last before its alert fires (see :mod:`edged.alerts`)."""

    # "for" is a Python keyword: the attribute is for_, the TOML key is for (as in Prometheus)
    for_: float | int | str = msgspec.field(default=30.0, name="for")  # at or above soft
    critical_for: float | int | str = 0.0  # at or above hard; 0: fires on the first tick

    def __post_init__(self) -> None:
        for name, value in (("for", self.for_), ("critical_for", self.critical_for)):
            try:
                parse_duration_s(value)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from exc

    @property
    def for_s(self) -> float:
        return parse_duration_s(self.for_)

    @property
    def critical_for_s(self) -> float:
        return parse_duration_s(self.critical_for)


#: Where cgroup hierarchies are mounted: a ``[scope] cgroup`` under it is the sysfs form.
CGROUP_MOUNT = "/sys/fs/cgroup"
#: Names of the v1 hierarchies' mount directories under /sys/fs/cgroup (a directory may join
#: several, ``cpu,cpuacct``); ``systemd`` is systemd's named v1 hierarchy and ``unified`` the
#: v2 hierarchy of a hybrid host. The first component of a sysfs path that is one of these is a
#: mount, not a group.
V1_HIERARCHIES = frozenset(
    {
        "blkio",
        "cpu",
        "cpuacct",
        "cpuset",
        "devices",
        "freezer",
        "hugetlb",
        "memory",
        "misc",
        "net_cls",
        "net_prio",
        "perf_event",
        "pids",
        "rdma",
        "systemd",
        "unified",
    }
)


def cgroup_path(path: str) -> str:
    """A cgroup path as ``/proc/PID/cgroup`` writes it (``/foo/bar``), from that form or from
    the sysfs form a user copies from a shell: ``/sys/fs/cgroup/memory/foo/bar`` (v1, a
    hierarchy's mount first), ``/sys/fs/cgroup/foo/bar`` (v2). A trailing slash is dropped;
    ``""`` and ``"/"`` stay the root. Raises ValueError for a /sys path outside
    /sys/fs/cgroup.

    The form is told from the text alone (a config may be checked on another machine), so on
    a v2-only host a top-level group named like a v1 hierarchy (``/sys/fs/cgroup/memory/x``)
    reads as v1: write such a group in the /proc/PID/cgroup form (``/memory/x``)."""
    stripped = "/" + path.strip("/") if path.strip("/") else path[:1]
    if stripped != "/sys" and not stripped.startswith("/sys/"):
        return stripped
    if stripped != CGROUP_MOUNT and not stripped.startswith(CGROUP_MOUNT + "/"):
        raise ValueError(
            f"cgroup: {path!r} is a /sys path outside {CGROUP_MOUNT}; give the group as "
            f"/proc/PID/cgroup writes it ('/system.slice/foo.service') or under {CGROUP_MOUNT}"
        )
    parts = stripped[len(CGROUP_MOUNT) :].strip("/").split("/")
    if parts[0] and all(name in V1_HIERARCHIES for name in parts[0].split(",")):
        parts = parts[1:]
    rest = "/".join(p for p in parts if p)
    return "/" + rest if rest else "/"


class Scope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The part of the machine edged governs: ``cgroup`` is a cgroup path as
    ``/proc/PID/cgroup`` writes it (``/system.slice/foo.service``, ``/bench``) or as it appears
    under /sys/fs/cgroup (``/sys/fs/cgroup/memory/bench`` on v1,
    ``/sys/fs/cgroup/system.slice/foo.service`` on v2; see :func:`cgroup_path`); empty means
    the whole machine. Whether the group exists is checked when the daemon starts, not here
    (a config may be checked on another machine)."""

    cgroup: str = ""

    def __post_init__(self) -> None:
        raw = self.cgroup
        if not raw:
            return
        if not raw.startswith("/"):
            raise ValueError(f"cgroup: must be an absolute path such as '/bench'; got {raw!r}")
        if any(c in raw for c in "\0\n"):
            raise ValueError(f"cgroup: not a plain cgroup path (no '.', '..', '//'): {raw!r}")
        # '//' and '.' are refused as typed, before the sysfs prefix is taken off
        inner = raw.strip("/")
        if inner and any(part in ("", ".", "..") for part in inner.split("/")):
            raise ValueError(f"cgroup: not a plain cgroup path (no '.', '..', '//'): {raw!r}")
        if cgroup_path(raw) == "/":
            raise ValueError(
                f"cgroup: {raw!r} is the root group; leave it empty for the whole machine"
            )

    @property
    def path(self) -> str:
        """The group path as /proc/PID/cgroup writes it, without a trailing slash ("" for
        the whole machine)."""
        return cgroup_path(self.cgroup) if self.cgroup else ""


class Budget(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What budgets may not take. The capacity budgets share is the hard limit of each resource
    (``[limits]``), else the machine's total (MemTotal, the CPU count, the GPUs' memory); the
    reserve is kept out of it for everything that holds no budget (the system, edged itself).
    A reserve is an amount (bytes for memory, cores for CPU) or a percentage of the capacity.

    Lending (``edged.budget.ledger``): a lease whose use stays at or below ``lend_fraction`` of
    its grant for ``lend_idle_after`` lends the rest to elastic leases; when it needs it back,
    the borrowers get ``reclaim_notice`` to give it back. ``lend = false`` turns it off."""

    reserve_memory: float | int | str = "10%"
    reserve_cpu: float | int | str = "10%"
    reserve_gpu_memory: float | int | str = 0
    lend: bool = True
    lend_idle_after: float | int | str = 30.0
    lend_fraction: float = 0.5
    reclaim_notice: float | int | str = 5.0

    @property
    def lend_idle_after_s(self) -> float:
        return parse_duration_s(self.lend_idle_after)

    @property
    def reclaim_notice_s(self) -> float:
        return parse_duration_s(self.reclaim_notice)

    def __post_init__(self) -> None:
        if not 0 < self.lend_fraction < 1:
            raise ValueError("lend_fraction: must be between 0 and 1 (exclusive)")
        for name in ("lend_idle_after", "reclaim_notice"):
            try:
                if parse_duration_s(getattr(self, name)) < 0:
                    raise ValueError("must not be negative")
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from exc
        for name in ("reserve_memory", "reserve_cpu", "reserve_gpu_memory"):
            value = getattr(self, name)
            try:
                if isinstance(value, str) and value.strip().endswith("%"):
                    percent = float(value.strip()[:-1])
                    if not 0 <= percent <= 100:
                        raise ValueError(f"a percentage must be in [0, 100]; got {value!r}")
                elif name == "reserve_cpu":
                    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                        raise ValueError(f"expected cores (>= 0) or a percentage; got {value!r}")
                else:
                    parse_size_bytes(value)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from exc


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    sampling: Sampling = msgspec.field(default_factory=Sampling)
    limits: Limits = msgspec.field(default_factory=Limits)
    strategy: Strategy = msgspec.field(default_factory=Strategy)
    rules: list[Rule] = msgspec.field(default_factory=list)
    server: Server = msgspec.field(default_factory=Server)
    telemetry: Telemetry = msgspec.field(default_factory=Telemetry)
    enforce: Enforce = msgspec.field(default_factory=Enforce)
    alerts: Alerts = msgspec.field(default_factory=Alerts)
    scope: Scope = msgspec.field(default_factory=Scope)
    budget: Budget = msgspec.field(default_factory=Budget)
    root: str = ""  # prefix for /proc, /sys, /etc (tests and `--root`); empty: the real ones


def parse_listen_address(value: str) -> tuple[str, int]:
    """``"host:port"`` (``"[::1]:9464"`` for IPv6) into a (host, port) pair."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected 'host:port' or 'off'; got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: tables merge key by key, everything else (arrays included) is replaced."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data: dict[str, Any] = tomllib.load(f)
            return data
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", source=str(path)) from exc
    except UnicodeDecodeError as exc:  # TOML is UTF-8; binary garbage ends here
        raise ConfigError(
            f"not valid TOML: not UTF-8 text (byte {exc.start}: {exc.reason})", source=str(path)
        ) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", source=str(path)) from exc


def _env_value(raw: str) -> Any:
    """An environment value as TOML would read it (numbers, booleans, arrays), else a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _fields(struct: type[msgspec.Struct]) -> dict[str, Any]:
    """Encoded field name -> field type, for walking the schema from environment names."""
    return {f.encode_name: f.type for f in msgspec.structs.fields(struct)}


def _env_layer(environ: Mapping[str, str]) -> dict[str, Any]:
    """``EDGED_SAMPLING_INTERVAL=0.5`` -> ``{"sampling": {"interval": 0.5}}``.

    Names are matched against the schema, so keys with underscores work
    (``EDGED_SERVER_MAX_CLIENTS``). A name that matches nothing is an error, like an unknown
    key in a file.
    """
    layer: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        struct: type[msgspec.Struct] = Config
        path: list[str] = []
        while True:
            fields = _fields(struct)
            match = next(
                (
                    k
                    for k in sorted(fields, key=len, reverse=True)
                    if rest == k or rest.startswith(k + "_")
                ),
                None,
            )
            if match is None:
                raise ConfigError(
                    f"unknown setting {name} (no key {'.'.join([*path, rest])})",
                    source="environment",
                    key=".".join([*path, rest]),
                )
            path.append(match)
            rest = rest[len(match) + 1 :]
            ftype = fields[match]
            if rest and isinstance(ftype, type) and issubclass(ftype, msgspec.Struct):
                struct = ftype
                continue
            if rest:
                raise ConfigError(
                    f"unknown setting {name}", source="environment", key=".".join(path)
                )
            break
        node = layer
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = _env_value(raw)
    return layer


def _decode(data: Mapping[str, Any], source: str) -> Config:
    try:
        return msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        message = str(exc)
        key = ""
        m = re.search(r" - at `\$\.?(.*)`$", message)
        if m:
            key = re.sub(r"\[(\d+)\]", r"[\1]", m.group(1))
            message = message[: m.start()]
        unknown = re.match(r"Object contains unknown field `(.+)`", message)
        if unknown:
            key = f"{key}.{unknown.group(1)}" if key else unknown.group(1)
            message = "unknown key"
        raise ConfigError(f"{key}: {message}" if key else message, source=source, key=key) from exc


def load(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the effective config from all layers.

    ``path`` None means the default file, which may be absent (safe defaults); a path given
    explicitly must exist. ``overrides`` is the flags layer, as a nested dict.
    """
    environ = os.environ if environ is None else environ
    explicit = path is not None or bool(environ.get(ENV_PREFIX + "CONFIG"))
    file_path = Path(path or environ.get(ENV_PREFIX + "CONFIG") or DEFAULT_CONFIG_PATH)
    data: dict[str, Any] = {}
    sources: list[str] = []
    if file_path.exists() or explicit:
        data = _read_toml(file_path)
        _decode(data, str(file_path))  # report errors against the file that has them
        sources.append(str(file_path))
    dropin_dir = file_path.parent / "edged.d"
    if dropin_dir.is_dir():
        for dropin in sorted(dropin_dir.glob("*.toml")):
            layer = _read_toml(dropin)
            _decode(_merge(data, layer), str(dropin))
            data = _merge(data, layer)
            sources.append(str(dropin))
    env = {k: v for k, v in environ.items() if k not in NOT_SETTINGS_ENV}
    data = _merge(data, _env_layer(env))
    _decode(data, "environment")
    if overrides:
        data = _merge(data, overrides)
    return _decode(data, "command line")


def dumps_toml(config: Config) -> str:
    """The effective config as TOML text (what ``edged check-config`` prints)."""
    data = msgspec.to_builtins(config)
    lines: list[str] = []

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{_key(k)} = {scalar(x)}" for k, x in v.items()) + " }"
        if isinstance(v, list):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        return msgspec.json.encode(str(v)).decode()

    def table(prefix: str, body: dict[str, Any]) -> None:
        plain = {k: v for k, v in body.items() if not isinstance(v, dict) or k == "headers"}
        nested = {k: v for k, v in body.items() if k not in plain}
        if plain or not nested:
            lines.append(f"[{prefix}]")
            lines.extend(f"{_key(k)} = {scalar(v)}" for k, v in plain.items() if v is not None)
            lines.append("")
        for k, v in nested.items():
            table(f"{prefix}.{k}", v)

    top = {k: v for k, v in data.items() if not isinstance(v, (dict, list))}
    lines.extend(f"{k} = {scalar(v)}" for k, v in top.items())
    if top:
        lines.append("")
    for key, value in data.items():
        if isinstance(value, dict):
            table(key, value)
        elif isinstance(value, list):
            for item in value:
                lines.append(f"[[{key}]]")
                lines.extend(f"{_key(k)} = {scalar(v)}" for k, v in item.items() if v is not None)
                lines.append("")
    return "\n".join(lines)


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else msgspec.json.encode(k).decode()
