"""The ``edged`` command line (DESIGN section 7).

Exit codes: 0 ok, 1 error, 2 usage, 3 daemon not running, 4 permission denied, 6 bad config.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

from edged import __version__
from edged import config as config_mod
from edged.metrics import METRICS

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_DENIED, EXIT_BAD_CONFIG = 0, 1, 2, 3, 4, 6
STRATEGIES = ["dynamic", "predictive", "adaptive", "cooperative"]  # DESIGN section 4


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edged", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"edged {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", help="config file (default /etc/edged/edged.toml if present)")
    run.add_argument("--socket", help="Unix socket path to serve")
    run.add_argument("--strategy", choices=STRATEGIES)
    run.add_argument("--interval", help="sampling interval (seconds, or '100ms')")
    run.add_argument("--otlp", help="OTLP endpoint to push metrics to, e.g. http://127.0.0.1:4318")
    run.add_argument("--prometheus", metavar="ADDR|off", help="Prometheus listen address or off")
    run.add_argument("--root", help="read DIR/proc, DIR/sys and DIR/etc instead of the real ones")
    run.add_argument("--dry-run", action="store_true", help="decide and log, never act")
    run.add_argument(
        "--log-level",
        default=os.environ.get("EDGED_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )

    sensors = sub.add_parser("sensors", help="discover and read every sensor once")
    sensors.add_argument("--root", help="read DIR/proc, DIR/sys and DIR/etc instead")
    sensors.add_argument("--json", action="store_true", help="machine-readable output")
    sensors.add_argument(
        "--scope", metavar="CGROUP", help="also read this cgroup as [scope] cgroup would"
    )

    check = sub.add_parser("check-config", help="validate and print the effective config")
    check.add_argument("--config", help="config file (default /etc/edged/edged.toml)")
    check.add_argument("--json", action="store_true", help="print it as JSON instead of TOML")

    status = sub.add_parser("status", help="ask the running daemon how it is")
    status.add_argument("--socket", help="daemon socket (default per DESIGN)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    events = sub.add_parser(
        "events", help="actions the daemon took (or decided, in dry run) and alert transitions"
    )
    events.add_argument("--socket", help="daemon socket (default per DESIGN)")
    events.add_argument("--since", type=int, default=0, help="only events after this sequence")
    events.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    events.add_argument("--json", action="store_true", help="one JSON object per line")

    strategy = sub.add_parser("strategy", help="switch the running strategy (root or edged-admin)")
    strategy_sub = strategy.add_subparsers(dest="strategy_command", required=True, metavar="ACTION")
    strategy_set = strategy_sub.add_parser(
        "set", help="decide with NAME from the next tick on (until a restart or SIGHUP reload)"
    )
    strategy_set.add_argument(
        "name", choices=STRATEGIES, metavar="NAME", help=", ".join(STRATEGIES)
    )
    strategy_set.add_argument("--socket", help="daemon socket (default per DESIGN)")
    strategy_set.add_argument("--json", action="store_true", help="machine-readable output")

    history = sub.add_parser("history", help="the daemon's history ring (samples per tick)")
    history.add_argument("--socket", help="daemon socket (default per DESIGN)")
    history.add_argument(
        "--window", type=float, metavar="S", help="only the last S seconds (default: all)"
    )
    history.add_argument("--json", action="store_true", help="the raw samples, to save to a file")

    top = sub.add_parser("top", help="live view of the machine as the daemon sees it")
    top.add_argument("--socket", help="daemon socket (default per DESIGN)")
    top.add_argument("--interval", type=float, default=1.0, metavar="S", help="refresh period")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.add_argument("--json", action="store_true", help="one JSON object per frame")
    top.add_argument("--plain", action="store_true", help="plain text even where rich is installed")

    budget = sub.add_parser("budget", help="request, list and release budgets")
    budget_sub = budget.add_subparsers(dest="budget_command", required=True, metavar="ACTION")
    request = budget_sub.add_parser("request", help="ask for a budget (a lease)")
    request.add_argument("--memory", metavar="SIZE", help="memory, e.g. 2G or 512MiB")
    request.add_argument("--cpu", type=float, metavar="CORES", help="CPU cores")
    request.add_argument("--gpu-memory", metavar="SIZE", help="GPU memory")
    request.add_argument("--gpu", type=int, metavar="INDEX", help="which GPU")
    request.add_argument("--min-memory", metavar="SIZE", help="smallest memory acceptable")
    request.add_argument("--min-cpu", type=float, metavar="CORES", help="fewest cores acceptable")
    request.add_argument("--min-gpu-memory", metavar="SIZE", help="smallest GPU memory acceptable")
    request.add_argument("--wait", type=float, default=0.0, metavar="S", help="queue up to S s")
    request.add_argument("--ttl", type=float, metavar="S", help="the lease ends after S s")
    request.add_argument("--class", dest="klass", metavar="CLASS", help="class of the process")
    request.add_argument(
        "--pid",
        type=int,
        default=None,
        help="the process the budget is for (default: COMMAND, else the shell that ran edged)",
    )
    request.add_argument(
        "run_command",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND",
        help="run COMMAND under the lease and release it when COMMAND exits (a lease lives as "
        "long as the connection that holds it: without COMMAND, edged holds it until "
        "interrupted)",
    )
    budget_list = budget_sub.add_parser("list", help="the leases visible to you")
    release = budget_sub.add_parser("release", help="give a lease back")
    release.add_argument("lease", help="the lease id that request printed")
    for p in (request, budget_list, release):
        p.add_argument("--socket", help="daemon socket (default per DESIGN)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Flags as a config layer (the highest)."""
    out: dict[str, Any] = {}

    def put(section: str, key: str, value: Any) -> None:
        if value is not None:
            out.setdefault(section, {})[key] = value

    put("sampling", "interval", args.interval)
    put("server", "socket", args.socket)
    put("strategy", "name", args.strategy)
    put("telemetry", "otlp", args.otlp)
    put("telemetry", "prometheus", args.prometheus)
    if args.dry_run:
        put("enforce", "dry_run", True)
    if args.root is not None:
        out["root"] = args.root
    return out


