"""The daemon: tick -> snapshot -> history/telemetry, the socket server, signals, sd_notify.

One asyncio loop runs everything that is not an exporter thread. Ticks are scheduled on
absolute deadlines (``start + n * interval``) so the cadence does not drift with the cost of
a tick; a tick that overruns skips the deadlines it missed instead of bunching up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from edged import __version__
from edged import config as config_mod
from edged.budget.service import BudgetService, capacity_of, lending_of
from edged.history import History
from edged.rulecheck import RuleWatch
from edged.sampler import Sampler
from edged.sensors import Roots, Sensor, SensorError, discover_all
from edged.sensors.processes import ProcessSensor
from edged.sensors.scope import ScopeSensor, open_scope
from edged.sensors.wake import MemoryWake
from edged.server import protocol
from edged.server.server import Peer, Server, bind_unix_socket, default_socket_path
from edged.snapshot import Snapshot, SourceStatus
from edged.systemd import Notifier, listen_fds

if TYPE_CHECKING:
    from edged.control import Controller

if TYPE_CHECKING:
    from edged.telemetry import Telemetry

log = logging.getLogger("edged")
EXIT_BAD_CONFIG = 6  # DESIGN section 7
# Above a soft level the tick shortens to this (earlyoom adapts its poll the same way), and
# returns to the configured interval once every resource is back under its soft level.
FAST_INTERVAL_S = 0.02
# Below soft, the tick also shortens as memory nears its level: the next tick comes before a
# process faulting memory at this rate could cross it (earlyoom's poll assumes 6000 MiB/s). So
# a machine 1 GiB from its soft level is looked at every ~170 ms, one 6 GiB away every second.
MEMORY_FILL_RATE_BYTES_S = 6000 * (1 << 20)
# While the tick is shortened, /proc is listed for new processes at least this often.
PRESSURE_RESCAN_S = 0.1
# A tick this short or shorter (memory within ~1.2 GiB of soft at the fill rate above, or a
# resource over soft) reads every process, not only the hot ones (see sensors/processes.py).
URGENT_STEP_S = 0.2
# at most one tick woken early by the kernel (sensors/wake.py) per this much time
WAKE_GAP_S = 0.01
# how often the rules' live matches are counted (warnings on a rule that matches nothing)
RULE_CHECK_S = 1.0
# the GIL switch interval while the daemon runs (see Daemon.run)
SWITCH_INTERVAL_S = 0.001
# what ``subscribe`` accepts (DESIGN section 6)
TOPICS = ("pressure", "events", "snapshot")


def roots_of(config: config_mod.Config) -> Roots:
    return Roots.under(config.root) if config.root else Roots()


class Daemon:
    """Owns the sensors, the loop and the server for one run of ``edged run``."""

    def __init__(
        self,
        config: config_mod.Config,
        *,
        config_path: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self._config_path = config_path
        self._overrides = dict(overrides or {})
        self._environ = os.environ if environ is None else environ
        self.roots = roots_of(config)
        self.latest: Snapshot | None = None
        self.discovery: list[SourceStatus] = []
        self.history = History(self._history_capacity(config))
        self.telemetry: Telemetry | None = None
        self.notifier = Notifier(self._environ)
        self.budgets = BudgetService(
            self._notify,
            proc=self.roots.proc,
            watch=self._watch,
            unwatch=self._unwatch,
            lending=lending_of(config.budget),
        )
        # connection -> the topics it subscribed to (subscribe); gone with the connection
        self.subscriptions: dict[int, frozenset[str]] = {}
        # the pressure level last sent per resource (while anyone subscribes to pressure)
        self._levels: dict[Any, str] | None = None
        self.server = Server(
            self._methods(),
            max_clients=config.server.max_clients,
            on_close=self._connection_closed,
            max_requests_per_s=config.server.max_requests_per_s,
            idle_timeout_s=config.server.idle_timeout_s,
            holds=self._holds,
        )
        self.socket_path: Path | None = None
        self._socket_owned = False
        self._stop = asyncio.Event()
        self._reload_requested = False
        # the last SIGHUP's outcome, in status as "reload" (None: none since the start)
        self.last_reload: dict[str, Any] | None = None
        self.ticks = 0
        self.overruns = 0
        self.started_s = time.monotonic()
        self._sampler: Sampler | None = None
        self._processes: ProcessSensor | None = None
        # per [[rules]] entry: how many processes it classifies, since when none (status, log)
        self._rule_watch: RuleWatch | None = None
        self._rules_next_s = 0.0
        self.controller: Controller | None = None
        self._memory_reader: Sensor | None = None
        # [scope] cgroup is fixed for the run: edged's own groups are placed inside it
        self.scope_path = config.scope.path
        self._scope: ScopeSensor | None = None
        self._restore: Any = None  # () -> int: lifts everything edged imposed
        self._gpu_lever: Any = None  # edged.enforce.nvml.GpuPowerLever, as root with a GPU
        self._units: Any = None  # SystemdUnits where PID 1 is systemd: closed at shutdown
        self.fast_interval_s = FAST_INTERVAL_S
        self._lock_fd = -1
        self.memory_locked = False  # mlockall in force (see _lock_memory)
        self._waiter: asyncio.Future[None] | None = None
        # kernel notifications between ticks (sensors/wake.py), and what they did
        self._wake: MemoryWake | None = None
        self._woken_early = False
        self._last_tick_s = 0.0
        self.wakeups = 0

    @staticmethod
    def _history_capacity(config: config_mod.Config) -> int:
        return max(1, round(config.sampling.history_s / config.sampling.interval_s))

    # ---- set-up -------------------------------------------------------------------------

    def _build_sampler(self) -> Sampler:
        """Discover the sensors (and open the scope). Raises ConfigError, before anything is
        opened, when ``[scope] cgroup`` names a group this machine does not have."""
        scope, members = (
            open_scope(self.roots, self.scope_path) if self.scope_path else (None, None)
        )
        sensors, statuses = discover_all(self.roots)
        if scope is not None:
            sensors.append(scope)
            statuses.append(SourceStatus(scope.name, "ok", scope.describe()))
        self._scope = scope
        self._processes = ProcessSensor(
            self.roots,
            self.config.rules,
            mode=self.config.sampling.processes,
            rescan_s=self.config.sampling.rescan_s,
            members=members,
        )
        sensors.append(self._processes)
        statuses.append(SourceStatus("processes", "ok"))
        self._rule_watch = RuleWatch(
            self.config.rules,
            self.config.sampling.rule_warn_after_s,
            time.monotonic(),
            active=self.config.sampling.processes != "none",
        )
        self._rules_next_s = 0.0
        for line in self._rule_watch.start_warnings():
            log.warning("%s", line)
        self.discovery = statuses
        for status in statuses:
            if status.status == "ok":
                log.debug("source %s: ok", status.name)
            else:
                log.info("source %s: %s %s", status.name, status.status, status.detail)
        return Sampler(sensors, on_error=self._sensor_error)

    def _sensor_error(self, name: str) -> None:
        if self.telemetry is not None:
            self.telemetry.count_sensor_error(name)

    def _start_telemetry(self) -> None:
        settings = self.config.telemetry
        push = bool(
            settings.otlp
            or self._environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
            or self._environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
        )
        disabled = self._environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
        if disabled or (not push and settings.prometheus == "off"):
            log.info("telemetry: no exporter configured")
            return
        from edged.telemetry import Telemetry  # the SDK is imported only when it is used

        self.telemetry = Telemetry(settings, lambda: self.latest, environ=self._environ)
        if self.telemetry.prometheus_address is not None:
            host, port = self.telemetry.prometheus_address
            log.info("prometheus metrics on http://%s:%d/metrics", host, port)

    def _start_controller(self) -> None:
        """The strategy, the enforcer and the alerts; first, lift whatever a crashed run left
        imposed.

        The GPU power-limit lever (NVML) exists only as root, with a driver and a GPU whose
        limit can be set; it is opened before the restore so that a limit a crashed run
        lowered is put back."""
        from edged.alerts import AlertTracker
        from edged.control import Controller, still_needed
        from edged.enforce.cgroupfs import detect
        from edged.enforce.enforcer import Enforcer
        from edged.enforce.nvml import open_lever
        from edged.enforce.restore import StateStore, restore_all, state_directory
        from edged.enforce.signals import Signaller
        from edged.enforce.systemd import choose_units, systemd_booted
        from edged.policy.registry import make_strategy
        from edged.sensors.memory import MemorySensor

        cfg = self.config
        strategy = make_strategy(cfg.strategy.name, getattr(cfg.strategy, cfg.strategy.name))
        backend = None
        root = Path(cfg.root or "/")
        # systemd's D-Bus API for processes in a unit (where PID 1 is systemd); cgroupfs for
        # the rest, as without systemd
        units = choose_units(cfg.enforce.backend, root)
        self._units = units
        if units is not None:
            log.info("PID 1 is systemd: units are changed through D-Bus at %s", units.address)
        # with a scope, edged's own groups go inside the governed group, so a throttled or
        # frozen victim stays in it (its usage still counts, it is still a member)
        subtree = f"{self.scope_path.strip('/')}/edged" if self.scope_path else "edged"
        if (
            cfg.enforce.backend in ("auto", "cgroupfs")
            or (cfg.enforce.backend == "systemd" and units is not None)
        ) and os.geteuid() == 0:
            backend = detect(
                self.roots.sys / "fs" / "cgroup", subtree=subtree, proc=self.roots.proc
            )
            if backend is None:
                log.warning("no writable cgroup hierarchy: enforcing with signals only")
        elif cfg.enforce.backend == "systemd" and not systemd_booted(root):
            log.warning(
                '[enforce] backend = "systemd" but PID 1 is not systemd (no %s): enforcing '
                "with signals only",
                root / "run" / "systemd" / "system",
            )
        signals = Signaller(proc=self.roots.proc)
        directory = self._state_directory(state_directory)
        exclusive = self._lock_state(directory)
        store = StateStore(directory)
        lever = None
        if exclusive and os.geteuid() == 0 and cfg.enforce.backend != "none":
            lever = self._gpu_lever = open_lever(self.roots, store)
        if exclusive:
            lifted = restore_all(store, backend, signals, lever, units)
            if lifted:
                log.warning("lifted %d changes a previous run left in force", lifted)
            self._restore = lambda: restore_all(store, backend, signals, lever, units)
        self._memory_reader = MemorySensor(self.roots)

        def limits() -> Any:
            state = self.controller.last_state if self.controller else None
            return state.limits if state is not None else {}

        enforcer = Enforcer(
            backend,
            signals,
            store,
            dry_run=cfg.enforce.dry_run or cfg.enforce.backend == "none" or not exclusive,
            recheck=still_needed(self._reread, limits),
            gpus=lever,
            units=units,
        )
        if not enforcer.dry_run:
            self._choose_lease_enforcer(units, backend, store)
        alerts = AlertTracker(cfg.alerts.for_s, cfg.alerts.critical_for_s)
        self.controller = Controller(
            strategy,
            enforcer,
            cfg.limits,
            alerts=alerts,
            scoped=bool(self.scope_path),
            notify=self.budgets.notify_action,  # NOTIFY -> budget.shrink to the lease holder
            on_event=self._publish_event,
        )
        log.info(
            "strategy %s, enforcing with %s%s%s%s",
            strategy.name,
            (type(backend).__name__ if backend else "signals")
            + (" and systemd units" if units is not None else ""),
            f" and the power limits of {len(lever.constraints_mw)} GPUs" if lever else "",
            f" on cgroup {self.scope_path}" if self.scope_path else "",
            " (dry run: acting on nothing)" if enforcer.dry_run else "",
        )

    def _choose_lease_enforcer(self, units: Any, backend: Any, store: Any) -> None:
        """A lease's process gets its own group with the granted memory and CPU: a transient
        systemd scope where PID 1 is systemd and its bus answers (with ``[enforce] backend =
        "systemd"`` even when it does not answer now: each lease then says why it is not
        enforced), else an edged cgroup (cgroupfs), else nothing (cooperative)."""
        from edged.budget.enforce import CgroupLeases, ScopeLeases
        from edged.enforce.signals import EnforceError

        if units is not None:
            try:
                units.ping()
            except EnforceError as exc:
                if self.config.enforce.backend == "systemd":
                    log.warning("systemd does not answer on %s (%s)", units.address, exc)
                else:
                    log.warning(
                        "systemd does not answer on %s (%s): leases go to cgroups instead",
                        units.address,
                        exc,
                    )
                    units = None
        if units is not None:
            self.budgets.enforcer = ScopeLeases(units, store)
            log.info("budget leases are enforced as systemd scopes")
        elif backend is not None:
            self.budgets.enforcer = CgroupLeases(backend, store)

    def _lock_state(self, directory: Path) -> bool:
        """Hold an exclusive lock on the state directory for the daemon's lifetime.

        Two enforcing daemons on one machine would undo each other's work (each restores what
        its state file lists at start and exit); the second one to start only observes.
        """
        import fcntl

        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_fd = os.open(directory / "edged.lock", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.error(
                "another edged is enforcing with state in %s: this one only observes (dry run)",
                directory,
            )
            return False
        except OSError as exc:
            log.error("cannot lock %s (%s): this edged only observes (dry run)", directory, exc)
            return False
        return True

    def _state_directory(self, default: Any) -> Path:
        if os.geteuid() == 0 or self._environ.get("STATE_DIRECTORY"):
            return Path(default())
        base = self._environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
        return Path(base) / "edged"

    def _reread(self, resource: Any) -> float | None:
        """A fresh read of a resource right before acting (the enforcer's re-check): the
        governed cgroup's working set with a scope, else MemTotal - MemAvailable - the
        per-CPU free pages (as the policy's usage)."""
        from edged.policy.base import Resource

        if resource is Resource.MEMORY and self._scope is not None:
            try:
                return self._scope.memory()[0]
            except (OSError, ValueError, SensorError) as exc:
                log.debug("re-read of the scope's memory failed: %s", exc)
                return None
        if resource is Resource.MEMORY and self._memory_reader is not None:
            try:
                readings = {r.metric: r.value for r in self._memory_reader.read()}
            except (OSError, ValueError) as exc:
                log.debug("re-read of memory failed: %s", exc)
                return None
            total = readings.get("system.memory.limit")
            available = readings.get("system.memory.linux.available")
            percpu = readings.get("edged.memory.percpu_free", 0.0)
            if total is not None and available is not None:
                return float(total - available - percpu)
        return None

    async def _start_server(self) -> None:
        fds = listen_fds(unset_environment=True)
        if fds:
            sock = socket.socket(fileno=fds[0])
            for extra in fds[1:]:
                log.warning("ignoring extra socket-activated fd %d", extra)
            self.socket_path = Path(sock.getsockname()) if sock.getsockname() else None
            log.info("serving the socket-activated fd %d (%s)", fds[0], self.socket_path)
        else:
            path = (
                Path(self.config.server.socket)
                if self.config.server.socket
                else default_socket_path(self._environ)
            )
            sock = bind_unix_socket(path)
            self.socket_path = path
            self._socket_owned = True
            log.info("serving on %s", path)
        await self.server.start(sock)

    # ---- the loop -----------------------------------------------------------------------

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT. Returns the process exit code."""
        loop = asyncio.get_running_loop()
        # The exporters' threads (a Prometheus scrape renders every series in Python) hold
        # the GIL for up to the switch interval before the loop's thread gets it back: at
        # CPython's default 5 ms, a scrape that lands on a tick's deadline delays the tick by
        # that much. 1 ms bounds it at a cost of more hand-overs while both threads run.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._request_reload)
        self._lock_memory(self.config.enforce.lock_memory)
        try:
            self._sampler = self._build_sampler()
            self._start_controller()
            self._start_telemetry()
        except config_mod.ConfigError as exc:  # TelemetryError: an OTEL_* value, a busy port
            log.error("bad configuration: %s", exc)
            self._shutdown_parts()
            return EXIT_BAD_CONFIG
        self._start_wake(loop)
        try:
            await self._start_server()
        except OSError as exc:
            log.error("cannot serve the socket: %s", exc)
            self._shutdown_parts()
            return 1
        try:
            await self._loop()
        finally:
            self.notifier.stopping("stopping")
            await self.server.close()
            self._shutdown_parts()
        log.info("stopped after %d ticks", self.ticks)
        return 0

    def _start_wake(self, loop: asyncio.AbstractEventLoop) -> None:
        """Ask the kernel to wake the loop when memory runs short between two ticks: v1
        thresholds on the machine's (or the governed group's) memory usage, a PSI trigger
        (sensors/wake.py). Nothing to act with (no controller): nothing to wake for."""
        if self.controller is None:
            return
        memory_root = self.roots.sys / "fs" / "cgroup" / "memory"
        memcg = memory_root / self.scope_path.strip("/") if self.scope_path else memory_root
        pressure = self.roots.proc / "pressure" / "memory"
        wake = MemoryWake(
            memcg if memcg.is_dir() else None, pressure if pressure.exists() else None
        )
        if not wake.sources:
            wake.close()
            return
        self._wake = wake
        loop.add_reader(wake.fileno(), self._on_wake)
        log.info("woken between ticks by: %s", "; ".join(wake.sources))

    def _on_wake(self) -> None:
        """The kernel said memory crossed a level or stalls: tick now, not at the deadline
        (at most one early tick per WAKE_GAP_S: the fast tick takes over from there)."""
        assert self._wake is not None
        if not self._wake.drain():
            return
        self.wakeups += 1  # notifications received (a tick may already be under way)
        if self._waiter is None or time.monotonic() - self._last_tick_s < WAKE_GAP_S:
            return
        self._woken_early = True
        _wake(self._waiter)

    def _arm_wake(self) -> None:
        """Thresholds at this tick's soft and hard memory levels (moved as they drift)."""
        from edged.policy.base import Resource

        state = self.controller.last_state if self.controller is not None else None
        if self._wake is None or state is None:
            return
        limit = state.limits.get(Resource.MEMORY)
        used = state.usage.get(Resource.MEMORY)
        if limit is None or used is None:
            return
        self._wake.arm(used, tuple(v for v in (limit.soft, limit.hard) if v is not None))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        interval_s = self.config.sampling.interval_s
        deadline_s = loop.time()
        while not self._stop.is_set():
            if self._reload_requested:
                self._reload_requested = False
                self._reload()
                if self.config.sampling.interval_s != interval_s:
                    interval_s = self.config.sampling.interval_s
                    deadline_s = loop.time()
            try:
                self._tick()
            finally:
                self.server.release()  # answer the requests that waited for this tick
            self._last_tick_s = time.monotonic()
            self._arm_wake()
            step_s = self._next_interval_s(interval_s)
            if self._processes is not None:
                # near or over a limit: every process is read each tick (no cold tier), so
                # victims are ranked on fresh figures
                self._processes.urgent = step_s <= URGENT_STEP_S
                if step_s < interval_s:
                    # a culprit started since the last /proc listing must not wait up to
                    # [sampling] rescan to be seen
                    self._processes.hurry(PRESSURE_RESCAN_S)
            deadline_s += step_s
            now_s = loop.time()
            if deadline_s <= now_s:  # overran: skip the missed deadlines, keep the phase
                missed = int((now_s - deadline_s) // step_s) + 1
                self.overruns += missed
                deadline_s += missed * step_s
            self.server.hold(deadline_s)  # from the deadline on, requests wait for the tick
            await self._sleep_until(loop, deadline_s)
            if self._woken_early:  # the kernel woke us: the cadence restarts from now
                self._woken_early = False
                deadline_s = loop.time()

    async def _sleep_until(self, loop: asyncio.AbstractEventLoop, deadline_s: float) -> None:
        """Wait for the deadline or a stop request, with one timer and one future: cheaper
        per tick than ``wait_for`` (a task per call), which matters at 0.1 s and 20 ms."""
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiter = waiter
        handle = loop.call_at(deadline_s, _wake, waiter)
        try:
            await waiter
        finally:
            handle.cancel()
            self._waiter = None

    def _request_stop(self) -> None:
        self._stop.set()
        if self._waiter is not None:
            _wake(self._waiter)

    def _next_interval_s(self, interval_s: float) -> float:
        """The configured interval; the fast one while any resource is above soft; and for
        memory, short enough that a fast fill cannot cross its level between two ticks."""
        from edged.policy.base import Resource

        state = self.controller.last_state if self.controller is not None else None
        if state is None:
            return interval_s
        fast_s = min(interval_s, self.fast_interval_s)
        step_s = interval_s
        for resource, limit in state.limits.items():
            used = state.usage.get(resource)
            level = limit.soft if limit.soft is not None else limit.hard
            if used is None or level is None:
                continue
            if used >= level:
                return fast_s
            if resource is Resource.MEMORY:
                step_s = min(step_s, max(fast_s, (level - used) / MEMORY_FILL_RATE_BYTES_S))
        return step_s

    def _tick(self) -> None:
        assert self._sampler is not None
        started = time.perf_counter()
        snapshot = self._sampler.tick()
        self._check_rules()
        if self.controller is not None and self._processes is not None:
            from edged.control import policy_readings

            members = self._processes.in_scope  # None: no scope, every watched process
            start_ticks = {
                pid: w.info.start_ticks
                for pid, w in self._processes.watched.items()
                if members is None or pid in members
            }
            self.controller.step(snapshot, self.config.sampling.interval_s, start_ticks)
            extra = tuple(policy_readings(self.controller, self._forecasts()))
            snapshot = msgspec.structs.replace(snapshot, readings=snapshot.readings + extra)
        self._update_budgets(snapshot)
        self.latest = snapshot
        self.history.append(snapshot)
        self._publish_tick(snapshot)
        self.ticks += 1
        duration_s = time.perf_counter() - started
        if self.telemetry is not None:
            self.telemetry.record_tick(duration_s)
        if self.ticks == 1:
            errors = sum(1 for s in snapshot.sources if s.status == "error")
            self.notifier.ready(
                f"sampling every {self.config.sampling.interval_s:g}s, "
                f"{len(snapshot.sources)} sources, {errors} failing"
            )
            log.info(
                "edged %s ready: %d sources, interval %gs",
                __version__,
                len(snapshot.sources),
                self.config.sampling.interval_s,
            )
        self.notifier.watchdog()

    def _check_rules(self) -> None:
        """At most every RULE_CHECK_S: how many processes each rule classifies now, and the
        WARNING for a rule that has matched none for ``[sampling] rule_warn_after``."""
        watch, processes = self._rule_watch, self._processes
        if watch is None or processes is None or not watch.rules:
            return
        now_s = time.monotonic()
        if now_s < self._rules_next_s:
            return
        self._rules_next_s = now_s + RULE_CHECK_S
        for line in watch.observe(processes.rule_counts(), now_s):
            log.warning("%s", line)

    def _update_budgets(self, snapshot: Snapshot) -> None:
        """The ledger's capacity from this tick (hard limits, else totals), then its queue;
        GPU-memory leases against NVML's per-process figures."""
        self.budgets.check_gpu(snapshot.readings)
        self.budgets.observe(snapshot.readings)  # idle leases lend, busy lenders take back
        state = self.controller.last_state if self.controller is not None else None
        if state is None:
            return
        hard = {r.value: limit.hard for r, limit in state.limits.items()}
        totals = {r.value: amount for r, amount in state.capacity.items()}
        capacity, reserve = capacity_of(totals, hard, self.config.budget)
        self.budgets.set_capacity(capacity, reserve)

    def _notify(self, connection: int, method: str, params: Any) -> bool:
        return self.server.notify(connection, method, params)

    # ---- subscriptions ------------------------------------------------------------------

    def _subscribers(self, topic: str) -> list[int]:
        return [c for c, topics in self.subscriptions.items() if topic in topics]

    def _holds(self, connection: int) -> bool:
        """Whether a silent connection is kept open past the idle timeout: it holds a lease
        or a queued request, or it subscribed (a follower has nothing to say)."""
        return connection in self.subscriptions or self.budgets.holds(connection)

    def _connection_closed(self, connection: int) -> None:
        """The server's close hook: subscriptions and leases end with their connection."""
        self.subscriptions.pop(connection, None)
        if not self._subscribers("pressure"):
            self._levels = None
        self.budgets.connection_closed(connection)

    def _publish_tick(self, snapshot: Snapshot) -> None:
        """After each tick: the snapshot to its subscribers (encoded once, skipped for a
        subscriber still behind on the previous one) and a ``pressure`` notification for
        each resource whose level changed. Nothing at all without subscribers."""
        if not self.subscriptions:
            return
        watchers = self._subscribers("snapshot")
        if watchers:
            data = protocol.encode_notification("snapshot", snapshot)
            self.server.broadcast(watchers, data, droppable=True)
        watchers = self._subscribers("pressure")
        if not watchers:
            return
        current = self._pressure_levels()
        previous = self._levels if self._levels is not None else {}
        state = self.controller.last_state if self.controller is not None else None
        usage = state.usage if state is not None else {}
        for resource, level in current.items():
            before = previous.get(resource)
            if resource not in usage and before is not None:
                current[resource] = before  # no reading this tick: no evidence of a change
            elif level != before:
                params = {"resource": resource.value, "level": level, "previous": before}
                self.server.broadcast(watchers, protocol.encode_notification("pressure", params))
        self._levels = current

    def _pressure_levels(self) -> dict[Any, str]:
        if self.controller is None:
            return {}
        from edged.control import resource_levels

        return resource_levels(
            self.controller.last_state,
            self._forecasts(),
            self.controller.alerts.firing_resources(),
        )

    def _publish_event(self, event: Any) -> None:
        """The controller's event hook: each new action, alert or switch event to the
        ``events`` subscribers, encoded once."""
        watchers = self._subscribers("events")
        if watchers:
            self.server.broadcast(watchers, protocol.encode_notification("event", event))

    def _send_levels(self, connection: int) -> None:
        """Right after a ``pressure`` subscription: every resource's current level (with
        ``previous`` null), so the client knows where it starts."""
        for resource, level in (self._levels or {}).items():
            params = {"resource": resource.value, "level": level, "previous": None}
            self.server.notify(connection, "pressure", params)

    def _watch(self, pid: int, klass: str, client: str) -> None:
        """A lease holder is sampled from the next tick on, with ``edged.client`` = its name."""
        if self._processes is not None:
            self._processes.watch(pid, klass, client)

    def _unwatch(self, pid: int) -> None:
        if self._processes is not None:
            self._processes.unwatch(pid)

    # ---- reload and shutdown ------------------------------------------------------------

    def _request_reload(self) -> None:
        self._reload_requested = True

    def _reload(self) -> None:
        """SIGHUP: re-read the config. A bad file is reported; the old config stays."""
        self.notifier.reloading("reloading configuration")
        try:
            new = config_mod.load(
                self._config_path, environ=self._environ, overrides=self._overrides
            )
        except config_mod.ConfigError as exc:
            self._refuse_reload(str(exc))
            return
        except Exception as exc:
            self._refuse_reload(f"{type(exc).__name__}: {exc}")
            return
        old = self.config
        switch_to = self._reloaded_strategy(new)
        if switch_to is False:
            self._refuse_reload("the [strategy] settings were refused (see the log)")
            return
        self.config = new
        if new.sampling != old.sampling or new.rules != old.rules or new.root != old.root:
            old_sampler, old_roots = self._sampler, self.roots
            self.roots = roots_of(new)
            try:
                self._sampler = self._build_sampler()
            except config_mod.ConfigError as exc:  # the governed group is gone
                self.config, self.roots = old, old_roots
                self._refuse_reload(str(exc))
                return
            if old_sampler is not None:
                old_sampler.close()
            self.budgets.rewatch()  # the new process sensor samples the lease holders too
            if self._history_capacity(new) != self.history.capacity:
                self.history = History(self._history_capacity(new))
        if new.budget != old.budget:
            self.budgets.configure(lending_of(new.budget))  # reserves: at the next tick
        if new.limits != old.limits and self.controller is not None:
            # the strategy, the alerts, the pressure levels and the budgets' capacity all read
            # the limits from the controller's state, built each tick: in force from the next
            self.controller.limits = new.limits
            log.info("[limits] changed: in force from the next tick")
        if new.enforce.lock_memory != old.enforce.lock_memory:
            self._lock_memory(new.enforce.lock_memory)
        if new.alerts != old.alerts and self.controller is not None:
            # pending alerts are held against the new times from the next tick on
            self.controller.alerts.for_s = new.alerts.for_s
            self.controller.alerts.critical_for_s = new.alerts.critical_for_s
        for section in ("telemetry", "server", "scope"):
            if getattr(new, section) != getattr(old, section):
                log.warning("[%s] changes take effect at the next restart", section)
        if switch_to is not None and self.controller is not None:
            self.controller.switch(switch_to, "reload", "SIGHUP: the configuration's strategy")
        log.info("configuration reloaded")
        self.last_reload = {"ok": True, "time_unix_s": round(time.time(), 3), "error": None}
        self.notifier.ready("configuration reloaded")

    def _refuse_reload(self, error: str) -> None:
        """A refused reload: the running configuration stays, and ``status`` says so
        (``reload``) as well as the log, until a later reload succeeds."""
        log.error("reload refused, keeping the running configuration: %s", error)
        self.last_reload = {"ok": False, "time_unix_s": round(time.time(), 3), "error": error}
        self.notifier.ready("reload refused: bad configuration")

    def _lock_memory(self, wanted: bool) -> None:
        """``[enforce] lock_memory``: lock edged's pages (at start, or a reload that turns it
        on) or unlock them (a reload that turns it off), and say which in the log."""
        from edged import memlock

        if wanted and not self.memory_locked:
            result = memlock.lock_memory()
            self.memory_locked = result.locked
            if result.locked:
                log.info("memory: %s", result.detail)
            else:
                log.warning("memory: %s", result.detail)
        elif not wanted and self.memory_locked:
            self.memory_locked = not memlock.unlock_memory()
            log.info("memory: %s", "still locked" if self.memory_locked else "unlocked")
        elif not wanted:
            log.info("memory: not locked ([enforce] lock_memory = false)")

    def _reloaded_strategy(self, new: config_mod.Config) -> Any:
        """The strategy a reload switches to: the file's ``[strategy]`` wins over a
        ``strategy.set`` made since (a reload makes the daemon match its configuration, as a
        restart would). None when the running strategy already is the file's, with the same
        settings (it keeps its learned state); False when the file's settings are bad (the
        reload is refused)."""
        from edged.policy.registry import make_strategy

        if self.controller is None:
            return None
        name = new.strategy.name
        settings = getattr(new.strategy, name)
        running = self.controller.strategy.name
        if name == running and settings == getattr(self.config.strategy, name):
            return None
        try:
            return make_strategy(name, settings)
        except ValueError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return False

    def _shutdown_parts(self) -> None:
        if self._wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                asyncio.get_running_loop().remove_reader(self._wake.fileno())
            self._wake.close()
            self._wake = None
        self.budgets.close()  # leases end before the restore lifts what is left
        if self._restore is not None:
            try:
                lifted = self._restore()
            except OSError as exc:
                log.error("restoring what edged imposed failed: %s", exc)
            else:
                if lifted:
                    log.info("lifted %d changes on the way out", lifted)
            self._restore = None
        if self._gpu_lever is not None:
            self._gpu_lever.close()
            self._gpu_lever = None
        if self._units is not None:
            self._units.close()
            self._units = None
        if self.telemetry is not None:
            self.telemetry.shutdown()
        if self._sampler is not None:
            self._sampler.close()
        if self._socket_owned and self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()

    # ---- methods ------------------------------------------------------------------------

    def _methods(self) -> dict[str, Any]:
        return {
            "hello": self._hello,
            "status": self._status,
            "snapshot": self._snapshot,
            "history": self._history,
            "events": self._events,
            "subscribe": self._subscribe,
            "strategy.set": self._strategy_set,
            **self.budgets.methods(),
        }

    async def _subscribe(self, peer: Peer, params: Mapping[str, Any]) -> Any:
        """``subscribe {topics}``: the connection's topics become exactly these (again with
        other topics: replaced; ``[]``: none). Returns ``{"topics": [...]}``. A ``pressure``
        subscriber is sent the current level of each resource right after the reply."""
        unknown_params = sorted(set(params) - {"topics"})
        if unknown_params:
            raise protocol.RpcError(
                protocol.INVALID_PARAMS, f"unknown parameter {unknown_params[0]!r}"
            )
        topics = params.get("topics")
        if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
            raise protocol.RpcError(
                protocol.INVALID_PARAMS,
                f"topics must be a list of {', '.join(TOPICS)}",
                {"topics": list(TOPICS)},
            )
        unknown = sorted(set(topics) - set(TOPICS))
        if unknown:
            raise protocol.RpcError(
                protocol.INVALID_PARAMS,
                f"unknown topic {unknown[0]!r} (known: {', '.join(TOPICS)})",
                {"topics": list(TOPICS)},
            )
        chosen = frozenset(topics)
        if chosen:
            self.subscriptions[peer.connection] = chosen
        else:
            self.subscriptions.pop(peer.connection, None)
        if not self._subscribers("pressure"):
            self._levels = None
        elif "pressure" in chosen:
            if self._levels is None:  # the first pressure subscriber: start tracking now
                self._levels = self._pressure_levels()
            # after the reply: the server writes it as soon as this handler returns, before
            # the loop runs anything scheduled now
            asyncio.get_running_loop().call_soon(self._send_levels, peer.connection)
        return {"topics": sorted(chosen)}

    async def _strategy_set(self, peer: Peer, params: Mapping[str, Any]) -> Any:
        """``strategy.set {name}``, root or group edged-admin only: the next tick decides
        with ``name`` (settings from the running config's ``[strategy.NAME]``)."""
        from edged.policy.registry import STRATEGY_NAMES

        if not self.budgets.is_admin(peer):
            raise protocol.RpcError(
                protocol.PERMISSION_DENIED, "strategy.set needs root or group edged-admin"
            )
        unknown_params = sorted(set(params) - {"name"})
        if unknown_params:
            raise protocol.RpcError(
                protocol.INVALID_PARAMS, f"unknown parameter {unknown_params[0]!r}"
            )
        name = params.get("name")
        if not isinstance(name, str) or name not in STRATEGY_NAMES:
            raise protocol.RpcError(
                protocol.INVALID_PARAMS,
                f"unknown strategy {name!r} (known: {', '.join(STRATEGY_NAMES)})",
                {"known": list(STRATEGY_NAMES)},
            )
        if self.controller is None:
            raise protocol.RpcError(protocol.INTERNAL_ERROR, "no strategy is running")
        previous = self.controller.strategy.name
        try:
            self._switch_strategy(name, "set", f"strategy.set by uid {peer.uid}, pid {peer.pid}")
        except ValueError as exc:  # bad [strategy.NAME] settings in the running config
            raise protocol.RpcError(protocol.INVALID_PARAMS, str(exc)) from exc
        return {"strategy": name, "previous": previous}

    def _switch_strategy(self, name: str, reason: str, who: str) -> None:
        """Replace the running strategy with a fresh ``name`` built from the running
        config's settings (the path strategy.set and a reload share). Raises ValueError on
        bad settings, before anything changes."""
        from edged.policy.registry import make_strategy

        assert self.controller is not None
        strategy = make_strategy(name, getattr(self.config.strategy, name))
        self.controller.switch(strategy, reason, who)

    async def _hello(self, peer: Peer, params: Mapping[str, Any]) -> Any:
        version = params.get("protocol", protocol.PROTOCOL_VERSION)
        client = params.get("client")
        if isinstance(client, str) and client:
            self.budgets.name(peer.connection, client)
        if version != protocol.PROTOCOL_VERSION:
            raise protocol.RpcError(
                protocol.INVALID_PARAMS, f"unsupported protocol {version!r}; this server speaks 1"
            )
        return {
            "server": f"edged {__version__}",
            "protocol": protocol.PROTOCOL_VERSION,
            "strategy": self._strategy_name(),
            "capabilities": sorted(self.server.methods),
            "peer": {"pid": peer.pid, "uid": peer.uid},
        }

    async def _status(self, peer: Peer, params: Mapping[str, Any]) -> Any:
        snap = self.latest
        usage: dict[str, float] = {}
        if snap is not None:
            total = snap.value("system.memory.limit")
            available = snap.value("system.memory.linux.available")
            if total is not None and available is not None:
                usage["memory_used_bytes"] = total - available
                usage["memory_total_bytes"] = total
        result: dict[str, Any] = {
            "version": __version__,
            "health": self._health(),
            "strategy": self._strategy_name(),
            "dry_run": self.config.enforce.dry_run,
            # edged's own pages locked in memory ([enforce] lock_memory, edged.memlock)
            "memory_locked": self.memory_locked,
            "interval_s": self.config.sampling.interval_s,
            "uptime_s": round(time.monotonic() - self.started_s, 3),
            "ticks": self.ticks,
            "overruns": self.overruns,
            "wakeups": self.wakeups,
            "limits": msgspec.to_builtins(self.config.limits),
            "levels": self._resolved_levels(),
            "protection": self._protection(),
            "reload": self.last_reload,
            "usage": usage,
            "sources": [msgspec.to_builtins(s) for s in (snap.sources if snap else ())],
            "clients": len(self.server.clients),
            "budget": self.budgets.summary(),
            "alerts": self.controller.alert_status() if self.controller is not None else [],
            # per [[rules]] entry: processes it classifies now, how long it has matched none
            "rules": self._rule_watch.status(time.monotonic()) if self._rule_watch else [],
            "subscriptions": {
                **{topic: len(self._subscribers(topic)) for topic in TOPICS},
                "snapshots_skipped": self.server.skipped,
                "closed_slow": self.server.closed_slow,
                # error logs left out by the server's limit (one per kind per 10 s)
                "errors_suppressed": self.server.errors_suppressed,
                "pending_bytes": self.server.pending_bytes(),
            },
        }
        if self.scope_path:
            result["scope"] = self._scope_status(snap)
        return result

    def _resolved_levels(self) -> dict[str, dict[str, float | None]]:
        """The limits as resolved this tick (``"auto"`` and percentages made figures)."""
        state = self.controller.last_state if self.controller is not None else None
        if state is None:
            return {}
        return {
            resource.value: {"soft": limit.soft, "hard": limit.hard}
            for resource, limit in state.limits.items()
        }

    def _protection(self) -> dict[str, Any]:
        """What edged watches: candidates by class, how many were read on the last tick
        (the rest are cold, see sensors/processes.py), and what wakes it between ticks."""
        out: dict[str, Any] = {"processes": self.config.sampling.processes}
        if self._processes is not None:
            classes: dict[str, int] = {}
            for watched in self._processes.watched.values():
                classes[watched.klass] = classes.get(watched.klass, 0) + 1
            out["classes"] = classes
            out["read_last_tick"] = self._processes.last_reads
            out["cold_last_tick"] = self._processes.last_skipped
        out["woken_by"] = list(self._wake.sources) if self._wake is not None else []
        return out

    def _scope_status(self, snap: Snapshot | None) -> dict[str, Any]:
        """The governed cgroup's figures from the latest snapshot (absent ones left out)."""
        out: dict[str, Any] = {"cgroup": self.scope_path}
        names = {
            "edged.scope.memory.usage": "memory_used_bytes",
            "edged.scope.memory.limit": "memory_limit_bytes",
            "edged.scope.cpu.usage": "cpu_cores",
            "edged.scope.cpu.limit": "cpu_limit_cores",
        }
        for metric, key in names.items():
            value = snap.value(metric) if snap is not None else None
            if value is not None:
                out[key] = value
        if self._processes is not None and self._processes.in_scope is not None:
            out["processes"] = len(self._processes.in_scope)
        return out

    def _strategy_name(self) -> str:
        """The strategy deciding now (strategy.set may have switched from the config's)."""
        if self.controller is not None:
            return self.controller.strategy.name
        return self.config.strategy.name

    def _health(self) -> str:
        if self.controller is None:
            return "ok"
        from edged.control import health

        return health(
            self.controller.last_state,
            self._forecasts(),
            self.controller.alerts.firing_resources(),
        )

    def _forecasts(self) -> Mapping[Any, float]:
        """Time to limit per resource from strategies that forecast (predictive); {} else."""
        forecasts = getattr(self.controller, "strategy", None)
        method = getattr(forecasts, "forecasts", None)
        result: Mapping[Any, float] = method() if callable(method) else {}
        return result

    async def _snapshot(self, peer: Peer, params: Mapping[str, Any]) -> Any:
        return msgspec.to_builtins(self.latest) if self.latest is not None else None

    async def _events(self, peer: Peer, params: Mapping[str, Any]) -> Any:
        since = params.get("since", 0)
        if isinstance(since, bool) or not isinstance(since, int) or since < 0:
            raise protocol.RpcError(protocol.INVALID_PARAMS, "since must be a sequence number >= 0")
        if self.controller is None:
            return {"events": [], "last": 0}
        events = self.controller.since(since)
        last = self.controller.events[-1].seq if self.controller.events else 0
        return {"events": [msgspec.to_builtins(e) for e in events], "last": last}

    async def _history(self, peer: Peer, params: Mapping[str, Any]) -> Any:
        window = params.get("window")
        resources = params.get("resources")
        if window is not None and (
            isinstance(window, bool) or not isinstance(window, (int, float)) or window <= 0
        ):
            raise protocol.RpcError(protocol.INVALID_PARAMS, "window must be a positive number")
        if resources is not None and (
            not isinstance(resources, list) or not all(isinstance(r, str) for r in resources)
        ):
            raise protocol.RpcError(
                protocol.INVALID_PARAMS, "resources must be a list of metric names"
            )
        return self.history.query(window, resources)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
