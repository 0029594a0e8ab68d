"""Per-process memory and CPU for the processes edged manages.

Which processes: every user-space process (``[sampling] processes = "all"``, the default: with
no rules at all edged protects the machine), those a ``[[rules]]`` entry matches (``"rules"``),
or none; plus any pid added with :meth:`ProcessSensor.watch` (budget clients). Each is given a
class: its rule's, else the built-in one (:func:`edged.rules.builtin_class`: the init system,
journald, dbus, sshd, gettys, ``oom_score_adj`` -1000), else ``normal``; edged itself and its
ancestors are always ``critical``.

``/proc`` is listed every ``rescan_s`` for new pids; a new pid's cmdline, exe and cgroup are
read once, to classify it. A read then costs one ``pread`` per process on a descriptor kept
open (``stat``: CPU times, start time, resident pages). Reading *every* process every tick
would make edged's cost grow with the machine's process count, so reads are tiered:

- **hot**, read every tick: processes at or above ``HOT_BYTES`` resident, those that grew by
  ``HOT_GROWTH_BYTES`` or more since their previous read, those that used ``HOT_CORES`` or
  more of a CPU, new ones (until their second read gives a CPU figure), and budget clients;
- **cold**, the rest (shells, sleeping daemons, small helpers): read once per ``COLD_S`` on
  average (each at its own period, 0.5 to 1.5 times that, so the reads spread over the ticks),
  their previous readings repeated in between (so every process is in every snapshot, and a
  cold one's CPU utilization is that of its last read);
- **all**, every tick, while :attr:`ProcessSensor.urgent` is set: the daemon sets it whenever
  memory is near or over a limit (its tick is then shortened), so a small process that starts
  to grow fast is seen within one short tick, and victims are ranked on fresh figures.

A vanished process makes pread fail with ESRCH: it is dropped, not reported as an error. A pid
reused by a new process is told apart by its start time.

A process's name changes when it execs (a program started from a shell is first seen as
``bash``) or renames itself: a watched one is judged again when the name in its ``stat``
changes (every tick, in every mode). An unmatched one (``processes = "rules"``) is not read
every tick: at each listing its ``stat`` is read once more and, if its name or start time
changed, it is judged again, so a rule on its post-exec name matches it within ``rescan_s``
(one open and read per unmatched process per listing, about 18 us each on a 2-core VM, only
while some rule could match).
Each watched process keeps the index of the ``[[rules]]`` entry that classified it
(:meth:`ProcessSensor.rule_counts`), for the warning on a rule that matches nothing.

With a scope (``[scope] cgroup``, a :class:`~edged.sensors.scope.ScopeMembers`), the processes
are those of the governed group and the groups below it, read every tick instead of listing
``/proc``: a process that enters the group is sampled from the next tick, one that leaves it is
dropped at once. Every member is sampled (a rule still gives its class, "normal" otherwise)
unless ``[sampling] processes = "none"``; a process outside the group is never sampled unless
it was added with :meth:`ProcessSensor.watch`.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from edged.config import Rule
from edged.rules import (
    Classifier,
    ProcessInfo,
    ancestry,
    builtin_class,
    parse_stat_fields,
    read_process_info,
)
from edged.sensors.base import KeptFile, Roots, Sensor
from edged.sensors.cpu import USER_HZ
from edged.snapshot import Reading

if TYPE_CHECKING:
    from edged.sensors.scope import ScopeMembers

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_GONE = (errno.ESRCH, errno.ENOENT)
CLK_TCK = USER_HZ  # /proc/<pid>/stat's start time and /proc/uptime's seconds, reconciled
# an unmatched process younger than this is judged again at the next listing (see rescan)
YOUNG_S = 2.0
# an unwatched budget client's entry is kept (not sampled, its stat file open) this long, and
# at most this many: a client asking for its next lease takes it back without reading /proc
PARK_S = 5.0
MAX_PARKED = 256
# tiers (see the module docstring): a process this large, or growing this much between two
# reads, is read every tick; the rest once per COLD_S. 64 MiB: on the smallest boards edged
# runs on (2 GiB) a process under it cannot take the machine down within one cold period at
# the growth that would keep it cold (< 4 MiB per read).
HOT_BYTES = 64 << 20
HOT_GROWTH_BYTES = 4 << 20
HOT_CORES = 0.05
COLD_S = 5.0


@dataclass
class Watched:
    """A process being sampled, with its kept-open files and last CPU counters."""

    info: ProcessInfo
    klass: str
    client: str = ""
    rule: int | None = None  # index in [[rules]] of the first rule that matches it, if any
    stat: KeptFile = field(init=False)
    cpu_ticks: tuple[int, int] | None = None  # (utime, stime) at the last read
    read_at_s: float = 0.0
    memory_attrs: dict[str, str | int] = field(init=False)
    user_attrs: dict[str, str | int] = field(init=False)
    system_attrs: dict[str, str | int] = field(init=False)
    # the name as stat spells it at the first read (raw bytes: no decoding per tick); a
    # change later means exec or a rename, and the process is judged again
    comm: bytes | None = None
    rss_bytes: int = -1  # at the last read (-1: not read yet)
    # this process's cold period: COLD_S x 0.5..1.5 by its pid, so that the processes found
    # by one listing do not all fall due on the same tick (a cost spike every COLD_S)
    cold_s: float = COLD_S
    hot: bool = True  # read every tick (see the module docstring); judged at each read
    last: tuple[Reading, ...] = ()  # the readings of the last read, repeated while cold

    def __post_init__(self) -> None:
        self.attributes_changed()
        self.cold_s = COLD_S * (0.5 + (self.info.pid * 0.6180339887) % 1.0)

    def open(self, proc: str) -> None:
        self.stat = KeptFile(f"{proc}/{self.info.pid}/stat", 4096)

    def attributes_changed(self) -> None:
        base: dict[str, str | int] = {
            "process.pid": self.info.pid,
            "process.executable.name": self.info.name,
            "edged.class": self.klass,
        }
        if self.client:
            base["edged.client"] = self.client
        self.memory_attrs = base
        self.user_attrs = {**base, "cpu.mode": "user"}
        self.system_attrs = {**base, "cpu.mode": "system"}

    def close(self) -> None:
        self.stat.close()


class ProcessSensor(Sensor):
    """``process.memory.usage`` and ``process.cpu.utilization`` of watched processes."""

    name = "processes"

    def __init__(
        self,
        roots: Roots,
        rules: list[Rule],
        mode: str = "rules",
        rescan_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        members: ScopeMembers | None = None,
    ) -> None:
        self._proc = str(roots.proc)
        self._members = members
        # the pids of the governed group at the last read; None without a scope
        self.in_scope: frozenset[int] | None = frozenset() if members is not None else None
        self._classifier = Classifier(rules)
        self._has_rules = bool(rules)
        self._mode = mode
        # edged and its ancestors: never acted on, whatever a rule says
        self._ancestry = ancestry(Path(self._proc), os.getpid())
        # set by the daemon while memory is near or over a limit: read every process each tick
        self.urgent = False
        # reads done / skipped (cold) by the last read(): what the tiers save, for the bench
        self.last_reads = 0
        self.last_skipped = 0
        self._rescan_s = rescan_s
        self._clock = clock
        self._next_scan_s = 0.0
        self._known: set[int] = set()  # pids seen and judged (watched or not)
        self.watched: dict[int, Watched] = {}
        self._explicit: dict[int, tuple[str, str]] = {}  # pid -> (class, client)
        self._to_watch: set[int] = set()  # explicit pids the next read starts sampling
        self._to_unwatch: set[int] = set()  # pids the next read stops sampling
        # unwatched clients' entries, files still open, for a next lease (see _stop_watching)
        self._parked: dict[int, tuple[Watched, float]] = {}
        # settled unmatched pids -> (start time, name) when judged: checked again at each
        # listing, so one that execs into what a rule names is judged again (see rescan)
        self._unmatched: dict[int, tuple[int, str]] = {}

    def watch(self, pid: int, klass: str = "normal", client: str = "") -> None:
        """Sample ``pid`` from the next read on (a budget client), as ``klass`` and with
        ``edged.client`` = ``client``. Its /proc files are opened by that read, not here: a
        grant is answered without touching /proc, and a lease released before the next tick
        costs nothing. A pid that is gone by then is simply not sampled."""
        self._explicit[pid] = (klass, client)
        existing = self.watched.get(pid)
        if existing is not None:
            if (existing.klass, existing.client) != (klass, client):
                existing.klass, existing.client = klass, client
                existing.attributes_changed()
            return
        self._to_watch.add(pid)

    def unwatch(self, pid: int) -> None:
        """Stop sampling a pid added with :meth:`watch` from the next read on (rules may still
        match it). Like :meth:`watch`, nothing is done here: a client that releases its lease
        and asks for the next one between two ticks keeps its open /proc files."""
        self._explicit.pop(pid, None)
        self._to_watch.discard(pid)
        self._to_unwatch.add(pid)

    def _stop_watching(self, now_s: float) -> None:
        """Stop sampling the pids :meth:`unwatch` named since the last read, unless watched
        again. A budget client often asks for its next lease soon after it released one
        (per training step, per request): its entry is parked, files open, for
        ``PARK_S``, and a watch within that time takes it back without touching /proc.
        A parked process is not sampled; parked entries past their time are closed."""
        pending, self._to_unwatch = self._to_unwatch, set()
        for pid in pending:
            if pid in self._explicit:
                continue  # watched again meanwhile
            self._known.discard(pid)  # a rule may claim it at the next listing
            watched = self.watched.pop(pid, None)
            if watched is None:
                continue
            if len(self._parked) >= MAX_PARKED:
                watched.close()
                continue
            self._parked[pid] = (watched, now_s)
        if self._parked:
            for pid, (watched, since_s) in list(self._parked.items()):
                if now_s - since_s >= PARK_S or pid in self.watched:
                    del self._parked[pid]
                    if self.watched.get(pid) is not watched:
                        watched.close()

    def _path(self) -> Path:
        return Path(self._proc)

    def rule_counts(self) -> dict[int, int]:
        """How many watched processes each ``[[rules]]`` entry (by index) classifies now; an
        entry that classifies none is absent. Costs one pass over the watched processes:
        the daemon asks at most once a second."""
        counts: dict[int, int] = {}
        for w in self.watched.values():
            if w.rule is not None:
                counts[w.rule] = counts.get(w.rule, 0) + 1
        return counts

    def _add(
        self, info: ProcessInfo, klass: str, client: str = "", rule: int | None = None
    ) -> None:
        watched = Watched(info=info, klass=klass, client=client, rule=rule)
        if "\ufffd" not in info.name:  # else (not UTF-8) the first read sets it
            watched.comm = info.name.encode()
        watched.open(self._proc)
        self.watched[info.pid] = watched
        self._known.add(info.pid)

    def _uptime_ticks(self) -> float:
        """Seconds since boot, in clock ticks (the unit of a process's start time)."""
        try:
            with open(os.path.join(self._proc, "uptime"), "rb") as f:
                return float(f.read().split()[0]) * CLK_TCK
        except (OSError, ValueError, IndexError):
            return float("inf")  # unknown: treat every process as settled

    def hurry(self, within_s: float) -> None:
        """List /proc again within ``within_s`` (sooner than ``rescan_s``): under memory
        pressure the process that causes it may have started since the last listing."""
        self._next_scan_s = min(self._next_scan_s, self._clock() + within_s)

    def rescan(self) -> None:
        """List /proc and classify pids not seen before."""
        if self._mode == "none" and not self._explicit:
            return
        pids = {int(e) for e in os.listdir(self._proc) if e.isdigit()}
        self._known &= pids  # forget pids that are gone, so a reuse is judged again
        if self._unmatched:
            self._recheck_unmatched(pids)
        now_ticks: float | None = None
        for pid in pids - self._known:
            if self._mode == "none":
                self._known.add(pid)
                continue
            info = read_process_info(self._path(), pid)
            if info is None:
                self._known.add(pid)
                continue
            klass, rule = self._class_of(info)
            if klass is not None:
                self._known.add(pid)
                self._add(info, klass, rule=rule)
                continue
            # Unmatched. A process seen in its first moments may not be what it will be: a
            # fork not yet exec'd carries its parent's name and command line, and a program
            # may rename itself (prctl) as it starts. A young one is judged again at the next
            # listings until it is YOUNG_S old; an older one is settled.
            if now_ticks is None:
                now_ticks = self._uptime_ticks()
            if now_ticks - info.start_ticks >= YOUNG_S * CLK_TCK:
                self._known.add(pid)
                if self._has_rules:  # else nothing it becomes could match
                    self._unmatched[pid] = (info.start_ticks, info.name)

    def _recheck_unmatched(self, pids: set[int]) -> None:
        """Judge again, at this listing, the settled unmatched processes whose name changed
        since they were judged: a process started from a shell or a launcher was ``bash``
        when seen and may since have exec'd into what a rule names (a rename by prctl too).
        A changed start time is a reused pid: judged afresh as well."""
        for pid, (start_ticks, name) in list(self._unmatched.items()):
            if pid not in pids or pid in self.watched:  # gone, or watched meanwhile (a lease)
                del self._unmatched[pid]
                continue
            try:
                fd = os.open(f"{self._proc}/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    raw = os.read(fd, 4096)
                finally:
                    os.close(fd)
                comm, fields = parse_stat_fields(raw)
                changed = comm != name or int(fields[19]) != start_ticks
            except (OSError, ValueError, IndexError):
                changed = True  # gone since the listing: forgotten, not judged (no info)
            if changed:
                del self._unmatched[pid]
                self._known.discard(pid)  # judged again by the caller's loop

    def _class_of(self, info: ProcessInfo) -> tuple[str | None, int | None]:
        """(class, index of the rule that gave it): the first matching rule; else (mode
        "all") the built-in class or ``normal``; edged and its ancestors are critical whatever
        gave them a class. (None, None): not sampled (mode "rules", no rule matches)."""
        matched = self._classifier.classify_rule(info)
        klass, rule = matched if matched is not None else (None, None)
        if klass is None and self._mode == "all":
            klass = builtin_class(info) or "normal"
        if klass is not None and (info.pid, info.start_ticks) in self._ancestry:
            klass = "critical"
        return klass, rule

    def _scoped_class_of(self, info: ProcessInfo) -> tuple[str, int | None]:
        """A governed group's member is always sampled: rule, built-in, else normal."""
        matched = self._classifier.classify_rule(info)
        klass, rule = matched if matched is not None else (None, None)
        klass = klass or builtin_class(info) or "normal"
        if (info.pid, info.start_ticks) in self._ancestry:
            klass = "critical"
        return klass, rule

    def scan_scope(self, members: ScopeMembers, relist: bool = False) -> None:
        """Watch the governed group's new members and drop the processes that left it.
        ``relist`` lists the group tree again (a safety net on filesystems whose directory
        link counts do not follow their subdirectories)."""
        if relist:
            members.refresh()
        pids = members.pids()
        self.in_scope = frozenset(pids)
        for pid in [p for p in self.watched if p not in pids and p not in self._explicit]:
            self.watched.pop(pid).close()
        self._known &= pids
        for pid in pids - self._known:
            self._known.add(pid)
            if self._mode == "none":
                continue
            info = read_process_info(self._path(), pid)
            if info is None:
                continue
            klass, rule = self._scoped_class_of(info)
            self._add(info, klass, rule=rule)

    def _start_watching(self) -> None:
        """Open the /proc files of the pids :meth:`watch` named since the last read (or take
        back a parked entry: a client between two leases)."""
        pending, self._to_watch = self._to_watch, set()
        for pid in pending:
            explicit = self._explicit.get(pid)
            if explicit is None or pid in self.watched:
                continue
            parked = self._parked.pop(pid, None)
            if parked is not None:  # its stat read checks the start time: a reused pid drops
                watched = parked[0]
                if (watched.klass, watched.client) != explicit:
                    watched.klass, watched.client = explicit
                    watched.attributes_changed()
                watched.cpu_ticks = None  # no utilization across the time it was not read
                self.watched[pid] = watched
                self._known.add(pid)
                continue
            info = read_process_info(self._path(), pid)
            if info is None:  # gone before it was ever sampled
                self._explicit.pop(pid, None)
                continue
            # the class is the lease's; the rule it matches still counts as matching
            matched = self._classifier.classify_rule(info)
            self._add(info, explicit[0], explicit[1], rule=matched[1] if matched else None)

    def read(self) -> list[Reading]:
        now_s = self._clock()
        if self._to_unwatch or self._parked:
            self._stop_watching(now_s)
        if self._to_watch:
            self._start_watching()
        due = now_s >= self._next_scan_s
        if due:
            self._next_scan_s = now_s + self._rescan_s
        if self._members is not None:
            self.scan_scope(self._members, relist=due)
        elif due:
            self.rescan()
        out: list[Reading] = []
        gone: list[int] = []
        renamed: list[int] = []
        urgent = self.urgent
        skipped = 0
        for pid, w in self.watched.items():
            if not (urgent or w.hot or now_s - w.read_at_s >= w.cold_s or pid in self._explicit):
                out.extend(w.last)  # cold: its last readings stand (see the module docstring)
                skipped += 1
                continue
            try:
                raw = w.stat.read_bytes()
            except OSError as exc:
                if exc.errno in _GONE:
                    gone.append(pid)
                    continue
                raise
            if not raw:
                gone.append(pid)
                continue
            # fields after "(comm) ": state=0 ... utime=11 stime=12 ... starttime=19 ... rss=21
            close = raw.rindex(b")")
            fields = raw[close + 2 :].split(None, 22)
            if int(fields[19]) != w.info.start_ticks:  # pid reused by another process
                gone.append(pid)
                continue
            comm = raw[raw.index(b"(") + 1 : close]
            if comm != w.comm:
                if w.comm is not None:
                    # it exec'd or renamed itself: a fork seen before its exec carried its
                    # parent's name (and rule, and class); judge what it is now
                    renamed.append(pid)
                w.comm = comm
            rss_bytes = int(fields[21]) * PAGE_SIZE
            memory = Reading("process.memory.usage", float(rss_bytes), w.memory_attrs)
            utime, stime = int(fields[11]), int(fields[12])
            if w.cpu_ticks is not None and now_s > w.read_at_s:
                elapsed_ticks = (now_s - w.read_at_s) * USER_HZ
                user = max(0, utime - w.cpu_ticks[0]) / elapsed_ticks
                system = max(0, stime - w.cpu_ticks[1]) / elapsed_ticks
                w.last = (
                    memory,
                    Reading("process.cpu.utilization", user, w.user_attrs),
                    Reading("process.cpu.utilization", system, w.system_attrs),
                )
                # hot: large, growing, or busy (a CPU limit's victim is the top consumer)
                w.hot = (
                    rss_bytes >= HOT_BYTES
                    or rss_bytes - w.rss_bytes >= HOT_GROWTH_BYTES
                    or user + system >= HOT_CORES
                )
            else:  # a first read: the next tick reads it again, for its CPU utilization
                w.last = (memory,)
                w.hot = True
            out.extend(w.last)
            w.rss_bytes = rss_bytes
            w.cpu_ticks = (utime, stime)
            w.read_at_s = now_s
        for pid in gone:
            self.watched.pop(pid).close()
            self._explicit.pop(pid, None)
            self._known.discard(pid)  # a reused pid is judged afresh when it is seen again
        for pid in renamed:
            self._rejudge(pid)
        self.last_skipped = skipped
        self.last_reads = len(self.watched) - skipped
        return out

    def _rejudge(self, pid: int) -> None:
        """Classify a watched process again after its name changed (rare: exec, prctl)."""
        watched = self.watched[pid]
        info = read_process_info(self._path(), pid)
        if info is None or info.start_ticks != watched.info.start_ticks:
            return  # gone: the next read drops it
        watched.comm = None  # the next read takes the new name as it is spelled
        matched = self._classifier.classify_rule(info)
        watched.rule = matched[1] if matched is not None else None
        if pid in self._explicit:  # a budget client keeps the class it was given
            watched.info = info
            watched.attributes_changed()
            return
        klass, _rule = (
            self._scoped_class_of(info) if self._members is not None else self._class_of(info)
        )
        if klass is None:
            self.watched.pop(pid).close()  # no rule names it any more
            if self._has_rules:  # it may exec again into what a rule names
                self._unmatched[pid] = (info.start_ticks, info.name)
            return
        watched.info = info
        watched.klass = klass
        watched.attributes_changed()

    def close(self) -> None:
        for w in self.watched.values():
            w.close()
        self.watched.clear()
        for w, _ in self._parked.values():
            w.close()
        self._parked.clear()
        if self._members is not None:
            self._members.close()