def _setup_logging(level: str) -> None:
    under_journal = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = (
        "%(levelname)s %(name)s: %(message)s"
        if under_journal
        else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    overrides = _overrides(args)
    try:
        config = config_mod.load(args.config, overrides=overrides)
    except config_mod.ConfigError as exc:
        logging.getLogger("edged").error("bad configuration: %s", exc)
        return EXIT_BAD_CONFIG
    from edged.daemon import Daemon

    daemon = Daemon(config, config_path=args.config, overrides=overrides)
    return asyncio.run(daemon.run())


def cmd_sensors(args: argparse.Namespace) -> int:
    from edged.sampler import Sampler
    from edged.sensors import Roots, Sensor, discover_all

    # failures are in the table below (and in --json); no log lines on top of them
    logging.basicConfig(level=logging.ERROR, format="edged: %(message)s")
    roots = Roots.under(args.root) if args.root else Roots()
    scope: Sensor | None = None
    if args.scope:
        from edged.sensors.scope import ScopeSensor, resolve

        try:
            path = config_mod.Scope(cgroup=args.scope).path  # a /sys/fs/cgroup/... path too
            scope = ScopeSensor(resolve(roots.sys, path), roots)
        except (ValueError, config_mod.ConfigError) as exc:
            print(f"edged: --scope: {exc}", file=sys.stderr)
            return EXIT_USAGE
    sensors, discovered = discover_all(roots)
    if scope is not None:
        from edged.snapshot import SourceStatus

        sensors.append(scope)
        discovered.append(SourceStatus(scope.name, "ok", scope.describe()))
    sampler = Sampler(sensors)
    sampler.tick()  # sources that need two reads (utilization, power from energy) get them
    time.sleep(0.2)
    snapshot = sampler.tick()
    sampler.close()
    tick_status = {s.name: s for s in snapshot.sources}
    # a source's error on this read wins over discovery; an ok read keeps discovery's detail
    sources = [
        s if tick_status.get(s.name, s).status == s.status else tick_status[s.name]
        for s in discovered
    ]
    if args.json:
        out = {
            "readings": [
                {
                    "metric": r.metric,
                    "value": r.value,
                    "unit": METRICS[r.metric].unit,
                    "attributes": dict(r.attributes),
                }
                for r in snapshot.readings
            ],
            "sources": [{"name": s.name, "status": s.status, "detail": s.detail} for s in sources],
        }
        print(json.dumps(out, indent=2))
    else:
        for s in sources:
            print(f"{s.name:<28} {s.status:<7} {s.detail}")
        print()
        for r in snapshot.readings:
            attrs = ", ".join(f"{k}={v}" for k, v in r.attributes.items())
            print(f"{r.metric:<32} {r.value:>16.6g} {METRICS[r.metric].unit:<6} {attrs}")
    # A source that is unavailable on this read is a reading ("error" in the table), not a
    # failure of the command: a Jetson's idle CV zones would otherwise make every call fail.
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        print(f"edged: bad configuration: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if args.json:
        import msgspec

        print(msgspec.json.format(msgspec.json.encode(config)).decode())
    else:
        print(config_mod.dumps_toml(config), end="")
    _report_rules(config)
    return EXIT_OK


def _report_rules(config: config_mod.Config) -> None:
    """Per ``[[rules]]`` entry, how many processes it matches on this machine now (/proc read
    once), on stderr so that stdout stays the config; a warning with a hint for one that
    matches none (the exit code stays 0: the file may be meant for another machine, or the
    process may not be running yet)."""
    if not config.rules:
        return
    from edged.rulecheck import describe_rule, live_matches, rule_hint
    from edged.sensors import Roots

    proc = (Roots.under(config.root) if config.root else Roots()).proc
    try:
        counts = live_matches(proc, config.rules)
    except OSError as exc:
        print(f"edged: cannot read {proc} to check the rules: {exc}", file=sys.stderr)
        return
    for i, (rule, (classified, alone)) in enumerate(zip(config.rules, counts, strict=True)):
        what = describe_rule(i, rule)
        if classified:
            s = "" if classified == 1 else "es"
            print(
                f"edged: {what} matches {classified} process{s} now (class {rule.klass})",
                file=sys.stderr,
            )
        elif alone:
            print(
                f"edged: warning: {what} matches no process now: the {alone} it would "
                "match are taken by earlier rules (the first rule that matches decides)",
                file=sys.stderr,
            )
        else:
            print(
                f"edged: warning: {what} matches no process now: {rule_hint(rule)}",
                file=sys.stderr,
            )
    if os.geteuid() != 0 and any(rule.exe is not None for rule in config.rules):
        print(
            "edged: not root: other users' /proc/PID/exe cannot be read, so exe rules may "
            "match more processes in the daemon",
            file=sys.stderr,
        )


class DaemonUnavailable(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def call(
    method: str,
    params: dict[str, Any] | None = None,
    socket_path: str | None = None,
    timeout_s: float = 5.0,
) -> Any:
    """One JSON-RPC call to the running daemon (the CLI's own tiny client)."""
    from edged.client import socket_path as resolve_socket_path

    path = resolve_socket_path(socket_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise DaemonUnavailable(
            f"edged is not running (no daemon on {path})", EXIT_NOT_RUNNING
        ) from exc
    except PermissionError as exc:
        raise DaemonUnavailable(f"permission denied on {path}", EXIT_DENIED) from exc
    with sock:
        request = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}
        sock.sendall(json.dumps(request).encode() + b"\n")
        reader = sock.makefile("rb")
        line = reader.readline()
    if not line:
        raise DaemonUnavailable("the daemon closed the connection", EXIT_ERROR)
    reply = json.loads(line)
    if "error" in reply:
        code = EXIT_DENIED if reply["error"].get("code") == 1003 else EXIT_ERROR
        raise DaemonUnavailable(reply["error"].get("message", "error"), code)
    return reply["result"]


def cmd_status(args: argparse.Namespace) -> int:
    try:
        result = call("status", socket_path=args.socket)
    except DaemonUnavailable as exc:
        print(f"edged: {exc}", file=sys.stderr)
        return exc.code
    if args.json:
        print(json.dumps(result, indent=2))
        return EXIT_OK
    print(
        f"edged {result['version']}: health {result['health']}, strategy {result['strategy']}"
        f"{' (dry run)' if result['dry_run'] else ''}"
    )
    print(
        f"  up {result['uptime_s']:.0f}s, {result['ticks']} ticks every "
        f"{result['interval_s']:g}s, {result['overruns']} overruns, "
        f"{result['clients']} clients"
        + ("" if result.get("memory_locked", True) else ", memory not locked (see its log)")
    )
    usage = result.get("usage", {})
    if "memory_used_bytes" in usage:
        used, total = usage["memory_used_bytes"], usage["memory_total_bytes"]
        print(
            f"  memory used {used / 2**30:.2f} GiB of {total / 2**30:.2f} GiB ({used / total:.0%})"
        )
    levels = result.get("levels", {}).get("memory")
    if levels is not None:
        parts = [
            f"{name} {value / 2**30:.2f} GiB"
            for name in ("soft", "hard")
            if (value := levels.get(name)) is not None
        ]
        if parts:
            print(f"  memory levels: {', '.join(parts)}")
    protection = result.get("protection")
    if protection is not None and "classes" in protection:
        classes = protection["classes"]
        total = sum(classes.values())
        spelled = ", ".join(f"{n} {k}" for k, n in sorted(classes.items()))
        woken = "; ".join(protection.get("woken_by", [])) or "its tick only"
        print(
            f"  watching {total} processes ({spelled}; {protection['processes']}), "
            f"woken by {woken}"
        )
    scope = result.get("scope")
    if scope is not None:
        line = f"  scope {scope['cgroup']}:"
        if "memory_used_bytes" in scope:
            line += f" memory used {scope['memory_used_bytes'] / 2**20:.0f} MiB"
            if scope.get("memory_limit_bytes"):
                limit = scope["memory_limit_bytes"]
                line += f" of {limit / 2**20:.0f} MiB ({scope['memory_used_bytes'] / limit:.0%})"
        if "cpu_cores" in scope:
            line += f", cpu {scope['cpu_cores']:.2f} of {scope.get('cpu_limit_cores', 0):g} cores"
        if "processes" in scope:
            count = scope["processes"]
            line += f", {count} process{'' if count == 1 else 'es'}"
        print(line)
    failing = [s for s in result.get("sources", []) if s["status"] != "ok"]
    for s in failing:
        print(f"  source {s['name']}: {s['status']} {s['detail']}")
    for a in result.get("alerts", []):
        since = time.strftime("%H:%M:%S", time.localtime(a["since_unix_ns"] / 1e9))
        print(
            f"  alert {a['resource']} {a['severity']} {a['state']} since {since} "
            f"(active {a['active_s']:.0f}s): {a['detail']}"
        )
    for r in result.get("rules", []):
        if r["matched"]:
            s = "" if r["matched"] == 1 else "es"
            print(f"  {r['rule']} {r['class']}: {r['matched']} process{s}")
        else:
            print(
                f"  {r['rule']} {r['class']}: no process for {r['unmatched_for_s']:.0f}s "
                f"({r.get('hint', '')})"
            )
    return EXIT_OK


def _event_line(e: dict[str, Any]) -> str:
    """One event as ``edged events`` prints it; alert transitions and strategy switches
    have no pid or class."""
    stamp = time.strftime("%H:%M:%S", time.localtime(e["time_unix_ns"] / 1e9))
    if e["action"] == "strategy":
        return f"{stamp} #{e['seq']} {e['status']:<8} {'strategy':<10} {e['detail']}"
    if e["action"] == "alert":
        return (
            f"{stamp} #{e['seq']} {e['status']:<8} {'alert':<10} "
            f"{e['resource']}/{e['reason']} {e['detail']}"
        )
    outcome = f"; {e['outcome']}" if e["outcome"] else ""
    target = f"gpu {e['gpu']}" if e.get("gpu") else f"pid {e['pid']:<7}"
    return (
        f"{stamp} #{e['seq']} {e['status']:<8} {e['action']:<10} {target} "
        f"{e['resource']}/{e['reason']} [{e['klass']}, {e['strategy']}] "
        f"{e['detail']}{outcome}"
    )


def cmd_events(args: argparse.Namespace) -> int:
    if args.follow:
        return _follow_events(args)
    try:
        result = call("events", {"since": args.since}, socket_path=args.socket)
    except DaemonUnavailable as exc:
        print(f"edged: {exc}", file=sys.stderr)
        return exc.code
    for e in result["events"]:
        print(json.dumps(e) if args.json else _event_line(e), flush=True)
    return EXIT_OK


def _follow_events(args: argparse.Namespace) -> int:
    """``events --follow``: ``subscribe ["events"]`` first, then ask for the backlog on the
    same connection, so nothing falls between the two; an event both in the backlog and
    pushed is printed once (by its sequence number). Runs until interrupted; the daemon
    stopping ends it with exit 3, a daemon error with exit 1."""
    from edged.client import socket_path as resolve_socket_path

    path = resolve_socket_path(args.socket)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"edged: edged is not running (no daemon on {path})", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except PermissionError:
        print(f"edged: permission denied on {path}", file=sys.stderr)
        return EXIT_DENIED
    printed = args.since
    early: list[dict[str, Any]] = []  # pushed before the backlog came
    backlog_seen = False

    def show(event: dict[str, Any]) -> None:
        nonlocal printed
        if event["seq"] > printed:
            print(json.dumps(event) if args.json else _event_line(event), flush=True)
            printed = event["seq"]

    with sock, sock.makefile("rb") as reader:
        for rid, method, params in (
            (1, "subscribe", {"topics": ["events"]}),
            (2, "events", {"since": args.since}),
        ):
            request = {"jsonrpc": "2.0", "id": rid, "method": method, "params": params}
            sock.sendall(json.dumps(request).encode() + b"\n")
        for line in reader:
            message = json.loads(line)
            if "error" in message:
                error = message["error"]
                print(f"edged: {error.get('message', 'error')}", file=sys.stderr)
                return EXIT_DENIED if error.get("code") == 1003 else EXIT_ERROR
            if message.get("method") == "event":
                if backlog_seen:
                    show(message["params"])
                else:
                    early.append(message["params"])
            elif message.get("method") == "shutdown":
                break
            elif message.get("id") == 2:
                backlog_seen = True
                for event in [*message["result"]["events"], *early]:
                    show(event)
                early.clear()
    print("edged: the daemon stopped", file=sys.stderr)
    return EXIT_NOT_RUNNING


def cmd_strategy(args: argparse.Namespace) -> int:
    """``strategy set NAME``: exit 4 when the caller is neither root nor in edged-admin."""
    try:
        result = call("strategy.set", {"name": args.name}, socket_path=args.socket)
    except DaemonUnavailable as exc:
        print(f"edged: {exc}", file=sys.stderr)
        return exc.code
    if args.json:
        print(json.dumps(result))
    else:
        print(f"strategy {result['previous']} -> {result['strategy']}")
    return EXIT_OK


# ---- commands built on edged.client -------------------------------------------------------


def _client(socket_path: str | None, reconnect_timeout_s: float = 0.0) -> Any:
    """A Client for one CLI command. The first connection is tried once (no daemon: exit 3
    at once); by default a broken one is not retried either, since a one-shot command should
    fail fast; ``edged top`` passes a reconnect budget to ride out a daemon restart."""
    from edged.client import Client

    return Client(socket_path, reconnect_timeout_s=reconnect_timeout_s)


def _client_failure(exc: Exception) -> int:
    """Print a client error and return its exit code (DESIGN section 7)."""
    from edged.client import (
        ConnectionLost,
        DaemonUnavailable,
        InsufficientResources,
        PermissionDenied,
    )

    message = str(exc)
    if isinstance(exc, InsufficientResources) and exc.available:
        message += f" (available now: {_amounts(exc.available)})"
    print(f"edged: {message}", file=sys.stderr)
    if isinstance(exc, PermissionDenied):
        return EXIT_DENIED
    if isinstance(exc, DaemonUnavailable) and not isinstance(exc, ConnectionLost):
        return EXIT_NOT_RUNNING
    return EXIT_ERROR


def _client_errors() -> tuple[type[Exception], ...]:
    from edged.client import EdgedError

    return (EdgedError, TimeoutError)


def _amounts(resources: Any) -> str:
    """``memory 1.50 GiB, cpu 2 cores`` from a resources mapping (bytes, cores)."""
    if not isinstance(resources, dict):
        return str(resources)
    parts = []
    for name, value in resources.items():
        if name in ("memory", "gpu_memory") and isinstance(value, (int, float)):
            parts.append(f"{name} {value / 2**30:.2f} GiB")
        elif name == "cpu" and isinstance(value, (int, float)):
            parts.append(f"cpu {value:g} cores")
        else:
            parts.append(f"{name} {value}")
    return ", ".join(parts) or "nothing"


def _series_value(
    series: list[dict[str, Any]], metric: str, attributes: dict[str, Any], index: int
) -> float | None:
    for s in series:
        if s["metric"] == metric and s["attributes"] == attributes:
            value = s["values"][index]
            return None if value is None or math.isnan(value) else float(value)  # no reading
    return None


def _cpu_busy(series: list[dict[str, Any]], index: int) -> float | None:
    """Share of the machine's CPU not idle at sample ``index`` (mean over logical CPUs)."""
    idle = [
        s["values"][index]
        for s in series
        if s["metric"] == "system.cpu.utilization" and s["attributes"].get("cpu.mode") == "idle"
    ]
    idle = [v for v in idle if v is not None and not math.isnan(v)]
    return 1.0 - sum(idle) / len(idle) if idle else None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def cmd_history(args: argparse.Namespace) -> int:
    if args.window is not None and args.window <= 0:
        print("edged: --window must be > 0 seconds", file=sys.stderr)
        return EXIT_USAGE
    try:
        with _client(args.socket) as client:
            result = client.history(args.window)
    except _client_errors() as exc:
        return _client_failure(exc)
    if args.json:
        print(json.dumps(result))
        return EXIT_OK
    series = result.get("series", [])
    print(
        f"{'time':<12} {'mem used GiB':>12} {'mem %':>6} {'cpu %':>6} "
        f"{'psi mem':>8} {'psi cpu':>8} {'psi io':>8}"
    )
    for i, t in enumerate(result.get("time", [])):
        total = _series_value(series, "system.memory.limit", {}, i)
        available = _series_value(series, "system.memory.linux.available", {}, i)
        used = total - available if total is not None and available is not None else None
        share = used / total if used is not None and total else None
        busy = _cpu_busy(series, i)
        psi = [
            _series_value(series, "edged.pressure", {"edged.resource": r, "edged.window": "10s"}, i)
            for r in ("memory", "cpu", "io")
        ]
        stamp = time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 10) % 10}"
        print(
            f"{stamp:<12} {_fmt(None if used is None else used / 2**30, '12.2f')} "
            f"{_fmt(None if share is None else share * 100, '6.1f')} "
            f"{_fmt(None if busy is None else busy * 100, '6.1f')} "
            + " ".join(_fmt(p, "8.3f") for p in psi)
        )
    return EXIT_OK


def _top_model(
    status: dict[str, Any], snapshot: dict[str, Any] | None
) -> tuple[list[str], list[tuple[str, str, str, str, str]]]:
    """What one ``edged top`` frame shows: summary lines, and process rows (pid, RSS MiB,
    CPU %, class, name; the 15 largest by RSS) when the daemon samples processes."""
    lines = [
        f"edged {status['version']}  health {status['health']}  strategy {status['strategy']}"
        f"{' (dry run)' if status.get('dry_run') else ''}  up {status['uptime_s']:.0f}s  "
        f"ticks {status['ticks']}  overruns {status['overruns']}  clients {status['clients']}"
    ]
    usage = status.get("usage", {})
    if "memory_used_bytes" in usage:
        used, total = usage["memory_used_bytes"], usage["memory_total_bytes"]
        lines.append(
            f"memory    {used / 2**30:.2f} GiB used of {total / 2**30:.2f} GiB ({used / total:.0%})"
        )
    readings = (snapshot or {}).get("readings", [])
    idle = [
        r["value"]
        for r in readings
        if r["metric"] == "system.cpu.utilization" and r["attributes"].get("cpu.mode") == "idle"
    ]
    if idle:
        lines.append(f"cpu       {1 - sum(idle) / len(idle):.0%} busy over {len(idle)} CPUs")
    psi = {
        r["attributes"]["edged.resource"]: r["value"]
        for r in readings
        if r["metric"] == "edged.pressure" and r["attributes"].get("edged.window") == "10s"
    }
    if psi:
        lines.append(
            "pressure  " + "  ".join(f"{k} {v:.2f}" for k, v in psi.items()) + "  (some, 10s)"
        )
    for a in status.get("alerts", []):
        lines.append(f"alert     {a['resource']} {a['severity']} {a['state']}: {a['detail']}")
    for s in status.get("sources", []):
        if s["status"] != "ok":
            lines.append(f"source    {s['name']}: {s['status']} {s['detail']}")
    procs: dict[Any, dict[str, Any]] = {}
    for r in readings:
        if r["metric"] in ("process.memory.usage", "process.cpu.utilization"):
            pid = r["attributes"].get("process.pid")
            entry = procs.setdefault(pid, {"attributes": r["attributes"]})
            entry[r["metric"]] = r["value"]
    ranked = sorted(procs.items(), key=lambda kv: -kv[1].get("process.memory.usage", 0.0))
    rows = []
    for pid, entry in ranked[:15]:
        attrs = entry["attributes"]
        rss = entry.get("process.memory.usage")
        cpu = entry.get("process.cpu.utilization")
        rows.append(
            (
                str(pid),
                _fmt(None if rss is None else rss / 2**20, ".1f"),
                _fmt(None if cpu is None else cpu * 100, ".1f"),
                str(attrs.get("edged.class", "")),
                str(attrs.get("process.executable.name", "")),
            )
        )
    return lines, rows


_TOP_COLUMNS = ("PID", "RSS MiB", "CPU %", "CLASS", "NAME")


def _top_frame(status: dict[str, Any], snapshot: dict[str, Any] | None) -> str:
    """One ``edged top`` frame as plain text."""
    lines, rows = _top_model(status, snapshot)
    if rows:
        lines.append("")
        for row in [_TOP_COLUMNS, *rows]:
            pid, rss, cpu, klass, name = row
            lines.append(f"{pid:>7} {rss:>9} {cpu:>6} {klass:<10} {name}")
    return "\n".join(lines)


def _top_rich(status: dict[str, Any], snapshot: dict[str, Any] | None) -> Any:
    """One ``edged top`` frame as a rich renderable (the ``[tui]`` extra)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    lines, rows = _top_model(status, snapshot)
    parts: list[Any] = [Text(line) for line in lines]
    if rows:
        table = Table(expand=False)
        for name in _TOP_COLUMNS:
            table.add_column(name, justify="left" if name in ("CLASS", "NAME") else "right")
        for row in rows:
            table.add_row(*row)
        parts.append(table)
    return Group(*parts)


def _rich_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("rich") is not None


def cmd_top(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        print("edged: --interval must be > 0 seconds", file=sys.stderr)
        return EXIT_USAGE
    # rich (the [tui] extra) only on a terminal; pipes, --json and --plain get plain text
    use_rich = not args.json and not args.plain and sys.stdout.isatty() and _rich_available()
    try:
        with _client(args.socket, 0.0 if args.once else 30.0) as client:
            if use_rich:
                return _top_loop_rich(client, args)
            while True:
                status, snapshot = client.status(), client.snapshot()
                if args.json:
                    print(json.dumps({"status": status, "snapshot": snapshot}), flush=True)
                else:
                    clear = "" if args.once else "\x1b[H\x1b[2J"
                    print(clear + _top_frame(status, snapshot), flush=True)
                if args.once:
                    return EXIT_OK
                time.sleep(args.interval)
    except _client_errors() as exc:
        return _client_failure(exc)


def _top_loop_rich(client: Any, args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    console = Console()
    if args.once:
        console.print(_top_rich(client.status(), client.snapshot()))
        return EXIT_OK
    with Live(console=console, auto_refresh=False, screen=False) as live:
        while True:
            live.update(_top_rich(client.status(), client.snapshot()), refresh=True)
            time.sleep(args.interval)


def shell_status(returncode: int) -> int:
    """COMMAND's exit status as a shell reports it: its code, or 128 + N when signal N ended
    it (``Popen`` says -N, which as an exit code would wrap to 256 - N: 247 for SIGKILL)."""
    return 128 - returncode if returncode < 0 else returncode


def _hold_budget(args: argparse.Namespace, params: dict[str, Any]) -> int:
    """``budget request``: a lease lives as long as the connection that holds it, so the CLI
    holds it: while COMMAND runs (the lease is for COMMAND's pid unless ``--pid``; the exit
    code is COMMAND's), or until SIGINT/SIGTERM. Notifications (shrink, revoke) go to stderr."""
    import signal
    import subprocess

    command = [c for c in args.run_command if c != "--"] if args.run_command else []
    child: subprocess.Popen[bytes] | None = None
    stop = {"now": False}

    def interrupted(signum: int, frame: object) -> None:
        stop["now"] = True

    try:
        with _client(args.socket) as client:
            if command:
                try:
                    child = subprocess.Popen(command)
                except OSError as exc:
                    print(f"edged: budget request: cannot run {command[0]}: {exc}", file=sys.stderr)
                    return EXIT_ERROR
                if args.pid is None:
                    params["pid"] = child.pid
            for method in ("budget.shrink", "budget.grow", "budget.revoked"):
                client.on(
                    method, lambda p, m=method: print(f"{m} {json.dumps(p)}", file=sys.stderr)
                )
            lease = client.request_budget(params)
            result = {"lease": lease.id, "granted": lease.granted, "enforced": lease.enforced}
            text = (
                f"lease {lease.id}: {_amounts(lease.granted)} for pid {params['pid']} "
                f"(enforced: {lease.enforced})"
            )
            print(
                json.dumps(result) if args.json else text,
                file=sys.stderr if command else sys.stdout,
                flush=True,
            )
            signal.signal(signal.SIGINT, interrupted)
            signal.signal(signal.SIGTERM, interrupted)
            while not stop["now"] and not lease.revoked:
                if child is not None and child.poll() is not None:
                    break
                client.poll(0.2)
            if child is not None:
                if child.poll() is None:
                    child.terminate()
                return shell_status(child.wait())
            return EXIT_OK
    except _client_errors() as exc:
        if child is not None and child.poll() is None:
            child.terminate()
            child.wait()
        return _client_failure(exc)


def cmd_budget(args: argparse.Namespace) -> int:
    from edged.client import budget_params

    if args.budget_command == "request":
        minimum: dict[str, Any] = {}
        for key, value in (
            ("memory", args.min_memory),
            ("cpu", args.min_cpu),
            ("gpu_memory", args.min_gpu_memory),
        ):
            if value is not None:
                minimum[key] = value
        try:
            params = budget_params(
                memory=args.memory,
                cpu=args.cpu,
                gpu_memory=args.gpu_memory,
                gpu=args.gpu,
                min=minimum or None,
                wait_s=args.wait,
                ttl_s=args.ttl,
                klass=args.klass,
                pid=args.pid if args.pid is not None else os.getppid(),
            )
        except ValueError as exc:
            print(f"edged: budget request: {exc}", file=sys.stderr)
            return EXIT_USAGE
        return _hold_budget(args, params)
    try:
        with _client(args.socket) as client:
            if args.budget_command == "list":
                result = client.list_budgets()
                leases = result.get("leases", []) if isinstance(result, dict) else result
                text = (
                    "\n".join(
                        f"{le.get('lease')!s:<12} pid {le.get('pid')!s:<8} "
                        f"{le.get('class', '')!s:<10} {_amounts(le.get('granted', {}))}"
                        for le in leases
                    )
                    or "no leases"
                )
            else:
                lease_id: Any = int(args.lease) if str(args.lease).isdigit() else args.lease
                result = client.call("budget.release", {"lease": lease_id})
                text = f"released {args.lease}"
    except _client_errors() as exc:
        return _client_failure(exc)
    print(json.dumps(result) if args.json else text)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    handlers = {
        "run": cmd_run,
        "sensors": cmd_sensors,
        "check-config": cmd_check_config,
        "status": cmd_status,
        "events": cmd_events,
        "history": cmd_history,
        "top": cmd_top,
        "budget": cmd_budget,
        "strategy": cmd_strategy,
    }
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
